"""Specs and configs are strict: any input gives a `SpecError` or a valid pipeline, never another
exception; unknown keys name the allowed ones; size limits and YAML aliases fail fast."""

import string
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.errors import SpecError
from tokenprune.pipeline import MAX_CONFIG_BYTES
from tokenprune.spec import MAX_SPEC_CHARS

NAMES = sorted(tp.list_strategies())
SCORERS = sorted(tp.list_strategies("scorer"))
SELECTORS = sorted(tp.list_strategies("selector"))


def valid_or_spec_error(build) -> tp.Pipeline | None:
    """Run `build`; it must return a pipeline that round-trips through its spec and config, or raise
    `SpecError`."""
    try:
        pipeline = build()
    except SpecError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None
    assert isinstance(pipeline, tp.Pipeline) and pipeline.stages
    assert tp.Pipeline.from_spec(pipeline.to_spec()) == pipeline
    assert tp.Pipeline.from_config(pipeline.to_config()) == pipeline
    return pipeline


SPEC_ALPHABET = string.ascii_letters + string.digits + "@>+(),=[]{}'\"-_.:*! \t\n\\\x00é"
values = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["True", "None", "'last'", "b'3'", "[-2,-6]", "[1,True]", "{1:2}", "1+2j", "2**8", "(1,)", "x"]),
    st.text(SPEC_ALPHABET, max_size=8),
)
terms = st.builds(
    lambda name, params: name + (f"({','.join(params)})" if params is not None else ""),
    st.sampled_from(NAMES) | st.text(SPEC_ALPHABET, max_size=6),
    st.none()
    | st.lists(
        st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from(["layer", "layers", "seed", "query", "neighbours", "pivots", "name", "x", "contextual"]),
            values,
        ),
        max_size=3,
    ),
)
budgets = st.one_of(
    st.integers(-3, 700).map(str), st.floats(-1, 2).map(repr), st.sampled_from(["", "nan", "inf", "1e9", "0x10", "1_0"])
)
places = st.sampled_from(["", "@projector", "@llm:2", "@llm:0", "@vision:1", "@vision:-1", "@nowhere", "@llm:99999"])
stages = st.builds(
    lambda a, b, budget, place: a + (f"+{b}" if b else "") + f"@{budget}" + place,
    terms,
    st.none() | terms,
    budgets,
    places,
)
good_stages = st.builds(
    lambda a, b, budget, place: a + (f"+{b}" if b else "") + f"@{budget}" + place,
    st.sampled_from(SCORERS),
    st.none() | st.sampled_from(SELECTORS),
    st.integers(1, 64).map(str) | st.floats(0.01, 1).map(repr),
    st.sampled_from(["", "@projector", "@llm:2", "@vision:1"]),
)
specs = st.lists(stages | good_stages, min_size=1, max_size=3).map(" > ".join) | good_stages


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(specs, st.text(SPEC_ALPHABET, max_size=60), st.text(max_size=40)))
def test_any_spec_string_is_a_pipeline_or_a_spec_error(spec):
    valid_or_spec_error(lambda: tp.Pipeline.from_spec(spec))


keys = st.sampled_from(["at", "scorer", "selector", "budget", "name", "stages", "selecter", "layer", "seed"]) | st.text(
    max_size=5
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=True),
    st.sampled_from(NAMES + ["projector", "llm:2", "vision:1", "llm:", "last"]),
    st.binary(max_size=3),
    st.text(max_size=5),
)
json_like = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys | st.integers(0, 3), inner, max_size=4)
)
stage_configs = st.fixed_dictionaries(
    {},
    optional={
        "at": st.sampled_from(["projector", "llm:2", "vision:1"]) | scalars,
        "scorer": st.sampled_from(SCORERS) | st.fixed_dictionaries({"name": st.sampled_from(NAMES)}) | json_like,
        "selector": st.sampled_from(SELECTORS) | json_like,
        "budget": st.integers(0, 40) | st.floats(0, 1.5) | scalars,
    },
)
good_stage_configs = st.fixed_dictionaries(
    {"budget": st.integers(1, 40) | st.floats(0.01, 1)},
    optional={
        "at": st.sampled_from(["projector", "llm:2", "vision:1"]),
        "scorer": st.sampled_from(SCORERS),
        "selector": st.sampled_from(SELECTORS),
    },
)
configs = st.one_of(
    json_like,
    st.lists(good_stage_configs, min_size=1, max_size=2),
    st.lists(stage_configs | good_stage_configs, max_size=3).map(lambda s: {"stages": s}),
    st.lists(stage_configs, max_size=3),
    st.fixed_dictionaries({"stages": st.lists(stage_configs, max_size=3)}, optional={"extra": scalars}),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_any_config_is_a_pipeline_or_a_spec_error(config):
    valid_or_spec_error(lambda: tp.Pipeline.from_config(config))
    if isinstance(config, dict) and all(isinstance(k, str) for k in config):  # keywords: strings only
        valid_or_spec_error(lambda: tp.Pipeline(**config))
    if isinstance(config, dict) and all(isinstance(k, str) for k in config) and "stages" not in config:
        valid_or_spec_error(lambda: tp.Stage(**config))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(configs.map(lambda c: yaml.safe_dump(c) if not isinstance(c, bytes) else ""), st.text(max_size=80)))
