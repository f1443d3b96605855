"""Hypothesis properties of the built-in selectors, and top-k against a Python reference."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import topk_reference
from tokenprune.strategies.uniform import lattice_indices

import tokenprune as tp


@st.composite
def scored_tokens(draw):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, n))
    # few distinct values, so ties are common
    values = draw(st.lists(st.integers(-3, 3), min_size=b * n, max_size=b * n))
    scores = torch.tensor(values, dtype=torch.float32).view(b, n)
    tokens = torch.randn(b, n, 5, generator=torch.Generator().manual_seed(n))
    return tokens, scores, k


@settings(max_examples=150, deadline=None)
@given(scored_tokens())
def test_topk_matches_reference_with_ties(case):
    tokens, scores, k = case
    red = tp.create("topk").reduce(tp.SelectContext(tokens=tokens, scores=scores, k=k))
    for row, idx in zip(scores, red.index, strict=False):
        assert idx.tolist() == topk_reference(row.tolist(), k)
    assert torch.equal(red.tokens, torch.gather(tokens, 1, red.index[..., None].expand(-1, -1, 5)))


SELECTORS = sorted(name for name, entry in tp.list_strategies().items() if entry.role == "selector")
INFO = tp.ModelInfo(vision_layers=2, feature_layer=0, stage_layer=2)  # signals of every place


def signals_for(selector, tokens: torch.Tensor) -> dict:
    """Random values for the signals a selector reads (`[B, N, 4]` key-like tensors)."""
    g = torch.Generator().manual_seed(tokens.shape[1])
    return {s: torch.randn(*tokens.shape[:2], 4, generator=g) for s in selector.signals(INFO)}


@settings(max_examples=60, deadline=None)
@given(scored_tokens())
def test_every_selector_k_distinct_sorted_in_range_deterministic(case):
    """Exactly k outputs, distinct ascending representatives, provenance rows summing to 1 (an
    adaptive selector in its fixed raster form; adaptively, per image: at most k outputs, distinct
    representatives)."""
    tokens, scores, k = case
    for name in SELECTORS:
        adaptive = "adaptive" in tp.list_strategies()[name].cls.model_fields
        if adaptive:
            for b in range(tokens.shape[0]):
                one, one_scores = tokens[b : b + 1], scores[b : b + 1]
                selector = tp.create(name)
                red = selector.reduce(
                    tp.SelectContext(tokens=one, scores=one_scores, k=k, signals=signals_for(selector, one))
                )
                idx = red.index[0].tolist()
                assert len(idx) <= k and len(set(idx)) == len(idx) and all(0 <= i < one.shape[1] for i in idx)
                assert torch.allclose(red.dense_weights(one.shape[1]).sum(-1), torch.ones(1, len(idx)))
        selector = tp.create(name, **({"adaptive": False, "order": "raster"} if adaptive else {}))
        signals = signals_for(selector, tokens)
        red = selector.reduce(tp.SelectContext(tokens=tokens, scores=scores, k=k, signals=signals))
        again = selector.reduce(tp.SelectContext(tokens=tokens, scores=scores, k=k, signals=signals))
        assert red.tokens.shape == (tokens.shape[0], k, tokens.shape[2])
        assert red.index.dtype == torch.long and red.index.shape == (tokens.shape[0], k)
        assert torch.equal(red.index, again.index)
        for idx in red.index.tolist():
            assert idx == sorted(set(idx)) and all(0 <= i < tokens.shape[1] for i in idx)
        assert torch.allclose(red.dense_weights(tokens.shape[1]).sum(-1), torch.ones(tokens.shape[0], k))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24), st.data())
def test_uniform_lattice_exact_count(rows, cols, data):
    k = data.draw(st.integers(1, rows * cols))
    idx = lattice_indices(k, rows, cols).tolist()
    assert len(idx) == k and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < rows * cols


def test_uniform_is_a_regular_grid_when_k_is_square():
    idx = lattice_indices(4, 4, 4).tolist()
    assert idx == [5, 7, 13, 15]  # rows 1 and 3, cols 1 and 3 of a 4x4 grid


def test_random_is_seeded_and_same_for_every_image():
    ctx = tp.ScoringContext(tokens=torch.zeros(3, 10, 2), info=tp.ModelInfo())
    a = tp.create("random", seed=1).score(ctx)
    assert torch.equal(a, tp.create("random", seed=1).score(ctx))
    assert not torch.equal(a, tp.create("random", seed=2).score(ctx))
    assert torch.equal(a[0], a[2])


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 20), st.data())
def test_permuting_tokens_permutes_what_score_based_selectors_return(n, data):
    """Reordering the input tokens (with their scores) yields the same output tokens as a set."""
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(n * 7 + k)
    tokens, scores = torch.randn(1, n, 5, generator=g), torch.rand(1, n, generator=g)
    perm = torch.randperm(n, generator=g)
    for name in ("topk", "group-merge"):
        a = tp.create(name).reduce(tp.SelectContext(tokens=tokens, scores=scores, k=k)).tokens[0]
        b = tp.create(name).reduce(tp.SelectContext(tokens=tokens[:, perm], scores=scores[:, perm], k=k)).tokens[0]
        order = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
        torch.testing.assert_close(order(a), order(b), atol=1e-5, rtol=1e-5)
