"""Reusing the unpruned forward's decoder layers where a pipeline leaves their inputs unchanged.

A comparison runs many pipelines on the same batches. Where a pipeline changes nothing before a
decoder layer (a keep-all row at the projector; the layers before an `llm:K` stage), that layer
receives exactly the unpruned forward's inputs and would compute exactly its output. `LayerReuse`
records each layer's inputs and output in the unpruned forward of a batch, and in a later forward of
the same batch returns the recorded output for a layer whose inputs are bit-identical (positions up to
broadcasting, see `_same_call`), instead of running it again. Results are unchanged bit for bit; a
reused layer's time is its recorded time, so latencies stay what a full run measures.

A layer is never reused while anything observes its inside: a forward hook on the layer or any hook
on one of its submodules (e.g. an `llm:K` stage capturing a layer's queries and keys), or a global
module hook. Such a layer runs, but its MLP (`layer.mlp`, where the layer has one) is recorded and
reused the same way: its input is bit-identical when nothing before it changed, so a layer observed
only for its attention costs no MLP time. Calls with a KV cache are never reused (only cache-free
prefills are recorded).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .compat import cache_of
from .forwards import observed, replaced_forwards


@dataclass(frozen=True)
class LayerCall:
    """One decoder layer's call in the unpruned forward: its inputs, output and wall time."""

    inputs: dict[str, Any]
    output: Any
    seconds: float


@dataclass
class Reused:
    """What one forward reused: the number of layer (or MLP) calls and their recorded seconds."""

    calls: int = 0
    seconds: float = 0.0


@dataclass
class LayerReuse:
    """Records and reuses the calls of `layers`, and of their MLPs, per batch (see the module doc).

    Args:
        layers: the LLM's decoder layers, in order.
        keep: asked with a batch's recorded bytes; `False` drops that batch's record (memory budget).
    """

    layers: Sequence[nn.Module] | nn.ModuleList
    keep: Callable[[int], bool] = lambda nbytes: True
    _calls: dict[int, list[LayerCall | None]] = field(default_factory=dict)
    units: list[nn.Module] = field(init=False)

    def __post_init__(self) -> None:
        mlps = [getattr(layer, "mlp", None) for layer in self.layers]
        self.units = [*self.layers, *(mlp for mlp in mlps if isinstance(mlp, nn.Module))]

    @contextmanager
    def record(self, batch: int) -> Iterator[None]:
        """Inside, the units' cache-free calls are recorded as batch `batch`'s unpruned forward."""
        calls: list[LayerCall | None] = [None] * len(self.units)

        def wrap(index: int, forward: Callable[..., Any]) -> Callable[..., Any]:
            def recording(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                output = forward(*args, **kwargs)
                inputs = _inputs(args, kwargs)
                if cache_of(kwargs) is None:
                    calls[index] = LayerCall(inputs, output, time.perf_counter() - start)
                return output

            return recording

        with replaced_forwards(self.units, wrap):
            yield
        if all(call is not None for call in calls) and self.keep(_nbytes(calls)):
            self._calls[batch] = calls

    @contextmanager
    def reuse(self, batch: int) -> Iterator[Reused]:
        """Inside, a layer (or an MLP of a layer that runs) called with the inputs it had in batch
        `batch`'s recorded forward returns the recorded output; the yielded `Reused` counts what was
        reused."""
        reused = Reused()
        calls = self._calls.get(batch)
        if calls is None:
            yield reused
            return

        def wrap(index: int, forward: Callable[..., Any]) -> Callable[..., Any]:
            unit, call = self.units[index], calls[index]

            def reusing(*args: Any, **kwargs: Any) -> Any:
                if (
                    call is not None
                    and not observed(unit, own_pre_hooks=False)
                    and _same_call(_inputs(args, kwargs), call.inputs)
                ):
                    reused.calls += 1
                    reused.seconds += call.seconds
                    return call.output
                return forward(*args, **kwargs)

            return reusing

        with replaced_forwards(self.units, wrap):
            yield reused


def _inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    return {str(i): a for i, a in enumerate(args)} | kwargs


HIDDEN = ("0", "hidden_states")
"""The names `_inputs` gives a decoder layer's hidden states (first positional, or by keyword)."""


def _same_call(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two calls of a layer (`_inputs`) compute the same output: the hidden states `_same`,
    every other argument `_same` up to broadcasting. After an `llm:K` stage the engine passes
    per-row positions (`[B, L]`, cos/sin `[B, L, d]`) where the unpruned forward passed one row
    for the whole batch (`[1, L]`); decoder layers combine those with the hidden states only by
    broadcasting, so equal rows give the same output."""
    return a.keys() == b.keys() and all(_same(a[k], b[k], broadcast=k not in HIDDEN) for k in a)


def _same(a: Any, b: Any, broadcast: bool = False) -> bool:
    """Whether two call arguments are the same: tensors equal in shape (or, with `broadcast`, after
    broadcasting one against the other), dtype, device and every element; containers element-wise;
    plain values by `==`; anything else only if identical."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and (a is b or _equal(a, b, broadcast))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], broadcast) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return (
            type(a) is type(b) and len(a) == len(b) and all(_same(x, y, broadcast) for x, y in zip(a, b, strict=True))
        )
    if a is None or isinstance(a, bool | int | float | str):
        return type(a) is type(b) and a == b
    return a is b


def _equal(a: Tensor, b: Tensor, broadcast: bool) -> bool:
    """Tensors equal element for element, in dtype and device, and in shape unless `broadcast`
    (then each dimension is equal or 1 on one side)."""
    if a.dtype != b.dtype or a.device != b.device:
        return False
    if a.shape == b.shape:
        return torch.equal(a, b)
    if (
        not broadcast
        or a.dim() != b.dim()
        or any(x != y and 1 not in (x, y) for x, y in zip(a.shape, b.shape, strict=True))
    ):
        return False
    return torch.equal(*torch.broadcast_tensors(a, b))


def _nbytes(calls: Sequence[LayerCall | None]) -> int:
    """Bytes of the distinct tensors the recorded calls hold."""
    seen: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, Tensor):
            seen[value.data_ptr()] = value.nbytes
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, list | tuple):
            for v in value:
                visit(v)

    for call in calls:
        if call is not None:
            visit(call.inputs)
            visit(call.output)
    return sum(seen.values())
