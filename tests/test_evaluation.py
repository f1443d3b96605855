"""One vision encoding per batch, shared by every row at the projector or later, gives bit for bit
what each row encoding its own gives; plots give every strategy its own look; the Pareto front."""

import itertools

import torch

from tokenprune.evaluation import Evaluation, demo_samples
from tokenprune.models import load
from tokenprune.pipeline import Pipeline
from tokenprune.report import pareto_front, styles

SPECS = [
    "vtc-cls-ensemble@0.25",
    "prumerge+prumerge-merge(adaptive=False)@0.25",  # its official adaptive count differs per image
    "visionzip@0.25",
    "divprune@0.25",
    "tome@0.25",
    "fastv@0.25",
    "dart@0.25",
    "vtc-cls@1.0",
    "tome@0.5@vision:1 > vtc-cls@0.25",
]


def test_shared_encoding_equals_one_encoding_per_row():
    model, processor = load("demo")
    samples = demo_samples(6)
    pipelines = [None] + [Pipeline.from_spec(s) for s in SPECS]
    tower_runs = []
    handle = model.model.vision_tower.register_forward_hook(lambda *args: tower_runs.append(1))
    try:
        shared = Evaluation(model, processor, samples, pipelines, 3, "cpu")
        got = [shared.run(p) for p in pipelines]
        shared_runs = len(tower_runs)
        tower_runs.clear()
        alone = Evaluation(model, processor, samples, pipelines, 3, "cpu", share=False)
        want = [alone.run(p) for p in pipelines]
    finally:
        handle.remove()
    assert shared_runs == 2 + 2  # once per batch, and once per batch for the vision:1 row
    assert len(tower_runs) == 2 * len(pipelines)
    for pipeline, mine, theirs in zip(pipelines, got, want, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert torch.equal(a.pred, b.pred) and torch.equal(a.kl, b.kl), pipeline
            assert a.lengths == b.lengths and a.kept == b.kept


def test_every_strategy_has_its_own_colour_and_marker():
    names = ["unpruned"] + [f"s{i}" for i in range(15)] + ["vtc-cls", "vtc-cls(layer=-1)", "vtc-cls(layer=-3)"]
    look = styles(names)
    pairs = [(look[n]["color"], look[n]["marker"]) for n in names]
    assert len(set(pairs)) == len(names) and len({look[n]["color"] for n in names}) == len(names)
    assert [look[n]["linestyle"] for n in names[-3:]] == ["-", "--", ":"]


def test_pareto_front_is_the_set_no_point_beats():
    points = [(0.2, 0.7), (0.3, 0.9), (0.3, 0.8), (0.5, 0.85), (0.6, 0.95), (1.0, 0.95), (0.1, 0.5)]
    front = pareto_front(points)
    beaten = {p for p, q in itertools.permutations(points, 2) if q[0] <= p[0] and q[1] >= p[1] and q != p}
    assert front == sorted(set(points) - beaten)


def test_a_row_applies_its_pipeline_once_when_references_are_at_hand(monkeypatch):
    import tokenprune.evaluation as evaluation

    model, processor = load("demo")
    samples = demo_samples(6)
    pipelines = [Pipeline.from_spec(s) for s in ("vtc-cls@0.25", "fastv@0.5", "tome@0.5@vision:1")]
    applied = []

    def counting(model, pipeline, **kwargs):
        applied.append(pipeline.to_spec())
        return tp_apply(model, pipeline, **kwargs)

    tp_apply = evaluation.apply
    monkeypatch.setattr(evaluation, "apply", counting)
    cold = [Evaluation(model, processor, samples, [None, p], 3, "cpu") for p in pipelines]
    per_batch = [runner.run(p) for runner, p in zip(cold, pipelines, strict=True)]
    specs = [p.to_spec() for p in pipelines]
    assert applied == [s for s in specs for _ in range(2)]  # no reference yet: each batch applies around its forward
    applied.clear()
    warm = Evaluation(model, processor, samples, [None, *pipelines], 3, "cpu")
    warm.run(None)
    once = [warm.run(p) for p in pipelines]
    assert applied == specs  # once per row, around both batches
    for mine, theirs in zip(once, per_batch, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert torch.equal(a.pred, b.pred) and torch.equal(a.kl, b.kl)
            assert a.lengths == b.lengths and a.kept == b.kept
