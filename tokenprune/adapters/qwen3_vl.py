"""Qwen3-VL adapter (`Qwen3VLForConditionalGeneration`): Qwen2-VL's pruning of each image's merged
tokens before the LLM, plus its DeepStack features kept aligned with them.

* DeepStack: the tower hands the LLM, besides each image's merged tokens, one more merged feature
  per unit from each of `n = len(deepstack_visual_indexes)` tower blocks (each block's own merger);
  the LLM adds layer `i`'s features to the hidden states of the image tokens after decoder layer
  `i` (`i < n`). A projector stage prunes them with the same kept units as the main tokens, image
  by image (`deepstack_kept`: gathered at the kept units, or a merged token's provenance weights
  applied to them), and the LLM adds them at the kept image tokens' columns of the shortened prompt.
* The adapter adds them itself (`DeepStackInjection`, a forward hook on decoder layers `0..n-1`,
  the same arithmetic as HF's), so that an `llm:K` stage with `K < n` prunes them with the image
  tokens it prunes (gathered at the kept ones, or merged by the stage's weights): the layers after
  it add each kept token's own features at its new column, and pruned tokens get none.
* Positions: as Qwen2-VL, the kept units keep their original M-RoPE positions (the model's own
  `get_rope_index` over the full prompt, gathered at the kept columns).
* No [CLS] (Qwen's ViT): [CLS]-based scorers are refused, as on Qwen2-VL; no vision signals yet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..pipeline import Pipeline
from ..reduction import Reduction
from ..registry import register_adapter
from ..strategy import DeferredCheck
from .base import Handle
from .decoder import ImageLayout
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


class DeepStackInjection:
    """One prefill's DeepStack features on the LLM's columns, added after decoder layers `0..n-1`
    and pruned by `llm:K` stages like the hidden states.

    Attributes:
        mask: `[B, S]` bool, the image tokens' columns in the current sequence.
        dense: per DeepStack layer `[B, S, D]`, each image token's features at its column (zero elsewhere).
    """

    def __init__(self, mask: Tensor, features: Sequence[Tensor]) -> None:
        """`mask` `[B, S]` the shortened prompt's image columns; `features` per layer `[M, D]` in their
        row-major order (`deepstack_kept`)."""
        self.mask = mask
        on_mask = [f.to(mask.device) for f in features]
        self.dense = [f.new_zeros(*mask.shape, f.shape[-1]).masked_scatter(mask[..., None], f) for f in on_mask]

    def add(self, layer: int, hidden: Tensor) -> Tensor:
        """`hidden` `[B, S, D]` after decoder layer `layer` plus that layer's features at the image
        columns (as HF's `_deepstack_process` adds them, on a copy)."""
        mask = self.mask.to(hidden.device)
        hidden = hidden.clone()
        hidden[mask, :] = hidden[mask, :] + self.dense[layer].to(hidden.device, hidden.dtype)[mask, :]
        return hidden

    def prune(self, comp: Compaction, layout: ImageLayout, reduction: Reduction, columns: Tensor) -> None:
        """An `llm:K` stage shortened the sequence (`comp`) and reduced the image tokens at
        `layout.positions` to `reduction`'s, now at `columns` `[I, k]`: the features follow them."""
        rows = layout.rows[:, None]
        self.mask = comp.gather(self.mask, False)
        for i, dense in enumerate(self.dense):
            before = dense[rows, layout.positions]  # [I, n, D] the stage's input tokens' features
            after = (
                before.gather(1, reduction.index[..., None].expand(-1, -1, before.shape[-1]))
                if reduction.weights is None
                else reduction.weights.to(before.dtype) @ before
            )
            dense = comp.gather(dense)
            dense[rows, columns] = after
            self.dense[i] = dense


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
        self._injection: DeepStackInjection | None = None

    def attach(self, pipeline: Pipeline, run: Run) -> list[Handle]:
        """Qwen2-VL's hooks, and one per DeepStack layer that adds the kept features."""
        self._deepstack, self._injection = [], None
        handles = super().attach(pipeline, run)
        for decoder in self._decoders:
            decoder.on_prune = self._prune_deepstack
        layers = self.core.language_model.layers
        injected = len(self.config.vision_config.deepstack_visual_indexes)
        return handles + [layers[i].register_forward_hook(self._add_deepstack(i, injected)) for i in range(injected)]

    def _before_core(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        self._deepstack, self._injection = [], None  # nothing from a forward that failed half-way
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
        """Qwen2-VL's rewrite; the kept units' DeepStack features go to the new image columns."""
        out = super()._rewrite_per_image(kw, placeholders, results, deferred)
        features = deepstack_kept(self._deepstack, [r["kept"] for r in results], [r["weights"] for r in results])
        self._deepstack, self._injection = [], DeepStackInjection(out[2], features)
        return out

    def _prune_deepstack(self, comp: Compaction, layout: ImageLayout, reduction: Reduction, columns: Tensor) -> None:
        if self._injection is not None:  # None: the stage runs after the last DeepStack layer
            self._injection.prune(comp, layout, reduction, columns)

    def _add_deepstack(self, layer: int, injected: int) -> Callable[[nn.Module, tuple, Tensor], Tensor | None]:
        """Forward hook of decoder layer `layer` (of the first `injected`): add the prefill's features."""

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            injection = self._injection
            if injection is None:
                return None
            if layer == injected - 1:
                self._injection = None
            return injection.add(layer, output)

        return hook
