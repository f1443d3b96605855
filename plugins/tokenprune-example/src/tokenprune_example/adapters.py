"""Adapter of the example plugin; importing this module registers it.

VipLLaVA (`VipLlavaForConditionalGeneration`) is LLaVA-1.5 with a projector that reads several CLIP
blocks' patch features concatenated, `[I, N, D * len(vision_feature_layer)]`, and never the [CLS]
feature. Everything else (tower, placeholder tokens, Llama decoder) is LLaVA's, so the adapter
subclasses tokenprune's LLaVA adapter and overrides only what differs.
"""

from typing import ClassVar

from torch import nn

import tokenprune as tp
from tokenprune.adapters.llava import LlavaAdapter


@tp.register_adapter("example-vipllava")
class VipLlavaAdapter(LlavaAdapter):
    """VipLLaVA (plugin example): prunes before the projector and inside the LLM, like LLaVA-1.5."""

    model_class: ClassVar[str] = "VipLlavaForConditionalGeneration"
    feature_keys: ClassVar[tuple[str, ...]] = ("vision_feature_layer",)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        from transformers import VipLlavaForConditionalGeneration

        return isinstance(model, VipLlavaForConditionalGeneration)

    def features_keep_cls(self) -> bool:
        return False
