"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): the LLaVA-NeXT treatment
(`tokenprune.adapters.llava_next`) on a SigLIP tower, which has no [CLS] token.

* [CLS]-based scorers (`vtc-cls`, `vtc-cls-ensemble`, `fastervlm`, `prumerge`, `visionzip`) are
  refused, naming what runs instead: score-free selectors (`divprune`, `tome`, `pool`, `uniform`),
  `random`, and `fopru` (patch-to-patch attention, no [CLS] needed). No substitute score is made up.
* `anyres_max_9`: HF downsamples (bilinear) the grid of an image larger than the allowance; those
  tokens' provenance is the nearest patch.
* Multi-image prompts (`batch_num_images` > 1) encode each image as one crop, as HF does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from ..registry import register_adapter
from . import llava_next
from .engine import Engine
from .packing import Anyres
from .providers import DECODER, QK_PATCHES


def pack(engine: Any, features: list[Tensor], image_sizes: Tensor, newline: Tensor) -> list[Tensor]:
    aspect = engine.config.vision_aspect_ratio
    return engine.core.pack_image_features(features, image_sizes, image_newline=newline, vision_aspect_ratio=aspect)[0]


def crops(engine: Any, sizes: Tensor, arguments: dict[str, Any]) -> list[int]:
    per_prompt = arguments.get("batch_num_images")
    tiled = [True] * len(sizes) if per_prompt is None else [int(n) == 1 for n in per_prompt for _ in range(int(n))]
    anyres = llava_next.crops(engine, sizes, arguments)
    return [n if tile else 1 for n, tile in zip(anyres, tiled, strict=False)]


LLAVA_ONEVISION = replace(
    llava_next.LLAVA_NEXT,
    model_classes=("LlavaOnevisionForConditionalGeneration",),
    packing=Anyres(pack=pack, crops=crops),
    feature_keys=("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"),
    providers=(QK_PATCHES, DECODER),  # SigLIP: no [CLS] row
)


@register_adapter("llava-onevision")
class LlavaOnevisionAdapter(Engine):
    """LLaVA-OneVision: prunes each image's packed crops before the LLM; its SigLIP tower has no [CLS] token."""

    family = LLAVA_ONEVISION
