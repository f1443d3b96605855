"""Deferred validation of device values: a check's flags are computed on the device and read at a
host sync the caller makes anyway, so that neither the check's kernels nor its read delay the work
queued before it. Model-agnostic; selectors (`Selector.reduce`) and adapters both use it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import ScoreError

if TYPE_CHECKING:
    from .strategy import Selector


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
        Exception: the first failing check's `error` (e.g. `ScoreError`), its message naming the failing items.
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


def check_now_or_later(deferred: list[DeferredCheck] | None, failing: Tensor, message: str) -> None:
    """Raise now (`deferred` is None), or append to `deferred`, the check that `failing` (`[B]`
    bool) is all False."""
    check = DeferredCheck(lambda: failing, message)
    if deferred is None:
        raise_deferred([check])
    else:
        deferred.append(check)


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
