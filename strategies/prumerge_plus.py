"""PruMerge+ (arXiv 2403.15388, the repository's `token_prune_merge_advanced_plus`): PruMerge's
IQR outliers plus spatially uniform samples, merged as PruMerge merges."""

import torch
from tokenprune.strategies.prumerge import PruMerge, PruMergeMerge, iqr_outliers
from torch import Tensor

from tokenprune.registry import register


@register("prumerge-plus")
class PruMergePlus(PruMerge):
    """PruMerge+'s scorer: PruMerge's (full-width [CLS] attention of the last block), paired with
    `prumerge-plus-merge`."""

    default_selector = "prumerge-plus-merge"


@register("prumerge-plus-merge")
class PruMergePlusMerge(PruMergeMerge):
    """PruMerge+'s merge: the kept tokens are each image's `m` IQR outliers (best first), then the
    raster positions `0, s, 2s, ... < N - 1` not among them, `s = max(1, (N // m) // 3)` (the
    official code's `arange(0, 575, int(int(1 / ratio) / 3))` for `N = 576`, `ratio = m / N`); with
    no outlier, none. Then PruMerge's merge and extra token (`prumerge-merge`). With
    `adaptive=False` the list is cut to `k - 1`, or filled up to `k - 1` with the best-scored other
    tokens."""

    def candidates(self, scores: Tensor, ranked: Tensor) -> list[Tensor]:
        n = scores.shape[1]
        out = []
        for b, m in enumerate(iqr_outliers(scores).sum(dim=1).tolist()):
            outliers = ranked[b, :m]
            if not m:
                out.append(outliers)
                continue
            grid = torch.arange(0, n - 1, max(1, (n // m) // 3), device=scores.device)
            out.append(torch.cat([outliers, grid[~torch.isin(grid, outliers)]]))
        return out

    def kept(self, scores: Tensor, k: int) -> Tensor:
        if self.adaptive:
            return super().kept(scores, k)
        ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices
        want = k - 1 if k > 1 else 1
        lists = []
        for b, listed in enumerate(self.candidates(scores, ranked)):
            rest = ranked[b][~torch.isin(ranked[b], listed)]
            lists.append(torch.cat([listed, rest])[:want])
        return torch.stack(lists)
