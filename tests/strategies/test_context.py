"""The contexts strategies read: a scorer's `ScoringContext` and a selector's `SelectContext` give the
values of the strategy's own declared signals (`ctx.signal`, `ctx.signals_of`), so `score` and
`select` never rebuild them; selectors written before `SelectContext` keep working."""

import pytest
import torch

import tokenprune as tp
from tokenprune.checks import DeferredCheck, raise_deferred
from tokenprune.errors import ScoreError, SignalError
from tokenprune.execute import run_stage
from tokenprune.pipeline import Pipeline
from tokenprune.reduction import Reduction
from tokenprune.signals import ClsAttention, NormedTokens, PatchKeys, TextPivots

A, B, K = ClsAttention(layer=1), ClsAttention(layer=2), PatchKeys(layer=1)


def _ctx(**kw) -> tp.ScoringContext:
    g = torch.Generator().manual_seed(0)
    values = {s: torch.randn(2, 4, generator=g) for s in (A, B, K, NormedTokens())}
    return tp.ScoringContext(tokens=torch.zeros(2, 4, 3), info=tp.ModelInfo(), signals=values, **kw)


def test_signal_reads_the_declared_ones_by_position_type_or_itself():
    ctx = _ctx(declared=(A, K, B))
    assert ctx.signal(0) is ctx.signals[A] and ctx.signal(-1) is ctx.signals[B] and ctx.signal(2) is ctx.signals[B]
    assert ctx.signal(PatchKeys) is ctx.signals[K] and ctx.signal(B) is ctx.signals[B]
    assert [v is ctx.signals[s] for v, s in zip(ctx.signals_of(ClsAttention), (A, B), strict=True)] == [True, True]
    assert ctx.signals_of(TextPivots) == []
    only = _ctx(declared=(B,))
    assert only.signal() is only.signals[B]  # the only declared one, not the first computed


def test_signal_refuses_ambiguous_or_absent_requests():
    ctx = _ctx(declared=(A, K, B))
    with pytest.raises(SignalError, match=r"reads the strategy's only signal, but it declared 3"):
        ctx.signal()
    with pytest.raises(SignalError, match="needs exactly one declared ClsAttention, found 2"):
        ctx.signal(ClsAttention)
    with pytest.raises(SignalError, match="found 0"):
        ctx.signal(NormedTokens)
    with pytest.raises(SignalError, match="signal 3 requested, but the strategy declared 3"):
        ctx.signal(3)
    with pytest.raises(SignalError, match="was not computed"):
        _ctx(declared=(ClsAttention(layer=7),)).signal()


def test_a_context_built_by_hand_reads_the_signals_it_holds():
    ctx = tp.ScoringContext(tokens=torch.zeros(1, 3, 2), info=tp.ModelInfo(), signals={A: torch.ones(1, 3)})
    assert torch.equal(ctx.signal(), torch.ones(1, 3))


def test_run_stage_gives_scorer_and_selector_only_their_own_declared_signals():
    """Every signal of the pipeline reaches `run_stage`; each strategy's `ctx.signal()` still reads its own."""
    info = tp.ModelInfo(vision_layers=4, feature_layer=2, has_cls=True)
    tokens = torch.randn(2, 6, 5)
    g = torch.Generator().manual_seed(1)
    signals = {
        ClsAttention(layer=2): torch.rand(2, 6, generator=g),  # vtc-cls's (penultimate block)
        ClsAttention(layer=3): torch.rand(2, 6, generator=g),  # another stage's
        PatchKeys(layer=2, heads="mean"): torch.randn(2, 6, 4, generator=g),  # visionzip-merge's
        PatchKeys(layer=3, heads="mean"): torch.randn(2, 6, 4, generator=g),
    }
    stage = Pipeline.from_spec("vtc-cls+visionzip-merge@4").stages[0]
    reduction, scores = run_stage(stage, tokens, info, signals)
    assert torch.equal(scores, signals[ClsAttention(layer=2)])
    alone = tp.create("visionzip-merge").reduce(
        tp.SelectContext(tokens=tokens, scores=scores, k=4, signals={PatchKeys(layer=2): signals[PatchKeys(layer=2)]})
    )
    assert torch.equal(reduction.tokens, alone.tokens) and torch.equal(reduction.index, alone.index)


def test_select_context_carries_deferred_checks():
    deferred: list[DeferredCheck] = []
    scores = torch.tensor([[0.0, float("nan"), 1.0]])
    out = tp.create("topk").reduce(tp.SelectContext(tokens=torch.zeros(1, 3, 2), scores=scores, k=2, deferred=deferred))
    assert out.index.shape == (1, 2) and len(deferred) == 2  # the score and output checks, not yet run
    with pytest.raises(ScoreError, match=r"contain NaN \(images \[0\]\)"):
        raise_deferred(deferred)


def test_a_selector_written_before_select_context_keeps_working():
    seen = []

    class OldStyle(tp.Selector):
        needs_scores = False

        def signals(self, info):
            return (K,)

        def select(self, tokens, scores, k, grid=None, signals=None):
            seen.append((grid, dict(signals)))
            return Reduction.drop(tokens, torch.arange(k).expand(tokens.shape[0], k))

    selector, keys = OldStyle(), torch.randn(2, 4, 3)
    red = selector.reduce(tp.SelectContext(tokens=torch.randn(2, 4, 3), k=2, grid=(2, 2), signals={K: keys}))
    assert red.index.tolist() == [[0, 1], [0, 1]] and seen[0][0] == (2, 2)
    assert seen[0][1].keys() == {K} and seen[0][1][K] is keys


def test_deferred_checks_live_outside_the_strategy_layer():
    import tokenprune.strategy as strategy

    assert DeferredCheck.__module__ == "tokenprune.checks" and not hasattr(strategy, "raise_deferred")
