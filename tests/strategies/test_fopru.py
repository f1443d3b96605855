"""FoPru against a transcription of the authors' group's rule, from the block's own q/k projections."""

import pytest
import torch
from conftest import images
from reference import block_qk_eager, fopru_reference

import tokenprune as tp
from tokenprune.adapters.vision import patch_attention


@pytest.mark.parametrize(("spec", "k", "variant"), [("fopru", 5, "rank"), ("fopru(variant='row')", 8, "row")])
@torch.no_grad()
def test_matches_reference(tiny, spec, k, variant):
    inputs = tiny.inputs(["what colour is the square"] * 3, images(3, seed=12))
    with tp.apply(tiny.model, f"{spec}@{k}") as run:
        tiny.model(**inputs)
    query, keys = block_qk_eager(str(tiny.path), inputs["pixel_values"], -2)  # the projector's block
    heads = tiny.model.config.vision_config.num_attention_heads
    got = [x.tolist() for x in run.trace[0].stages[0].kept]
    assert got == [fopru_reference(query[i], keys[i], heads, 1, k, variant, (4, 4)) for i in range(3)]


def test_row_variant_fills_a_partial_row_with_its_best_tokens():
    sig = torch.tensor([[0.0, 0.0, 0.0, 9.0, 5.0, 5.0, 1.0, 3.0, 2.0]])  # rows sum to 0, 19, 6
    info = tp.ModelInfo(vision_layers=2, feature_layer=1, grid=(3, 3))
    scorer = tp.create("fopru", variant="row", significance="col")
    signal = scorer.signals(info)[0]
    scores = scorer.score(tp.ScoringContext(tokens=torch.zeros(1, 9, 2), info=info, signals={signal: sig}))
    kept = tp.create("topk").reduce(tp.SelectContext(tokens=torch.zeros(1, 9, 2), scores=scores, k=5)).index[0].tolist()
    assert kept == [3, 4, 5, 7, 8]  # row 1 whole, then row 2's two best tokens
    raster = tp.create("fopru", variant="row", significance="col", partial="raster")
    scores = raster.score(tp.ScoringContext(tokens=torch.zeros(1, 9, 2), info=info, signals={signal: sig}))
    assert tp.create("topk").reduce(tp.SelectContext(tokens=torch.zeros(1, 9, 2), scores=scores, k=4)).index[
        0
    ].tolist() == [3, 4, 5, 6]


@pytest.mark.parametrize("axis", ["col", "row"])
def test_softmax_means_match_the_full_map(axis):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 301, 8, generator=g), torch.randn(2, 301, 8, generator=g)
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q.view(2, 301, 2, 4), k.view(2, 301, 2, 4)) * 0.5, dim=-1)[
        :, :, 1:, 1:
    ]
    expected = (probs.mean(2) if axis == "col" else probs.mean(3)).mean(1)
    got = patch_attention(q, k, 2, 0.5, 1, axis=axis, scores="softmax")
    torch.testing.assert_close(got, expected)


@torch.no_grad()
def test_runs_on_a_tower_without_cls(tiny_onevision):
    inputs = tiny_onevision.inputs(["what colour is the square"], images(1, seed=2))
    with tp.apply(tiny_onevision.model, "fopru@5") as run:
        tiny_onevision.model(**inputs)
    stage = run.trace[0].stages[0]
    assert stage.tokens_out == 5 and all(len(x) == 5 for x in stage.kept)
    with pytest.raises(tp.errors.SignalError, match="[CLS]"):
        with tp.apply(tiny_onevision.model, "vtc-cls@5"):
            tiny_onevision.model(**inputs)
