"""`spec.split_top_level`, the one quote-aware splitter: spec strings, CLI lists and lmms-eval's
`--model_args` (through `harness.parse_arg_string`) all split with it."""

import pytest

from tokenprune.errors import InputError, SpecError
from tokenprune.integrations.harness import parse_arg_string
from tokenprune.spec import split_top_level


@pytest.mark.parametrize(
    ("text", "sep", "parts"),
    [
        ("a,b,,c", ",", ["a", "b", "", "c"]),
        ("vtc-cls-ensemble(layers=[-2,-3])@0.25,fastv", ",", ["vtc-cls-ensemble(layers=[-2,-3])@0.25", "fastv"]),
        ("x(s='a,b'),y", ",", ["x(s='a,b')", "y"]),
        ('x(s="a)b"),y', ",", ['x(s="a)b")', "y"]),
        ('x(s="it\'s"),y', ",", ['x(s="it\'s")', "y"]),
        ("a{b,c},d", ",", ["a{b,c}", "d"]),
        ("tome@72@vision:1 > fastv@16@llm:4", ">", ["tome@72@vision:1 ", " fastv@16@llm:4"]),
        ("", ",", [""]),
    ],
)
def test_splits_only_outside_brackets_and_quotes(text, sep, parts):
    assert split_top_level(text, sep) == parts


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a),b", r"unbalanced '\)' at position 1 in spec"),
        ("a(b,c", "unclosed bracket or quote in spec"),
        ("a='b,c", "unclosed bracket or quote in spec"),
    ],
)
def test_unbalanced_brackets_and_quotes_are_refused(text, message):
    with pytest.raises(SpecError, match=message):
        split_top_level(text, ",")


def test_model_args_split_as_specs_and_refuse_unbalanced_text_clearly():
    assert parse_arg_string("pipeline='a,b',k=[1,2]") == {"pipeline": "a,b", "k": "[1,2]"}
    with pytest.raises(InputError, match="unclosed bracket or quote in model arguments"):
        parse_arg_string("pretrained=demo,pipeline=vtc-cls(layer=1@0.5")
    with pytest.raises(InputError, match=r"unbalanced '\]' at position 9 in model arguments"):
        parse_arg_string("layers=-2],batch_size=2")
