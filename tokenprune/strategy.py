"""The two roles every strategy plays: `ScoringStrategy` and `Selector`.

Both are pydantic models (validated, serialisable parameters), registered by name, and know nothing
of model families: what they need from the model they ask for as signals, answered by an adapter.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from torch import Tensor

from .checks import DeferredCheck, check_now_or_later, output_check, score_check
from .errors import BudgetError, ScoreError, SignalError
from .reduction import Reduction
from .signals import Signal


@dataclass(frozen=True)
class ModelInfo:
    """What a strategy may know about the model, with no model family in it.

    Attributes:
        vision_layers: number of blocks in the vision encoder.
        feature_layer: the block whose output the projector uses (non-negative index), or `None`
            when the features are the embeddings.
        feature_index: the projector's feature layer as configured: an index into the encoder's
            `hidden_states` (`0`: the embeddings, `-2`: the penultimate block's output), or `None`
            when unknown. Official code that indexes `attentions` with it reads block
            `feature_index` (Python-style), which is `feature_layer + 1` for a non-negative index.
        has_cls: whether the vision encoder has a [CLS] token.
        grid: `(rows, cols)` of the patch grid of the tokens reaching a stage, or `None`.
        llm_layers: number of decoder layers in the LLM.
        stage_layer: for a stage inside the LLM (`llm:K`), `K`: the stage runs before decoder
            layer `K`, after layers `0..K-1` saw every token.
    """

    vision_layers: int | None = None
    feature_layer: int | None = None
    feature_index: int | None = None
    has_cls: bool = False
    grid: tuple[int, int] | None = None
    llm_layers: int | None = None
    stage_layer: int | None = None

    def vision_block(self, index: int) -> int:
        """A vision-encoder block index, Python-style (`-2` is the penultimate), made non-negative.

        Raises:
            SignalError: the model has no vision encoder blocks, or `index` is out of range.
        """
        depth = self.vision_layers or 0
        if not -depth <= index < depth:
            raise SignalError(
                f"vision block {index} is out of range for an encoder of {depth} blocks; "
                f"use an index in [{-depth}, {depth - 1}]"
            )
        return index % depth

    def layer_before_stage(self, name: str) -> int:
        """The decoder layer `K - 1` that a stage at `llm:K` reads (FastV's attention, DART's keys).

        Raises:
            SignalError: the stage does not run inside the LLM after a layer.
        """
        if not self.stage_layer:
            raise SignalError(f"{name} runs inside the LLM after layer K >= 1, e.g. {name}@0.5@llm:2")
        return self.stage_layer - 1


class _DeclaredSignals:
    """What both contexts give a strategy: the values of the signals it declared, looked up by the
    signal itself, by position among its declarations, or by type (`signal`, `signals_of`)."""

    signals: Mapping[Signal, Tensor]
    declared: tuple[Signal, ...]

    def own(self) -> tuple[Signal, ...]:
        """The signals the strategy declared (its `signals(info)`), in order; when the context was
        built without declarations (by hand, as in a test), the computed signals it holds."""
        return self.declared or tuple(self.signals)

    def __getitem__(self, signal: Signal) -> Tensor:
        try:
            return self.signals[signal]
        except KeyError:
            raise SignalError(f"signal {signal!r} was not computed; a strategy must list it in signals()") from None

    def signal(self, which: int | type[Signal] | Signal | None = None) -> Tensor:
        """The value of one declared signal, so that `score`/`select` need not rebuild it:

        * `None`: the strategy's only declared signal;
        * an `int`: the declared signal at that position of `signals(info)`;
        * a `Signal` subclass: the only declared signal of that type;
        * a `Signal`: that signal's value (as `ctx[signal]`).

        Raises:
            SignalError: no such declared signal, or several where one was meant.
        """
        if isinstance(which, Signal):
            return self[which]
        own = self.own()
        if which is None:
            if len(own) != 1:
                raise SignalError(
                    f"ctx.signal() reads the strategy's only signal, but it declared {len(own)}: {list(own)}; "
                    "pick one by position or type, e.g. ctx.signal(0) or ctx.signal(ClsAttention)"
                )
            return self[own[0]]
        if isinstance(which, int):
            if not -len(own) <= which < len(own):
                raise SignalError(f"signal {which} requested, but the strategy declared {len(own)}: {list(own)}")
            return self[own[which]]
        matching = [s for s in own if isinstance(s, which)]
        if len(matching) != 1:
            raise SignalError(
                f"ctx.signal({which.__name__}) needs exactly one declared {which.__name__}, found "
                f"{len(matching)} among {list(own)}; use ctx.signals_of({which.__name__}) for several"
            )
        return self[matching[0]]

    def signals_of(self, kind: type[Signal]) -> list[Tensor]:
        """The values of every declared signal of type `kind`, in declaration order (possibly none)."""
        return [self[s] for s in self.own() if isinstance(s, kind)]


@dataclass(frozen=True)
class ScoringContext(_DeclaredSignals):
    """Everything a scorer sees at one stage for one batch of images.

    Attributes:
        tokens: `[B, N, D]` the visual tokens reaching the stage.
        info: model facts (depth, feature layer, patch grid).
        signals: computed signal values by signal, each `[B, N]` (or `[B, N, d]`, as the signal says);
            at least those the scorer declared.
        declared: the scorer's `signals(info)`, in order: what `ctx.signal()` reads.
    """

    tokens: Tensor
    info: ModelInfo
    signals: Mapping[Signal, Tensor] = field(default_factory=dict)
    declared: tuple[Signal, ...] = ()


@dataclass(frozen=True)
class SelectContext(_DeclaredSignals):
    """Everything a selector sees at one stage for one batch of images (`Selector.reduce(ctx)`).

    Attributes:
        tokens: `[B, N, D]` the visual tokens reaching the stage.
        k: tokens to keep per image (a cap for a selector that does not `keeps_exactly_k`).
        scores: `[B, N]` the scorer's scores, or `None` (no scorer: a score-free selector).
        grid: `(rows, cols)` of the patch grid of `tokens`, or `None` (tiled crops, a later stage).
        info: model facts, as the stage sees them.
        signals: computed signal values by signal; at least those the selector declared.
        declared: the selector's `signals(info)`, in order: what `ctx.signal()` reads.
        deferred: when given, `reduce` appends its score and output checks here (device-side flags,
            no host sync) instead of running them; the caller passes the list to
            `checks.raise_deferred` before using the output.
    """

    tokens: Tensor
    k: int
    scores: Tensor | None = None
    grid: tuple[int, int] | None = None
    info: ModelInfo = field(default_factory=ModelInfo)
    signals: Mapping[Signal, Tensor] = field(default_factory=dict)
    declared: tuple[Signal, ...] = ()
    deferred: list[DeferredCheck] | None = None


def _named_types(annotation: Any) -> set[type]:
    """Every type an annotation names, through unions, containers and `Literal` values."""
    if get_origin(annotation) is Literal:
        return {type(v) for v in get_args(annotation)}
    found = {annotation} if isinstance(annotation, type) else set()
    for arg in get_args(annotation):
        found |= _named_types(arg)
    return found


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


class Strategy(BaseModel):
    """Common base: a frozen pydantic model with a registered `name` and a `role`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ClassVar[str] = ""
    role: ClassVar[str] = ""

    @field_validator("*", mode="before")
    @classmethod
    def _no_lax_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse a bool, bytes or str (also inside a list) for a parameter whose type does not name
        that type: pydantic's lax mode would silently read `True` as 1 and `b"3"` or `"3"` as 3."""
        annotation = cls.model_fields[str(info.field_name)].annotation
        allowed = _named_types(annotation)
        for item in value if isinstance(value, list | tuple) else (value,):
            kind = next((t for t in (bool, bytes, str) if isinstance(item, t)), None)
            if kind is not None and kind not in allowed:
                raise ValueError(f"{kind.__name__} {item!r} is not accepted here (expected {_type_name(annotation)})")
        return value

    def params(self) -> dict[str, Any]:
        """Parameters that differ from the defaults, JSON-compatible."""
        return self.model_dump(mode="json", exclude_defaults=True)


class ScoringStrategy(Strategy):
    """Per-token importance: `score(ctx) -> [B, N]`, higher means keep.

    Class attributes a subclass may set:
        places: place kinds where it can run (`"vision"`, `"projector"`, `"llm"`).
        default_place: where a spec without `@place` puts it, e.g. `"projector"` or `"llm:2"`.
        default_selector: the selector a spec without `+selector` pairs it with.
        withdraws: the scorer only names the withdrawal of every visual token (VTW); its stages
            must have budget 0.
    """

    role: ClassVar[str] = "scorer"
    withdraws: ClassVar[bool] = False
    places: ClassVar[tuple[str, ...]] = ("projector",)
    default_place: ClassVar[str] = "projector"
    default_selector: ClassVar[str] = "topk"

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        """The signals `score` reads from its context; none by default."""
        return ()

    @abstractmethod
    def score(self, ctx: ScoringContext) -> Tensor:
        """Importance `[B, N]` of each visual token in `ctx.tokens`."""


class Selector(Strategy):
    """Turns tokens `[B, N, D]` (and scores `[B, N]`) into `k` tokens with provenance.

    Call `reduce(ctx)` (it validates `k` and the scores, then calls `select(ctx)`); subclasses
    implement `select`, reading `ctx.tokens`, `ctx.scores` (`self.scored(ctx.scores)` where they are required), `ctx.k`,
    `ctx.grid` and their declared signals (`ctx.signal()`).
    """

    role: ClassVar[str] = "selector"
    needs_scores: ClassVar[bool] = True
    weights_by_scores: ClassVar[bool] = False
    """True when `select` uses score values as merge weights, not only their order: ±inf is then
    refused (it has no meaning as a weight)."""
    _legacy_select: ClassVar[bool] = False

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        # a `select(tokens, scores, k, grid[, signals])` written before `SelectContext` keeps working
        cls._legacy_select = len(inspect.signature(cls.select).parameters) > 2

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        """Model signals `select` reads (e.g. key projections to merge by); none by default. A
        selector that lists any reads them from its context: `ctx.signal()`, `ctx.signal(PatchKeys)`."""
        return ()

    def keeps_exactly_k(self) -> bool:
        """Whether `select` returns exactly `k` tokens per image (True by default); an adaptive
        selector returns a count of its own choosing, the same for every image of a batch, and
        treats `k` as a cap."""
        return True

    def reduce(self, ctx: SelectContext) -> Reduction:
        """Validate the inputs, select, and check that exactly `ctx.k` tokens come out per image (at
        most `k`, the same count for every image, for a selector that does not `keeps_exactly_k`).

        With `ctx.deferred`, the score and output checks are appended to it (device-side flags, no
        host sync) instead of run now; the caller must pass the list to `raise_deferred` before
        using the output.

        Scores may hold ±inf, meaning "keep first" (+inf) and "keep last" (-inf) to selectors that
        use only their order (ties still break by lower index); a selector that weights tokens by
        their scores (`weights_by_scores`) refuses ±inf. NaN is always refused. Whatever the
        scores, finite tokens never come out non-finite: a selector whose output overflows (e.g.
        weights from scores of huge magnitude) raises instead of passing NaN to the LLM.

        Raises:
            BudgetError: `k` outside `[0, N]` (`0`: every token withdrawn, an empty reduction).
            ScoreError: scores missing when needed, of the wrong shape, containing NaN (or ±inf
                for a selector that weights by them), or an output that overflowed.
        """
        tokens, scores, k = ctx.tokens, ctx.scores, ctx.k
        b, n = tokens.shape[:2]
        if not 0 <= k <= n:
            raise BudgetError(f"selector {self.name!r} asked for k={k} of {n} tokens; k must be in [0, {n}]")
        if k == 0:  # every token withdrawn (VTW); no selector is consulted
            return Reduction.drop(tokens, torch.zeros(b, 0, dtype=torch.long, device=tokens.device))
        if scores is None and self.needs_scores:
            raise ScoreError(f"selector {self.name!r} needs scores; pair it with a scorer")
        if scores is not None:
            if scores.shape != (b, n):
                raise ScoreError(f"scores have shape {tuple(scores.shape)}, expected [B, N] = [{b}, {n}]")
            check_now_or_later(ctx.deferred, *score_check(self, scores))
        reduction = self._legacy(ctx) if self._legacy_select else self.select(ctx)
        out = k if self.keeps_exactly_k() else min(reduction.index.shape[1], k)
        if reduction.index.shape != (b, out) or reduction.tokens.shape[:2] != (b, out):
            raise ScoreError(
                f"selector {self.name!r} returned {tuple(reduction.tokens.shape[:2])} tokens, expected ({b}, {out})"
            )
        check_now_or_later(ctx.deferred, *output_check(self, tokens, reduction.tokens))
        return reduction

    def _legacy(self, ctx: SelectContext) -> Reduction:
        """`select` as written before `SelectContext`: `select(tokens, scores, k, grid)`, plus
        `signals={signal: value}` for a selector that declares signals."""
        extra = {"signals": dict(ctx.signals)} if type(self).signals is not Selector.signals else {}
        select: Callable[..., Reduction] = self.select
        return select(ctx.tokens, ctx.scores, ctx.k, ctx.grid, **extra)

    def scored(self, scores: Tensor | None) -> Tensor:
        """`scores` (`ctx.scores`) `[B, N]`, which a selector with `needs_scores` always receives
        (`reduce` refuses to call it without)."""
        if scores is None:
            raise ScoreError(f"selector {self.name!r} needs scores; pair it with a scorer, e.g. vtc-cls+{self.name}@64")
        return scores

    @abstractmethod
    def select(self, ctx: SelectContext) -> Reduction:
        """Reduce `ctx.tokens` `[B, N, D]` to `ctx.k` per image; `ctx.grid` is the patch grid, if known."""
