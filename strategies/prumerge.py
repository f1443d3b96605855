"""LLaVA-PruMerge (arXiv 2403.15388): keep the [CLS]-selected tokens, merge the rest into them."""

from collections.abc import Mapping

import torch
from pydantic import Field
from tokenprune.strategies.vtc_cls import VTCCLS
from torch import Tensor

from tokenprune.reduction import Reduction
from tokenprune.registry import register
from tokenprune.signals import PatchKeys, Signal
from tokenprune.strategy import ModelInfo, Selector


@register("prumerge")
class PruMerge(VTCCLS):
    """PruMerge's scorer: [CLS] attention in the last vision block (the official code hooks block
    23 of 24 in CLIP ViT-L), paired with `prumerge-merge`. The official code takes one attention
    over the whole key width; this uses the head mean (the [CLS] attention the paper describes).
    The paper's adaptive k (IQR outliers of the scores) is replaced by the stage's budget."""

    layer: int | None = -1
    default_selector = "prumerge-merge"
    places = ("projector",)  # defined on the encoder's output, not inside it


@register("prumerge-merge")
class PruMergeMerge(Selector):
    """PruMerge's merge: keep the `k - 1` best-scored tokens; each kept token adds the features of
    its `neighbours` most key-similar other tokens (cosine of block `layer`'s keys), weighted by
    their scores (`x_i + sum_j s_j x_j`, as the official code); the last output is the
    score-weighted sum of every pruned token (representative: the best pruned one). At `k = N`
    nothing is pruned and nothing is merged. Provenance weights are the same sums over non-negative
    scores, normalised."""

    weights_by_scores = True
    layer: int = -1
    neighbours: int = Field(32, ge=1)

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        return (PatchKeys(layer=info.vision_block(self.layer), heads="concat"),)

    def select(
        self,
        tokens: Tensor,
        scores: Tensor | None,
        k: int,
        grid: tuple[int, int] | None = None,
        signals: Mapping[Signal, Tensor] | None = None,
    ) -> Reduction:
        b, n, _ = tokens.shape
        if k == n:
            return Reduction.drop(tokens, torch.arange(n, device=tokens.device).expand(b, n))
        keys = next(iter(signals.values()))
        kept = k - 1 if k > 1 else 1
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        top = order[:, :kept].sort(dim=1).values  # [B, kept]
        unit = torch.nn.functional.normalize(keys.float(), dim=-1)
        sims = unit.gather(1, top[..., None].expand(-1, -1, unit.shape[-1])) @ unit.transpose(1, 2)
        sims.scatter_(2, top[..., None], -float("inf"))  # a token is not its own neighbour
        near = sims.topk(min(self.neighbours, n - 1), dim=2).indices  # [B, kept, m]
        weights = torch.zeros(b, kept, n, device=tokens.device)
        weights.scatter_(2, near, scores.float()[:, None, :].expand(-1, kept, -1).gather(2, near))
        weights.scatter_(2, top[..., None], 1.0)
        provenance = weights.clamp_min(0)  # provenance counts contributions of non-negative score
        if k > 1:
            pruned = torch.ones(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, top, False)
            summary = (scores.float() * pruned)[:, None]  # [B, 1, N]
            weights = torch.cat([weights, summary], dim=1)
            share = summary.clamp_min(0)
            unscored = share.sum(-1, keepdim=True) == 0  # no positive score: provenance spread evenly
            provenance = torch.cat([provenance, torch.where(unscored, pruned[:, None].float(), share)], dim=1)
            best = scores.float().masked_fill(~pruned, -float("inf")).argmax(dim=1, keepdim=True)
            top = torch.cat([top, best], dim=1)
        merged = weights.to(tokens.dtype) @ tokens
        weights = provenance / provenance.sum(-1, keepdim=True)
        return Reduction(tokens=merged, index=top, weights=weights).in_index_order()
