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
from functools import cached_property

import torch
from torch import Tensor

POSITION_MODES = ("contiguous", "original")


@dataclass(frozen=True)
class Compaction:
    """How a `[B, P]` prompt became `[B, P']`.

    Attributes:
        source: `[B, P']` long, the original column of each new column (0 at added padding).
        keep: `[B, P]` bool, the kept original columns.
        padding: `[B, P']` bool, True at padding added to keep the batch rectangular; `None` when
            every row kept as many columns.
    """

    source: Tensor
    keep: Tensor
    padding: Tensor | None

    @property
    def padded(self) -> bool:
        """Whether some row was left-padded."""
        return self.padding is not None

    @cached_property
    def valid(self) -> Tensor:
        """`[B, P']` bool, False at added padding."""
        return ~self.padding if self.padding is not None else torch.ones_like(self.source, dtype=torch.bool)

    @cached_property
    def removed_before(self) -> Tensor:
        """`[B, P]` long, how many columns were removed before each original column."""
        dropped = (~self.keep).long()
        return dropped.cumsum(dim=1) - dropped

    @cached_property
    def removed(self) -> Tensor:
        """`[B]` long, columns removed per row."""
        return (~self.keep).sum(dim=1)

    @property
    def length_in(self) -> int:
        return self.keep.shape[1]

    @property
    def length_out(self) -> int:
        return self.source.shape[1]

    def gather(self, values: Tensor, fill: int | float | bool = 0) -> Tensor:
        """`values` `[B, P, ...]` at the kept columns, `[B, P', ...]`; `fill` at added padding."""
        index = self.source.view(*self.source.shape, *([1] * (values.dim() - 2)))
        out = torch.gather(values, 1, index.expand(-1, -1, *values.shape[2:]))
        if self.padding is None:
            return out
        return out.masked_fill(self.padding.view(*index.shape), fill)

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
            position_ids = torch.arange(self.length_in, device=self.source.device).expand_as(self.keep)
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
    p = keep.shape[1]
    if lengths is None:
        kept = keep.sum(dim=1)
        p_out, shortest = (int(v) for v in torch.stack([kept.max(), kept.min()]).tolist())
    else:
        p_out, shortest = lengths
    # a stable sort on the flag puts each row's kept columns last, in order: a row's last p_out
    # columns are its kept ones, after the removed ones that become its left padding
    source = keep.to(torch.uint8).argsort(dim=1, stable=True)[:, p - p_out :]
    if shortest == p_out:
        return Compaction(source=source, keep=keep, padding=None)
    padding = ~keep.gather(1, source)
    return Compaction(source=source.masked_fill(padding, 0), keep=keep, padding=padding)
