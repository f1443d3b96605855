"""Seeded random baseline."""

import torch
from einops import repeat
from pydantic import Field
from torch import Tensor

from tokenprune.registry import register
from tokenprune.strategy import ScoringContext, ScoringStrategy


@register("random")
class RandomScores(ScoringStrategy):
    """Seeded random baseline: one random ranking of patch positions, the same for every image.

    The same ranking for every image keeps results independent of batching and reproducible from
    `seed`; vary `seed` to average over draws.
    """

    seed: int = Field(0, ge=-(2**63), lt=2**64)  # the range torch.Generator.manual_seed accepts

    def score(self, ctx: ScoringContext) -> Tensor:
        b, n = ctx.tokens.shape[:2]
        scores = torch.rand(n, generator=torch.Generator().manual_seed(self.seed))
        return repeat(scores.to(ctx.tokens.device), "n -> b n", b=b)
