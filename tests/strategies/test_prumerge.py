"""PruMerge and PruMerge+ (scorer + merge) against loop references and a transcription of the official
rule, on random tokens and on the tiny model."""

import pytest
import torch
from conftest import N_PATCHES, images, keyed_token_cases
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    block_qk_eager,
    cls_attention_eager,
    patch_keys_eager,
    prumerge_official_reference,
    prumerge_reference,
)

import tokenprune as tp
from tokenprune.signals import PatchKeys
from tokenprune.strategy import ModelInfo


@settings(max_examples=40, deadline=None)
@given(keyed_token_cases(max_n=14, key_width=6, salt=17), st.integers(1, 4))
def test_merge_matches_loop_reference(case, neighbours):
    x, scores, keys, k = case
    selector = tp.create("prumerge-merge", neighbours=neighbours, adaptive=False, order="raster")
    info = ModelInfo(vision_layers=3)
    red = selector.reduce(
        tp.SelectContext(tokens=x, scores=scores, k=k, signals={PatchKeys(layer=2, heads="concat"): keys})
    )
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
    spec = f"prumerge(layer=-1,heads='mean')+prumerge-merge(neighbours=3,adaptive=False,order='raster')@{k}"
    with tp.apply(tiny.model, spec) as run:
        tiny.model(**inputs)
    stage = run.trace[0].stages[0]
    scores = cls_attention_eager(str(tiny.path), inputs["pixel_values"])[-1]
    keys = patch_keys_eager(str(tiny.path), inputs["pixel_values"], -1)
    x = torch.zeros(N_PATCHES, 1)
    for i in range(2):
        index, _, weights = prumerge_reference(x, scores[i].tolist(), keys[i], k, 3)
        assert stage.kept[i].tolist() == index
        torch.testing.assert_close(stage.weights[i].double(), weights, atol=1e-4, rtol=1e-4)


def official_scores(path: str, pixel_values: torch.Tensor) -> torch.Tensor:
    """`[I, N]` the official score: one softmax of the [CLS] query over all keys of the last block,
    over the full width, scaled by `D ** -0.5`, the [CLS] key dropped."""
    query, keys = block_qk_eager(path, pixel_values, -1)
    logits = torch.einsum("id,ind->in", query[:, 0].double(), keys.double()) * keys.shape[-1] ** -0.5
    return torch.softmax(logits, dim=-1)[:, 1:]


@settings(max_examples=40, deadline=None)
@given(keyed_token_cases(max_n=24, key_width=6, salt=29), st.booleans())
def test_adaptive_merge_matches_official_transcription(case, plus):
    x, scores, keys, _ = case
    scores = scores**6  # heavy-tailed, so that some images have IQR outliers
    name = "prumerge-plus-merge" if plus else "prumerge-merge"
    for b in range(2):
        index, tokens = prumerge_official_reference(x[b], scores[b].tolist(), keys[b], 3, plus)
        if len(index) == x.shape[1] and sorted(index) == list(range(x.shape[1])) and len(tokens) == len(index):
            continue  # nothing pruned: the official N + 1 outputs exceed the cap N (documented difference)
        red = tp.create(name, neighbours=3).reduce(
            tp.SelectContext(
                tokens=x[b : b + 1],
                scores=scores[b : b + 1],
                k=x.shape[1],
                signals={PatchKeys(layer=2, heads="concat"): keys[b : b + 1]},
            )
        )
        assert red.index[0].tolist() == index  # official order: kept best first, the extra token last
        torch.testing.assert_close(red.tokens[0].double(), tokens, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["prumerge", "prumerge-plus"])
@torch.no_grad()
def test_default_is_official_on_model(tiny, name):
    imgs = images(4, seed=21)
    for i in range(4):  # one image per forward: adaptive counts differ between images
        inputs = tiny.inputs(["what colour is the square"], [imgs[i]])
        with tp.apply(tiny.model, f"{name}+{name}-merge(neighbours=3)@1.0") as run:
            tiny.model(**inputs)
        scores = official_scores(str(tiny.path), inputs["pixel_values"])[0]
        keys = patch_keys_eager(str(tiny.path), inputs["pixel_values"], -1)[0]
        index, _ = prumerge_official_reference(torch.zeros(N_PATCHES, 1), scores.tolist(), keys, 3, name != "prumerge")
        assert run.trace[0].stages[0].kept[0].tolist() == index


def test_budget_caps_the_adaptive_count():
    scores = torch.tensor([[9.0, 8.0, 7.0] + [0.0] * 13])  # three outliers
    x, keys = torch.randn(1, 16, 5), torch.randn(1, 16, 6)
    red = tp.create("prumerge-merge").reduce(
        tp.SelectContext(tokens=x, scores=scores, k=3, signals={PatchKeys(layer=2, heads="concat"): keys})
    )
    assert red.index[0].tolist() == [0, 1, 2]  # two best outliers, then the extra token (best pruned: 2)


def test_ragged_adaptive_counts_are_refused():
    scores = torch.tensor([[9.0] + [0.0] * 15, [9.0, 8.0] + [0.0] * 14])  # one and two outliers
    x, keys = torch.randn(2, 16, 5), torch.randn(2, 16, 6)
    with pytest.raises(tp.errors.BudgetError, match=r"different number of tokens per image.*\[2, 3\]"):
        tp.create("prumerge-merge").reduce(
            tp.SelectContext(tokens=x, scores=scores, k=16, signals={PatchKeys(layer=2, heads="concat"): keys})
        )
