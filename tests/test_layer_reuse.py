"""Reusing the unpruned forward's decoder-layer calls: bit-identical results, reuse exactly where a
pipeline leaves a layer's inputs unchanged and nothing observes its inside, and nothing left behind."""

import pytest
import torch

import tokenprune as tp
from tokenprune.evaluation import Evaluation, demo_samples
from tokenprune.layer_reuse import LayerReuse, _same_call
from tokenprune.models import load
from tokenprune.pipeline import Pipeline

SPECS = ["vtc-cls@1.0", "vtc-cls@0.25", "fastv@1.0", "fastv@0.25", "dart@0.5", "vtw@0@llm:2", "tome@0.5@vision:1"]


@pytest.fixture(scope="module")
def demo():
    model, processor = load("demo")
    inputs = processor(
        images=[s.image for s in demo_samples(2)],
        text=[f"USER: <image>\n{s.question} ASSISTANT:" for s in demo_samples(2)],
        return_tensors="pt",
        padding=True,
    )
    return model, dict(inputs)


@pytest.mark.parametrize(
    ("spec", "reused"),
    [
        ("vtc-cls@1.0", 4),  # keep-all at the projector: every layer sees the unpruned inputs
        ("vtc-cls@0.25", 0),  # the prompt is shorter from layer 0 on
        ("vtw@0@llm:2", 2),  # layers 0 and 1 run before the stage, which reads no signal
        ("fastv@0.25", 2),  # layer 1 is observed (the stage captures its queries and keys): only its MLP reused
        ("fastv@1.0", 4),  # and keep-all at llm:2: layers 2 and 3 get per-row positions equal to the shared row
        ("dart@1.0", 4),
    ],
)
def test_reuses_exactly_the_layers_a_pipeline_leaves_unchanged(demo, spec, reused):
    model, inputs = demo
    layers = model.get_decoder().layers
    memo = LayerReuse(layers)
    with torch.inference_mode():
        with memo.record(0):
            want_unpruned = model(**inputs, use_cache=False).logits
        with tp.apply(model, spec):
            want = model(**inputs, use_cache=False).logits
        with memo.reuse(0) as got_reused, tp.apply(model, spec):
            got = model(**inputs, use_cache=False).logits
        with memo.reuse(0):
            assert torch.equal(model(**inputs, use_cache=False).logits, want_unpruned)
    assert got_reused.calls == reused
    assert torch.equal(got, want)
    assert all("forward" not in vars(module) for module in memo.units)
    assert len(memo.units) == 2 * len(layers)  # the layers and their MLPs


def test_a_changed_element_is_not_reused(demo):
    model, inputs = demo
    memo = LayerReuse(model.get_decoder().layers)
    with torch.inference_mode():
        with memo.record(0):
            model(**inputs, use_cache=False)
        changed = dict(inputs, pixel_values=inputs["pixel_values"].clone())
        changed["pixel_values"][1, 0, 0, 0] += 1.0
        with memo.reuse(0) as reused:
            got = model(**changed, use_cache=False).logits
        want = model(**changed, use_cache=False).logits
    assert reused.calls == 0
    assert torch.equal(got, want)


def test_a_batch_over_the_memory_budget_is_not_recorded(demo):
    model, inputs = demo
    memo = LayerReuse(model.get_decoder().layers, keep=lambda nbytes: False)
    with torch.inference_mode():
        with memo.record(0):
            model(**inputs, use_cache=False)
        with memo.reuse(0) as reused:
            model(**inputs, use_cache=False)
    assert reused.calls == 0


def test_evaluation_with_reuse_equals_every_row_in_full():
    model, processor = load("demo")
    samples = demo_samples(6)
    pipelines = [None] + [Pipeline.from_spec(s) for s in SPECS]
    runner = Evaluation(model, processor, samples, pipelines, 3, "cpu")
    assert runner.layers is not None
    got = [r for p in pipelines for r in runner.run(p)]
    full = Evaluation(model, processor, samples, pipelines, 3, "cpu", reuse_layers=False, last_position=False)
    assert full.layers is None
    want = [r for p in pipelines for r in full.run(p)]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.pred, b.pred) and torch.equal(a.kl, b.kl)
        assert a.lengths == b.lengths and a.kept == b.kept


def test_positions_match_up_to_broadcasting_and_hidden_states_only_exactly():
    hidden = torch.randn(3, 5, 4)
    positions = torch.arange(5)[None]
    cos = torch.randn(1, 5, 2)
    recorded = {"0": hidden, "position_ids": positions, "position_embeddings": (cos, cos + 1)}
    per_row = {
        "0": hidden.clone(),
        "position_ids": positions.expand(3, -1),
        "position_embeddings": (cos.expand(3, -1, -1), (cos + 1).repeat(3, 1, 1)),
    }
    assert _same_call(per_row, recorded)
    shifted = dict(per_row, position_ids=torch.stack([positions[0], positions[0], positions[0] + 1]))
    assert not _same_call(shifted, recorded)
    one_row = hidden[:1].clone()
    assert not _same_call({"0": one_row}, {"0": one_row.expand(3, -1, -1)})  # hidden states never broadcast
    assert not _same_call(dict(per_row, position_ids=positions.expand(3, -1).double()), recorded)
