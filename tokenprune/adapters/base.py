"""The adapter contract: everything model-specific lives behind it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

from torch import nn

from ..budget import BudgetRule
from ..errors import InputError, PlaceError, RegistryError, UnsupportedModelError
from ..execute import required_signals
from ..pipeline import Pipeline
from ..registry import Entry, list_adapters
from ..strategy import ModelInfo
from .sequence import POSITION_MODES

if TYPE_CHECKING:
    from ..apply import Run

T = TypeVar("T")


class Handle(Protocol):
    """What `ModelAdapter.attach` returns: a hook handle (`torch.utils.hooks.RemovableHandle`) or
    anything else that undoes one change to the model."""

    def remove(self) -> None: ...


def require_state(value: T | None, what: str) -> T:
    """`value`, state that `attach` or an earlier hook of the same forward sets (`what` names it).

    Raises:
        RuntimeError: it is unset: the hooks ran out of the order the adapter relies on (a tokenprune bug).
    """
    if value is None:
        raise RuntimeError(f"tokenprune internal error: {what} is not set")
    return value


class ModelAdapter(ABC):
    """Applies a pipeline to one family of Hugging Face models.

    An adapter knows where the vision tower, projector and LLM layers are, how image tokens sit in
    the inputs, how to rebuild embeddings, masks, positions and the KV cache after a stage, and how
    to compute the signals scorers ask for cheaply. It installs only removable hooks.

    `positions` says which position ids kept tokens get: `"contiguous"` (renumbered without gaps) or
    `"original"` (their original ids).

    Class attributes:
        model_class: the model class name(s) it supports, for messages.
        places: the place kinds it can run stages at.
        ragged_places: the place kinds where images of one batch may keep different counts (a
            stage with a `BudgetRule` budget); none by default.
    """

    name: ClassVar[str] = ""
    model_class: ClassVar[str] = ""
    places: ClassVar[tuple[str, ...]] = ("projector",)
    ragged_places: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, positions: str = "contiguous") -> None:
        if positions not in POSITION_MODES:
            raise InputError(f"unknown positions mode {positions!r}; allowed: {', '.join(POSITION_MODES)}")
        self.model = model
        self.positions = positions

    @classmethod
    @abstractmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether this adapter can drive `model`."""

    @abstractmethod
    def info(self) -> ModelInfo:
        """Model facts strategies may use (depths, feature layer, [CLS], patch grid)."""

    @abstractmethod
    def attach(self, pipeline: Pipeline, run: Run) -> Sequence[Handle]:
        """Install the hooks that run `pipeline`, recording into `run`; return their handles."""

    def finish(self) -> None:
        """The context exits without an exception, its hooks removed: raise for anything computed
        inside it and not validated yet (nothing by default)."""
        return None

    def check(self, pipeline: Pipeline) -> None:
        """Refuse, before any forward, a pipeline this adapter cannot run.

        Raises:
            PlaceError: a stage at a place this adapter does not support, a budget rule where images
                cannot keep different counts, or a stage after one that needs equal counts.
            SignalError: a scorer needs a signal this model cannot provide.
        """
        ragged = None
        for stage in pipeline.stages:
            if stage.place.kind not in self.places:
                raise PlaceError(
                    f"stage {stage.to_spec()!r} runs at {stage.at}, which the {self.name!r} adapter "
                    f"does not support; supported places: {', '.join(self.places)}"
                )
            if ragged is not None:
                raise PlaceError(
                    f"stage {stage.to_spec()!r} follows {ragged.to_spec()!r}, whose budget rule lets images keep "
                    f"different counts, and the {self.name!r} adapter runs a stage at {stage.at} only on equal "
                    "counts; give the earlier stage an int or ratio budget, or make the rule stage the last"
                )
            if isinstance(stage.budget, BudgetRule):
                if stage.place.kind not in self.ragged_places:
                    supported = ", ".join(self.ragged_places) or "none"
                    raise PlaceError(
                        f"stage {stage.to_spec()!r}: a budget rule lets images keep different counts, which the "
                        f"{self.name!r} adapter supports at: {supported} (not at {stage.at}); use an int or "
                        "ratio budget there"
                    )
                ragged = stage
        required_signals(list(pipeline.stages), self.info())


def find_adapter(model: nn.Module, positions: str = "contiguous") -> ModelAdapter:
    """The registered adapter for `model`, set to `positions` (see `ModelAdapter`).

    Raises:
        UnsupportedModelError: no adapter supports it (the message lists the supported classes).
    """
    adapters = list_adapters()
    for entry in adapters.values():
        cls = adapter_class(entry)
        if cls.supports(model):
            return cls(model, positions=positions)
    supported = ", ".join(f"{adapter_class(e).model_class} ({name})" for name, e in adapters.items())
    raise UnsupportedModelError(f"no tokenprune adapter supports {type(model).__name__}; supported models: {supported}")


def adapter_class(entry: Entry) -> type[ModelAdapter]:
    """The `ModelAdapter` subclass a registry entry holds.

    Raises:
        RegistryError: it holds something else (a plugin registered a class that is not an adapter).
    """
    cls = entry.cls
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise RegistryError(
            f"adapter {entry.name!r} (from {entry.origin}) is {cls!r}, not a tokenprune ModelAdapter subclass"
        )
    return cls
