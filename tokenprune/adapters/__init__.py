"""Model adapters; importing this package registers the built-in ones."""

from .base import ModelAdapter, find_adapter
from .engine import Engine
from .family import Family, Layout
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter

__all__ = [
    "Engine",
    "Family",
    "Gemma3Adapter",
    "InternVLAdapter",
    "Layout",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "ModelAdapter",
    "Qwen2VLAdapter",
    "Qwen3VLAdapter",
    "find_adapter",
]
