"""Average pooling over the patch grid (VCC, arXiv 2406.20092; LLaVA's pooled variants)."""

import functools
import math

import torch
from einops import repeat
from torch import Tensor

from tokenprune.reduction import Reduction
from tokenprune.registry import register
from tokenprune.strategy import SelectContext, Selector


def bins(n_in: int, n_out: int, device: torch.device | None = None) -> Tensor:
    """`[n_out, n_in]` adaptive-average-pooling weights (PyTorch's bins: floor/ceil edges), built on
    `device` (no host-to-device copy)."""
    i = torch.arange(n_out, device=device)
    start = torch.div(i * n_in, n_out, rounding_mode="floor")
    end = torch.div((i + 1) * n_in + n_out - 1, n_out, rounding_mode="floor")
    j = torch.arange(n_in, device=device)
    member = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return member.float() / member.sum(dim=1, keepdim=True)


@functools.lru_cache(maxsize=64)
def pooling(n: int, k: int, grid: tuple[int, int] | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """The pooling of `n` tokens (on a `grid` of rows x columns, or none) to `k`: weights `[k, n]` and
    each output's centre patch `[k]`, on `device`. Cached: a shape's plan is built once (read-only)."""
    side = math.isqrt(k)
    if grid is not None and grid[0] * grid[1] == n and side * side == k and side <= min(grid):
        rows, cols = bins(grid[0], side, device), bins(grid[1], side, device)
        weights = torch.einsum("ih,jw->ijhw", rows, cols).reshape(k, n)  # separable 2D bins
        centre = lambda w: (w > 0).float().argmax(1) + ((w > 0).sum(1) - 1) // 2  # noqa: E731
        return weights, (centre(rows)[:, None] * grid[1] + centre(cols)[None, :]).flatten()
    weights = bins(n, k, device)
    return weights, (weights > 0).float().argmax(1) + ((weights > 0).sum(1) - 1) // 2


@register("pool")
class Pool(Selector):
    """Average pooling to k tokens: 2D over the patch grid when k is a square (e.g. 24x24 -> 8x8),
    else 1D adaptive pooling over raster order. Each output stands at its bin's centre patch."""

    needs_scores = False

    def select(self, ctx: SelectContext) -> Reduction:
        tokens = ctx.tokens
        b, n, _ = tokens.shape
        weights, index = pooling(n, ctx.k, None if ctx.grid is None else tuple(ctx.grid), tokens.device)
        merged = torch.einsum("kn,bnd->bkd", weights.to(tokens.dtype), tokens)
        return Reduction(
            tokens=merged,
            index=repeat(index, "k -> b k", b=b),
            weights=repeat(weights, "k n -> b k n", b=b),
        )
