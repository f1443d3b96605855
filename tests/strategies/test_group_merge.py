"""group-merge (VisToG-style importance-weighted grouping) against a loop reference."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import topk_reference

import tokenprune as tp


def group_merge_reference(x: torch.Tensor, scores: list[float], k: int):
    """One image: `(centres, tokens)`; explicit loops over tokens and groups."""
    n = x.shape[0]
    centres = topk_reference(scores, k)
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    groups = {c: [c] for c in centres}
    for j in range(n):
        if j not in groups:
            sims = [float(unit[j] @ unit[c]) for c in centres]
            groups[centres[sims.index(max(sims))]].append(j)
    out = []
    for c in centres:
        w = [max(scores[j], 0.0) for j in groups[c]]
        w = w if sum(w) > 0 else [1.0] * len(w)
        out.append(sum(wi * x[j].double() for wi, j in zip(w, groups[c], strict=False)) / sum(w))
    return centres, torch.stack(out)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.data())
def test_matches_loop_reference(n, data):
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(n * 11 + k)
    x, scores = torch.randn(2, n, 6, generator=g), torch.randn(2, n, generator=g)
    red = tp.create("group-merge").reduce(tp.SelectContext(tokens=x, scores=scores, k=k))
    for b in range(2):
        centres, tokens = group_merge_reference(x[b], scores[b].tolist(), k)
        assert red.index[b].tolist() == centres
        torch.testing.assert_close(red.tokens[b].double(), tokens, atol=1e-5, rtol=1e-5)


def test_keep_all_is_identity():
    x, scores = torch.randn(2, 9, 4), torch.rand(2, 9)
    assert torch.equal(tp.create("group-merge").reduce(tp.SelectContext(tokens=x, scores=scores, k=9)).tokens, x)
