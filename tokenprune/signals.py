"""Signals: the inputs a strategy asks an adapter to compute during the forward.

A signal is a small frozen pydantic model, hashable, so a strategy's request and the adapter's answer
meet in a dict. Each signal type declares where it is computed (`place`: the vision encoder or the
LLM), the layer whose forward computes it (`read_layer()`) and what it costs (`flops()`). Signal
types are an open set: `register_signal` adds one (a plugin's), `signal_types()` lists them, and an
adapter computes those its family provides, saying clearly which ones it cannot.
"""

from __future__ import annotations

import threading
from typing import ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from .errors import RegistryError

PLACE_KINDS = ("vision", "llm")


class Signal(BaseModel):
    """Base of every signal; subclasses are frozen value objects.

    Class attributes a subclass sets:
        place: `"vision"` (computed inside the vision encoder, per image) or `"llm"` (inside the
            LLM, per sequence).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    place: ClassVar[Literal["vision", "llm"]]

    def read_layer(self) -> int | None:
        """The non-negative vision block (`place="vision"`) or LLM decoder layer (`place="llm"`)
        whose forward computes this signal: its `layer` field, if it has one; `None` for a signal
        computed at the stage itself (e.g. `NormedTokens`)."""
        layer = getattr(self, "layer", None)
        return layer if isinstance(layer, int) else None

    def flops(self, tokens: int, width: int) -> int:
        """FLOPs this signal adds to the forward (its scoring overhead), for one image of `tokens`
        encoder tokens ([CLS] included) of width `width` (vision signals), or one LLM sequence of
        `tokens` tokens of width `width` (LLM signals). Projections the model computes anyway are
        not counted; the default, 0, is for a signal made only of those."""
        return 0


S = TypeVar("S", bound=type[Signal])

_TYPES: dict[str, type[Signal]] = {}
_LOCK = threading.Lock()


def register_signal(cls: S) -> S:
    """Class decorator: add a `Signal` subclass to the signal types, under its class name.

    Re-registering the same definition (a re-run notebook cell, a reloaded module) replaces it.

    Raises:
        RegistryError: not a `Signal` subclass, no valid `place`, or the name taken by another class.
    """
    if not isinstance(cls, type) or not issubclass(cls, Signal):
        raise RegistryError(f"{cls!r} is not a Signal subclass")
    if getattr(cls, "place", None) not in PLACE_KINDS:
        raise RegistryError(
            f"signal type {cls.__name__} must declare place = 'vision' or 'llm' (where it is computed), "
            f"got {getattr(cls, 'place', None)!r}"
        )
    with _LOCK:
        existing = _TYPES.get(cls.__name__)
        same = existing is not None and (existing.__module__, existing.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )
        if existing is not None and existing is not cls and not same:
            raise RegistryError(
                f"signal type name {cls.__name__!r} is registered twice: by {existing.__module__} and by "
                f"{cls.__module__}; name yours differently"
            )
        _TYPES[cls.__name__] = cls
    return cls


def signal_types(place: str | None = None) -> dict[str, type[Signal]]:
    """The registered signal types by name, optionally only those of one place kind."""
    with _LOCK:
        return {n: t for n, t in sorted(_TYPES.items()) if place is None or t.place == place}


@register_signal
class ClsAttention(Signal):
    """Post-softmax attention of the [CLS] query on each patch key in one vision-encoder block.

    `heads="mean"`: per-head attention, averaged over heads (unweighted); `heads="concat"`: one
    attention over the full projection width `D`, scaled by `D ** -0.5` (PruMerge's official
    score). The [CLS]->[CLS] entry is excluded, so the value is `[B, N]` over the `N` patch tokens
    (softmax taken over all `N + 1` keys). `layer` is a non-negative block index.

    Cost: the [CLS] query against every key, `2 * tokens * width`.
    """

    place: ClassVar[Literal["vision", "llm"]] = "vision"
    layer: int = Field(ge=0)
    heads: Literal["mean", "concat"] = "mean"

    def flops(self, tokens: int, width: int) -> int:
        return 2 * tokens * width


@register_signal
class PatchAttention(Signal):
    """Mean over one axis of the patch-to-patch attention map of one vision-encoder block,
    averaged over heads, `[B, N]` (the [CLS] row and column, if any, dropped): FoPru's significance.

    `axis="col"`: entry `j` is the mean over queries `i` of `A[i, j]` (attention patch `j`
    receives); `axis="row"`: entry `i` is the mean over keys `j` of `A[i, j]` (attention patch `i`
    gives). `scores="logits"`: `A = QK^T / sqrt(d)` before the softmax (linear, so no `N x N` map is
    built); `scores="softmax"`: post-softmax probabilities over all keys of the block ([CLS]
    included), computed in query chunks. `layer` is a non-negative block index.

    Cost: logits, a mean query (or key) against every key (or query), `2 * tokens * width`;
    softmax, every query against every key, `2 * tokens ** 2 * width`.
    """

    place: ClassVar[Literal["vision", "llm"]] = "vision"
    layer: int = Field(ge=0)
    axis: Literal["col", "row"] = "col"
    scores: Literal["logits", "softmax"] = "logits"

    def flops(self, tokens: int, width: int) -> int:
        return 2 * tokens * width * (tokens if self.scores == "softmax" else 1)


@register_signal
class PatchKeys(Signal):
    """Key projections of the patch tokens in one vision-encoder block (the [CLS] key dropped).

    `heads="mean"`: averaged over heads, `[B, N, d_head]` (VisionZip's metric); `heads="concat"`:
    the full projection, `[B, N, D]` (PruMerge's). `layer` is a non-negative block index.

    Cost: 0 (the block's own key projections, kept).
    """

    place: ClassVar[Literal["vision", "llm"]] = "vision"
    layer: int = Field(ge=0)
    heads: Literal["mean", "concat"] = "mean"


@register_signal
class PatchKeyNorm(Signal):
    """Lp norm of each patch token's key in one vision-encoder block (all heads concatenated, after
    the block's rotary embedding if it has one; the [CLS] key dropped), `[B, N]`. `layer` is a
    non-negative block index.

    Cost: the rotary embedding and norm of every key, `4 * tokens * width`.
    """

    place: ClassVar[Literal["vision", "llm"]] = "vision"
    layer: int = Field(ge=0)
    p: int = Field(2, ge=1)

    def flops(self, tokens: int, width: int) -> int:
        return 4 * tokens * width


@register_signal
class TextAttention(Signal):
    """Attention that visual tokens receive inside the LLM at decoder layer `layer`.

    `query="last"`: the row of the last prompt token; `query="mean"`: the mean over every
    (non-padding) query token. Post-softmax, averaged over heads; value `[B, N]` over the visual
    tokens reaching the stage.

    Cost: one query row (`last`) or every row (`mean`) against every key, `2 * tokens * width`
    times 1 or `tokens`.
    """

    place: ClassVar[Literal["vision", "llm"]] = "llm"
    layer: int = Field(ge=0)
    query: Literal["last", "mean"] = "last"

    def flops(self, tokens: int, width: int) -> int:
        return 2 * tokens * width * (tokens if self.query == "mean" else 1)


@register_signal
class KeyNorm(Signal):
    """Lp norm of each visual token's key at LLM decoder layer `layer` (after the rotary embedding,
    all key heads concatenated), `[B, N]`: DART's pivot criterion.

    Cost: the rotary embedding and norm of every key, `4 * tokens * width`."""

    place: ClassVar[Literal["vision", "llm"]] = "llm"
    layer: int = Field(ge=0)
    p: int = Field(1, ge=1)

    def flops(self, tokens: int, width: int) -> int:
        return 4 * tokens * width


@register_signal
class TextPivots(Signal):
    """The `count` prompt tokens after each image with the largest L1 key norm at LLM layer `layer`,
    as hidden states entering layer `layer + 1` passed through the LLM's final norm: `[B, count, D]`.

    Cost: the rotary embedding and norm of every key, `4 * tokens * width`."""

    place: ClassVar[Literal["vision", "llm"]] = "llm"
    layer: int = Field(ge=0)
    count: int = Field(ge=1)

    def flops(self, tokens: int, width: int) -> int:
        return 4 * tokens * width


@register_signal
class NormedTokens(Signal):
    """The visual tokens reaching an LLM stage passed through the LLM's final norm, `[B, N, D]`.

    Cost: the final norm of every token, `3 * tokens * width`."""

    place: ClassVar[Literal["vision", "llm"]] = "llm"

    def flops(self, tokens: int, width: int) -> int:
        return 3 * tokens * width
