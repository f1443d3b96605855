"""Budget rules evaluated per image on the scores (`mass`, `iqr`): against plain-Python/numpy
references, round-trips through spec and config, ragged batches equal per-image runs, refusals."""

import json
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
import yaml
from conftest import N_PATCHES, images
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.budget import IqrRule, MassRule, parse_rule
from tokenprune.errors import BudgetError, PlaceError, SpecError


def mass_reference(scores: list[float], fraction: float) -> int:
    """The fewest tokens whose positive scores hold `fraction` of the positive total (`+inf`: the
    `+inf` tokens; a zero total: none)."""
    if any(s == math.inf for s in scores):
        return sum(s == math.inf for s in scores)
    ordered = sorted((max(s, 0.0) for s in scores), reverse=True)
    total = 0.0
    for s in ordered:
        total += s
    if total == 0:
        return 0
    held = 0.0
    for count, s in enumerate(ordered, 1):
        held += s
        if held >= fraction * total:
            return count
    return len(ordered)


def iqr_reference(scores: list[float], whisker: float) -> int:
    """PruMerge's rule: scores above `Q3 + whisker * IQR` (numpy's linear percentiles)."""
    values = np.asarray(scores, dtype=np.float64)
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    return int((values > q3 + whisker * (q3 - q1)).sum())


def clamp(count: int, n: int, low: int, high: int | None) -> int:
    return max(min(low, n), min(count, n if high is None else min(high, n)))


finite = st.floats(-2.0, 10.0, allow_nan=False, width=32)
rows = st.integers(1, 40).flatmap(lambda n: st.lists(st.lists(finite, min_size=n, max_size=n), min_size=1, max_size=4))


@settings(max_examples=150, deadline=None)
@given(
    rows,
    st.floats(0.01, 1.0),
    st.sampled_from([0.0, 0.5, 1.5, 3.0]),
    st.integers(1, 8),
    st.one_of(st.none(), st.integers(8, 50)),
    st.booleans(),
)
def test_rules_match_references(batch, fraction, whisker, low, high, infinite):
    if infinite:  # the first image's last score is +inf (mass only: quartiles of inf are undefined)
        batch = [batch[0][:-1] + [math.inf], *batch[1:]]
    scores = torch.tensor(batch, dtype=torch.float32)
    n = scores.shape[1]
    mass = MassRule(fraction=fraction, min=low, max=high).counts(scores).tolist()
    assert mass == [clamp(mass_reference(r, fraction), n, low, high) for r in scores.tolist()]
    finite_scores = scores.nan_to_num(posinf=11.0)
    iqr = IqrRule(whisker=whisker, min=low, max=high).counts(finite_scores).tolist()
    assert iqr == [clamp(iqr_reference(r, whisker), n, low, high) for r in finite_scores.tolist()]


