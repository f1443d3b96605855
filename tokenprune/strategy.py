"""The two roles every strategy plays: `ScoringStrategy` and `Selector`.

Both are pydantic models (validated, serialisable parameters), registered by name, and know nothing
of model families: what they need from the model they ask for as signals, answered by an adapter.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from torch import Tensor

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


@dataclass(frozen=True)
class ScoringContext:
    """Everything a scorer sees at one stage for one batch of images.

    Attributes:
        tokens: `[B, N, D]` the visual tokens reaching the stage.
        info: model facts (depth, feature layer, patch grid).
        signals: the values of the signals the scorer asked for, each `[B, N]`.
    """

    tokens: Tensor
    info: ModelInfo
    signals: Mapping[Signal, Tensor] = field(default_factory=dict)

    def __getitem__(self, signal: Signal) -> Tensor:
        try:
            return self.signals[signal]
        except KeyError:
            raise SignalError(f"signal {signal!r} was not computed; a scorer must list it in signals()") from None


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


@dataclass(frozen=True)
class DeferredCheck:
    """A validation of device values, computed and read later, at a host sync the caller makes
    anyway (so that neither the check's kernels nor its read delay the work queued before it).

    Attributes:
        failing: returns `[N]` bool, True for each failing item (an image, a batch row).
        message: the error's text; `{items}` stands for the failing items' indices.
        error: the exception raised when some item fails.
    """

    failing: Callable[[], Tensor]
    message: str
    error: type[Exception] = ScoreError


def raise_deferred(checks: list[DeferredCheck], *values: Tensor) -> list[float | list[float]]:
    """Run every deferred check and read it, and the tensors `values` the caller needs anyway, in
    one device-to-host copy; returns each value as a number (0-dim tensors) or a flat list.

    Raises:
        the first failing check's `error`, its message naming the failing items.
    """
    flags = [check.failing() for check in checks]
    parts = [v.reshape(-1) for v in values] + [f.any().reshape(1) for f in flags]
    read = (
        [] if not parts else parts[0].tolist() if len(parts) == 1 else torch.cat([p.double() for p in parts]).tolist()
    )
    out, at = [], 0
    for value in values:
        chunk, at = read[at : at + value.numel()], at + value.numel()
        out.append(chunk[0] if value.dim() == 0 else chunk)
    for check, flag, failed in zip(checks, flags, read[at:], strict=False):
        if failed:
            raise check.error(check.message.format(items=flag.nonzero().flatten().tolist()))
    return out


def score_check(selector: Selector, scores: Tensor) -> tuple[Tensor, str]:
    """`[B]` True for each image whose `scores` `[B, N]` `selector` cannot use, and the message."""
    if selector.weights_by_scores:  # computed now: scores may live in a CUDA graph's reused output buffers
        return (~torch.isfinite(scores)).any(dim=1), (
            f"scores given to selector {selector.name!r} contain NaN or ±inf (images {{items}}); it weights "
            "tokens by their scores, so they must be finite (use a selector that only ranks them, e.g. topk)"
        )
    return torch.isnan(scores).any(dim=1), (
        f"scores given to selector {selector.name!r} contain NaN (images {{items}}); a scorer must return "
        "finite values or ±inf"
    )


def output_check(selector: Selector, tokens: Tensor, out: Tensor) -> tuple[Tensor, str]:
    """`[B]` True for each image whose `tokens` `[B, N, D]` were finite but whose selected `out`
    `[B, k, D]` are not (an overflow inside the selector), and the message."""
    finite_in = torch.isfinite(tokens).flatten(1).all(dim=1)
    return finite_in & ~torch.isfinite(out).flatten(1).all(dim=1), (
        f"selector {selector.name!r} turned finite tokens into NaN or ±inf (images {{items}}); scores of "
        "huge magnitude overflow a selector that weights tokens by them: rescale the scores"
    )


class Selector(Strategy):
    """Turns tokens `[B, N, D]` (and scores `[B, N]`) into `k` tokens with provenance.

    Call `reduce` (it validates `k` and the scores, then calls `select`); subclasses implement
    `select`.
    """

    role: ClassVar[str] = "selector"
    needs_scores: ClassVar[bool] = True
    weights_by_scores: ClassVar[bool] = False
    """True when `select` uses score values as merge weights, not only their order: ±inf is then
    refused (it has no meaning as a weight)."""

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        """Model signals `select` reads (e.g. key projections to merge by); none by default. A
        selector that lists any receives exactly those as `select(..., signals={signal: value})`."""
        return ()

    def keeps_exactly_k(self) -> bool:
        """Whether `select` returns exactly `k` tokens per image (True by default); an adaptive
        selector returns a count of its own choosing, the same for every image of a batch, and
        treats `k` as a cap."""
        return True

    def reduce(
        self,
        tokens: Tensor,
        scores: Tensor | None,
        k: int,
        grid: tuple[int, int] | None = None,
        signals: Mapping[Signal, Tensor] | None = None,
        deferred: list[DeferredCheck] | None = None,
    ) -> Reduction:
        """Validate the inputs, select, and check that exactly `k` tokens come out per image (at
        most `k`, the same count for every image, for a selector that does not `keeps_exactly_k`).

        `deferred`: when given, the score and output checks are appended to it (device-side flags, no
        host sync) instead of run now; the caller must pass the list to `raise_deferred` before using the output.

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
            self._check(deferred, *score_check(self, scores))
        extra = {"signals": signals or {}} if type(self).signals is not Selector.signals else {}
        reduction = self.select(tokens, scores, k, grid, **extra)
        out = k if self.keeps_exactly_k() else min(reduction.index.shape[1], k)
        if reduction.index.shape != (b, out) or reduction.tokens.shape[:2] != (b, out):
            raise ScoreError(
                f"selector {self.name!r} returned {tuple(reduction.tokens.shape[:2])} tokens, expected ({b}, {out})"
            )
        self._check(deferred, *output_check(self, tokens, reduction.tokens))
        return reduction

    @staticmethod
    def _check(deferred: list[DeferredCheck] | None, failing: Tensor, message: str) -> None:
        """Raise now, or append to `deferred`, the check that `failing` (`[B]` bool) is all False."""
        check = DeferredCheck(lambda: failing, message)
        if deferred is None:
            raise_deferred([check])
        else:
            deferred.append(check)

    def scored(self, scores: Tensor | None) -> Tensor:
        """`scores` `[B, N]`, which a selector with `needs_scores` always receives (`reduce`
        refuses to call it without)."""
        if scores is None:
            raise ScoreError(f"selector {self.name!r} needs scores; pair it with a scorer, e.g. vtc-cls+{self.name}@64")
        return scores

    @abstractmethod
    def select(self, tokens: Tensor, scores: Tensor | None, k: int, grid: tuple[int, int] | None = None) -> Reduction:
        """Reduce `tokens` `[B, N, D]` to `k` per image; `grid` is the patch grid, if known."""
