"""Model adapters; importing this package registers the built-in ones."""

from .base import ModelAdapter, find_adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter

__all__ = ["LlavaAdapter", "LlavaNextAdapter", "LlavaOnevisionAdapter", "ModelAdapter", "find_adapter"]
