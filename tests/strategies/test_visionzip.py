"""VisionZip (dominant + contextual) against a loop reference, on random tokens and on the tiny model."""

import pytest
import torch
from conftest import N_PATCHES, images, keyed_token_cases
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import cls_attention_eager, patch_keys_eager, visionzip_reference

import tokenprune as tp
from tokenprune.signals import PatchKeys


@settings(max_examples=40, deadline=None)
@given(keyed_token_cases(max_n=16, key_width=4, salt=13), st.integers(0, 5), st.sampled_from(["target+mean", "mean"]))
def test_merge_matches_loop_reference(case, contextual, merge):
    x, scores, keys, k = case
    selector = tp.create("visionzip-merge", contextual=contextual, merge=merge)
    red = selector.reduce(tp.SelectContext(tokens=x, scores=scores, k=k, signals={PatchKeys(layer=0): keys}))
    assert red.index.shape == (2, k)
    torch.testing.assert_close(red.weights.sum(-1), torch.ones(2, k))
    for b in range(2):
        index, tokens = visionzip_reference(x[b], scores[b].tolist(), keys[b], k, contextual, merge)
        assert red.index[b].tolist() == index
        torch.testing.assert_close(red.tokens[b].double(), tokens, atol=1e-5, rtol=1e-5)


def test_default_split_follows_the_paper():
    g = torch.Generator().manual_seed(0)  # a draw where every contextual group has several members
    x, scores, keys = (
        torch.randn(1, 576, 3, generator=g),
        torch.rand(1, 576, generator=g),
        torch.randn(1, 576, 4, generator=g),
    )
    for k, contextual in [(64, 10), (128, 20), (192, 30)]:
        red = tp.create("visionzip-merge").reduce(
            tp.SelectContext(tokens=x, scores=scores, k=k, signals={PatchKeys(layer=0): keys})
        )
        merged = (red.weights > 0).sum(-1) > 1
        assert int(merged.sum()) == contextual  # every contextual group here has several members


@pytest.mark.parametrize("k", [3, 8])
@torch.no_grad()
def test_on_model_uses_feature_block(tiny, k):
    inputs = tiny.inputs(["what colour is the square"] * 2, images(2, seed=6))
    with tp.apply(tiny.model, f"visionzip+visionzip-merge(contextual=2)@{k}") as run:
        tiny.model(**inputs)
    stage = run.trace[0].stages[0]
    scores = cls_attention_eager(str(tiny.path), inputs["pixel_values"])[-2]
    keys = patch_keys_eager(str(tiny.path), inputs["pixel_values"], -2)
    heads = tiny.model.config.vision_config.num_attention_heads
    mean_keys = keys.view(*keys.shape[:2], heads, -1).mean(2)
    for i in range(2):
        index, _ = visionzip_reference(torch.zeros(N_PATCHES, 1), scores[i].tolist(), mean_keys[i], k, 2)
        assert stage.kept[i].tolist() == index
