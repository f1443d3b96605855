"""The spec string grammar, the CLI's short form of a pipeline.

```
pipeline := stage (">" stage)*
stage    := strategy ["+" strategy] "@" budget ["@" place]
strategy := NAME ["(" key=value ("," key=value)* ")"]
budget   := INT | FLOAT | RULE    # 64 keeps 64 tokens, 0.25 keeps a quarter, 1.0 keeps all
RULE     := NAME ["(" [value ","] key=value ("," key=value)* ")"]   # per image: mass(0.9,min=16), iqr
place    := "projector" | "llm:" INT | "vision:" INT
```
Values are Python literals (`3`, `-0.5`, `'last'`, `[-2, -6, -10]`, `True`). Examples:
`vtc-cls@64`, `vtc-cls-ensemble(layers=[-2,-6,-10])@0.25`, `vtc-cls+topk@192 > fastv@64@llm:2`.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

from .budget import Budget, parse_rule
from .errors import SpecError

MAX_SPEC_CHARS = 10_000
"""Longer spec strings are refused before parsing (a real pipeline's spec is a few hundred)."""
_QUOTE_CHARS = 60
_NAME = re.compile(r"^([A-Za-z0-9_.\-]+)\s*(?:\((.*)\))?$", re.DOTALL)
_OPEN, _CLOSE = "([{", ")]}"


@dataclass(frozen=True)
class StrategySpec:
    """One `name(params)` term."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    """One parsed stage: its strategy terms, budget and optional place."""

    strategies: tuple[StrategySpec, ...]
    budget: Budget
    at: str | None = None


def shorten(text: object, limit: int = _QUOTE_CHARS) -> str:
    """`repr(text)`, cut to about `limit` characters with the full length said, for messages."""
    shown = repr(text)
    if len(shown) <= limit:
        return shown
    size = f"{len(text)} characters" if isinstance(text, str) else type(text).__name__
    return f"{shown[: limit - 4]}...{shown[-3:]} ({size})"


def split_top_level(text: str, sep: str, what: str = "spec") -> list[str]:
    """Split `text` on `sep` outside brackets (`()[]{}`) and quotes (`'` or `"`): the one quote-aware
    splitter, for spec strings, comma-separated CLI lists and lmms-eval's `--model_args`.

    Raises:
        SpecError: a closing bracket without its opening one, or a bracket or quote left open
            (`what` names the text in the message).
    """
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced {ch!r} at position {i} in {what} {shorten(text)}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise SpecError(f"unclosed bracket or quote in {what} {shorten(text)}")
    parts.append(text[start:])
    return parts


def parse_strategy(text: str) -> StrategySpec:
    """Parse `name` or `name(key=value, ...)`."""
    m = _NAME.match(text.strip())
    if m is None:
        raise SpecError(
            f"malformed strategy {shorten(text.strip())}; expected NAME or NAME(key=value, ...), "
            "e.g. vtc-cls or vtc-cls-ensemble(start_layer=12)"
        )
    name, body = m.group(1), m.group(2)
    if not body or not body.strip():
        return StrategySpec(name=name)
    try:
        call = ast.parse(f"_({body})", mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise SpecError(f"malformed parameters {shorten(body)} of strategy {shorten(name)}") from None
    if not isinstance(call, ast.Call) or call.args:
        raise SpecError(f"parameters of {shorten(name)} must be key=value pairs, got {shorten(body)}")
    params = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise SpecError(f"'**' is not allowed in the parameters of {shorten(name)}")
        if kw.arg == "name":
            raise SpecError(f"'name' is not a parameter of {shorten(name)}; the strategy's name comes before '('")
        try:
            params[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise SpecError(
                f"parameter {kw.arg!r} of {shorten(name)} must be a literal (number, string, list, bool)"
            ) from None
    return StrategySpec(name=name, params=params)


def parse_budget(text: str) -> Budget:
    """`64` -> 64 (a count), `0.25` / `1.0` -> a ratio, `mass(0.9)` -> a `BudgetRule`."""
    text = text.strip()
    if text[:1].isalpha():
        return parse_rule(text)
    try:
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
    except ValueError:
        raise SpecError(
            f"malformed budget {shorten(text)}; use an int count (64), a ratio in (0, 1] (0.25) or a rule (mass(0.9))"
        ) from None


def parse_stage(text: str) -> StageSpec:
    """Parse one stage `strategy[+strategy]@budget[@place]`."""
    parts = split_top_level(text.strip(), "@")
    if len(parts) not in (2, 3) or not parts[0].strip():
        raise SpecError(
            f"malformed stage {shorten(text.strip())}; expected STRATEGY[+SELECTOR]@BUDGET[@PLACE], "
            "e.g. vtc-cls@64 or fastv@0.5@llm:2"
        )
    terms = split_top_level(parts[0], "+")
    if len(terms) > 2 or any(not t.strip() for t in terms):
        raise SpecError(f"malformed stage {shorten(text.strip())}: at most one scorer and one selector, joined by '+'")
    at = parts[2].strip() if len(parts) == 3 else None
    return StageSpec(strategies=tuple(parse_strategy(t) for t in terms), budget=parse_budget(parts[1]), at=at)


def parse_pipeline(text: str) -> list[StageSpec]:
    """Parse a whole spec string into its stages."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"empty pipeline spec {shorten(text)}; expected e.g. 'vtc-cls@64'")
    if len(text) > MAX_SPEC_CHARS:
        raise SpecError(f"pipeline spec {shorten(text)} is longer than {MAX_SPEC_CHARS} characters")
    return [parse_stage(part) for part in split_top_level(text, ">")]


def format_value(value: Any) -> str:
    """A parameter value in spec form, parseable back by `ast.literal_eval`."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{format_value(k)}:{format_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def format_strategy(name: str, params: dict[str, Any]) -> str:
    """`name` or `name(key=value,...)` in spec form."""
    if not params:
        return name
    return f"{name}(" + ",".join(f"{k}={format_value(v)}" for k, v in params.items()) + ")"
