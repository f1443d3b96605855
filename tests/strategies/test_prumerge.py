"""PruMerge (scorer + merge) against a loop reference, on random tokens and on the tiny model."""

import pytest
import torch
from conftest import N_PATCHES, images, keyed_token_cases
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import cls_attention_eager, patch_keys_eager, prumerge_reference

import tokenprune as tp
from tokenprune.signals import PatchKeys
from tokenprune.strategy import ModelInfo


@settings(max_examples=40, deadline=None)
@given(keyed_token_cases(max_n=14, key_width=6, salt=17), st.integers(1, 4))
def test_merge_matches_loop_reference(case, neighbours):
    x, scores, keys, k = case
    selector = tp.create("prumerge-merge", neighbours=neighbours)
    info = ModelInfo(vision_layers=3)
    red = selector.reduce(x, scores, k, None, {PatchKeys(layer=2, heads="concat"): keys})
    assert red.index.shape == (2, k) and red.tokens.shape == (2, k, 5)
    for b in range(2):
        index, tokens, weights = prumerge_reference(x[b], scores[b].tolist(), keys[b], k, neighbours)
        assert red.index[b].tolist() == index
        torch.testing.assert_close(red.tokens[b].double(), tokens, atol=1e-5, rtol=1e-5)
        if weights is not None:
            torch.testing.assert_close(red.weights[b].double(), weights, atol=1e-6, rtol=1e-6)
    assert selector.signals(info) == (PatchKeys(layer=2, heads="concat"),)


@pytest.mark.parametrize("k", [1, 4, 9])
@torch.no_grad()
def test_on_model_reads_last_block(tiny, k):
    inputs = tiny.inputs(["what colour is the square"] * 2, images(2, seed=4))
    with tp.apply(tiny.model, f"prumerge(layer=-1)+prumerge-merge(neighbours=3)@{k}") as run:
        tiny.model(**inputs)
    stage = run.trace[0].stages[0]
    scores = cls_attention_eager(str(tiny.path), inputs["pixel_values"])[-1]
    keys = patch_keys_eager(str(tiny.path), inputs["pixel_values"], -1)
    x = torch.zeros(N_PATCHES, 1)
    for i in range(2):
        index, _, weights = prumerge_reference(x, scores[i].tolist(), keys[i], k, 3)
        assert stage.kept[i].tolist() == index
        torch.testing.assert_close(stage.weights[i].double(), weights, atol=1e-4, rtol=1e-4)
