"""pool, divprune and tome against independent references (PyTorch pooling, slow loops)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenprune as tp


def test_pool_2d_matches_adaptive_avg_pool2d():
    tokens = torch.randn(2, 24 * 24, 5)
    red = tp.create("pool").reduce(tokens, None, 64, (24, 24))
    grid = tokens.view(2, 24, 24, 5).permute(0, 3, 1, 2)
    ref = torch.nn.functional.adaptive_avg_pool2d(grid, 8).permute(0, 2, 3, 1).reshape(2, 64, 5)
    torch.testing.assert_close(red.tokens, ref)
    assert red.index[0, :2].tolist() == [1 * 24 + 1, 1 * 24 + 4]  # centres of the 3x3 bins


@pytest.mark.parametrize(("n", "k", "grid"), [(16, 5, (4, 4)), (20, 7, None), (16, 9, (4, 4)), (15, 4, (3, 5))])
def test_pool_falls_back_or_matches_torch(n, k, grid):
    tokens = torch.randn(1, n, 3)
    red = tp.create("pool").reduce(tokens, None, k, grid)
    if grid and math.isqrt(k) ** 2 == k and math.isqrt(k) <= min(grid):
        g = tokens.view(1, *grid, 3).permute(0, 3, 1, 2)
        ref = torch.nn.functional.adaptive_avg_pool2d(g, math.isqrt(k)).flatten(2).transpose(1, 2)
    else:
        ref = torch.nn.functional.adaptive_avg_pool1d(tokens.transpose(1, 2), k).transpose(1, 2)
    torch.testing.assert_close(red.tokens, ref)


def divprune_reference(x: torch.Tensor, k: int) -> list[int]:
    """Greedy max-min diversity, one image, explicit loops."""
    n = x.shape[0]
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    d = [[1.0 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    nearest = [min(d[i][j] for j in range(n) if j != i) if n > 1 else 0.0 for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[i][c] for c in chosen), -i)))
    return sorted(chosen)


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
    red = tp.create("divprune").reduce(x, None, k)
    assert [red.index[i].tolist() for i in range(2)] == [divprune_reference(x[i], k) for i in range(2)]


def tome_reference(x: torch.Tensor, k: int) -> tuple[torch.Tensor, list[int]]:
    """ToMe rounds on one image with explicit loops: returns merged tokens and representatives."""
    tokens = [(x[i].double(), 1.0, i) for i in range(x.shape[0])]  # (size-weighted mean, mass, repr)
    while len(tokens) > k:
        r = min(len(tokens) - k, len(tokens) // 2)
        a, b = tokens[0::2], tokens[1::2]
        unit = lambda v: v / v.norm()  # noqa: E731
        best = []
        for i, (va, _, _) in enumerate(a):
            sims = [float(unit(va) @ unit(vb)) for vb, _, _ in b]
            j = max(range(len(b)), key=lambda j: (sims[j], -j))
            best.append((sims[j], i, j))
        order = sorted(best, key=lambda t: (-t[0], t[1]))
        merged, kept = order[:r], sorted(t[1] for t in order[r:])
        b = list(b)
        for _, i, j in merged:
            (va, sa, _), (vb, sb, rb) = a[i], b[j]
            b[j] = ((va * sa + vb * sb) / (sa + sb), sa + sb, rb)
        tokens = sorted([a[i] for i in kept] + b, key=lambda t: t[2])
    return torch.stack([t[0] for t in tokens]).float(), [t[2] for t in tokens]


@settings(max_examples=40, deadline=None)
@given(token_cases(2, 20))
def test_tome_matches_reference(case):
    x, k = case
    red = tp.create("tome").reduce(x, None, k)
    for i in range(2):
        tokens, index = tome_reference(x[i], k)
        assert red.index[i].tolist() == index
        torch.testing.assert_close(red.tokens[i], tokens, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["pool", "divprune", "tome"]), st.integers(1, 30), st.data())
def test_merging_selectors_provenance(name, n, data):
    k = data.draw(st.integers(1, n))
    x = torch.randn(2, n, 4, generator=torch.Generator().manual_seed(n + 100 * k))
    red = tp.create(name).reduce(x, None, k, None)
    w = red.dense_weights(n)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, k))
    torch.testing.assert_close(torch.einsum("bkn,bnd->bkd", w, x), red.tokens, atol=1e-5, rtol=1e-5)
    assert all(row == sorted(set(row)) for row in red.index.tolist())
