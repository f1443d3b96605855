"""Running one stage on a batch of visual tokens: score, then select. Model-agnostic."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from torch import Tensor

from .budget import resolve_budget
from .errors import ScoreError
from .pipeline import Stage
from .reduction import Reduction
from .signals import Signal
from .strategy import DeferredCheck, ModelInfo, ScoringContext


def run_stage(
    stage: Stage,
    tokens: Tensor,
    info: ModelInfo,
    signals: Mapping[Signal, Tensor],
    deferred: list[DeferredCheck] | None = None,
) -> tuple[Reduction, Tensor | None]:
    """Apply `stage` to `tokens` `[B, N, D]`; returns `k` tokens per image with provenance, and the
    scorer's scores `[B, N]` (`None` for a score-free selector). `deferred`: see `Selector.reduce`.

    Raises:
        BudgetError: the budget does not fit the `N` tokens reaching the stage.
        ScoreError: the scorer returned scores of the wrong shape or with NaN.
    """
    n = tokens.shape[1]
    k = resolve_budget(stage.budget, n, where=stage)
    scores = None
    if stage.scorer is not None:
        scores = stage.scorer.score(ScoringContext(tokens=tokens, info=info, signals=signals))
        if scores.shape != tokens.shape[:2]:
            raise ScoreError(
                f"scorer {stage.scorer.name!r} returned shape {tuple(scores.shape)}, "
                f"expected [B, N] = {list(tokens.shape[:2])}"
            )
    wanted = stage.selector.signals(info)
    context = ScoringContext(tokens=tokens, info=info, signals=signals)
    given = {s: context[s] for s in wanted} if wanted else None
    return stage.selector.reduce(tokens, scores, k, info.grid, given, deferred), scores


def stage_info(stage: Stage, info: ModelInfo) -> ModelInfo:
    """`info` as a stage sees it: `stage_layer` is `K` for a stage at `llm:K`."""
    place = stage.place
    return replace(info, stage_layer=place.layer if place.kind == "llm" else None)


def required_signals(stages: list[Stage], info: ModelInfo) -> set[Signal]:
    """Every signal the scorers and selectors of `stages` ask for."""
    wanted: set[Signal] = set()
    for stage in stages:
        local = stage_info(stage, info)
        wanted.update(stage.scorer.signals(local) if stage.scorer is not None else ())
        wanted.update(stage.selector.signals(local))
    return wanted
