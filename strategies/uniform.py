"""Spatially uniform baseline: a regular lattice over the patch grid, ignoring content."""

import math

import torch
from einops import repeat
from torch import Tensor

from tokenprune.reduction import Reduction
from tokenprune.registry import register
from tokenprune.strategy import SelectContext, Selector


def evenly_spaced(k: int, n: int) -> Tensor:
    """`k` distinct indices spread evenly over `range(n)`: the centres of `k` equal bins. `[k]`."""
    return torch.div((2 * torch.arange(k) + 1) * n, 2 * k, rounding_mode="floor")


def lattice_indices(k: int, rows: int, cols: int) -> Tensor:
    """`k` distinct raster indices on a `rows x cols` grid, from the most square lattice covering k.

    The lattice has `gh x gw >= k` points at bin centres; if it has more than `k`, `k` of them are
    taken evenly in raster order. Returns `[k]`, ascending.
    """
    gh = min(rows, max(1, round(math.sqrt(k * rows / cols))))
    gw = min(cols, math.ceil(k / gh))
    gh = min(rows, max(gh, math.ceil(k / gw)))
    lattice = (evenly_spaced(gh, rows)[:, None] * cols + evenly_spaced(gw, cols)[None, :]).flatten()
    return lattice[evenly_spaced(k, lattice.numel())]


@register("uniform")
class Uniform(Selector):
    """Spatially uniform baseline: k tokens on a regular lattice over the patch grid (1D if none)."""

    needs_scores = False

    def select(self, ctx: SelectContext) -> Reduction:
        tokens, k, grid = ctx.tokens, ctx.k, ctx.grid
        b, n = tokens.shape[:2]
        if grid is not None and grid[0] * grid[1] == n:
            index = lattice_indices(k, *grid)
        else:
            index = evenly_spaced(k, n)
        return Reduction.drop(tokens, repeat(index.to(tokens.device), "k -> b k", b=b))