def test_any_yaml_file_is_a_pipeline_or_a_spec_error(tmp_path, text):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text, encoding="utf-8")
    valid_or_spec_error(lambda: tp.Pipeline.from_file(path))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"stages": [{"scorer": "vtc-cls", "selecter": "topk", "budget": 4}]},
            "unknown stage key 'selecter'; allowed: at, scorer, selector, budget",
        ),
        (
            {"stages": [{"scorer": "vtc-cls", "budget": 4}], "name": "x"},
            "unknown pipeline config key 'name'; allowed: stages",
        ),
        ({"stage": []}, "unknown pipeline config key 'stage'; allowed: stages"),
        ({}, "a pipeline config needs 'stages'"),
        ({"stages": [{"scorer": "vtc-cls"}]}, "a stage needs a budget"),
        ({"stages": "vtc-cls@4"}, "must be a list of stages"),
        ({"stages": [{"scorer": {"layer": 3}, "budget": 4}]}, "with a string name"),
        ({"stages": [{"scorer": {"name": "vtc-cls", "layer": True}, "budget": 4}]}, "layer: bool True is not accepted"),
        (
            {"stages": [{"scorer": {"name": "vtc-cls", "layer": b"3"}, "budget": 4}]},
            "layer: bytes b'3' is not accepted",
        ),
        ({"stages": [{"scorer": {"name": "random", "seed": 2**64}, "budget": 4}]}, "seed: Input should be less than"),
        ({"stages": [{"scorer": "vtc-cls", "budget": True}]}, "budget must be an int"),
        ([{"scorer": "vtc-cls", "budget": b"4"}], "budget must be an int"),
        (None, "a pipeline config is"),
    ],
)
def test_config_errors_name_what_is_allowed(config, message):
    with pytest.raises(SpecError) as info:
        tp.Pipeline.from_config(config)
    assert message in str(info.value)


def test_unknown_stage_key_in_python_and_yaml(tmp_path):
    with pytest.raises(SpecError, match="unknown stage key 'selecter'; allowed: at, scorer, selector, budget"):
        tp.Stage(scorer="vtc-cls", selecter="topk", budget=4)
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - scorer: vtc-cls\n    selecter: topk\n    budget: 4\n")
    with pytest.raises(SpecError, match="unknown stage key 'selecter'"):
        tp.Pipeline.from_file(path)


def test_spec_parameter_named_name_is_refused():
    with pytest.raises(SpecError, match="'name' is not a parameter of 'vtc-cls'"):
        tp.Pipeline.from_spec("vtc-cls(name='topk')@4")


def test_long_inputs_are_quoted_shortened():
    for spec in ("x" * 5000 + "(@4", "x" * 5000 + "@4", "vtc-cls@" + "1" * 5000 + "x"):
        with pytest.raises(SpecError) as info:
            tp.Pipeline.from_spec(spec)
        message = str(info.value).split("; known strategies")[0]
        assert "characters)" in message and len(message) < 200
    with pytest.raises(SpecError) as info:
        tp.Stage(at="llm:" + "9" * 3000 + "x", selector="uniform", budget=4)
    assert "(3005 characters)" in str(info.value) and len(str(info.value)) < 300
    with pytest.raises(SpecError, match="unknown place"):
        tp.Pipeline.from_spec("uniform@4@llm:" + "9" * 5000)  # more digits than int() parses


def test_too_long_spec_fails_fast():
    start = time.perf_counter()
    with pytest.raises(SpecError, match=f"longer than {MAX_SPEC_CHARS} characters"):
        tp.Pipeline.from_spec("vtc-cls(layer=" + "[" * 50_000 + ")@4")
    assert time.perf_counter() - start < 1


def test_yaml_alias_bomb_and_huge_files_fail_fast(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nstages: [*i]\n")
    start = time.perf_counter()
    with pytest.raises(SpecError, match=r"YAML aliases \(\*name\) are not allowed"):
        tp.Pipeline.from_file(bomb)
    huge = tmp_path / "huge.json"
    huge.write_text('{"stages": [' + " " * MAX_CONFIG_BYTES + "]}")
    with pytest.raises(SpecError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        tp.Pipeline.from_file(huge)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SpecError, match="cannot parse pipeline config"):
        tp.Pipeline.from_file(deep)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00stages")
    with pytest.raises(SpecError, match="cannot parse pipeline config"):
        tp.Pipeline.from_file(binary)
    assert time.perf_counter() - start < 5
