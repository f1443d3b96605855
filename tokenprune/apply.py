"""`apply(model, pipeline)`: run an unmodified Hugging Face model compressed, inside a context."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .adapters.base import ModelAdapter, find_adapter
from .errors import InputError
from .pipeline import Pipeline
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
    adapter = find_adapter(model, positions=positions)
    adapter.check(pipeline)
    run = Run(pipeline=pipeline, adapter=adapter)
    handles = adapter.attach(pipeline, run)
    _ACTIVE.add(model)
    try:
        yield run
    finally:
        for handle in handles:
            handle.remove()
        _ACTIVE.discard(model)
    adapter.finish()
