"""InternVL adapter (`InternVLForConditionalGeneration`, transformers' own port of InternVL 2.5 / 3):
prunes each image's pixel-shuffled tokens, across all its tiles, before the LLM.

What a kept token is: one **unit**, an LLM token, i.e. one `2x2` patch group of one tile after
HF's pixel shuffle (`f x f` for `downsample_ratio = 1/f`; see `tokenprune.adapters.internvl_layout`).
Units are never split: a stage keeps or drops (or merges) whole units.

* Signals: InternViT has a [CLS] token, so `vtc-cls`, `vtc-cls-ensemble`, `fastervlm`, `prumerge`,
  `visionzip` and `fopru` run. The probe reads each block's queries and keys after InternViT's
  optional qk-norm, which is what its attention uses. A unit's attention score is the **sum** over
  its patches (the [CLS] attention mass its 2x2 patches receive: each tile's [CLS] row still sums
  to at most 1); its key is the **mean** of its patches' keys. Every unit covers the same number
  of patches, so sum or mean give one ranking; the sum keeps `@mass(p)` budgets meaning attention
  mass.
* Tiles: the processor cuts an image into up to `max_patches` 448-px tiles plus a thumbnail (last),
  each encoded on its own; the model never learns the tile counts, so the adapter reads them from
  the prompt: an image is one run of `<IMG_CONTEXT>` tokens (`tiles x image_seq_length`, between
  `<img>` and `</img>`), in the order of `pixel_values`. That costs one host sync per prefill.
* Budget per image across its tiles (thumbnail included), as LLaVA-NeXT's across its crops: `k`
  units, a ratio of the image's units, or a budget rule on its scores; with `topk` that is
  allocation by global score over the tiles. Images with the same tile count run as one batch.
  Grid selectors (`pool`, `uniform`) get the unit grid of a single-tile image; over several tiles
  they work in raster order (tile by tile).
* Trace provenance: `kept` holds each output's `tile * U + unit` within its image (`U` units per
  tile, tiles in the processor's order, thumbnail last).
* Places: `projector` (after the pixel shuffle and the MLP projector; a unit's projection depends
  on that unit alone, so drops are the same before or after it; merges average projected units) and
  `llm:K` (the LLM is a Qwen2 / Llama-style decoder). Not `vision:L`: pixel shuffle needs every
  tile's full patch grid.
* Positions: 1D, as for LLaVA (`positions` option of `tp.apply`).

The family is data for the engine (`tokenprune.adapters.engine`): the `INTERNVL` record (InternViT's
layout: blocks at `encoder.layer`, attention at `attention`, [CLS] at `embeddings.cls_token`, q/k read
after `q_norm`/`k_norm`) and the `PixelShuffle` packing below.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from ..checks import DeferredCheck
from ..errors import InputError
from ..flops import signal_flops
from ..pipeline import Stage
from ..registry import register_adapter
from ..signals import Signal
from ..strategy import ModelInfo
from .engine import Engine, ImageTokens
from .family import Family, Layout
from .internvl_layout import placeholder_runs, shuffle_factor, tiles_per_image, unit_signal
from .packing import ImagePass, _encode, _reduce, per_image

if TYPE_CHECKING:
    from torch import Tensor


def _tile_side(engine: Engine) -> int:
    """Patches per side of one tile."""
    vision = engine.config.vision_config
    return vision.image_size[0] // vision.patch_size[0]


@dataclass(frozen=True)
class PixelShuffle:
    """InternVL packing: each tile's `S x S` patches ([CLS] dropped) pixel-shuffled into `(S/f)^2`
    units, one LLM token each; an image is the units of its tiles, in tile order. Stages run per image
    over all its tiles (images of one tile count as one batch), with per-unit signals."""

    shares_encodings: bool = False
    unequal: str = "tokens"

    def grid(self, engine: Engine) -> tuple[int, int] | None:
        side = _tile_side(engine)
        units = side // shuffle_factor(engine.config.downsample_ratio, side)
        return units, units

    def check(self, engine: Engine, stages: list[Stage], info: ModelInfo) -> None:
        if engine.config.vision_feature_select_strategy != "default":
            raise InputError(
                f"the {engine.name} adapter needs vision_feature_select_strategy='default' (the [CLS] feature "
                "dropped before the pixel shuffle, as InternVL does)"
            )

    def attach(self, engine: Engine) -> list[Any]:
        return []

    def prune(self, engine: Engine, kw: dict[str, Any], encoded: Any) -> ImageTokens:
        """Encode the tiles unless `generate` already did, read each image's tile count from its
        placeholder run, and prune each image's units over its tiles."""
        features = _encode(engine, kw, encoded)
        units = getattr(features, "pooler_output", features)  # [T, U, D] every tile's units
        per_tile = units.shape[1]
        image_mask = kw["input_ids"] == getattr(engine.config, engine.family.layout.image_token)
        tiles = tiles_per_image([n for _, n in placeholder_runs(image_mask)], per_tile, units.shape[0])
        side = _tile_side(engine)
        factor = shuffle_factor(engine.config.downsample_ratio, side)
        state = engine.state
        signals: dict[Signal, Tensor] = {s: unit_signal(v, side, factor) for s, v in state.probe.values().items()}
        stage = state.projector_stages[0] if state.projector_stages else None
        deferred: list[DeferredCheck] = []
        firsts = [sum(tiles[:i]) for i in range(len(tiles))]
        groups: dict[int, list[int]] = {}  # images of one tile count run as one batch
        for i, n in enumerate(tiles):
            groups.setdefault(n, []).append(i)
        by_image: dict[int, ImagePass] = {}
        for n, members in groups.items():
            rows = torch.tensor([firsts[i] + t for i in members for t in range(n)], device=units.device)
            tokens = units[rows].reshape(len(members), n * per_tile, -1)  # [G, n * U, D]
            local = {s: v[rows].reshape(len(members), n * per_tile, *v.shape[2:]) for s, v in signals.items()}
            info = replace(state.info, grid=state.info.grid if n == 1 else None)
            reduction, scores = _reduce(stage, tokens, info, local, deferred)
            slots = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            slots.scatter_(1, reduction.index, True)
            counts = reduction.row_counts()  # a ragged row's padding repeats a kept index: the scatter holds
            for g, i in enumerate(members):
                by_image[i] = ImagePass(
                    slots=slots[g],
                    features=reduction.tokens[g, : counts[g]],
                    llm_tokens=slots.new_ones(counts[g]),
                    tokens_in=tokens.shape[1],
                    kept=reduction.index[g, : counts[g]],
                    weights=None if reduction.weights is None else reduction.weights[g, : counts[g]],
                    scores=None if scores is None else scores[g],
                )
        vision = engine.config.vision_config
        per_tile_tokens = side * side + 1  # [CLS] included
        return per_image(
            stage,
            [by_image[i] for i in range(len(tiles))],
            deferred,
            scoring_flops=sum(signal_flops(s, per_tile_tokens, vision.hidden_size) for s in state.probe.signals)
            * sum(tiles),
            vision_tokens=[per_tile_tokens] * (state.info.vision_layers or 0),
            vision_shape=(vision.hidden_size, vision.intermediate_size, per_tile_tokens),
        )


INTERNVL = Family(
    model_classes=("InternVLForConditionalGeneration",),
    packing=PixelShuffle(),
    layout=Layout(
        blocks=("encoder.layer",),
        attention="attention",
        embeddings=("embeddings",),
        cls_token="cls_token",
        query="q_norm",  # InternViT's attention uses q/k after its optional qk-norm (nn.Identity without)
        key="k_norm",
    ),
    ragged_places=("projector",),
    feature_keys=("vision_feature_layer", "vision_feature_select_strategy"),
)


@register_adapter("internvl")
class InternVLAdapter(Engine):
    """InternVL 2.5 / 3 (`InternVLForConditionalGeneration`): prunes each image's pixel-shuffled
    tokens across its tiles before the LLM; [CLS] scorers run on InternViT."""

    family = INTERNVL
