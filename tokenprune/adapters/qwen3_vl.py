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
* On the engine: a `Family` record with `DeepStackMerged`, Qwen2-VL's `Merged` packing plus the
  DeepStack hooks; positions are `MRope`.
* Positions: as Qwen2-VL, the kept units keep their original M-RoPE positions (the model's rule
  for images over the full prompt, computed on the device by `mrope.rope_index`, gathered at the
  kept columns). Videos are refused.
* No [CLS] (Qwen's ViT): [CLS]-based scorers are refused, as on Qwen2-VL; no vision signals yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..reduction import Reduction
from ..registry import register_adapter
from .base import require_state
from .decoder import ImageLayout
from .engine import Engine
from .family import Family, Layout, resolve
from .mrope import MRope
from .packing import Merged
from .providers import DECODER
from .sequence import Compaction

if TYPE_CHECKING:
    from .engine import ImageTokens


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


_MEMO = "deepstack"  # the engine's per-context memo key: a `_Pending` or a `DeepStackInjection`


@dataclass(frozen=True)
class _Pending:
    """A prefill's kept DeepStack features before the prompt rewrite: `placeholders` `[B, P]` bool, the
    original prompt's image placeholders; `features` per layer `[M, D]` in kept-slot order; `kept`
    the kept units per image (`M = sum(kept)`)."""

    placeholders: Tensor
    features: list[Tensor]
    kept: list[int]

    def in_order(self, order: list[int] | None) -> list[Tensor]:
        """`features` of the images in `order` (the engine's, where `generate` made copies of each
        prompt: each copy gets its prompt's images), or as they are for `None`."""
        if order is None:
            return self.features
        return [torch.cat([layer.split(self.kept)[i] for i in order]) for layer in self.features]


@dataclass(frozen=True)
class DeepStackMerged(Merged):
    """Qwen2-VL's `Merged` packing, plus Qwen3-VL's DeepStack features: each image's are pruned with
    the units its main tokens keep, and added after decoder layers `0..n-1` at the kept columns
    (pruned alike by `llm:K` stages that run before the last of those layers)."""

    def attach(self, engine: Engine) -> list[Any]:
        llm: Any = resolve(engine.core, engine.family.layout.llm)
        injected = len(engine.config.vision_config.deepstack_visual_indexes)
        for decoder in engine.state.decoders:
            decoder.on_prune = partial(self._prune_llm, engine)
        return [
            *super().attach(engine),
            # before the engine's own pre-hook: nothing from a forward that failed half-way
            engine.core.register_forward_pre_hook(lambda module, args: engine.memo.pop(_MEMO, None)),
            *(llm.layers[i].register_forward_hook(partial(self._add, engine, i, injected)) for i in range(injected)),
        ]

    def prune(self, engine: Engine, kw: dict[str, Any], encoded: Any) -> ImageTokens:
        """Encode the images unless `generate` did (keeping their DeepStack features), run `Merged`'s
        pruning, and keep each image's DeepStack features at its kept units for the LLM."""
        grid = engine.image_argument(kw, "image_grid_thw")
        if encoded is None and grid is not None:  # without a grid, `Merged.prune` refuses clearly
            encoded = engine.core.get_image_features(
                pixel_values=kw["pixel_values"], image_grid_thw=grid, return_dict=True
            )
        images = super().prune(engine, kw, encoded)
        weights = images.records[0].weights if images.records else None
        features = deepstack_kept(encoded.deepstack_features, images.origin, weights or [None] * len(images.origin))
        placeholders = kw["input_ids"] == getattr(engine.config, engine.family.layout.image_token)
        engine.memo[_MEMO] = _Pending(placeholders, features, [len(index) for index in images.origin])
        return images

    @staticmethod
    def _injection(engine: Engine) -> DeepStackInjection | None:
        """The prefill's DeepStack features on the LLM's columns (placed on first use, once the
        prompt rewrite has made its compaction); `None` outside a prefill."""
        state = engine.memo.get(_MEMO)
        if isinstance(state, _Pending):
            comp = require_state(engine.prefill, "the prefill").compaction
            features = state.in_order(engine.order)
            state = engine.memo[_MEMO] = DeepStackInjection(comp.gather(state.placeholders, False), features)
        return state

    def _prune_llm(
        self, engine: Engine, comp: Compaction, layout: ImageLayout, reduction: Reduction, columns: Tensor
    ) -> None:
        """`DecoderStage.on_prune`: an `llm:K` stage before the last DeepStack layer prunes them too."""
        injection = self._injection(engine)
        if injection is not None:
            injection.prune(comp, layout, reduction, columns)

    def _add(self, engine: Engine, layer: int, injected: int, module: nn.Module, args: tuple, output: Tensor) -> Any:
        """Forward hook of decoder layer `layer` (one of the first `injected`): add its features."""
        injection = self._injection(engine)
        if injection is None:
            return None
        if layer == injected - 1:
            engine.memo.pop(_MEMO, None)
        return injection.add(layer, output)


QWEN3_VL = Family(
    model_classes=("Qwen3VLForConditionalGeneration",),
    packing=DeepStackMerged(),
    layout=Layout(tower=("visual",), blocks=("blocks",), attention="attn", embeddings=(), feature_layer=None),
    positions=MRope(),
    ragged_places=("projector",),
    providers=(DECODER,),  # no vision signals yet: DeepStack's tower is not read
)


@register_adapter("qwen3-vl")
class Qwen3VLAdapter(Engine):
    """Qwen3-VL: prunes each image's merged tokens and DeepStack features with the same kept units."""

    family = QWEN3_VL
