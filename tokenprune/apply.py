"""`apply(model, pipeline)`: run an unmodified Hugging Face model compressed, inside a context."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .adapters.base import Handle, ModelAdapter, find_adapter
from .errors import InputError
from .generation import GenerateGuard
from .pipeline import Pipeline
from .rollback import Snapshot
from .trace import ForwardRecord

_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass
class Run:
    """A live application of a pipeline to a model.

    Attributes:
        pipeline: what runs.
        adapter: the model's adapter.
        trace: one `ForwardRecord` per compressed forward (each prefill), in order.
    """

    pipeline: Pipeline
    adapter: ModelAdapter
    trace: list[ForwardRecord] = field(default_factory=list)

    def record(self, forward: ForwardRecord) -> None:
        self.trace.append(forward)

    def to_json(self) -> list[dict[str, Any]]:
        return [f.to_json() for f in self.trace]


@contextmanager
def apply(
    model: nn.Module, pipeline: Pipeline | str | dict[str, Any], *, positions: str = "contiguous"
) -> Iterator[Run]:
    """Compress `model`'s visual tokens with `pipeline` inside the context.

    Inside, `model(**inputs)` and `model.generate(**inputs)` run compressed; on exit (also through an
    exception) every hook is removed and the model is exactly as before.

    The hooks act on the module, not on the caller: while the context is open, *every* forward of
    `model` is compressed, including a plain call from another thread (which also records into
    this run's trace). A `copy.deepcopy(model)` made inside the context would carry the hooks, so
    it is refused with an `InputError`; copy the model before entering the context or after it
    exits. To serve compressed and uncompressed requests at once, use two model instances. Only one
    `apply` may be active on a model at a time.

    Args:
        model: a supported Hugging Face model (see `tokenprune list`).
        pipeline: a `Pipeline`, a spec string (`"vtc-cls@64"`) or a config dict.
        positions: `"contiguous"` (default) renumbers kept tokens without gaps; `"original"` keeps
            each kept token's original position id.

    `generate` supports greedy, sampled and beam-search decoding, several sequences per prompt (the
    copies of a prompt share its kept image tokens), with or without the KV cache; a cache that
    already holds a prompt prefix is refused before any work.

    Raises:
        UnsupportedModelError: no adapter supports the model.
        InputError: `apply` is already active on the model; or, inside, a deep copy of it.
        PlaceError, SignalError: the pipeline cannot run on this model.
        ScoreError: on exit, for image features encoded inside the context (e.g. by calling
            `get_image_features` alone) whose scores contained NaN and that no forward consumed.
    """
    pipeline = Pipeline.coerce(pipeline)
    if model in _ACTIVE:
        raise InputError("tokenprune.apply is already active on this model; nest pipelines as stages instead")
    run, handles = _attach(model, pipeline, positions)
    _ACTIVE.add(model)
    try:
        yield run
    finally:
        for handle in handles:
            handle.remove()
        _ACTIVE.discard(model)
    run.adapter.finish()


def _attach(model: nn.Module, pipeline: Pipeline, positions: str) -> tuple[Run, list[Handle]]:
    """The model's adapter checks `pipeline` and attaches it, all or nothing: a failure anywhere in
    `attach` removes every hook and instance attribute it had placed, then raises."""
    adapter = find_adapter(model, positions=positions)
    adapter.check(pipeline)
    run = Run(pipeline=pipeline, adapter=adapter)
    before = Snapshot.take(model)
    try:
        handles: list[Handle] = [*adapter.attach(pipeline, run)]
        if hasattr(model, "generate"):
            handles.append(GenerateGuard(model, adapter))
        return run, handles
    except BaseException:
        before.restore()
        raise


def check(model: nn.Module, pipeline: Pipeline | str | dict[str, Any], *, positions: str = "contiguous") -> Pipeline:
    """Raise exactly what `apply(model, pipeline)` would raise on entering, and change nothing: the
    checks of the model's adapter, then its attach, undone at once (all or nothing, as in `apply`).

    Returns:
        the pipeline, built from a spec string or config when given one.

    Raises:
        UnsupportedModelError, PlaceError, SignalError, SpecError, InputError: as `apply`.
    """
    pipeline = Pipeline.coerce(pipeline)
    before = Snapshot.take(model)
    try:
        _attach(model, pipeline, positions)
    finally:
        before.restore()
    return pipeline
