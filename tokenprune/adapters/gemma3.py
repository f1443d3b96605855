"""Gemma 3 (`Gemma3ForConditionalGeneration`): prunes each image's pooled soft tokens before the LLM
(`Pooled` packing); the LLM's bidirectional image mask is kept over the kept tokens.

* Tower: SigLIP, no [CLS]. [CLS]-based scorers (`vtc-cls`, `vtc-cls-ensemble`, `fastervlm`,
  `prumerge`, `visionzip`) are refused, naming what runs instead: score-free selectors (`divprune`,
  `tome`, `pool`, `uniform`), `random`, and `fopru` (patch-to-patch attention, no [CLS] needed).
* Projector: average-pools the patch grid (e.g. 64x64 -> 16x16 = 256 soft tokens), then norms and
  projects. The `projector` stage runs on its output, the soft tokens `[I, T, D]` on their
  `tokens x tokens` grid: a kept token is a soft token, its provenance in the trace is its soft
  token index (`PooledGrid.window` gives its patches). Vision signals are computed per patch by the
  usual probe, then averaged over each soft token's pooling window (`PooledGrid.pool`).
* LLM mask: an image's tokens attend to each other in both directions, which HF reads from
  `token_type_ids`. The engine shortens `token_type_ids` with the prompt, so HF builds that mask
  over the kept image tokens, on its sliding-window layers too. Padding added by the rewrite is
  text (type 0).
* Places: `projector` only (budget rules too). A stage inside the tower would break the pooled grid.
  `llm:K` is refused: Gemma's decoder normalises queries and keys (`q_norm`, `k_norm`), and its
  sliding-window layers cache a window, not the prompt. The `llm:K` stages model neither.
* `generate` with a static cache hands the core a per-layer-type mask mapping: the engine refuses it.
  `generate` encodes the images before its first forward (`mm_encoder_outputs`), with the probe's
  hooks in place. A prefill whose images the tower did not encode since the last prefill (features
  encoded outside the context) has no signals of its own, so a scorer that reads them is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..checks import DeferredCheck
from ..errors import InputError, PlaceError
from ..flops import signal_flops
from ..pipeline import Pipeline, Stage
from ..registry import register_adapter
from ..strategy import ModelInfo
from .engine import Engine, ImageTokens
from .family import Family, Layout
from .packing import ImagePass, _encode, _reduce, per_image
from .pooled import PooledGrid
from .providers import QK_PATCHES

_NO_LLM = (
    "llm:K stages are not supported on Gemma 3: its decoder normalises queries and keys (q_norm, k_norm) "
    "and its sliding-window layers cache a window, not the prompt, which tokenprune's llm:K stages do not "
    "model; prune at the projector (e.g. fopru@64, divprune@64, pool@64)"
)
_STALE = (
    "the scorer reads vision signals, but these image features were not encoded inside "
    "tokenprune.apply; pass pixel_values (or let generate encode them) inside the context"
)


@dataclass(frozen=True)
class Pooled:
    """Gemma 3 packing: each image is its `mm_tokens_per_image` soft tokens, the projector's average
    pool of the square patch grid; stages run on them per batch of images, on their pooled grid,
    with vision signals pooled the same way."""

    shares_encodings: bool = False
    unequal: str = "tokens"

    def grid(self, engine: Engine) -> tuple[int, int] | None:
        pooled = PooledGrid.from_config(engine.config)
        return pooled.tokens, pooled.tokens

    def check(self, engine: Engine, stages: list[Stage], info: ModelInfo) -> None:
        PooledGrid.from_config(engine.config)  # a geometry the projector cannot have is refused here

    def attach(self, engine: Engine) -> list[Any]:
        """A hook noting that the tower ran: the probe then holds signals of the images the next prefill gets."""
        return [engine.tower.register_forward_hook(lambda *_: engine.memo.__setitem__("encoded", True))]

    def prune(self, engine: Engine, kw: dict[str, Any], encoded: Any) -> ImageTokens:
        features = _encode(engine, kw, encoded)
        tokens = getattr(features, "pooler_output", features)  # [I, T, D]
        tokens = torch.stack(list(tokens)) if isinstance(tokens, list | tuple) else tokens
        state, pooled = engine.state, PooledGrid.from_config(engine.config)
        if not engine.memo.pop("encoded", False) and state.probe.signals:  # the probe holds no signals of these
            raise InputError(_STALE)
        stage = state.projector_stages[0] if state.projector_stages else None
        deferred: list[DeferredCheck] = []
        signals = pooled.pool_signals(state.probe.values())
        reduction, scores = _reduce(stage, tokens, state.info, signals, deferred)
        slots = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        slots.scatter_(1, reduction.index, True)  # a ragged row's padding repeats a kept index: the scatter holds
        counts = reduction.row_counts()
        passes = [
            ImagePass(
                slots=slots[i],
                features=reduction.tokens[i, : counts[i]],
                llm_tokens=slots.new_ones(counts[i]),
                tokens_in=tokens.shape[1],
                kept=reduction.index[i, : counts[i]],
                weights=None if reduction.weights is None else reduction.weights[i, : counts[i]],
                scores=None if scores is None else scores[i],
            )
            for i in range(tokens.shape[0])
        ]
        vision, patches = engine.config.vision_config, pooled.n_patches
        return per_image(
            stage,
            passes,
            deferred,
            scoring_flops=sum(signal_flops(s, patches, vision.hidden_size) for s in state.probe.signals)
            * tokens.shape[0],
            vision_tokens=[patches] * (state.info.vision_layers or 0),
            vision_shape=(vision.hidden_size, vision.intermediate_size, patches),
        )


GEMMA3 = Family(
    model_classes=("Gemma3ForConditionalGeneration",),
    packing=Pooled(),
    layout=Layout(feature_layer=None),  # the projector reads the tower's last (post-layernormed) output
    places=("projector",),
    ragged_places=("projector",),
    providers=(QK_PATCHES,),  # SigLIP: no [CLS] row; no llm:K stages
)


@register_adapter("gemma3")
class Gemma3Adapter(Engine):
    """Gemma 3 (`Gemma3ForConditionalGeneration`): prunes each image's pooled soft tokens before the LLM,
    the bidirectional image mask kept over the kept tokens."""

    family = GEMMA3

    def check(self, pipeline: Pipeline) -> None:
        """As every adapter checks, with `llm:K` stages refused first, saying why."""
        if any(s.place.kind == "llm" for s in pipeline.stages):
            raise PlaceError(_NO_LLM)
        super().check(pipeline)
