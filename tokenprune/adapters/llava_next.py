"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, anyres): prunes each image's packed tokens before
the LLM (`Anyres` packing).

HF packs an image as the base image's `P` patch tokens, then the high-resolution crops tiled into one
grid, unpadded to the image's aspect ratio, with an `image_newline` token ending each grid row. The
budget applies per image over all its crops (`k` tokens, a ratio of its non-newline tokens, or a
budget rule on its scores): with `topk` that is allocation by global score, each crop's [CLS] row
summing to at most 1. A row's newline token stays while the row keeps a token (the base image has
none); `kept` records each output's `crop * P + patch` (crop 0 is the base image), in packed order.

Places: `projector` and `llm:K` (a stage inside the tower would break the crops' grids). In the LLM,
the kept patch tokens are the image tokens (newline tokens stay, like text), and every image must
reach the stage with the same number of them, else the stage is refused.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..registry import register_adapter
from .engine import Engine
from .family import Family
from .packing import Anyres


def pack(engine: Any, features: list[Tensor], image_sizes: Tensor, newline: Tensor) -> list[Tensor]:
    """HF's packing of per-image crop features `[crops, P, C]` with `newline` `[C]`."""
    return engine.core.pack_image_features(features, image_sizes, "default", image_newline=newline)[0]


def crops(engine: Any, sizes: Tensor, arguments: dict[str, Any]) -> list[int]:
    """Crops the tower encoded per image (anyres tiles plus the base image)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = engine.config
    return [
        image_size_to_num_patches(
            image_size=s, grid_pinpoints=config.image_grid_pinpoints, patch_size=config.vision_config.image_size
        )
        for s in sizes.tolist()
    ]


LLAVA_NEXT = Family(
    model_classes=("LlavaNextForConditionalGeneration",),
    packing=Anyres(pack=pack, crops=crops),
    feature_keys=("vision_feature_layer", "vision_feature_select_strategy"),
    keeps_cls=lambda config: config.vision_feature_select_strategy == "full",
)


@register_adapter("llava-next")
class LlavaNextAdapter(Engine):
    """LLaVA-NeXT: prunes each image's packed crops before the LLM."""

    family = LLAVA_NEXT
