"""Model adapters; importing this package registers the built-in ones."""

from .base import ModelAdapter, find_adapter
from .llava import LlavaAdapter

__all__ = ["LlavaAdapter", "ModelAdapter", "find_adapter"]
