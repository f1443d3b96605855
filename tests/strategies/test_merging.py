"""pool, divprune and tome against independent references (PyTorch pooling, slow loops)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import divprune_reference, tome_reference

import tokenprune as tp


def test_pool_2d_matches_adaptive_avg_pool2d():
    tokens = torch.randn(2, 24 * 24, 5)
    red = tp.create("pool").reduce(tp.SelectContext(tokens=tokens, k=64, grid=(24, 24)))
    grid = tokens.view(2, 24, 24, 5).permute(0, 3, 1, 2)
    ref = torch.nn.functional.adaptive_avg_pool2d(grid, 8).permute(0, 2, 3, 1).reshape(2, 64, 5)
    torch.testing.assert_close(red.tokens, ref)
    assert red.index[0, :2].tolist() == [1 * 24 + 1, 1 * 24 + 4]  # centres of the 3x3 bins


@pytest.mark.parametrize(("n", "k", "grid"), [(16, 5, (4, 4)), (20, 7, None), (16, 9, (4, 4)), (15, 4, (3, 5))])
def test_pool_falls_back_or_matches_torch(n, k, grid):
    tokens = torch.randn(1, n, 3)
    red = tp.create("pool").reduce(tp.SelectContext(tokens=tokens, k=k, grid=grid))
    if grid and math.isqrt(k) ** 2 == k and math.isqrt(k) <= min(grid):
        g = tokens.view(1, *grid, 3).permute(0, 3, 1, 2)
        ref = torch.nn.functional.adaptive_avg_pool2d(g, math.isqrt(k)).flatten(2).transpose(1, 2)
    else:
        ref = torch.nn.functional.adaptive_avg_pool1d(tokens.transpose(1, 2), k).transpose(1, 2)
    torch.testing.assert_close(red.tokens, ref)


@st.composite
def token_cases(draw, min_n: int, max_n: int):
    """Seeded tokens `[2, n, 6]` and a budget `k` in `[1, n]`."""
    n = draw(st.integers(min_n, max_n))
    k = draw(st.integers(1, n))
    return torch.randn(2, n, 6, generator=torch.Generator().manual_seed(n * 31 + k)), k


@settings(max_examples=40, deadline=None)
@given(token_cases(1, 14))
def test_divprune_matches_reference(case):
    x, k = case
    red = tp.create("divprune").reduce(tp.SelectContext(tokens=x, k=k))
    assert [red.index[i].tolist() for i in range(2)] == [divprune_reference(x[i], k) for i in range(2)]


@settings(max_examples=40, deadline=None)
@given(token_cases(2, 20))
def test_tome_matches_reference(case):
    x, k = case
    red = tp.create("tome").reduce(tp.SelectContext(tokens=x, k=k))
    for i in range(2):
        tokens, index, _ = tome_reference(x[i], k)
        assert red.index[i].tolist() == index
        torch.testing.assert_close(red.tokens[i], tokens, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["pool", "divprune", "tome"]), st.integers(1, 30), st.data())
def test_merging_selectors_provenance(name, n, data):
    k = data.draw(st.integers(1, n))
    x = torch.randn(2, n, 4, generator=torch.Generator().manual_seed(n + 100 * k))
    red = tp.create(name).reduce(tp.SelectContext(tokens=x, k=k))
    w = red.dense_weights(n)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, k))
    torch.testing.assert_close(torch.einsum("bkn,bnd->bkd", w, x), red.tokens, atol=1e-5, rtol=1e-5)
    assert all(row == sorted(set(row)) for row in red.index.tolist())
