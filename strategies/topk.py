"""Top-k drop: the selector behind VTC-CLS, FasterVLM and most score-based pruners."""

import torch

from tokenprune.reduction import Reduction
from tokenprune.registry import register
from tokenprune.strategy import SelectContext, Selector


@register("topk")
class TopK(Selector):
    """Keep the k highest-scoring tokens (ties: lower index first), back in their original order."""

    def select(self, ctx: SelectContext) -> Reduction:
        order = torch.sort(self.scored(ctx.scores), dim=1, descending=True, stable=True).indices[:, : ctx.k]  # [B, k]
        return Reduction.drop(ctx.tokens, order.sort(dim=1).values)
