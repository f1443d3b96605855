"""`generate` inside `tokenprune.apply`: which settings run compressed, checked before `generate` does
any work, and how several sequences per prompt share that prompt's kept image tokens."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any

from torch import nn

from .compat import cache_of
from .errors import InputError

if TYPE_CHECKING:
    from .adapters.base import ModelAdapter

SUPPORTED = (
    "greedy, sampling and beam search, several sequences per prompt (num_return_sequences), with or without "
    "the KV cache (use_cache=False), a fresh dynamic or static cache"
)
"""What `generate` inside `tokenprune.apply` supports, for messages."""


def _setting(kwargs: dict[str, Any], config: Any, name: str) -> Any:
    """`generate`'s setting `name`: its keyword argument over `config` (its generation config)."""
    config = kwargs.get("generation_config") or config
    return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, None)


def copies(kwargs: dict[str, Any], config: Any) -> int:
    """How many rows `generate` makes of each prompt (beams or returned sequences): HF's expand size."""
    return max(int(_setting(kwargs, config, name) or 1) for name in ("num_beams", "num_return_sequences"))


def unsupported_settings(kwargs: dict[str, Any], config: Any, expands: bool = True) -> list[str]:
    """The `generate` settings (from its keyword arguments over `config`, its generation config)
    that compressed generation does not support: a cache that already holds a prompt prefix (its
    tokens would sit before a prompt the engine shortens), and, for an adapter that cannot share
    one prompt's kept tokens between its copies (`expands` False), beam search and several
    returned sequences."""
    found = (
        []
        if expands
        else [
            f"{name}={_setting(kwargs, config, name)}"
            for name in ("num_beams", "num_return_sequences")
            if int(_setting(kwargs, config, name) or 1) > 1
        ]
    )
    cache = cache_of(kwargs)
    cached = cache.get_seq_length() if cache is not None else 0
    if isinstance(cached, int) and cached > 0:  # a static cache counts on the device: the prefill checks it
        found.append(f"a pre-filled prompt cache ({cached} tokens cached)")
    return found


def _keep_multimodal_outputs(input_ids: Any, outputs: Any, expand_size: int = 1, inputs_embeds: Any = None) -> Any:
    """Stands in for HF's `_expand_multimodal_outputs` inside a compressing `generate`: the encoded
    (already compressed) images stay one per image, and the adapter gives each copy of a prompt
    that prompt's kept tokens (HF counts placeholders against the compressed lengths and would
    drop them)."""
    return outputs


class GenerateGuard:
    """Wraps `model.generate` on the instance: unsupported settings are refused before any work; the
    prompt's position ids come from the adapter where it computes them faster than `generate` would
    (`ModelAdapter.generation_positions`, e.g. M-RoPE's on the device); and for the call's duration
    the adapter learns how many copies of each prompt `generate` makes (`ModelAdapter.copies`).
    `remove()` deletes the wrapper, so the class's method shows through again."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter) -> None:
        self.model = model
        original: Callable[..., Any] = model.generate  # type: ignore[assignment]

        @wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            config = getattr(model, "generation_config", None)
            found = unsupported_settings(kwargs, config, adapter.shares_copies)
            if found:
                raise InputError(
                    f"generate({', '.join(found)}) is not supported inside tokenprune.apply; supported: "
                    f"{SUPPORTED if adapter.shares_copies else 'greedy or sampling, one sequence per prompt'}; "
                    "run it outside the context"
                )
            if kwargs.get("position_ids") is None:
                positions = adapter.generation_positions(kwargs)
                kwargs = kwargs if positions is None else {**kwargs, "position_ids": positions}
            n = copies(kwargs, config)
            if n == 1:
                return original(*args, **kwargs)
            adapter.copies = n
            object.__setattr__(model, "_expand_multimodal_outputs", _keep_multimodal_outputs)
            try:
                return original(*args, **kwargs)
            finally:
                adapter.copies = 1
                model.__dict__.pop("_expand_multimodal_outputs", None)

        object.__setattr__(model, "generate", generate)

    def remove(self) -> None:
        self.model.__dict__.pop("generate", None)
