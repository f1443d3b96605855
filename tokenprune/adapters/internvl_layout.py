"""InternVL's packing, as pure functions: pixel-shuffle units over each tile's patch grid, patch
signals summed into units, and an image's tiles read from its placeholder run.

InternVL encodes every tile (a 448-px crop of the image, or its thumbnail) with InternViT: a [CLS]
token and an `S x S` patch grid. HF drops the [CLS] feature and pixel-shuffles the grid by
`f = 1 / downsample_ratio` (2 for every released checkpoint): each `f x f` patch group becomes one
**unit**, the concatenation of its patches' features, and each unit is one LLM token after the MLP
projector. Units are numbered row-major over the `S/f x S/f` unit grid; unit `(r, c)` holds
patches `(f r + i, f c + j)`, `i` outer, `j` inner (HF's channel order).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from ..errors import InputError


def shuffle_factor(downsample_ratio: float, side: int) -> int:
    """The pixel-shuffle factor `f = 1 / downsample_ratio` of a tile of `side x side` patches.

    Raises:
        InputError: `1 / downsample_ratio` is not an integer, or `f` does not divide `side`.
    """
    factor = round(1 / downsample_ratio)
    if factor < 1 or abs(factor * downsample_ratio - 1) > 1e-6 or side % factor:
        raise InputError(
            f"downsample_ratio={downsample_ratio} does not pixel-shuffle a {side}x{side} patch grid into whole "
            "units: 1 / downsample_ratio must be an integer dividing the grid side"
        )
    return factor


def unit_patches(side: int, factor: int) -> Tensor:
    """`[U, f*f]` long: the patch indices (row-major in the `side x side` grid) each unit stands for,
    in HF's channel order, `U = (side / f) ** 2`."""
    grid = torch.arange(side * side).view(side, side)
    return rearrange(grid, "(r i) (c j) -> (r c) (i j)", i=factor, j=factor)


def unit_signal(values: Tensor, side: int, factor: int) -> Tensor:
    """A per-patch signal of each tile, per unit.

    Args:
        values: `[T, N]` a scalar per patch (attention a patch receives or gives), or `[T, N, d]` a
            vector per patch (keys), `N = side * side` in raster order, the [CLS] entry dropped.
    Returns:
        `[T, U]`: the sum over each unit's `f*f` patches (the attention mass the unit's patches
        receive, so a tile's [CLS] row still sums to at most 1); or `[T, U, d]`: their mean.
    """
    grouped = rearrange(values, "t (r i c j) ... -> t (r c) (i j) ...", i=factor, j=factor, c=side // factor)
    return grouped.sum(dim=2) if values.dim() == 2 else grouped.mean(dim=2)


def placeholder_runs(image_mask: Tensor) -> list[tuple[int, int]]:
    """The maximal runs of image placeholders in a prompt batch, in prompt order (row by row).

    Args:
        image_mask: `[B, P]` bool, the placeholder columns.
    Returns:
        per run, `(batch row, length)`. Reads the mask to the host (one sync).
    """
    padded = torch.nn.functional.pad(image_mask.long(), (1, 1))  # [B, P + 2]: no run touches an edge
    edges = padded.diff(dim=1)  # +1 where a run starts, -1 one past where it ends
    starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()  # row-major: runs in prompt order
    return [(int(row), int(end - start)) for (row, start), (_, end) in zip(starts.tolist(), ends.tolist(), strict=True)]


def tiles_per_image(lengths: list[int], units: int, tiles: int) -> list[int]:
    """Each image's tile count from its placeholder run (`lengths`, `units` LLM tokens per tile),
    checked against the `tiles` the tower encoded.

    Raises:
        InputError: a run is not a whole number of tiles, or the runs need other than `tiles` tiles.
    """
    counts = [n // units for n in lengths]
    if any(n % units for n in lengths) or sum(counts) != tiles:
        raise InputError(
            f"the prompt's image placeholder runs ({', '.join(map(str, lengths)) or 'none'} tokens) do not match the "
            f"{tiles} tile(s) in pixel_values at {units} tokens per tile: each image must be one run of "
            "<IMG_CONTEXT> tokens (tiles x image_seq_length) between <img> and </img>, as the model's processor "
            "builds it"
        )
    return counts
