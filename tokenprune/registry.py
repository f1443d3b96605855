"""Name-based registries of strategies and model adapters.

Built-in strategies live in `tokenprune.strategies` (one module each, imported on first use);
third-party ones come from the entry-point groups `tokenprune.strategies` and `tokenprune.adapters`.
A plugin that fails to load is reported as a warning naming it; everything else keeps working.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar

from pydantic import ValidationError

from .errors import RegistryError, StrategyConfigError, UnknownStrategyError
from .spec import shorten
from .strategy import ScoringStrategy, Selector, Strategy

STRATEGY_GROUP = "tokenprune.strategies"
ADAPTER_GROUP = "tokenprune.adapters"
BUILTIN = "built-in"
USER = "user code"
BUILTIN_MODULES = ("tokenprune.strategies.", "tokenprune.adapters.")

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
    """Strategies and adapters by name, loaded lazily (built-ins first, then plugins).

    Loading is thread-safe: the first thread to need the tables loads them under a lock while any
    other waits. A registration from user code loads the built-ins first, so a clash with one is an
    error at once (never a broken registry later); re-registering the same class (same module and
    name, as a re-run notebook cell does) replaces the earlier one.
    """

    def __init__(self) -> None:
        self._strategies: dict[str, Entry] = {}
        self._adapters: dict[str, Entry] = {}
        self._plugin: str | None = None
        self._lock = threading.RLock()
        self._builtins_loaded = False
        self._loaded = False
        self._loading = False

    @contextmanager
    def _loading_from(self, origin: str) -> Iterator[None]:
        previous, self._plugin = self._plugin, origin
        try:
            yield
        finally:
            self._plugin = previous

    def _origin_of(self, cls: type) -> str:
        if self._plugin is not None:
            return self._plugin
        return BUILTIN if cls.__module__.startswith(BUILTIN_MODULES) else USER

    def _add(self, table: dict[str, Entry], name: str, cls: type, what: str) -> None:
        origin = self._origin_of(cls)
        if origin != BUILTIN:
            self.ensure_builtins()
        with self._lock:
            for entry in table.values():
                if entry.cls is cls and entry.name != name:
                    raise RegistryError(
                        f"{_qualified(cls)} is already registered as {what} {entry.name!r}; register a subclass "
                        f"under {name!r} instead"
                    )
            existing = table.get(name)
            if existing is not None and existing.cls is not cls and not _same_definition(existing.cls, cls):
                if existing.origin == BUILTIN and origin != BUILTIN:
                    raise RegistryError(
                        f"{what} name {name!r} is registered twice: it is the built-in {_qualified(existing.cls)}, "
                        f"which {origin} ({_qualified(cls)}) cannot replace; register yours under another name"
                    )
                raise RegistryError(
                    f"{what} name {name!r} is registered twice: by {existing.origin} ({_qualified(existing.cls)}) "
                    f"and by {origin} ({_qualified(cls)})"
                )
            table[name] = Entry(name=name, cls=cls, origin=origin)

    def add_strategy(self, name: str, cls: type[Strategy]) -> None:
        """Register a `ScoringStrategy` or `Selector` subclass under `name`."""
        if not isinstance(cls, type) or not (issubclass(cls, ScoringStrategy) or issubclass(cls, Selector)):
            raise RegistryError(f"{cls!r} is neither a ScoringStrategy nor a Selector subclass")
        self._add(self._strategies, name, cls, "strategy")

    def add_adapter(self, name: str, cls: type) -> None:
        """Register a `ModelAdapter` subclass under `name`."""
        self._add(self._adapters, name, cls, "adapter")

    def ensure_builtins(self) -> None:
        """Import the built-in strategies and adapters, once (re-entrant: a call made while they
        import returns at once)."""
        if self._builtins_loaded:
            return
        with self._lock:
            if self._builtins_loaded or self._loading:
                return
            self._loading = True
            try:
                builtins = importlib.import_module("tokenprune.strategies")
                for module in pkgutil.iter_modules(builtins.__path__):
                    importlib.import_module(f"tokenprune.strategies.{module.name}")
                importlib.import_module("tokenprune.adapters")
                self._builtins_loaded = True
            finally:
                self._loading = False

    def ensure_loaded(self) -> None:
        """Import the built-in strategies and adapters, then every plugin entry point, once."""
        if self._loaded:
            return
        with self._lock:
            if self._loaded or self._loading:
                return
            self.ensure_builtins()
            self._loading = True
            try:
                for group in (STRATEGY_GROUP, ADAPTER_GROUP):
                    for ep in entry_points(group=group):
                        self._load_plugin(ep, group)
                self._loaded = True
            finally:
                self._loading = False

    def _load_plugin(self, ep: Any, group: str) -> None:
        dist = getattr(ep, "dist", None)
        origin = f"plugin {dist.name if dist is not None else ep.value}"
        with self._lock:
            snapshot = (dict(self._strategies), dict(self._adapters))
            try:
                with self._loading_from(origin):
                    loaded = ep.load()
                    if isinstance(loaded, type):
                        named: Any = loaded  # strategies and adapters carry their registered `name`
                        named.name = getattr(loaded, "name", "") or ep.name
                        if issubclass(loaded, Strategy):
                            self.add_strategy(named.name, loaded)
                        elif group == ADAPTER_GROUP:
                            self.add_adapter(named.name, loaded)
            except (Exception, SystemExit) as exc:  # a broken plugin (even one calling sys.exit) never breaks the rest
                self._strategies, self._adapters = snapshot
                what = f"SystemExit({exc.code!r}) (it called sys.exit)" if isinstance(exc, SystemExit) else None
                warnings.warn(
                    f"tokenprune plugin {ep.name!r} ({origin}, entry point {ep.value!r} in group "
                    f"{group!r}) failed to load and was skipped: {what or f'{type(exc).__name__}: {exc}'}",
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
            raise UnknownStrategyError(f"unknown strategy {shorten(name)}; known strategies: {known}")
        return table[name]


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_definition(a: type, b: type) -> bool:
    """Two classes from the same module under the same name: one definition run twice (a notebook
    cell re-run, a module reloaded)."""
    return a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__


REGISTRY = Registry()


def register(name: str) -> Callable[[T], T]:
    """Class decorator: register a `ScoringStrategy` or `Selector` under `name`.

    Example:
        >>> @register("my-norm")
        ... class MyNorm(ScoringStrategy):
        ...     def score(self, ctx): return ctx.tokens.norm(dim=-1)
    """

    def decorate(cls: T) -> T:
        REGISTRY.add_strategy(name, cls)
        named: Any = cls  # a strategy class carries its registered `name`
        named.name = name
        return cls

    return decorate


def register_adapter(name: str) -> Callable[[T], T]:
    """Class decorator: register a `ModelAdapter` under `name`."""

    def decorate(cls: T) -> T:
        REGISTRY.add_adapter(name, cls)
        named: Any = cls  # an adapter class carries its registered `name`
        named.name = name
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
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or name}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        allowed = ", ".join(getattr(entry.cls, "model_fields", ())) or "none"
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
