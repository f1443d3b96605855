"""DART (arXiv 2502.11494): inside the LLM, drop the visual tokens that duplicate a few pivots."""

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from tokenprune.reduction import Reduction
from tokenprune.registry import register
from tokenprune.signals import KeyNorm, NormedTokens, Signal, TextPivots
from tokenprune.strategy import ModelInfo, ScoringContext, ScoringStrategy, SelectContext, Selector


@register("dart")
class DART(ScoringStrategy):
    """DART's pivot score: the L1 norm of each visual token's key at layer K-1 (after the rotary
    embedding, all key heads), as the official code; default place `llm:2`, paired with
    `dart-dedup`. Needs no attention map, so every layer keeps fused attention."""

    places: ClassVar[tuple[str, ...]] = ("llm",)
    default_place: ClassVar[str] = "llm:2"
    default_selector: ClassVar[str] = "dart-dedup"

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        return (KeyNorm(layer=info.layer_before_stage(self.name), p=1),)

    def score(self, ctx: ScoringContext) -> Tensor:
        return ctx.signal()


@register("dart-dedup")
class DARTDedup(Selector):
    """DART's duplication-aware selection. Pivots: the `pivots` best-scored visual tokens (default 4)
    and the `text_pivots` prompt tokens after the image with the largest key L1 norm (default 4).
    Each pivot in turn (visual pivots by position, then text pivots; `pivot_order="text-first"`
    the other way round) claims its share of the
    remaining budget: the not-yet-kept visual tokens *least* cosine-similar to it (hidden states
    through the LLM's final norm, as the official code). Kept: the visual pivots and every claimed
    token. The official code gives each pivot `int(kept / pivots)` tokens; here the shares are equal
    up to one, so exactly `k` tokens remain."""

    pivots: int = Field(4, ge=1)
    text_pivots: int = Field(4, ge=0)
    pivot_order: Literal["image-first", "text-first"] = "image-first"
    """The order pivots claim in (earlier pivots claim first, and one more token when the shares
    do not divide evenly); the official code's order is Python's `set` order of their positions."""

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        text = (
            (TextPivots(layer=info.layer_before_stage(self.name), count=self.text_pivots),) if self.text_pivots else ()
        )
        return (NormedTokens(), *text)

    def select(self, ctx: SelectContext) -> Reduction:
        tokens, k = ctx.tokens, ctx.k
        b, n, _ = tokens.shape
        normed = ctx.signal(NormedTokens).float()
        p = min(self.pivots, k)
        image_pivots = (
            torch.sort(self.scored(ctx.scores), dim=1, descending=True, stable=True).indices[:, :p].sort(dim=1).values
        )
        pivot_states = normed.gather(1, image_pivots[..., None].expand(-1, -1, normed.shape[-1]))
        text = ctx.signals_of(TextPivots)
        if text:
            pivot_states = torch.cat([pivot_states, text[0].float()], dim=1)
        sims = torch.nn.functional.normalize(pivot_states, dim=-1) @ torch.nn.functional.normalize(
            normed, dim=-1
        ).transpose(1, 2)
        chosen = torch.zeros(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, image_pivots, True)
        count = sims.shape[1]
        order = list(range(count)) if self.pivot_order == "image-first" else [*range(p, count), *range(p)]
        for rank, i in enumerate(order):
            share = (k - p) // count + (rank < (k - p) % count)
            if share:
                claim = torch.sort(sims[:, i].masked_fill(chosen, float("inf")), dim=1, stable=True).indices[:, :share]
                chosen.scatter_(1, claim, True)
        return Reduction.drop(tokens, chosen.nonzero()[:, 1].view(b, k))
