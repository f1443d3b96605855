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
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import InputError, SignalError
from ..execute import required_signals, run_stage
from ..flops import signal_flops
from ..pipeline import Pipeline
from ..reduction import Reduction
from ..registry import register_adapter
from ..signals import Signal
from ..strategy import DeferredCheck, ModelInfo
from ..trace import ForwardRecord
from .base import Handle, require_state
from .decoder import DecoderStage
from .internvl_layout import placeholder_runs, shuffle_factor, tiles_per_image, unit_signal
from .llava import LlavaAdapter, Placeholders
from .vision import VisionProbe, split_vision_signals

if TYPE_CHECKING:
    from ..apply import Run


@dataclass(frozen=True)
class NormedQK:
    """An InternViT attention module as `VisionProbe` reads it: its queries and keys after the
    optional qk-norm (`nn.Identity` when the tower has none), its heads and scale."""

    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    scale: float

    @classmethod
    def of(cls, attention: Any) -> NormedQK:
        return cls(attention.q_norm, attention.k_norm, attention.num_heads, attention.scale)


@register_adapter("internvl")
class InternVLAdapter(LlavaAdapter):
    """InternVL 2.5 / 3 (`InternVLForConditionalGeneration`): prunes each image's pixel-shuffled
    tokens across its tiles before the LLM; [CLS] scorers run on InternViT."""

    shares_encodings: ClassVar[bool] = False
    model_class: ClassVar[str] = "InternVLForConditionalGeneration"
    places: ClassVar[tuple[str, ...]] = ("projector", "llm")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        from transformers import InternVLForConditionalGeneration

        return isinstance(model, InternVLForConditionalGeneration)

    def _blocks(self) -> nn.ModuleList:
        return self.core.vision_tower.encoder.layer

    def _side(self) -> int:
        """Patches per side of one tile."""
        vision = self.config.vision_config
        return vision.image_size[0] // vision.patch_size[0]

    def info(self) -> ModelInfo:
        depth, layer = len(self._blocks()), self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise InputError(f"InternVL reads one vision_feature_layer, not {layer!r}")
        side = self._side() // shuffle_factor(self.config.downsample_ratio, self._side())
        return ModelInfo(
            vision_layers=depth,
            feature_layer=layer % (depth + 1) - 1 if layer % (depth + 1) else None,
            feature_index=layer,
            has_cls=True,
            grid=(side, side),
            llm_layers=self.config.text_config.num_hidden_layers,
        )

    def attach(self, pipeline: Pipeline, run: Run) -> list[Handle]:
        """Hooks: the probe on the InternViT blocks scorers read (every tile), and the sequence
        rewrite before the LLM, which prunes the projected units."""
        self._pipeline, self._run, self._prefill, self._encoded = pipeline, run, None, None
        self._info = self.info()
        if self.config.vision_feature_select_strategy != "default":
            raise InputError(
                f"the {self.name} adapter needs vision_feature_select_strategy='default' (the [CLS] feature dropped "
                "before the pixel shuffle, as InternVL does)"
            )
        self._projector_stages = [s for s in pipeline.stages if s.place.kind == "projector"]
        signals, unknown = split_vision_signals(required_signals(self._projector_stages, self._info))
        if unknown:
            raise SignalError(f"the {self.name} adapter cannot provide {unknown} before the LLM")
        blocks = self._blocks()
        self._probe = VisionProbe({s.layer: NormedQK.of(blocks[s.layer].attention) for s in signals}, signals)
        language_model = self.core.language_model
        self._encoder = None
        self._decoders = [
            DecoderStage(language_model.layers, language_model.norm, s, self._info)
            for s in pipeline.stages
            if s.place.kind == "llm"
        ]
        for before, after in zip(self._decoders, self._decoders[1:], strict=False):
            before.next = after
        handles: list[Handle] = list(self._probe.attach())
        for decoder in self._decoders:
            handles += decoder.attach()
        return handles + self._core_hooks()

    def _compress_prefill(self, kw: dict[str, Any], encoded: Any, placeholders: Placeholders) -> dict[str, Any]:
        """Encode the tiles unless `generate` already did, prune each image's units over its tiles
        (images of one tile count together), then shorten the prompt to what is kept."""
        self._refuse_feature_overrides(kw)
        if encoded is None:
            encoded = self.core.get_image_features(pixel_values=kw["pixel_values"], return_dict=True)
        units = getattr(encoded, "pooler_output", encoded)  # [T, U, D] projected units of every tile
        per_tile = units.shape[1]
        runs = placeholder_runs(placeholders.mask)
        tiles = tiles_per_image([n for _, n in runs], per_tile, units.shape[0])
        side = self._side()
        factor = shuffle_factor(self.config.downsample_ratio, side)
        probe = require_state(self._probe, "the vision probe")
        signals: dict[Signal, Tensor] = {s: unit_signal(v, side, factor) for s, v in probe.values().items()}
        stage = self._projector_stages[0] if self._projector_stages else None
        model_info = require_state(self._info, "the model info")
        deferred: list[DeferredCheck] = []
        firsts = [sum(tiles[:i]) for i in range(len(tiles))]
        groups: dict[int, list[int]] = {}  # images of one tile count run as one batch
        for i, n in enumerate(tiles):
            groups.setdefault(n, []).append(i)
        found: dict[int, dict[str, Any]] = {}
        for n, members in groups.items():
            rows = torch.tensor([firsts[i] + t for i in members for t in range(n)], device=units.device)
            tokens = units[rows].flatten(0, 1).view(len(members), n * per_tile, -1)  # [G, n * U, D]
            local = {
                s: v[rows].flatten(0, 1).view(len(members), n * per_tile, *v.shape[2:]) for s, v in signals.items()
            }
            info = replace(model_info, grid=model_info.grid if n == 1 else None)
            if stage is None:  # only llm:K stages: every unit reaches the LLM
                index = torch.arange(tokens.shape[1], device=tokens.device).expand(len(members), -1)
                reduction, scores = Reduction.drop(tokens, index), None
            else:
                reduction, scores = run_stage(stage, tokens, info, local, deferred)
            slots = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            slots.scatter_(1, reduction.index, True)
            counts = reduction.row_counts()  # a ragged row's padding repeats a kept index: the scatter holds
            for g, i in enumerate(members):
                found[i] = {
                    "slots": slots[g],
                    "features": reduction.tokens[g, : counts[g]],
                    "kept": reduction.index[g, : counts[g]],
                    "weights": None if reduction.weights is None else reduction.weights[g, : counts[g]],
                    "scores": None if scores is None else scores[g],
                    "tokens_in": tokens.shape[1],
                }
        results = [found[i] for i in range(len(tiles))]
        self._refuse_unequal_images([len(r["kept"]) for r in results], "tokens")
        comp, new_ids, new_image_mask, new_mask, image_sample = self._rewrite_per_image(
            kw, placeholders, results, deferred
        )
        text, vision = self.config.text_config, self.config.vision_config
        tokens_per_tile = side * side + 1  # [CLS] included
        self._record = ForwardRecord(
            stages=self._per_image_record(stage, results, image_sample),
            seq_len_in=comp.length_in,
            seq_len_out=comp.length_out,
            llm_shape=(text.hidden_size, text.intermediate_size, text.num_hidden_layers),
            scoring_flops=sum(signal_flops(s, tokens_per_tile, vision.hidden_size) for s in probe.signals)
            * sum(tiles)
            / kw["inputs_embeds"].shape[0],
            vision_tokens=[tokens_per_tile] * model_info.vision_layers,
            vision_shape=(vision.hidden_size, vision.intermediate_size, tokens_per_tile),
        )
        require_state(self._run, "the run").record(self._record)
        if self._decoders:
            columns = new_image_mask.nonzero()[:, 1].view(len(results), -1)
            self._begin_decoders(columns, image_sample, torch.stack([r["kept"] for r in results]), new_ids, new_mask)
        return kw
