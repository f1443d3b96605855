"""Pipelines from Python, config and spec strings, and their round trips."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.spec import parse_pipeline


def test_spec_forms():
    p = tp.Pipeline.from_spec("vtc-cls-ensemble(layers=[-2,-6,-10])@0.25")
    (stage,) = p.stages
    assert stage.at == "projector" and stage.budget == 0.25
    assert stage.scorer.layers == [-2, -6, -10] and stage.selector.name == "topk"
    assert tp.Pipeline.from_spec("uniform@64").stages[0].scorer is None
    assert tp.Pipeline.from_spec("vtc-cls + topk @ 64 @ projector") == tp.Pipeline.from_spec("vtc-cls@64")
    assert tp.Pipeline.from_spec("random(seed=3)@1.0").stages[0].budget == 1.0


def test_python_config_and_spec_agree():
    python = tp.Pipeline(
        [
            tp.Stage(
                at="projector",
                scorer=tp.create("vtc-cls-ensemble", layers=[-2, -6, -10]),
                selector=tp.create("topk"),
                budget=0.25,
            )
        ]
    )
    assert python == tp.Pipeline.from_spec("vtc-cls-ensemble(layers=[-2,-6,-10])@0.25")
    assert python == tp.Pipeline.from_config(json.loads(json.dumps(python.to_config())))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_file_round_trip(tmp_path, suffix):
    pipe = tp.Pipeline.from_spec("vtc-cls(layer=-3)@48")
    pipe.save(tmp_path / f"p{suffix}")
    assert tp.Pipeline.from_file(tmp_path / f"p{suffix}") == pipe


stage_specs = st.one_of(
    st.builds(lambda layer, b: f"vtc-cls(layer={layer})@{b}", st.integers(-24, 23), st.integers(1, 600)),
    st.builds(
        lambda s, b: f"vtc-cls-ensemble(start_layer={s})@{b}",
        st.integers(-24, 22),
        st.floats(0.001, 1.0, allow_nan=False),
    ),
    st.builds(
        lambda layers, b: f"vtc-cls-ensemble(layers={layers})@{b}",
        st.lists(st.integers(-24, 23), min_size=1, max_size=4, unique=True),
        st.integers(1, 600),
    ),
    st.builds(lambda seed, b: f"random(seed={seed})+topk@{b}", st.integers(0, 2**31), st.integers(1, 600)),
    st.builds(lambda b: f"uniform@{b}", st.floats(0.001, 1.0, allow_nan=False)),
)


@settings(max_examples=200, deadline=None)
@given(stage_specs)
def test_spec_and_config_round_trip(spec):
    pipe = tp.Pipeline.from_spec(spec)
    assert tp.Pipeline.from_spec(pipe.to_spec()) == pipe
    assert tp.Pipeline.from_config(pipe.to_config()) == pipe
    assert tp.Pipeline.from_spec(pipe.to_spec()).to_spec() == pipe.to_spec()


def test_spec_grammar_parts():
    (stage,) = parse_pipeline("vtc-cls(layer=-2)+topk@0.5@projector")
    assert [s.name for s in stage.strategies] == ["vtc-cls", "topk"]
    assert stage.strategies[0].params == {"layer": -2} and stage.budget == 0.5 and stage.at == "projector"
    assert len(parse_pipeline("vtc-cls@64 > uniform@32")) == 2
