"""`Stage` and `Pipeline`: where to compress, how, and to how many tokens.

A pipeline is built from Python, from a JSON/YAML config, or from a spec string (see `spec.py`);
the three forms round-trip.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_serializer, model_validator

from .budget import Budget, check_budget, format_budget
from .errors import PlaceError, SpecError, TokenpruneError
from .places import Place
from .registry import REGISTRY, create
from .spec import format_strategy, parse_pipeline
from .strategy import ScoringStrategy, Selector, Strategy


def _as_strategy(value: Any, role: str) -> Strategy | None:
    """Accept an instance, a registered name, or `{"name": ..., **params}`."""
    if value is None or isinstance(value, Strategy):
        strategy = value
    elif isinstance(value, str):
        strategy = create(value)
    elif isinstance(value, dict) and "name" in value:
        params = {k: v for k, v in value.items() if k != "name"}
        strategy = create(value["name"], **params)
    else:
        raise SpecError(f"a {role} must be a strategy, its name, or {{'name': ..., ...}}; got {value!r}")
    if strategy is not None and strategy.role != role:
        raise SpecError(f"{strategy.name!r} is a {strategy.role}, not a {role}")
    return strategy


class Stage(BaseModel):
    """One compression step: a place, a scorer (optional for score-free selectors), a selector and
    a budget (int `k` per image, or a ratio of the tokens reaching the stage)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    at: str = "projector"
    scorer: ScoringStrategy | None = None
    selector: Selector | None = None
    budget: Budget

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

        return {"at": self.at, "scorer": term(self.scorer), "selector": term(self.selector), "budget": self.budget}


class Pipeline(BaseModel):
    """An ordered list of stages, applied from the vision encoder to the LLM."""

    model_config = ConfigDict(frozen=True)

    stages: tuple[Stage, ...]

    def __init__(self, stages: Any = None, **data: Any) -> None:
        super().__init__(stages=tuple(stages if stages is not None else data.pop("stages", ())), **data)

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
            if role == "selector":
                if len(stage.strategies) > 1:
                    raise SpecError(f"{first.name!r} is a selector; write SCORER+SELECTOR@BUDGET")
                scorer, selector = None, {"name": first.name, **first.params}
            else:
                scorer = {"name": first.name, **first.params}
                second = stage.strategies[1] if len(stage.strategies) > 1 else None
                selector = None if second is None else {"name": second.name, **second.params}
            scorer_obj = _as_strategy(scorer, "scorer")
            at = stage.at or (scorer_obj.default_place if scorer_obj is not None else "projector")
            stages.append(Stage(at=at, scorer=scorer_obj, selector=selector, budget=stage.budget))
        return cls(stages)

    def to_spec(self) -> str:
        """The spec string; `Pipeline.from_spec(p.to_spec()) == p`."""
        return " > ".join(stage.to_spec() for stage in self.stages)

    @classmethod
    def from_config(cls, config: dict[str, Any] | list[Any]) -> Pipeline:
        """Build from `{"stages": [{"at", "scorer", "selector", "budget"}, ...]}`."""
        stages = config["stages"] if isinstance(config, dict) else config
        return cls([s if isinstance(s, Stage) else Stage(**s) for s in stages])

    def to_config(self) -> dict[str, Any]:
        """JSON-compatible config; `Pipeline.from_config(p.to_config()) == p`."""
        return {"stages": [stage.model_dump() for stage in self.stages]}

    @classmethod
    def from_file(cls, path: str | Path) -> Pipeline:
        """Load a `.json`, `.yaml` or `.yml` config file."""
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.from_config(data)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON or YAML, by the file's suffix."""
        data = self.to_config()
        text = json.dumps(data, indent=2) if str(path).endswith(".json") else yaml.safe_dump(data)
        Path(path).write_text(text)

    @classmethod
    def coerce(cls, value: Pipeline | str | dict[str, Any] | list[Any]) -> Pipeline:
        """A pipeline from a `Pipeline`, a spec string, or a config."""
        if isinstance(value, Pipeline):
            return value
        if isinstance(value, str):
            return cls.from_spec(value)
        if isinstance(value, dict | list):
            return cls.from_config(value)
        raise TokenpruneError(f"expected a Pipeline, a spec string or a config, got {type(value).__name__}")

    def __str__(self) -> str:
        return self.to_spec()