def test_mass_negative_and_zero_scores():
    scores = torch.tensor([[-1.0, 3.0, -math.inf, 1.0], [0.0, -2.0, 0.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    assert MassRule(fraction=0.75).counts(scores).tolist() == [1, 1, 3]  # 3/4 held by one; zero mass: the floor
    assert MassRule(fraction=0.8, min=2).counts(scores).tolist() == [2, 2, 4]


budget_rules = st.one_of(
    st.builds(
        MassRule,
        fraction=st.floats(0.01, 1.0),
        min=st.integers(1, 10),
        max=st.one_of(st.none(), st.integers(10, 600)),
    ),
    st.builds(
        IqrRule, whisker=st.floats(0.0, 5.0), min=st.integers(1, 10), max=st.one_of(st.none(), st.integers(10, 99))
    ),
)


@settings(max_examples=60, deadline=None)
@given(budget_rules, st.sampled_from(["vtc-cls", "vtc-cls+divprune", "prumerge", "vtc-cls+uniform"]))
def test_rule_round_trips(rule, strategy):
    pipe = tp.Pipeline.from_spec(f"{strategy}@{rule.to_spec()}")
    assert pipe.stages[0].budget == rule and parse_rule(rule.to_spec()) == rule
    assert tp.Pipeline.from_spec(pipe.to_spec()) == pipe
    assert tp.Pipeline.from_config(json.loads(json.dumps(pipe.to_config()))) == pipe
    assert tp.Pipeline.from_config(yaml.safe_load(yaml.safe_dump(pipe.to_config()))) == pipe
    stage = tp.Stage(scorer="vtc-cls", budget=rule)
    assert stage.model_dump()["budget"] == {"rule": rule.name, **rule.params()}
    assert tp.Stage(scorer="vtc-cls", budget=rule.to_spec()) == stage == tp.Stage(**stage.model_dump())


def test_rule_spec_forms():
    assert tp.Pipeline.from_spec("vtc-cls@mass(0.9,min=16,max=64)").stages[0].budget == MassRule(
        fraction=0.9, min=16, max=64
    )
    assert tp.Pipeline.from_spec("vtc-cls@mass(fraction=0.9)").to_spec() == "vtc-cls@mass(0.9)"
    assert tp.Pipeline.from_spec("vtc-cls@iqr").stages[0].budget == IqrRule()
    assert tp.Pipeline.from_spec("vtc-cls@iqr(min=4) @projector").to_spec() == "vtc-cls@iqr(min=4)"


@pytest.mark.parametrize(
    ("spec", "error", "words"),
    [
        ("vtc-cls@mass", BudgetError, "fraction"),
        ("vtc-cls@mass(1.5)", BudgetError, "less than or equal to 1"),
        ("vtc-cls@mass(0.5,min=0)", BudgetError, "min"),
        ("vtc-cls@mass(0.5,min=8,max=4)", BudgetError, "max=4 is below min=8"),
        ("vtc-cls@mass(0.5,0.6)", SpecError, "mass(VALUE, key=value)"),
        ("vtc-cls@iqr(2.0)", SpecError, "iqr(key=value)"),
        ("vtc-cls@mass(0.5,cap=3)", BudgetError, "cap"),
        ("vtc-cls@mass(x)", SpecError, "use numbers"),
        ("vtc-cls@entropy(0.5)", BudgetError, "known rules: iqr, mass"),
        ("uniform@mass(0.5)", SpecError, "pair it with a scorer"),
    ],
)
def test_bad_rules_are_refused(spec, error, words):
    with pytest.raises(error) as info:
        tp.Pipeline.from_spec(spec)
    assert words in str(info.value)


def test_a_user_rule_plugs_in():
    class TopQuarter(tp.BudgetRule):
        name = "test-quarter"

        def count(self, scores):
            return torch.full(scores.shape[:1], scores.shape[1] // 4, dtype=torch.long)

    pipe = tp.Pipeline.from_spec("vtc-cls@test-quarter(max=3)")
    assert pipe.stages[0].budget.counts(torch.zeros(2, 16)).tolist() == [3, 3]
    assert tp.Pipeline.from_config(pipe.to_config()) == pipe


QUESTIONS = ["what colour is the square", "how many", "is the circle red", "what colour"]


def topk_reference(scores: list[float], k: int) -> list[int]:
    """The `k` highest scores, ties to the lower index, ascending."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


@pytest.mark.parametrize(
    "spec",
    [
        "vtc-cls@mass(0.65)",
        "vtc-cls@iqr(whisker=0.5)",
        "vtc-cls+divprune@mass(0.2)",
        "vtc-cls+tome@iqr(whisker=0.5,max=9)",
        "tome@12@vision:2 > vtc-cls@iqr(whisker=0.25)",
    ],
)
@torch.no_grad()
def test_ragged_batch_equals_each_image_alone(tiny, spec):
    model, imgs = tiny.model, images(4, seed=5)
    batch = tiny.inputs(QUESTIONS, imgs)
    rule = tp.Pipeline.from_spec(spec).stages[-1].budget
    with tp.apply(model, spec) as run:
        logits = model(**batch).logits
    stage = run.trace[0].stages[-1]
    counts = [len(k) for k in stage.kept]
    assert len(set(counts)) > 1, "the rule must give these images different counts"
    assert stage.counts == [(stage.tokens_in, c) for c in counts] and stage.tokens_out == max(counts)
    assert stage.kept_per_image() == counts == rule.counts(torch.stack(stage.scores)).tolist()
    assert json.loads(json.dumps(stage.to_json()))["counts"] == [[stage.tokens_in, c] for c in counts]
    if spec.startswith("vtc-cls@"):
        assert [k.tolist() for k in stage.kept] == [
            topk_reference(s.tolist(), c) for s, c in zip(stage.scores, counts, strict=True)
        ]
    for i, question in enumerate(QUESTIONS):
        with tp.apply(model, spec) as alone:
            single = model(**tiny.inputs([question], [imgs[i]])).logits[0, -1]
        torch.testing.assert_close(logits[i, -1], single, atol=1e-5, rtol=1e-5)
        assert torch.equal(alone.trace[0].stages[-1].kept[0], stage.kept[i])
        if stage.weights is not None:
            assert torch.equal(alone.trace[0].stages[-1].weights[0], stage.weights[i])


RULES = ("iqr(whisker=0.5)", "mass(0.2)", "mass(0.65)", "iqr(whisker=0.25)", "mass(0.59)", "mass(0.4)")


def ragged_spec(model, inputs, scorer="vtc-cls"):
    """The first of a few rule budgets that gives these images different counts (the tiny random
    towers' scores are nearly flat, so which one does depends on the checkpoint)."""
    for rule in RULES:
        pipe = tp.Pipeline([tp.Stage(scorer=scorer, budget=rule)])
        with tp.apply(model, pipe) as run:
            model(**inputs)
        if len(set(run.trace[0].stages[0].kept_per_image())) > 1:
            return pipe if not isinstance(scorer, str) else pipe.to_spec()
    raise AssertionError("no candidate rule gives these images different counts")


@torch.no_grad()
def test_ragged_generate_equals_each_image_alone(tiny_full):
    model, imgs = tiny_full.model, images(3, seed=5)
    spec = ragged_spec(model, tiny_full.inputs(QUESTIONS[:3], imgs))
    with tp.apply(model, spec) as run:
        out = model.generate(**tiny_full.inputs(QUESTIONS[:3], imgs), max_new_tokens=4, do_sample=False)
    assert len(set(run.trace[0].stages[0].kept_per_image())) > 1
    for i, question in enumerate(QUESTIONS[:3]):
        with tp.apply(model, spec):
            alone = model.generate(**tiny_full.inputs([question], [imgs[i]]), max_new_tokens=4, do_sample=False)
        assert out[i, -4:].tolist() == alone[0, -4:].tolist()


@torch.no_grad()
def test_floor_at_every_token_is_keep_all(tiny):
    batch = tiny.inputs(QUESTIONS[:2], images(2, seed=1))
    reference = tiny.model(**batch).logits
    with tp.apply(tiny.model, f"vtc-cls@mass(0.1,min={N_PATCHES})"):
        assert torch.equal(tiny.model(**batch).logits, reference)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("vtc-cls@mass(0.5)@vision:2", "supports at: projector (not at vision:2)"),
        ("fastv@mass(0.5)@llm:2", "supports at: projector (not at llm:2)"),
        ("vtc-cls@mass(0.5) > fastv@4@llm:2", "runs a stage at llm:2 only on equal counts"),
    ],
)
def test_rules_refused_where_counts_must_be_equal(tiny, spec, words):
    model = tiny.model
    hooks = lambda: [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]  # noqa: E731
    before = hooks()
    with pytest.raises(PlaceError) as info:
        with tp.apply(model, spec):
            pass
    assert words in str(info.value)
    assert hooks() == before


@torch.no_grad()
def test_llava_next_ragged_batch_equals_each_image_alone(tiny_next):
    from conftest import sized_images

    imgs = sized_images([(40, 60), (40, 60), (40, 60)], seed=4)
    inputs = tiny_next.inputs(QUESTIONS[:3], imgs)
    spec = ragged_spec(tiny_next.model, inputs)
    with tp.apply(tiny_next.model, spec) as run:
        logits = tiny_next.model(**inputs).logits
    stage = run.trace[0].stages[0]
    assert len(set(stage.kept_per_image())) > 1
    per_image = inputs["pixel_values"].shape[1] * N_PATCHES  # kept counts crops across the batch
    for i, question in enumerate(QUESTIONS[:3]):
        with tp.apply(tiny_next.model, spec) as alone:
            single = tiny_next.model(**tiny_next.inputs([question], [imgs[i]])).logits[0, -1]
        torch.testing.assert_close(logits[i, -1], single, atol=1e-5, rtol=1e-5)
        assert torch.equal(alone.trace[0].stages[0].kept[0] + i * per_image, stage.kept[i])


def test_compare_metrics_average_kept_over_images(tiny):
    from tokenprune.evaluation import BatchResult, batch_records, row_metrics

    def result(batch, kept, m=2):
        return BatchResult(batch, torch.zeros(m), torch.zeros(m), torch.zeros(m), 0.1, [20, 20, 20], kept)

    text = tiny.model.config.text_config
    reference = batch_records([result(0, None), result(1, None)])
    records = [{"index": i, "pred": 0, "reference": 0, "kl": 0.0} for i in range(4)]

    def kept(results):
        return row_metrics(records, batch_records(results), reference, [], tiny.processor.tokenizer, None, text)["kept"]

    assert kept([result(0, [10, 20, 6]), result(1, [4])]) == 10
    assert kept([result(0, [3, 4]), result(1, [4])]) == pytest.approx(11 / 3)


class FeatureNorm(tp.ScoringStrategy):
    """A scorer that needs no [CLS] (unregistered, for this test): each token's feature norm."""

    name: ClassVar[str] = "test-feature-norm"

    def score(self, ctx):
        return ctx.tokens.float().norm(dim=-1)


@pytest.mark.parametrize("family", ["onevision", "qwen"])
@torch.no_grad()
def test_ragged_batch_equals_each_image_alone_without_cls(family, tiny_onevision, tiny_qwen):
    from conftest import sized_images

    from tokenprune.adapters.base import find_adapter

    tiny = tiny_onevision if family == "onevision" else tiny_qwen
    model, imgs = tiny.model, sized_images([(40, 70), (40, 70), (40, 70), (64, 48)], seed=6)
    questions = QUESTIONS
    inputs = tiny.inputs(questions, imgs)
    pipe = ragged_spec(model, tiny.inputs(questions[:3], imgs[:3]), FeatureNorm())  # images of one size
    with tp.apply(model, pipe) as run:
        logits = model(**inputs).logits[:, -1]
    stage = run.trace[0].stages[0]
    counts = stage.kept_per_image()
    assert len(set(counts[:3])) > 1, "images of one size keep different counts"
    if family == "onevision":  # kept counts crops across the batch
        adapter = find_adapter(model)
        crops = adapter.family.packing.crops(adapter, inputs["image_sizes"], {})
        offsets = [sum(crops[:i]) * N_PATCHES for i in range(len(crops))]
    else:
        offsets = [0] * len(imgs)
    for i, question in enumerate(questions):
        with tp.apply(model, pipe) as alone:
            single = model(**tiny.inputs([question], [imgs[i]])).logits[0, -1]
        torch.testing.assert_close(logits[i], single, atol=1e-5, rtol=1e-5)
        assert torch.equal(alone.trace[0].stages[0].kept[0] + offsets[i], stage.kept[i])


def test_cli_refuses_a_bad_rule_in_one_line():
    from typer.testing import CliRunner

    from tokenprune.cli.app import app

    result = CliRunner().invoke(app, ["compare", "--strategies", "vtc-cls", "--budgets", "0.25,mass(2.0)"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "invalid budget rule mass(fraction=2.0)" in result.output


def test_per_count_reduction_pads_by_repeating_each_rows_last_output():
    from tokenprune.execute import reduce_per_count

    tokens, scores = torch.randn(3, 6, 4), torch.rand(3, 6)
    topk = tp.create("topk")
    ragged = reduce_per_count(topk, tp.SelectContext(tokens=tokens, k=0, scores=scores), [2, 4, 2])
    assert ragged.counts == (2, 4, 2) and ragged.index.shape == (3, 4) and ragged.weights is None
    for i, k in enumerate([2, 4, 2]):
        alone = topk.reduce(tp.SelectContext(tokens=tokens[i : i + 1], scores=scores[i : i + 1], k=k))
        assert torch.equal(ragged.index[i, :k], alone.index[0]) and torch.equal(ragged.tokens[i, :k], alone.tokens[0])
        assert (ragged.index[i, k:] == alone.index[0, -1]).all() and (ragged.tokens[i, k:] == alone.tokens[0, -1]).all()
    merged = reduce_per_count(
        tp.create("pool"), tp.SelectContext(tokens=tokens, k=0, scores=scores, grid=(2, 3)), [2, 4, 2]
    )
    assert merged.weights.shape == (3, 4, 6) and torch.allclose(merged.weights.sum(-1), torch.ones(3, 4))
    assert reduce_per_count(topk, tp.SelectContext(tokens=tokens, k=0, scores=scores), [3, 3, 3]).counts is None
