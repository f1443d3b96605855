"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP-style tower with [CLS], an MLP projector and a
decoder-only LLM; each image is one block of placeholder tokens (`Plain` packing). Stages run inside
the tower (`vision:L`), before the projector (budget rules too) and inside the LLM (`llm:K`)."""

from __future__ import annotations

from ..registry import register_adapter
from .engine import Engine
from .family import Family
from .packing import Plain

LLAVA = Family(
    model_classes=("LlavaForConditionalGeneration",),
    packing=Plain(),
    places=("vision", "projector", "llm"),
    ragged_places=("projector",),
    feature_keys=("vision_feature_layer", "vision_feature_select_strategy"),
    keeps_cls=lambda config: config.vision_feature_select_strategy == "full",
)


@register_adapter("llava")
class LlavaAdapter(Engine):
    """LLaVA-1.5: prunes inside the vision encoder, before the projector and inside the LLM."""

    family = LLAVA
