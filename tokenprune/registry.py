"""Name-based registries of strategies and model adapters.

Built-in strategies live in `tokenprune.strategies` (one module each, imported on first use);
third-party ones come from the entry-point groups `tokenprune.strategies` and `tokenprune.adapters`.
A plugin that fails to load is reported as a warning naming it; everything else keeps working.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar

from pydantic import ValidationError

from .errors import RegistryError, StrategyConfigError, UnknownStrategyError
from .strategy import ScoringStrategy, Selector, Strategy

STRATEGY_GROUP = "tokenprune.strategies"
ADAPTER_GROUP = "tokenprune.adapters"
BUILTIN = "built-in"

T = TypeVar("T", bound=type)


class PluginWarning(UserWarning):
    """A plugin could not be loaded; the rest of tokenprune keeps working."""


@dataclass(frozen=True)
class Entry:
    """One registered strategy or adapter: its name, class and where it came from."""

    name: str
    cls: type
    origin: str

    @property
    def role(self) -> str:
        return getattr(self.cls, "role", "adapter")

    @property
    def doc(self) -> str:
        """The first line of the class docstring."""
        lines = (self.cls.__doc__ or "").strip().splitlines()
        return lines[0] if lines else ""


class Registry:
    """Strategies and adapters by name, loaded lazily (built-ins first, then plugins)."""

    def __init__(self) -> None:
        self._strategies: dict[str, Entry] = {}
        self._adapters: dict[str, Entry] = {}
        self._origin = BUILTIN
        self._loaded = False
        self._loading = False

    @contextmanager
    def _loading_from(self, origin: str) -> Iterator[None]:
        previous, self._origin = self._origin, origin
        try:
            yield
        finally:
            self._origin = previous

    def _add(self, table: dict[str, Entry], name: str, cls: type, what: str) -> None:
        existing = table.get(name)
        if existing is not None and existing.cls is not cls:
            raise RegistryError(
                f"{what} name {name!r} is registered twice: by {existing.origin} "
                f"({existing.cls.__module__}.{existing.cls.__qualname__}) and by {self._origin} "
                f"({cls.__module__}.{cls.__qualname__})"
            )
        table[name] = Entry(name=name, cls=cls, origin=self._origin)

    def add_strategy(self, name: str, cls: type[Strategy]) -> None:
        """Register a `ScoringStrategy` or `Selector` subclass under `name`."""
        if not (issubclass(cls, ScoringStrategy) or issubclass(cls, Selector)):
            raise RegistryError(f"{cls.__qualname__} is neither a ScoringStrategy nor a Selector")
        self._add(self._strategies, name, cls, "strategy")

    def add_adapter(self, name: str, cls: type) -> None:
        """Register a `ModelAdapter` subclass under `name`."""
        self._add(self._adapters, name, cls, "adapter")

    def ensure_loaded(self) -> None:
        """Import the built-in strategies and adapters, then every plugin entry point, once."""
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            builtins = importlib.import_module("tokenprune.strategies")
            for module in pkgutil.iter_modules(builtins.__path__):
                importlib.import_module(f"tokenprune.strategies.{module.name}")
            importlib.import_module("tokenprune.adapters")
            for group in (STRATEGY_GROUP, ADAPTER_GROUP):
                for ep in entry_points(group=group):
                    self._load_plugin(ep, group)
            self._loaded = True
        finally:
            self._loading = False

    def _load_plugin(self, ep: Any, group: str) -> None:
        dist = getattr(ep, "dist", None)
        origin = f"plugin {dist.name if dist is not None else ep.value}"
        snapshot = (dict(self._strategies), dict(self._adapters))
        try:
            with self._loading_from(origin):
                loaded = ep.load()
                if isinstance(loaded, type):
                    loaded.name = getattr(loaded, "name", "") or ep.name
                    if issubclass(loaded, Strategy):
                        self.add_strategy(loaded.name, loaded)
                    elif group == ADAPTER_GROUP:
                        self.add_adapter(loaded.name, loaded)
        except Exception as exc:  # a broken plugin must never break the rest
            self._strategies, self._adapters = snapshot
            warnings.warn(
                f"tokenprune plugin {ep.name!r} ({origin}, entry point {ep.value!r} in group "
                f"{group!r}) failed to load and was skipped: {type(exc).__name__}: {exc}",
                PluginWarning,
                stacklevel=2,
            )

    def strategies(self) -> dict[str, Entry]:
        self.ensure_loaded()
        return dict(sorted(self._strategies.items()))

    def adapters(self) -> dict[str, Entry]:
        self.ensure_loaded()
        return dict(sorted(self._adapters.items()))

    def strategy(self, name: str) -> Entry:
        """The entry registered as `name`, or an error listing the known names."""
        table = self.strategies()
        if name not in table:
            known = ", ".join(table) or "(none)"
            raise UnknownStrategyError(f"unknown strategy {name!r}; known strategies: {known}")
        return table[name]


REGISTRY = Registry()


def register(name: str) -> Callable[[T], T]:
    """Class decorator: register a `ScoringStrategy` or `Selector` under `name`.

    Example:
        >>> @register("my-norm")
        ... class MyNorm(ScoringStrategy):
        ...     def score(self, ctx): return ctx.tokens.norm(dim=-1)
    """

    def decorate(cls: T) -> T:
        cls.name = name
        REGISTRY.add_strategy(name, cls)
        return cls

    return decorate


def register_adapter(name: str) -> Callable[[T], T]:
    """Class decorator: register a `ModelAdapter` under `name`."""

    def decorate(cls: T) -> T:
        cls.name = name
        REGISTRY.add_adapter(name, cls)
        return cls

    return decorate


def create(name: str, **params: Any) -> Strategy:
    """Build the strategy registered as `name` with validated parameters.

    Raises:
        UnknownStrategyError: no strategy has that name (the message lists the known ones).
        StrategyConfigError: the parameters do not validate.
    """
    entry = REGISTRY.strategy(name)
    try:
        return entry.cls(**params)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or name}: {err['msg']}" for err in exc.errors())
        allowed = ", ".join(entry.cls.model_fields) or "none"
        raise StrategyConfigError(
            f"bad parameters for strategy {name!r}: {problems} (its parameters: {allowed})"
        ) from None


def list_strategies(role: str | None = None) -> dict[str, Entry]:
    """Registered strategies by name, optionally only one role (`"scorer"` or `"selector"`)."""
    table = REGISTRY.strategies()
    return {n: e for n, e in table.items() if role is None or e.role == role}


def list_adapters() -> dict[str, Entry]:
    """Registered model adapters by name."""
    return REGISTRY.adapters()
