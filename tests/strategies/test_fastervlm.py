"""FasterVLM reads `attentions[select_layer]` (the official code), VTC-CLS `attentions[-2]`: against
eager attention maps, on a model whose feature layer is non-negative (where the blocks differ)."""

import pytest
import torch
from conftest import build_tiny, images
from reference import cls_attention_eager, topk_reference

import tokenprune as tp
from tokenprune.models import load


@pytest.fixture(scope="module")
def tiny_layer1(tmp_path_factory):
    """A tiny LLaVA whose projector reads `hidden_states[1]`, block 0's output (4 blocks)."""
    path = build_tiny(tmp_path_factory.mktemp("layer1"), "layer1", seed=4, vision_feature_layer=1)
    model, processor = load(str(path))
    return path, model, processor


def kept(setup, spec: str) -> tuple[torch.Tensor, list[list[int]]]:
    path, model, processor = setup
    from tokenprune.models import build_prompt

    prompts = [build_prompt(processor, "what colour is the square")] * 3
    inputs = processor(images=images(3, seed=9), text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), tp.apply(model, spec) as run:
        model(**inputs)
    return inputs["pixel_values"], [k.tolist() for k in run.trace[0].stages[0].kept]


@pytest.mark.parametrize(
    ("spec", "block"),
    [
        ("fastervlm@5", 1),  # official: attentions[1], block 1
        ("fastervlm(read='features')@5", 0),  # the block whose output the projector reads
        ("vtc-cls@5", 2),  # official VTC-CLS: attentions[-2] whatever the feature layer
        ("vtc-cls(layer=None)@5", 0),
    ],
)
def test_block_read_matches_eager(tiny_layer1, spec, block):
    pixel_values, got = kept(tiny_layer1, spec)
    rows = cls_attention_eager(str(tiny_layer1[0]), pixel_values)[block]
    assert got == [topk_reference(r.tolist(), 5) for r in rows]


def test_negative_feature_layer_reads_the_same_block(tiny):
    inputs = tiny.inputs(["what colour is the square"] * 2, images(2, seed=3))
    with torch.no_grad(), tp.apply(tiny.model, "fastervlm@6") as run:
        tiny.model(**inputs)
    rows = cls_attention_eager(str(tiny.path), inputs["pixel_values"])[-2]
    assert [k.tolist() for k in run.trace[0].stages[0].kept] == [topk_reference(r.tolist(), 6) for r in rows]
