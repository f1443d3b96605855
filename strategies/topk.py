"""Top-k drop: the selector behind VTC-CLS, FasterVLM and most score-based pruners."""

import torch
from torch import Tensor

from tokenprune.reduction import Reduction
from tokenprune.registry import register
from tokenprune.strategy import Selector


@register("topk")
class TopK(Selector):
    """Keep the k highest-scoring tokens (ties: lower index first), back in their original order."""

    def select(self, tokens: Tensor, scores: Tensor | None, k: int, grid: tuple[int, int] | None = None) -> Reduction:
        order = torch.sort(self.scored(scores), dim=1, descending=True, stable=True).indices[:, :k]  # [B, k]
        return Reduction.drop(tokens, order.sort(dim=1).values)
