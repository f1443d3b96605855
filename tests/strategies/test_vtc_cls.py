"""VTC-CLS kept indices against the official route: eager attention with output_attentions=True."""

import pytest
import torch
from conftest import images
from reference import cls_attention_eager, topk_reference

import tokenprune as tp


def kept(tiny, spec: str, n_images: int = 3):
    inputs = tiny.inputs(["what colour is the square"] * n_images, images(n_images, seed=3))
    with torch.no_grad(), tp.apply(tiny.model, spec) as run:
        tiny.model(**inputs)
    return inputs["pixel_values"], [k.tolist() for k in run.trace[0].stages[0].kept]


@pytest.mark.parametrize("k", [1, 5, 11])
def test_single_layer_matches_eager_reference(tiny, k):
    pixel_values, got = kept(tiny, f"vtc-cls@{k}")
    rows = cls_attention_eager(str(tiny.path), pixel_values)[-2]  # LLaVA-1.5: penultimate block
    assert got == [topk_reference(r.tolist(), k) for r in rows]


def test_explicit_layer(tiny):
    pixel_values, got = kept(tiny, "vtc-cls(layer=0)@6")
    rows = cls_attention_eager(str(tiny.path), pixel_values)[0]
    assert got == [topk_reference(r.tolist(), 6) for r in rows]


@pytest.mark.parametrize(
    ("spec", "blocks"),
    [
        ("vtc-cls-ensemble@7", list(range(4))[-4:-1]),  # default start_layer=-4, 4 blocks
        ("vtc-cls-ensemble(start_layer=1)@7", [1, 2]),
        ("vtc-cls-ensemble(start_layer=-2)@7", [2]),
        ("vtc-cls-ensemble(layers=[-1,0])@7", [3, 0]),
    ],
)
def test_ensemble_is_plain_sum_of_layers(tiny, spec, blocks):
    pixel_values, got = kept(tiny, spec)
    attn = cls_attention_eager(str(tiny.path), pixel_values)
    summed = sum(attn[b] for b in blocks)
    assert got == [topk_reference(r.tolist(), 7) for r in summed]


def test_feature_layer_list_uses_deepest_block(tiny_multilayer):
    # vision_feature_layer=[-2, -3]: hidden_states[-2] is block 2's output, the deepest used
    pixel_values, got = kept(tiny_multilayer, "vtc-cls@4")
    rows = cls_attention_eager(str(tiny_multilayer.path), pixel_values)[2]
    assert got == [topk_reference(r.tolist(), 4) for r in rows]


def test_ensemble_rejects_duplicate_layers():
    with pytest.raises(tp.errors.StrategyConfigError, match="duplicates"):
        tp.create("vtc-cls-ensemble", layers=[-2, -2])


def test_out_of_range_layer_is_refused(tiny):
    inputs = tiny.inputs(["what"], images(1))
    with pytest.raises(tp.errors.SignalError, match="out of range"):
        with tp.apply(tiny.model, "vtc-cls(layer=9)@4"):
            tiny.model(**inputs)
