"""Model adapters; importing this package registers the built-in ones."""

from .base import ModelAdapter, find_adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter

__all__ = ["LlavaAdapter", "LlavaNextAdapter", "ModelAdapter", "find_adapter"]
