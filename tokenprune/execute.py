"""Running one stage on a batch of visual tokens: score, then select. Model-agnostic."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from .budget import BudgetRule, resolve_budget
from .checks import DeferredCheck
from .errors import ScoreError, SpecError
from .pipeline import Stage
from .reduction import Reduction
from .signals import Signal
from .strategy import ModelInfo, ScoringContext, SelectContext, Selector


def run_stage(
    stage: Stage,
    tokens: Tensor,
    info: ModelInfo,
    signals: Mapping[Signal, Tensor],
    deferred: list[DeferredCheck] | None = None,
) -> tuple[Reduction, Tensor | None]:
    """Apply `stage` to `tokens` `[B, N, D]`; returns `k` tokens per image with provenance, and the
    scorer's scores `[B, N]` (`None` for a score-free selector). `deferred`: see `Selector.reduce`.

    A `BudgetRule` budget gives each image its own `k` (read to the host: one sync); images of one
    `k` run through the selector together, so each keeps exactly what it keeps alone, and the
    reduction is ragged (`Reduction.counts`) when the counts differ.

    Raises:
        BudgetError: the budget does not fit the `N` tokens reaching the stage.
        ScoreError: the scorer returned scores of the wrong shape or with NaN.
    """
    n = tokens.shape[1]
    budget = stage.budget
    rule, k = (budget, 0) if isinstance(budget, BudgetRule) else (None, resolve_budget(budget, n, where=stage))
    scores = None
    if stage.scorer is not None:
        declared = stage.scorer.signals(info)
        scores = stage.scorer.score(ScoringContext(tokens=tokens, info=info, signals=signals, declared=declared))
        if scores.shape != tokens.shape[:2]:
            raise ScoreError(
                f"scorer {stage.scorer.name!r} returned shape {tuple(scores.shape)}, "
                f"expected [B, N] = {list(tokens.shape[:2])}"
            )
    selector = stage.selector
    if selector is None:  # a validated Stage always has one (its scorer's default, when not given)
        raise SpecError(f"stage {stage.to_spec()!r} has no selector")
    wanted = selector.signals(info)
    given = ScoringContext(tokens=tokens, info=info, signals=signals)
    ctx = SelectContext(
        tokens=tokens,
        k=k,
        scores=scores,
        grid=info.grid,
        info=info,
        signals={s: given[s] for s in wanted},
        declared=wanted,
        deferred=deferred,
    )
    if rule is None or scores is None:
        return selector.reduce(ctx), scores
    counts = [int(c) for c in rule.counts(scores).tolist()]
    return reduce_per_count(selector, ctx, counts), scores


def reduce_per_count(selector: Selector, ctx: SelectContext, counts: list[int]) -> Reduction:
    """Reduce each image of `ctx.tokens` `[B, N, D]` to its own count (`counts`, per image): one
    `selector.reduce` per distinct count, on the images that have it (their rows of the tokens, the
    scores `[B, N]` and each signal). A ragged `Reduction` when the counts differ."""
    if len(set(counts)) == 1:
        return selector.reduce(replace(ctx, k=counts[0]))
    parts = []
    for k in sorted(set(counts)):
        rows = [i for i, c in enumerate(counts) if c == k]
        at = torch.tensor(rows, device=ctx.tokens.device)
        subset = replace(
            ctx,
            tokens=ctx.tokens[at],
            k=k,
            scores=None if ctx.scores is None else ctx.scores[at],
            signals={s: v[at] for s, v in ctx.signals.items()},
        )
        parts.append((rows, selector.reduce(subset)))
    return Reduction.ragged(parts, ctx.tokens.shape[0], ctx.tokens.shape[1])


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
