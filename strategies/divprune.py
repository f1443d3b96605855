"""DivPrune (arXiv 2503.02175): diversity-based selection, no attention needed."""

import torch
from torch import Tensor

from tokenprune.reduction import Reduction
from tokenprune.registry import register
from tokenprune.strategy import SelectContext, Selector


def max_min_diverse(features: Tensor, k: int) -> Tensor:
    """Greedy max-min diversity on cosine distance. `features` `[B, N, D]` -> `[B, k]` ascending.

    First the token whose nearest neighbour is farthest; then, k - 1 times, the token farthest
    from everything selected so far (ties to the lower index).
    """
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    dist = 1.0 - x @ x.transpose(1, 2)  # [B, N, N]
    b, n, _ = dist.shape
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    nearest = dist.masked_fill(eye, float("inf")).min(dim=1).values if n > 1 else torch.zeros(b, 1)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=dist.device)
    picked = nearest.argmax(dim=1)  # [B]
    min_dist = torch.full((b, n), float("inf"), device=dist.device)
    rows = torch.arange(b, device=dist.device)
    for _ in range(k):
        chosen[rows, picked] = True
        min_dist = torch.minimum(min_dist, dist[rows, picked])
        picked = min_dist.masked_fill(chosen, -float("inf")).argmax(dim=1)
    return chosen.nonzero()[:, 1].view(b, k)


@register("divprune")
class DivPrune(Selector):
    """DivPrune (arXiv 2503.02175): keep a max-min diverse subset of the tokens (cosine distance
    between the features reaching the stage); needs no scores and no attention map."""

    needs_scores = False

    def select(self, ctx: SelectContext) -> Reduction:
        return Reduction.drop(ctx.tokens, max_min_diverse(ctx.tokens, ctx.k))
