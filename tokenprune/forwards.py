"""Replacing modules' `forward` for a while, and telling whether hooks watch a module: what
`compare`'s fast paths (`layer_reuse`, `last_token`) share."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.nn.modules import module as torch_module

Forward = Callable[..., Any]


@contextmanager
def replaced_forwards(modules: Sequence[nn.Module], wrap: Callable[[int, Forward], Forward]) -> Iterator[None]:
    """Each module's `forward` replaced by `wrap(index, forward)` inside (an instance attribute; on
    exit, what the instance held before is put back, so replacements nest; hooks still run around it)."""
    before = [module.__dict__.get("forward") for module in modules]
    for index, module in enumerate(modules):
        module.forward = wrap(index, module.forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module, held in zip(modules, before, strict=True):
            if held is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = held  # type: ignore[method-assign]


def observed(module: nn.Module, own_pre_hooks: bool = True) -> bool:
    """Whether a hook would see the inputs or outputs of `module` or of anything inside it (a global
    module hook, or one on it or a submodule); `own_pre_hooks=False`: its own pre-hooks do not count
    (they run before the call, on what the caller passes)."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    if module._forward_hooks or (own_pre_hooks and module._forward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules() if m is not module)
