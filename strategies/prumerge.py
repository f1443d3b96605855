"""LLaVA-PruMerge (arXiv 2403.15388): keep the [CLS]-selected tokens, merge the rest into them."""

from typing import Literal

import torch
from pydantic import Field
from tokenprune.strategies.vtc_cls import VTCCLS
from torch import Tensor

from tokenprune.errors import BudgetError
from tokenprune.reduction import Reduction
from tokenprune.registry import register
from tokenprune.signals import ClsAttention, PatchKeys, Signal
from tokenprune.strategy import ModelInfo, ScoringContext, SelectContext, Selector


def iqr_outliers(scores: Tensor) -> Tensor:
    """PruMerge's adaptive selection: `[B, N]` bool, True for each score above `Q3 + 1.5 * IQR` of
    its image's scores (quartiles linearly interpolated, as `numpy.percentile`)."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device), dim=1, keepdim=True)
    return scores.float() > q3 + 1.5 * (q3 - q1)


@register("prumerge")
class PruMerge(VTCCLS):
    """PruMerge's scorer: [CLS] attention in the last vision block (the official code hooks block
    23 of 24 in CLIP ViT-L), paired with `prumerge-merge`. `heads="concat"` (default, as the
    official code): one softmax over the full q/k width, scaled by `D ** -0.5`; `heads="mean"`:
    the head-mean [CLS] attention the paper describes."""

    layer: int | None = -1
    heads: Literal["concat", "mean"] = "concat"
    default_selector = "prumerge-merge"
    places = ("projector",)  # defined on the encoder's output, not inside it

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        return (ClsAttention(layer=self.block(info), heads=self.heads),)

    def score(self, ctx: ScoringContext) -> Tensor:
        return ctx.signal()


@register("prumerge-merge")
class PruMergeMerge(Selector):
    """PruMerge's merge. Kept tokens: with `adaptive=True` (default, as the official code) each
    image's IQR outliers of the scores (`iqr_outliers`), best first, and the budget `k` is a cap on
    the outputs; with `adaptive=False` the `k - 1` best. Each kept token adds the features of its
    `neighbours` most key-similar other tokens (cosine of block `layer`'s full keys), weighted by
    their scores (`x_i + sum_j s_j x_j`, as the official code); one more output is the
    score-weighted sum of every pruned token (representative: the best pruned one). Outputs:
    `order="score"` (default, as the official code) kept tokens best first, the extra token last;
    `order="raster"`: ascending representative. With `adaptive=False`, at `k = N` nothing is pruned
    or merged. Provenance weights are the same sums over non-negative scores, normalised.

    Adaptive counts differ between images; a batch whose images keep different counts is refused
    (run one image per forward, or `adaptive=False`)."""

    weights_by_scores = True
    layer: int = -1
    neighbours: int = Field(32, ge=1)
    adaptive: bool = True
    order: Literal["score", "raster"] = "score"

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        return (PatchKeys(layer=info.vision_block(self.layer), heads="concat"),)

    def keeps_exactly_k(self) -> bool:
        return not self.adaptive

    def candidates(self, scores: Tensor, ranked: Tensor) -> list[Tensor]:
        """Per image, the official kept list before the budget: its IQR outliers, best first.

        Args:
            scores: `[B, N]`; ranked: `[B, N]` the indices by descending score (ties: lower first).
        """
        counts = iqr_outliers(scores).sum(dim=1).tolist()
        return [ranked[b, :m] for b, m in enumerate(counts)]

    def kept(self, scores: Tensor, k: int) -> Tensor:
        """`[B, kept]` the tokens kept (merge centres), in output order; `kept + 1 <= k` outputs."""
        ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices
        if not self.adaptive:
            return ranked[:, : k - 1 if k > 1 else 1]
        lists = [c[: k - 1] for c in self.candidates(scores, ranked)]
        counts = sorted({len(c) for c in lists})
        if len(counts) > 1:
            raise BudgetError(
                f"{self.name}(adaptive=True) keeps a different number of tokens per image in this batch "
                f"({[len(c) + 1 for c in lists]}); ragged counts are not supported here yet: run one image "
                f"per forward, or give a fixed budget: SCORER+{self.name}(adaptive=False)@K"
            )
        return torch.stack(lists)

    def select(self, ctx: SelectContext) -> Reduction:
        tokens, scores, k = ctx.tokens, self.scored(ctx.scores), ctx.k
        b, n, _ = tokens.shape
        if k == n and not self.adaptive:
            return Reduction.drop(tokens, torch.arange(n, device=tokens.device).expand(b, n))
        keys = ctx.signal()
        top = self.kept(scores, k)  # [B, kept]
        kept = top.shape[1]
        unit = torch.nn.functional.normalize(keys.float(), dim=-1)
        sims = unit.gather(1, top[..., None].expand(-1, -1, unit.shape[-1])) @ unit.transpose(1, 2)
        sims.scatter_(2, top[..., None], -float("inf"))  # a token is not its own neighbour
        near = sims.topk(min(self.neighbours, n - 1), dim=2).indices  # [B, kept, m]
        weights = torch.zeros(b, kept, n, device=tokens.device)
        weights.scatter_(2, near, scores.float()[:, None, :].expand(-1, kept, -1).gather(2, near))
        weights.scatter_(2, top[..., None], 1.0)
        provenance = weights.clamp_min(0)  # provenance counts contributions of non-negative score
        if kept < min(k, n):  # the extra token
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
        reduction = Reduction(tokens=merged, index=top, weights=weights)
        return reduction if self.order == "score" else reduction.in_index_order()
