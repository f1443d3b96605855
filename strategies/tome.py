"""ToMe bipartite soft matching (arXiv 2210.09461), used to merge visual tokens down to k."""

import torch
from torch import Tensor

from tokenprune.reduction import Reduction
from tokenprune.registry import register
from tokenprune.strategy import SelectContext, Selector


def bipartite_round(x: Tensor, size: Tensor, weights: Tensor, index: Tensor, r: int):
    """One ToMe round: merge the `r` most similar (even -> odd) pairs.

    x `[B, n, D]` tokens (size-weighted means), size `[B, n]` token masses, weights `[B, n, N]`
    provenance, index `[B, n]` representatives. Returns the same four with `n - r` tokens.
    """
    b, n, d = x.shape
    a_idx, b_idx = torch.arange(0, n, 2, device=x.device), torch.arange(1, n, 2, device=x.device)
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = unit[:, a_idx] @ unit[:, b_idx].transpose(1, 2)  # [B, Na, Nb]
    best, dst = sim.max(dim=-1)  # each even token's most similar odd token
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    src, keep_a = order[:, :r], order[:, r:].sort(dim=-1).values  # merged / unmerged even tokens
    dst_of_src = dst.gather(1, src)

    def merge(values: Tensor) -> Tensor:  # values [B, n, ...] summed into the odd side
        tail = values.shape[2:]
        odd = values[:, b_idx].clone()
        moved = values[:, a_idx].gather(1, src.view(b, r, *([1] * len(tail))).expand(b, r, *tail))
        odd.scatter_add_(1, dst_of_src.view(b, r, *([1] * len(tail))).expand(b, r, *tail), moved)
        kept = values[:, a_idx].gather(1, keep_a.view(b, -1, *([1] * len(tail))).expand(b, -1, *tail))
        return torch.cat([kept, odd], dim=1)

    mass = merge(size)
    x = merge(x.float() * size.unsqueeze(-1)) / mass.unsqueeze(-1)
    weights = merge(weights * size.unsqueeze(-1)) / mass.unsqueeze(-1)
    index = torch.cat([index[:, a_idx].gather(1, keep_a), index[:, b_idx]], dim=1)
    order = index.sort(dim=1).indices  # keep outputs in ascending representative order
    take = lambda t: t.gather(1, order.view(b, -1, *([1] * (t.dim() - 2))).expand_as(t))  # noqa: E731
    return take(x), take(mass), take(weights), take(index)


@register("tome")
class ToMe(Selector):
    """ToMe bipartite soft matching (arXiv 2210.09461): merge the most similar token pairs,
    size-weighted, in rounds of at most half the tokens, until k remain. A merged token stands at
    its odd-side (destination) member; provenance weights are the members' mass fractions."""

    needs_scores = False

    def select(self, ctx: SelectContext) -> Reduction:
        tokens, k = ctx.tokens, ctx.k
        b, n, _ = tokens.shape
        x = tokens
        size = torch.ones(b, n, device=tokens.device)
        weights = torch.eye(n, device=tokens.device).expand(b, n, n)
        index = torch.arange(n, device=tokens.device).expand(b, n)
        while x.shape[1] > k:
            x, size, weights, index = bipartite_round(x, size, weights, index, min(x.shape[1] - k, x.shape[1] // 2))
        return Reduction(tokens=x.to(tokens.dtype), index=index, weights=None if k == n else weights)
