"""Qwen3-VL adapter (`Qwen3VLForConditionalGeneration`): Qwen2-VL's pruning of each image's merged
tokens before the LLM, plus its DeepStack features kept aligned with them.

* DeepStack: the tower hands the LLM, besides each image's merged tokens, one more merged feature
  per unit from each of `n = len(deepstack_visual_indexes)` tower blocks (each block's own merger);
  the LLM adds layer `i`'s features to the hidden states of the image tokens after decoder layer
  `i` (`i < n`). A projector stage prunes them with the same kept units as the main tokens, image
  by image (`deepstack_kept`: gathered at the kept units, or a merged token's provenance weights
  applied to them), and the LLM adds them at the kept image tokens' columns of the shortened prompt.
* Positions: as Qwen2-VL, the kept units keep their original M-RoPE positions (the model's own
  `get_rope_index` over the full prompt, gathered at the kept columns).
* `llm:K` stages need `K >= n`: they prune after the last DeepStack addition. An earlier `K` would
  prune tokens that later layers still add DeepStack features to; it is refused (`check_deepstack_layers`).
* No [CLS] (Qwen's ViT): [CLS]-based scorers are refused, as on Qwen2-VL; no vision signals yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import PlaceError
from ..pipeline import Pipeline, Stage
from ..registry import register_adapter
from ..strategy import DeferredCheck
from .base import Handle
from .llava import Placeholders
from .qwen2_vl import Qwen2VLAdapter
from .sequence import Compaction

if TYPE_CHECKING:
    from ..apply import Run


def deepstack_kept(
    deepstack: Sequence[Sequence[Tensor]], kept: Sequence[Tensor], weights: Sequence[Tensor | None]
) -> list[Tensor]:
    """Each DeepStack layer's features at the kept units, images concatenated in prompt order (the
    order in which the LLM's image columns take them).

    Args:
        deepstack: per DeepStack layer, per image `[N_i, D]` (HF's `deepstack_features`).
        kept: per image `[k_i]` long, the kept units (the main tokens' `Reduction.index` rows).
        weights: per image `[k_i, N_i]` provenance weights of merged tokens, or `None` for a drop.
    Returns:
        per DeepStack layer `[sum k_i, D]`: a dropped image's rows gathered at its kept units, a
        merged image's rows its weights times its features (as the main tokens were merged).
    """
    return [
        torch.cat(
            [
                features[index] if w is None else w.to(features.dtype) @ features
                for features, index, w in zip(layer, kept, weights, strict=True)
            ]
        )
        for layer in deepstack
    ]


def check_deepstack_layers(stages: Sequence[Stage], injected: int) -> None:
    """Refuse an `llm:K` stage that prunes before the LLM's last DeepStack addition.

    Args:
        stages: the pipeline's stages.
        injected: the decoder layers after which DeepStack features are added (`0..injected-1`).

    Raises:
        PlaceError: a stage at `llm:K` with `K < injected`.
    """
    for stage in stages:
        if stage.place.kind == "llm" and stage.place.layer < injected:
            raise PlaceError(
                f"stage {stage.to_spec()!r}: Qwen3-VL adds DeepStack vision features to the image tokens after "
                f"decoder layers 0..{injected - 1}, so llm:K stages need K >= {injected} (pruning earlier would "
                f"drop tokens those layers still add to); use @llm:{injected} or later, or a projector stage"
            )


@register_adapter("qwen3-vl")
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: prunes each image's merged tokens and DeepStack features with the same kept units."""

    model_class: ClassVar[str] = "Qwen3VLForConditionalGeneration"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        from transformers import Qwen3VLForConditionalGeneration

        return isinstance(model, Qwen3VLForConditionalGeneration)

    def __init__(self, model: nn.Module, positions: str = "contiguous") -> None:
        super().__init__(model, positions)
        self._deepstack: Sequence[Sequence[Tensor]] = []  # the prefill's features, per layer and image
        self._inject: tuple[Tensor, list[Tensor]] | None = None  # the LLM's visual mask, kept features

    def _injected_layers(self) -> int:
        return len(self.config.vision_config.deepstack_visual_indexes)

    def check(self, pipeline: Pipeline) -> None:
        super().check(pipeline)
        check_deepstack_layers(pipeline.stages, self._injected_layers())

    def attach(self, pipeline: Pipeline, run: Run) -> list[Handle]:
        """Qwen2-VL's hooks, and one that hands the LLM the kept DeepStack features."""
        check_deepstack_layers(pipeline.stages, self._injected_layers())
        self._deepstack, self._inject = [], None
        handles = super().attach(pipeline, run)
        language_model = self.core.language_model
        return handles + [language_model.register_forward_pre_hook(self._before_language_model, with_kwargs=True)]

    def _before_core(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        self._deepstack, self._inject = [], None  # nothing from a forward that failed half-way
        return super()._before_core(module, args, kwargs)

    def _compress_prefill(self, kw: dict[str, Any], encoded: Any, placeholders: Placeholders) -> dict[str, Any]:
        """Encode the images unless `generate` already did, keep their DeepStack features for the
        rewrite, then Qwen2-VL's pruning and prompt rewrite."""
        if encoded is None:
            encoded = self.core.get_image_features(
                pixel_values=kw["pixel_values"], image_grid_thw=self._image_grid(kw), return_dict=True
            )
        self._deepstack = encoded.deepstack_features
        return super()._compress_prefill(kw, encoded, placeholders)

    def _rewrite_per_image(
        self,
        kw: dict[str, Any],
        placeholders: Placeholders,
        results: list[dict[str, Any]],
        deferred: list[DeferredCheck],
    ) -> tuple[Compaction, Tensor, Tensor, Tensor | None, list[int]]:
        """Qwen2-VL's rewrite; the kept units' DeepStack features go to the LLM at the new image columns."""
        out = super()._rewrite_per_image(kw, placeholders, results, deferred)
        features = deepstack_kept(self._deepstack, [r["kept"] for r in results], [r["weights"] for r in results])
        self._deepstack, self._inject = [], (out[2], features)
        return out

    def _before_language_model(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        """The prefill's LLM call: the shortened prompt's image mask `[B, P']` and the kept DeepStack
        features (per layer `[M, D]`) replace HF's (none: the prompt reaches the core as embeddings)."""
        if self._inject is None:
            return None
        (mask, features), self._inject = self._inject, None
        return args, kwargs | {"visual_pos_masks": mask, "deepstack_visual_embeds": features}
