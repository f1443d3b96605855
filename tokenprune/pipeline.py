"""`Stage` and `Pipeline`: where to compress, how, and to how many tokens.

A pipeline is built from Python, from a JSON/YAML config, or from a spec string (see `spec.py`);
the three forms round-trip.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_serializer, model_validator

from .budget import Budget, BudgetRule, budget_config, check_budget, format_budget
from .errors import PlaceError, SpecError
from .places import Place
from .registry import REGISTRY, create
from .spec import format_strategy, parse_pipeline, shorten
from .strategy import ScoringStrategy, Selector, Strategy

MAX_CONFIG_BYTES = 1 << 20
"""Larger config files are refused before parsing (a real pipeline's config is under a kilobyte)."""


def _as_strategy(value: Any, role: str) -> Strategy | None:
    """Accept an instance, a registered name, or `{"name": ..., **params}`."""
    if value is None or isinstance(value, Strategy):
        strategy = value
    elif isinstance(value, str):
        strategy = create(value)
    elif isinstance(value, Mapping) and isinstance(value.get("name"), str):
        params = {k: v for k, v in value.items() if k != "name"}
        if not all(isinstance(k, str) for k in params):
            raise SpecError(f"parameter names of {role} {value['name']!r} must be strings, got {shorten(list(params))}")
        strategy = create(value["name"], **params)
    else:
        raise SpecError(
            f"a {role} must be a strategy, its name, or {{'name': ..., **parameters}} with a string name; "
            f"got {shorten(value)}"
        )
    if strategy is not None and strategy.role != role:
        raise SpecError(f"{strategy.name!r} is a {strategy.role}, not a {role}")
    return strategy


def _validation_problem(what: str, exc: ValidationError) -> SpecError:
    """A pydantic `ValidationError` of a stage or pipeline as one `SpecError` line."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or what}: {err['msg'].removeprefix('Value error, ')}"
        for err in exc.errors()
    )
    return SpecError(f"invalid {what}: {problems}")


def _known_keys(what: str, data: Mapping[Any, Any], allowed: tuple[str, ...]) -> None:
    """Refuse keys of `data` outside `allowed`, naming them and the allowed ones."""
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise SpecError(
            f"unknown {what} key{'s' if len(unknown) > 1 else ''} {', '.join(shorten(k) for k in unknown)}; "
            f"allowed: {', '.join(allowed)}"
        )


STAGE_KEYS = ("at", "scorer", "selector", "budget")


class Stage(BaseModel):
    """One compression step: a place, a scorer (optional for score-free selectors), a selector and
    a budget (int `k` per image, a ratio of the tokens reaching the stage, or a `BudgetRule`
    evaluated per image on the scorer's scores)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")

    at: str = "projector"
    scorer: ScoringStrategy | None = None
    selector: Selector | None = None
    budget: Budget

    def __init__(self, **data: Any) -> None:
        """Raises `SpecError` (or a subclass) for unknown keys, a missing budget or any bad value."""
        _known_keys("stage", data, STAGE_KEYS)
        if "budget" not in data:
            raise SpecError("a stage needs a budget: an int k >= 1 or a float ratio in (0, 1]")
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _validation_problem("stage", exc) from None

    @field_validator("scorer", mode="before")
    @classmethod
    def _scorer(cls, value: Any) -> Any:
        return _as_strategy(value, "scorer")

    @field_validator("selector", mode="before")
    @classmethod
    def _selector(cls, value: Any) -> Any:
        return _as_strategy(value, "selector")

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Budget:
        return check_budget(value, allow_zero=True)

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, value: Any) -> str:
        return str(Place.parse(value))

    @model_validator(mode="after")
    def _complete(self) -> Stage:
        if self.budget == 0 and self.place.kind != "llm":
            check_budget(0)
        if self.selector is None:
            if self.scorer is None:
                raise SpecError("a stage needs a scorer, a selector, or both")
            object.__setattr__(self, "selector", create(self.scorer.default_selector))
        if self.scorer is None and isinstance(self.budget, BudgetRule):
            raise SpecError(
                f"budget rule {self.budget} is evaluated on a scorer's scores, and {self.selector.name!r} "
                f"has none; pair it with a scorer, e.g. vtc-cls+{self.selector.name}@{self.budget}"
            )
        if self.scorer is None and self.selector.needs_scores:
            raise SpecError(
                f"selector {self.selector.name!r} needs scores; pair it with a scorer, "
                f"e.g. vtc-cls+{self.selector.name}@64"
            )
        if self.scorer is not None and self.scorer.withdraws and self.budget != 0:
            raise SpecError(
                f"{self.scorer.name!r} withdraws every visual token, so its budget is 0 "
                f"(e.g. {self.scorer.name}@0@{self.scorer.default_place}), not {self.budget!r}"
            )
        place = self.place
        if self.scorer is not None and place.kind not in self.scorer.places:
            raise PlaceError(
                f"scorer {self.scorer.name!r} cannot run at {place}; it runs at: " + ", ".join(self.scorer.places)
            )
        return self

    @property
    def place(self) -> Place:
        return Place.parse(self.at)

    def to_spec(self) -> str:
        """This stage in spec form, e.g. `vtc-cls@64` or `vtc-cls+topk@0.25@projector`."""
        return self.spec

    @cached_property
    def spec(self) -> str:
        """The spec form, formatted once (stages are frozen; adapters label every forward with it)."""
        terms = []
        if self.scorer is not None:
            terms.append(format_strategy(self.scorer.name, self.scorer.params()))
        default_selector = self.scorer.default_selector if self.scorer is not None else None
        if self.scorer is None or self.selector.name != default_selector or self.selector.params():
            terms.append(format_strategy(self.selector.name, self.selector.params()))
        default_at = self.scorer.default_place if self.scorer is not None else "projector"
        at = "" if self.at == str(Place.parse(default_at)) else f"@{self.at}"
        return "+".join(terms) + f"@{format_budget(self.budget)}" + at

    def __str__(self) -> str:
        return f"stage {self.to_spec()!r} at {self.at}"

    @model_serializer
    def _serialize(self) -> dict[str, Any]:
        def term(s: Strategy | None) -> dict[str, Any] | None:
            return None if s is None else {"name": s.name, **s.params()}

        return {
            "at": self.at,
            "scorer": term(self.scorer),
            "selector": term(self.selector),
            "budget": budget_config(self.budget),
        }


class Pipeline(BaseModel):
    """An ordered list of stages, applied from the vision encoder to the LLM."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stages: tuple[Stage, ...]

    def __init__(self, stages: Any = None, **data: Any) -> None:
        """`stages`: `Stage`s or stage configs (mappings); raises `SpecError` for anything else."""
        _known_keys("pipeline", data, ("stages",))
        stages = stages if stages is not None else data.pop("stages", ())
        if isinstance(stages, str | bytes | Mapping) or not isinstance(stages, list | tuple):
            raise SpecError(f"a pipeline's stages must be a list of stages, got {shorten(stages)}")
        try:
            super().__init__(stages=tuple(_as_stage(s) for s in stages), **data)
        except ValidationError as exc:
            raise _validation_problem("pipeline", exc) from None

    @model_validator(mode="after")
    def _ordered(self) -> Pipeline:
        if not self.stages:
            raise SpecError("a pipeline needs at least one stage")
        for before, after in zip(self.stages, self.stages[1:], strict=False):
            if not before.place < after.place:
                raise SpecError(
                    f"stages must run in model order, one per place: {before.at} then {after.at} "
                    "is not allowed (order: vision:L < projector < llm:K)"
                )
            if before.budget == 0:
                raise SpecError(
                    f"no visual token is left after the budget-0 stage at {before.at}; it must be the last stage"
                )
            if isinstance(before.budget, int) and isinstance(after.budget, int) and after.budget > before.budget:
                raise SpecError(
                    f"budgets must shrink along the pipeline: {after.budget} at {after.at} "
                    f"after {before.budget} at {before.at}"
                )
        return self

    @classmethod
    def from_spec(cls, spec: str) -> Pipeline:
        """Build from a spec string such as `vtc-cls@64` (grammar in `tokenprune.spec`)."""
        stages = []
        for stage in parse_pipeline(spec):
            first = stage.strategies[0]
            role = REGISTRY.strategy(first.name).role
            scorer: dict[str, Any] | None
            selector: dict[str, Any] | None
            if role == "selector":
                if len(stage.strategies) > 1:
                    raise SpecError(f"{first.name!r} is a selector; write SCORER+SELECTOR@BUDGET")
                scorer, selector = None, {"name": first.name, **first.params}
            else:
                scorer = {"name": first.name, **first.params}
                second = stage.strategies[1] if len(stage.strategies) > 1 else None
                selector = None if second is None else {"name": second.name, **second.params}
            scorer_obj = _as_strategy(scorer, "scorer")
            at = stage.at or (scorer_obj.default_place if isinstance(scorer_obj, ScoringStrategy) else "projector")
            stages.append(Stage(at=at, scorer=scorer_obj, selector=selector, budget=stage.budget))
        return cls(stages)

    def to_spec(self) -> str:
        """The spec string; `Pipeline.from_spec(p.to_spec()) == p`."""
        return " > ".join(stage.to_spec() for stage in self.stages)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | list[Any]) -> Pipeline:
        """Build from `{"stages": [{"at", "scorer", "selector", "budget"}, ...]}` (or the list alone).

        Raises:
            SpecError: any other shape, an unknown key (the message names the allowed ones), or a
                bad value.
        """
        if isinstance(config, Mapping):
            _known_keys("pipeline config", config, ("stages",))
            if "stages" not in config:
                raise SpecError("a pipeline config needs 'stages': a list of stage configs")
            return cls(config["stages"])
        if isinstance(config, list | tuple):
            return cls(config)
        raise SpecError(f"a pipeline config is {{'stages': [...]}} or a list of stages, got {shorten(config)}")

    def to_config(self) -> dict[str, Any]:
        """JSON-compatible config; `Pipeline.from_config(p.to_config()) == p`."""
        return {"stages": [stage.model_dump() for stage in self.stages]}

    @classmethod
    def from_file(cls, path: str | Path) -> Pipeline:
        """Load a `.json`, `.yaml` or `.yml` config file (at most `MAX_CONFIG_BYTES`; YAML without
        aliases).

        Raises:
            FileNotFoundError: no such file.
            SpecError: too large, not UTF-8, not parseable, or not a valid pipeline config.
        """
        path = Path(path)
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise SpecError(f"pipeline config {str(path)!r} is larger than {MAX_CONFIG_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
            data = json.loads(text) if path.suffix == ".json" else _safe_yaml(text)
        except (UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SpecError(f"cannot parse pipeline config {str(path)!r}: {shorten(first, 200)}") from None
        return cls.from_config(data)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON or YAML, by the file's suffix."""
        data = self.to_config()
        text = json.dumps(data, indent=2) if str(path).endswith(".json") else yaml.safe_dump(data)
        Path(path).write_text(text)

    @classmethod
    def coerce(cls, value: Pipeline | str | Mapping[str, Any] | list[Any]) -> Pipeline:
        """A pipeline from a `Pipeline`, a spec string, or a config."""
        if isinstance(value, Pipeline):
            return value
        if isinstance(value, str):
            return cls.from_spec(value)
        if isinstance(value, Mapping | list):
            return cls.from_config(value)
        raise SpecError(f"expected a Pipeline, a spec string or a config, got {type(value).__name__}")

    def __str__(self) -> str:
        return self.to_spec()


def _as_stage(value: Any) -> Stage:
    """A `Stage` from itself or a stage config mapping."""
    if isinstance(value, Stage):
        return value
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise SpecError(f"stage keys must be strings, got {shorten(list(value))}; allowed: {', '.join(STAGE_KEYS)}")
        return Stage(**value)
    raise SpecError(f"a stage must be a Stage or a mapping with keys {', '.join(STAGE_KEYS)}; got {shorten(value)}")


def _safe_yaml(text: str) -> Any:
    """`yaml.safe_load`, refusing aliases (`*name`): they let a few bytes expand without bound.

    Raises:
        SpecError: the text uses an alias.
    """
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise SpecError("YAML aliases (*name) are not allowed in a pipeline config; write the values out")
    return yaml.safe_load(text)
