"""Budgets: how many tokens a stage keeps, as a count `k`, a ratio of the tokens reaching it, or a
rule evaluated per image on the scorer's scores (`BudgetRule`: `mass(0.9)`, `iqr`)."""

from __future__ import annotations

import ast
import math
import re
from abc import abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from .errors import BudgetError, SpecError


class BudgetRule(BaseModel):
    """A budget evaluated per image on its scores: each image keeps `count(scores)` tokens, clamped
    to `[min, max]` (and to the `N` tokens that reach the stage), so images of one batch may keep
    different counts.

    A subclass sets `name` (its spec name, registered when the class is defined), optionally
    `primary` (the one parameter a spec may give without its key, as in `mass(0.9)`), and implements
    `count`.

    Attributes:
        min: the floor, at least 1 (an image with fewer tokens keeps them all).
        max: the cap, or `None` for none.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ClassVar[str] = ""
    primary: ClassVar[str | None] = None

    min: int = Field(1, ge=1)
    max: int | None = Field(None, ge=1)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.name:
            BUDGET_RULES[cls.name] = cls

    @model_validator(mode="after")
    def _bounds(self) -> BudgetRule:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max={self.max} is below min={self.min}")
        return self

    @abstractmethod
    def count(self, scores: Tensor) -> Tensor:
        """`[B]` long: tokens each image would keep by the rule alone, from its scores `[B, N]`."""

    def counts(self, scores: Tensor) -> Tensor:
        """`[B]` long: tokens each image keeps, `count(scores)` clamped to `[min, max]` and to `[1, N]`."""
        n = scores.shape[1]
        upper = n if self.max is None else min(self.max, n)
        return self.count(scores).clamp(min=min(self.min, n), max=upper)

    def params(self) -> dict[str, Any]:
        """Parameters that differ from the defaults."""
        return self.model_dump(exclude_defaults=True)

    def to_config(self) -> dict[str, Any]:
        """`{"rule": name, **params}`, the JSON/YAML form."""
        return {"rule": self.name, **self.params()}

    def to_spec(self) -> str:
        """`name` or `name(primary, key=value, ...)`, e.g. `mass(0.9,min=16,max=64)`."""
        params = self.params()
        terms = [repr(params.pop(self.primary))] if self.primary in params else []
        terms += [f"{key}={value!r}" for key, value in params.items()]
        return self.name + (f"({','.join(terms)})" if terms else "")

    def __str__(self) -> str:
        return self.to_spec()


BUDGET_RULES: dict[str, type[BudgetRule]] = {}
"""Budget rules by name; a `BudgetRule` subclass with a `name` adds itself."""


class MassRule(BudgetRule):
    """`mass(fraction)`: the fewest tokens whose scores hold `fraction` of the image's total score.

    Scores count as mass when positive: negative scores and `-inf` hold none. An image whose total
    is 0 keeps the floor; one with `+inf` scores keeps exactly its `+inf` tokens (they hold all the
    mass). Computed in float64.
    """

    name: ClassVar[str] = "mass"
    primary: ClassVar[str | None] = "fraction"

    fraction: float = Field(gt=0.0, le=1.0)

    def count(self, scores: Tensor) -> Tensor:
        infinite = torch.isposinf(scores).sum(dim=1)
        mass = scores.double().clamp_min(0.0).masked_fill(torch.isposinf(scores), 0.0)
        held = mass.sort(dim=1, descending=True).values.cumsum(dim=1)  # [B, N]
        total = held[:, -1:]
        needed = (held < self.fraction * total).sum(dim=1) + (total[:, 0] > 0).long()
        return torch.where(infinite > 0, infinite, needed)


class IqrRule(BudgetRule):
    """`iqr`: the tokens whose score is an outlier above `Q3 + whisker * (Q3 - Q1)` (PruMerge's
    adaptive k; quartiles by linear interpolation, as `numpy.percentile`). Computed in float64."""

    name: ClassVar[str] = "iqr"

    whisker: float = Field(1.5, ge=0.0)

    def count(self, scores: Tensor) -> Tensor:
        values = scores.double()
        q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=values.dtype, device=values.device), dim=1)
        return (values > (q3 + self.whisker * (q3 - q1))[:, None]).sum(dim=1)


Budget = int | float | BudgetRule


WITHDRAW_HINT = (
    "(budget 0, withdrawing every visual token as VTW does, is allowed inside the LLM only: e.g. uniform@0@llm:16)"
)
_RULE = re.compile(r"^([A-Za-z_][A-Za-z0-9_\-]*)\s*(?:\((.*)\))?$", re.DOTALL)


def _rule_names() -> str:
    return ", ".join(sorted(BUDGET_RULES))


def make_rule(name: str, params: dict[str, Any]) -> BudgetRule:
    """The rule `name` with `params`.

    Raises:
        BudgetError: an unknown rule or invalid parameters.
    """
    cls = BUDGET_RULES.get(name)
    if cls is None:
        raise BudgetError(f"unknown budget rule {name!r}; known rules: {_rule_names()}")
    try:
        return cls(**params)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or name}: {e['msg']}" for e in exc.errors())
        given = ", ".join(f"{key}={value!r}" for key, value in params.items())
        raise BudgetError(f"invalid budget rule {name}({given}): {problems}") from None


def parse_rule(text: str) -> BudgetRule:
    """`mass(0.9,min=16,max=64)`, `iqr` or `iqr(whisker=3.0)` -> the rule.

    Raises:
        SpecError: a malformed term.
        BudgetError: an unknown rule or invalid parameters.
    """
    m = _RULE.match(text.strip())
    if m is None:
        raise SpecError(f"malformed budget rule {text.strip()!r}; expected e.g. mass(0.9,min=16,max=64) or iqr")
    name, body = m.group(1), m.group(2)
    if name not in BUDGET_RULES:
        raise BudgetError(f"unknown budget rule {name!r}; known rules: {_rule_names()}")
    params: dict[str, Any] = {}
    if body and body.strip():
        try:
            call = ast.parse(f"_({body})", mode="eval").body
            if not isinstance(call, ast.Call):
                raise ValueError(body)
            positional = [ast.literal_eval(a) for a in call.args]
            params = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg is not None}
        except (SyntaxError, ValueError):
            raise SpecError(f"malformed parameters {body!r} of budget rule {name!r}; use numbers") from None
        primary = BUDGET_RULES[name].primary
        if len(positional) > (1 if primary else 0) or (positional and primary in params):
            usage = f"{name}(VALUE, key=value)" if primary else f"{name}(key=value)"
            raise SpecError(f"budget rule {text.strip()!r}: write {usage}")
        if positional and primary is not None:
            params = {primary: positional[0], **params}
    return make_rule(name, params)


def check_budget(budget: object, allow_zero: bool = False) -> Budget:
    """Validate a budget: an int `k >= 1`, a float ratio in `(0, 1]`, or a `BudgetRule` (also given
    as its spec string, `"mass(0.9)"`, or its config, `{"rule": "mass", "fraction": 0.9}`); with
    `allow_zero`, also the int `0` (the stage withdraws every visual token).

    Raises:
        BudgetError: for booleans, other types, `k < 1` (`k < 0` with `allow_zero`), a ratio
            outside `(0, 1]`, or an invalid rule.
    """
    if isinstance(budget, BudgetRule):
        return budget
    if isinstance(budget, str):
        return parse_rule(budget)
    if isinstance(budget, dict) and "rule" in budget:
        return make_rule(budget["rule"], {k: v for k, v in budget.items() if k != "rule"})
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise BudgetError(
            f"budget must be an int k >= 1, a float ratio in (0, 1] or a rule ({_rule_names()}), got {budget!r}"
        )
    if isinstance(budget, int):
        if budget < (0 if allow_zero else 1):
            raise BudgetError(
                f"budget {budget} keeps no tokens; use an int k >= 1 or a float ratio in (0, 1] {WITHDRAW_HINT}"
            )
        return budget
    if not math.isfinite(budget) or not 0.0 < budget <= 1.0:
        raise BudgetError(f"budget ratio {budget!r} is outside (0, 1]; use a ratio such as 0.25, or an int k >= 1")
    return budget


def resolve_budget(budget: int | float, n: int, where: object = "stage") -> int:
    """The number of tokens to keep out of `n` for a fixed budget (a rule is evaluated on scores:
    `BudgetRule.counts`); `where` names the stage in the error (formatted only when one is raised,
    so a stage can pass itself).

    A ratio keeps `round(ratio * n)` tokens (halves rounded up), at least 1; the int 0 keeps none.

    Raises:
        BudgetError: an int `k` larger than `n`.
    """
    check_budget(budget, allow_zero=True)
    if isinstance(budget, int):
        if budget > n:
            raise BudgetError(
                f"budget {budget} exceeds the {n} tokens that reach {where}; use an int k <= {n} or a ratio in (0, 1]"
            )
        return budget
    return max(1, min(n, math.floor(budget * n + 0.5)))


def format_budget(budget: Budget) -> str:
    """The spec form of a budget: `64`, `0.25` (a ratio always shows its decimal point) or a rule's
    `mass(0.9,min=16)`."""
    if isinstance(budget, BudgetRule):
        return budget.to_spec()
    return str(budget) if isinstance(budget, int) else repr(float(budget))


def budget_config(budget: Budget) -> int | float | dict[str, Any]:
    """The JSON/YAML form of a budget: the number, or a rule's `{"rule": ..., **params}`."""
    return budget.to_config() if isinstance(budget, BudgetRule) else budget
