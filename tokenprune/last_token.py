"""Computing the per-token modules after the last attention for the last position only.

A first-token evaluation reads the logits of the last position alone. After the last decoder
layer's attention, every module works on each position by itself: the attention's output
projection, the MLP, the LM head. `LastToken` runs those on the last position only and fills the
other positions with zeros, which nothing read depends on. The attention itself, and every earlier
layer, run in full (their keys and values at every position feed the last one).

Only results that are bit-identical to the full computation are used: a matrix product can round a
row differently when it has fewer rows (a BLAS picks its kernel by shape), so the first call of each
module with each input shape (and thread count) computes both and compares the last position; shapes that differ run in
full from then on. A module is trimmed only while nothing observes it (a hook on it or inside it, or
a global module hook), and an MLP only when its parameters all sit in `nn.Linear` layers (a mixture
of experts routes tokens in groups, so its rounding may depend on the other positions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .forwards import observed, replaced_forwards

Shape = tuple[int, tuple[int, ...], torch.dtype, torch.device, int]


def per_token_modules(model: Any, layers: nn.ModuleList) -> list[nn.Module]:
    """The modules after the last layer's attention that work per position, where `model` has them in
    the Hugging Face layout: `self_attn.o_proj`, a dense `mlp`, and the output embeddings (LM head)."""
    last = layers[-1]
    found = [getattr(getattr(last, "self_attn", None), "o_proj", None), getattr(last, "mlp", None)]
    head = getattr(model, "get_output_embeddings", lambda: None)()
    modules = [m for m in [*found, head] if isinstance(m, nn.Module)]
    return [m for m in modules if isinstance(m, nn.Linear) or _dense(m)]


def _dense(module: nn.Module) -> bool:
    """Whether every parameter of `module` belongs to one of its `nn.Linear` submodules."""
    linear = {id(p) for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    return bool(linear) and all(id(p) in linear for p in module.parameters())


class LastToken:
    """Runs `modules` (each `[B, L, D] -> [B, L, E]`, position by position) on the last position
    only, inside `trimmed()`, wherever that gives bit for bit the last position's full result.

    Args:
        modules: per-position modules whose outputs are read at the last position only.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.exact: dict[Shape, bool] = {}
        self.trimmed_calls = 0

    @contextmanager
    def trimmed(self) -> Iterator[None]:
        """Inside, calls of the modules compute the last position only (see the module doc)."""
        with replaced_forwards(self.modules, lambda index, forward: self._wrap(index, self.modules[index], forward)):
            yield

    def _wrap(self, index: int, module: nn.Module, forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def last_only(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if args or kwargs or hidden.dim() < 3 or hidden.shape[-2] < 2 or observed(module):
                return forward(hidden, *args, **kwargs)
            shape: Shape = (index, tuple(hidden.shape), hidden.dtype, hidden.device, torch.get_num_threads())
            exact = self.exact.get(shape)
            if exact is False:
                return forward(hidden)
            last = forward(hidden[..., -1:, :].contiguous())
            if exact is None:
                full = forward(hidden)
                self.exact[shape] = torch.equal(full[..., -1:, :], last)
                return full
            self.trimmed_calls += 1
            out = last.new_zeros(*hidden.shape[:-1], last.shape[-1])
            out[..., -1:, :] = last
            return out

        return last_only
