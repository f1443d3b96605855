"""Undo a partial attach: what hooks and instance attributes each module of a model holds, so that
an adapter failing half-way through `attach` leaves the model exactly as it found it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def _hook_tables(module: nn.Module) -> dict[str, dict]:
    """The module's hook dicts (`_forward_pre_hooks`, `_forward_hooks_with_kwargs`, ...), by name;
    each is keyed by the id of the handle that removes its entry."""
    return {
        name: table
        for name, table in vars(module).items()
        if isinstance(table, dict) and "hooks" in name and name.startswith("_")
    }


@dataclass(frozen=True)
class ModuleSnapshot:
    """One module's hook ids per hook dict and its instance attribute names."""

    module: nn.Module
    hooks: dict[str, frozenset]
    attributes: frozenset[str]

    def restore(self) -> None:
        """Remove every hook and instance attribute added since the snapshot."""
        for name, table in _hook_tables(self.module).items():
            for key in [k for k in table if k not in self.hooks.get(name, frozenset())]:
                del table[key]
        for name in [n for n in vars(self.module) if n not in self.attributes]:
            del self.module.__dict__[name]


@dataclass(frozen=True)
class Snapshot:
    """The hooks and instance attributes of every module of a model."""

    modules: tuple[ModuleSnapshot, ...]

    @classmethod
    def take(cls, model: nn.Module) -> Snapshot:
        return cls(
            tuple(
                ModuleSnapshot(m, {n: frozenset(t) for n, t in _hook_tables(m).items()}, frozenset(vars(m)))
                for m in model.modules()
            )
        )

    def restore(self) -> None:
        for module in self.modules:
            module.restore()
