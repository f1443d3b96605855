"""The adapter contract: everything model-specific lives behind it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import InputError, PlaceError, UnsupportedModelError
from ..execute import required_signals
from ..pipeline import Pipeline
from ..registry import list_adapters
from ..signals import Signal
from ..strategy import ModelInfo
from .sequence import POSITION_MODES

if TYPE_CHECKING:
    from ..apply import Run


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
    """

    name: ClassVar[str] = ""
    model_class: ClassVar[str] = ""
    places: ClassVar[tuple[str, ...]] = ("projector",)

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
    def attach(self, pipeline: Pipeline, run: Run) -> list[RemovableHandle]:
        """Install the hooks that run `pipeline`, recording into `run`; return their handles."""

    def finish(self) -> None:
        """The context exits without an exception, its hooks removed: raise for anything computed
        inside it and not validated yet (nothing by default)."""
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
            PlaceError: a stage at a place this adapter does not support.
            SignalError: a scorer needs a signal this model cannot provide.
        """
        for stage in pipeline.stages:
            if stage.place.kind not in self.places:
                raise PlaceError(
                    f"stage {stage.to_spec()!r} runs at {stage.at}, which the {self.name!r} adapter "
                    f"does not support; supported places: {', '.join(self.places)}"
                )
        required_signals(list(pipeline.stages), self.info())


def find_adapter(model: nn.Module, positions: str = "contiguous") -> ModelAdapter:
    """The registered adapter for `model`, set to `positions` (see `ModelAdapter`).

    Raises:
        UnsupportedModelError: no adapter supports it (the message lists the supported classes).
    """
    adapters = list_adapters()
    for entry in adapters.values():
        if entry.cls.supports(model):
            return entry.cls(model, positions=positions)
    supported = ", ".join(f"{e.cls.model_class} ({name})" for name, e in adapters.items())
    raise UnsupportedModelError(f"no tokenprune adapter supports {type(model).__name__}; supported models: {supported}")
