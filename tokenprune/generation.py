"""Which `generate` settings run compressed, checked before `generate` does any work."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from torch import nn

from .errors import InputError

SUPPORTED = "greedy or sampling, one sequence per prompt, with the KV cache"
"""What `generate` inside `tokenprune.apply` supports, for messages."""


def unsupported_settings(kwargs: dict[str, Any], config: Any) -> list[str]:
    """The `generate` settings (from its keyword arguments over `config`, its generation config)
    that compressed generation does not support: beam search and several returned sequences (they
    expand the batch after the images are encoded and pruned) and `use_cache=False` (every step
    re-encodes the full prompt)."""
    config = kwargs.get("generation_config") or config

    def setting(name: str) -> Any:
        return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, None)

    found = [f"{name}={setting(name)}" for name in ("num_beams", "num_return_sequences") if (setting(name) or 1) > 1]
    if setting("use_cache") is False:
        found.append("use_cache=False")
    return found


class GenerateGuard:
    """Wraps `model.generate` on the instance so that unsupported settings are refused before any
    work; `remove()` deletes the wrapper, and the class's method shows through again."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        original: Callable[..., Any] = model.generate  # type: ignore[assignment]

        @wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            found = unsupported_settings(kwargs, getattr(model, "generation_config", None))
            if found:
                raise InputError(
                    f"generate({', '.join(found)}) is not supported inside tokenprune.apply; supported: "
                    f"{SUPPORTED}; run it outside the context"
                )
            return original(*args, **kwargs)

        object.__setattr__(model, "generate", generate)

    def remove(self) -> None:
        self.model.__dict__.pop("generate", None)
