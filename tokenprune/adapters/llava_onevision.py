"""LLaVA-OneVision adapter (`LlavaOnevisionForConditionalGeneration`): the LLaVA-NeXT treatment
(`tokenprune.adapters.llava_next`) on a SigLIP tower, which has no [CLS] token.

* [CLS]-based scorers (`vtc-cls`, `vtc-cls-ensemble`, `fastervlm`, `prumerge`, `visionzip`) are
  refused, naming what runs instead: score-free selectors (`divprune`, `tome`, `pool`, `uniform`),
  `random`, and `fopru` (patch-to-patch attention, no [CLS] needed). No substitute score is made up.
* `anyres_max_9`: HF downsamples (bilinear) the grid of an image larger than the allowance; those
  tokens' provenance is the nearest patch.
* Multi-image prompts (`batch_num_images` > 1) encode each image as one crop, as HF does.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from ..registry import register_adapter
from .llava_next import LlavaNextAdapter


@register_adapter("llava-onevision")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): prunes each image's packed crops
    before the LLM; its SigLIP tower has no [CLS] token."""

    model_class: ClassVar[str] = "LlavaOnevisionForConditionalGeneration"
    feature_keys: ClassVar[tuple[str, ...]] = (
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "vision_aspect_ratio",
    )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        from transformers import LlavaOnevisionForConditionalGeneration

        return isinstance(model, LlavaOnevisionForConditionalGeneration)

    def pack(self, features: list[Tensor], image_sizes: Tensor, newline: Tensor) -> list[Tensor]:
        return self.core.pack_image_features(
            features, image_sizes, image_newline=newline, vision_aspect_ratio=self.config.vision_aspect_ratio
        )[0]

    def crops(self, sizes: Tensor, arguments: dict[str, Any]) -> list[int]:
        per_prompt = arguments.get("batch_num_images")
        tiled = [True] * len(sizes) if per_prompt is None else [int(n) == 1 for n in per_prompt for _ in range(int(n))]
        anyres = super().crops(sizes, arguments)
        return [n if tile else 1 for n, tile in zip(anyres, tiled, strict=False)]
