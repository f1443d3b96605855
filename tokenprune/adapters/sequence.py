"""Shortening a prompt whose images sit as placeholder tokens in `input_ids`.

Shared by adapters of models that expand each image into a block of placeholder tokens (LLaVA
family). The rules, documented in `docs/concepts.md`:

* text and padding columns are always kept; an image block keeps the slots of its kept tokens;
* rows that end up shorter are left-padded (mask 0), so the batch stays rectangular;
* positions: `contiguous` renumbers each kept token by the count of removed tokens before it (the
  LLM sees a gap-free sequence, as if the image had had k tokens); `original` keeps each kept
  token's original position id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

POSITION_MODES = ("contiguous", "original")


@dataclass(frozen=True)
class Compaction:
    """How a `[B, P]` prompt became `[B, P']`.

    Attributes:
        source: `[B, P']` long, the original column of each new column (0 where `valid` is False).
        valid: `[B, P']` bool, False for padding added to keep the batch rectangular.
        removed_before: `[B, P]` long, how many columns were removed before each original column.
        removed: `[B]` long, columns removed per row.
        padded: whether some row was left-padded (`valid` has a False).
    """

    source: Tensor
    valid: Tensor
    removed_before: Tensor
    removed: Tensor
    padded: bool

    @property
    def length_in(self) -> int:
        return self.removed_before.shape[1]

    @property
    def length_out(self) -> int:
        return self.source.shape[1]

    def gather(self, values: Tensor, fill: int | float = 0) -> Tensor:
        """`values` `[B, P, ...]` at the kept columns, `[B, P', ...]`; `fill` at added padding."""
        index = self.source.view(*self.source.shape, *([1] * (values.dim() - 2)))
        out = torch.gather(values, 1, index.expand(-1, -1, *values.shape[2:]))
        mask = self.valid.view(*self.valid.shape, *([1] * (values.dim() - 2)))
        return out.masked_fill(~mask, fill)

    def attention_mask(self, mask: Tensor | None) -> Tensor | None:
        """The `[B, P']` mask for the kept columns; `None` stays `None` when nothing was padded."""
        if mask is None:
            return self.valid.long() if self.padded else None
        return self.gather(mask)

    def positions(self, position_ids: Tensor | None, mode: str) -> Tensor | None:
        """`[B, P']` position ids under `mode` (see module doc); `None` keeps HF's default."""
        if position_ids is None:
            if mode == "contiguous":
                return None
            position_ids = torch.arange(self.length_in, device=self.source.device).expand_as(self.removed_before)
        if mode == "contiguous":
            position_ids = position_ids - self.removed_before
        return self.gather(position_ids)

    def position_shift(self, mode: str) -> Tensor:
        """`[B]` to subtract from position ids that later forwards count in the original frame."""
        return self.removed if mode == "contiguous" else torch.zeros_like(self.removed)


def compact(keep: Tensor, lengths: tuple[int, int] | None = None) -> Compaction:
    """Plan the compaction of a `[B, P]` prompt given `keep` `[B, P]` (bool).

    `lengths` is the (longest, shortest) kept row length when the caller knows it already;
    otherwise it is read here (one host sync). Nothing else waits for the device. Given lengths
    that `keep` contradicts give a wrong but in-bounds compaction: a caller that passes them checks
    them (e.g. with a deferred check) before using the result.
    """
    b, p = keep.shape
    kept = keep.sum(dim=1)
    if lengths is None:
        lengths = tuple(int(v) for v in torch.stack([kept.max(), kept.min()]).tolist())
    p_out, shortest = lengths
    target = keep.long().cumsum(dim=1) - 1 + (p_out - kept)[:, None]  # new column of each kept one
    target = target.where(keep, p_out).clamp(0, p_out)  # removed columns land in a spare last column, cut off below
    columns = torch.arange(p, device=keep.device).expand(b, -1)
    source = torch.zeros(b, p_out + 1, dtype=torch.long, device=keep.device).scatter_(1, target, columns)
    valid = torch.zeros(b, p_out + 1, dtype=torch.bool, device=keep.device).scatter_(1, target, keep)
    dropped = (~keep).long()
    return Compaction(
        source=source[:, :p_out].contiguous(),
        valid=valid[:, :p_out].contiguous(),
        removed_before=dropped.cumsum(dim=1) - dropped,
        removed=dropped.sum(dim=1),
        padded=shortest < p_out,
    )
