"""The adapter contract: everything model-specific lives behind it."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from torch import Tensor, nn

from ..budget import BudgetRule
from ..errors import InputError, PlaceError, RegistryError, UnsupportedModelError
from ..execute import required_signals
from ..pipeline import Pipeline
from ..registry import BUILTIN, Entry, PluginWarning, list_adapters
from ..signals import Signal
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


@dataclass(frozen=True)
class Encoding:
    """A batch's images through the vision tower once, for every pipeline that can share it.

    Attributes:
        features: `[I, N(+1), D]` the projector's input (the tower's selected hidden states).
        signals: every vision signal the sharing pipelines' stages ask for, e.g. `ClsAttention` `[I, N]`.
        seconds: wall time of the encoding.
    """

    features: Tensor
    signals: Mapping[Signal, Tensor]
    seconds: float

    @property
    def nbytes(self) -> int:
        return self.features.nbytes + sum(t.nbytes for t in self.signals.values())


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
    shares_copies: ClassVar[bool] = False
    """Whether the adapter gives each of the `copies` rows `generate` makes of a prompt (beam search,
    `num_return_sequences`) that prompt's kept tokens; `generate` refuses those settings otherwise."""

    def __init__(self, model: nn.Module, positions: str = "contiguous") -> None:
        if positions not in POSITION_MODES:
            raise InputError(f"unknown positions mode {positions!r}; allowed: {', '.join(POSITION_MODES)}")
        self.model = model
        self.positions = positions
        self.copies = 1  # rows per prompt in the running `generate` (set by its guard)

    def __deepcopy__(self, memo: dict[int, object]) -> ModelAdapter:
        """Refuse: `copy.deepcopy(model)` inside `tp.apply` reaches the adapter through the hooks, and
        a copy carrying them would be neither compressed correctly nor plain."""
        raise InputError(
            f"cannot deep-copy a {type(self.model).__name__} while tokenprune.apply is active on it (the copy "
            "would carry its hooks); copy the model before entering the context or after it exits"
        )

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

    def generation_positions(self, kwargs: dict[str, Any]) -> Tensor | None:
        """Position ids for a `generate` call's keyword arguments `kwargs`, equal to those `generate`
        would compute itself and passed to it in their place (the guard of `generate` asks); `None`
        (the default): `generate` computes them."""
        return None

    def shares_encoding(self, pipeline: Pipeline | None) -> bool:
        """Whether `pipeline` (`None`: unpruned) can run on an `Encoding` made by `encode`: none by
        default; an adapter that can says so for pipelines without stages inside the vision tower."""
        return False

    def encode(self, inputs: Mapping[str, Any], pipelines: Sequence[Pipeline | None]) -> Encoding | None:
        """Run the vision tower once on `inputs`' images, with every signal the sharing `pipelines`
        need; `None` where this adapter cannot share encodings (each pipeline then encodes its own).
        Called outside `apply`."""
        return None

    def reuse(self, encoding: Encoding, inputs: Mapping[str, Any], compress: bool = True) -> dict[str, Any]:
        """The model inputs that feed `encoding` (made by `encode` for `inputs`) to the next forward
        in place of `pixel_values`: inside `apply` (`compress`), the stages run on its features and
        signals; outside, the unpruned features go in as they are.

        Raises:
            InputError: this adapter does not share encodings.
        """
        raise InputError(f"the {self.name!r} adapter does not share vision encodings between pipelines")

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

    Built-in adapters are asked first and win for the classes they support (a plugin that also
    claims such a model is ignored, with a warning); otherwise the plugin (or user) adapters are
    asked. An adapter whose `supports()` raises is skipped with a `PluginWarning` naming it.

    Raises:
        UnsupportedModelError: no adapter supports it (the message lists the supported classes).
        RegistryError: two adapters of the same rank both claim the model (the message names both).
    """
    adapters = list_adapters()
    claims = {name: entry for name, entry in adapters.items() if _claims(entry, model)}
    builtin = {name: e for name, e in claims.items() if e.origin == BUILTIN}
    chosen = builtin or claims
    if len(chosen) > 1:
        named = " and ".join(
            f"{name!r} ({e.origin}, {e.cls.__module__}.{e.cls.__qualname__})" for name, e in chosen.items()
        )
        raise RegistryError(f"{type(model).__name__} is claimed by two adapters: {named}; uninstall or fix one of them")
    if chosen:
        (entry,) = chosen.values()
        for name, other in claims.items():
            if other is not entry:
                warnings.warn(
                    f"adapter {name!r} ({other.origin}) also claims {type(model).__name__}; the built-in adapter "
                    f"{entry.name!r} is used",
                    PluginWarning,
                    stacklevel=2,
                )
        return adapter_class(entry)(model, positions=positions)
    supported = ", ".join(f"{getattr(e.cls, 'model_class', '?')} ({name})" for name, e in adapters.items())
    raise UnsupportedModelError(f"no tokenprune adapter supports {type(model).__name__}; supported models: {supported}")


def _claims(entry: Entry, model: nn.Module) -> bool:
    """`entry`'s `supports(model)`; an entry that is no adapter, or whose `supports` raises, is reported
    and counts as not claiming."""
    try:
        return bool(adapter_class(entry).supports(model))
    except Exception as exc:  # a broken adapter must not hide the others
        warnings.warn(
            f"adapter {entry.name!r} ({entry.origin}, {entry.cls.__module__}.{entry.cls.__qualname__}) raised in "
            f"supports() and was skipped: {type(exc).__name__}: {exc}",
            PluginWarning,
            stacklevel=3,
        )
        return False


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
