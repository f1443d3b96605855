"""Importance-weighted grouping in the spirit of VisToG (arXiv 2411.17773): tokens join groups and
each group becomes one token."""

import torch

from tokenprune.reduction import Reduction
from tokenprune.registry import register
from tokenprune.strategy import SelectContext, Selector


@register("group-merge")
class GroupMerge(Selector):
    """Group the tokens around the `k` best-scored ones and merge each group into one token.

    Centres: the `k` highest scores (ties: lower index). Every other token joins the centre whose
    features are most cosine-similar (ties: lower centre). A group's output is the mean of its
    members weighted by their scores clamped at 0 (uniform when they are all 0), at the centre's
    position. VisToG learns its grouping tokens; this is the training-free analogue: grouping by
    feature similarity, merging by importance. At `k = N` every token is its own group.
    """

    weights_by_scores = True

    def select(self, ctx: SelectContext) -> Reduction:
        tokens, scores, k = ctx.tokens, self.scored(ctx.scores), ctx.k
        b, n, _ = tokens.shape
        centres = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
        unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
        sims = unit @ unit.gather(1, centres[..., None].expand(-1, -1, unit.shape[-1])).transpose(1, 2)  # [B, N, k]
        group = sims.argmax(dim=2)  # [B, N]
        group.scatter_(1, centres, torch.arange(k, device=tokens.device).expand(b, k))  # a centre leads its own group
        member = torch.nn.functional.one_hot(group, k).transpose(1, 2).float()  # [B, k, N]
        mass = member * scores.float().clamp_min(0)[:, None, :]
        mass = torch.where(mass.sum(-1, keepdim=True) > 0, mass, member)
        weights = mass / mass.sum(-1, keepdim=True)
        return Reduction(tokens=weights.to(tokens.dtype) @ tokens, index=centres, weights=weights)
