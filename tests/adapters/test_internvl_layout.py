"""InternVL's packing helpers against HF's own `pixel_shuffle` (run on index and signal tensors) and
hand-worked placeholder runs."""

import pytest
import torch
from transformers.models.internvl.modeling_internvl import InternVLModel

from tokenprune.adapters.internvl_layout import (
    placeholder_runs,
    shuffle_factor,
    tiles_per_image,
    unit_patches,
    unit_signal,
)
from tokenprune.errors import InputError


def hf_shuffle(values: torch.Tensor, side: int, factor: int) -> torch.Tensor:
    """HF's pixel shuffle of `[T, N, C]` per-patch values (raster order): `[T, U, f*f*C]`."""
    grid = values.reshape(values.shape[0], side, side, -1)
    out = InternVLModel.pixel_shuffle(None, grid, scale_factor=1 / factor)  # uses no state of the model
    return out.reshape(values.shape[0], -1, out.shape[-1])


@pytest.mark.parametrize(("side", "factor"), [(4, 2), (8, 2), (32, 2), (8, 4)])
def test_unit_patches_are_the_patches_hf_shuffles_into_each_unit(side, factor):
    index = torch.arange(side * side, dtype=torch.float64)[None, :, None]
    expected = hf_shuffle(index, side, factor)[0].long()  # [U, f*f]: channel c of unit u holds patch index
    assert torch.equal(unit_patches(side, factor), expected)


def test_unit_patches_by_hand():
    assert unit_patches(4, 2).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


@pytest.mark.parametrize(("side", "factor"), [(4, 2), (8, 2), (8, 4)])
def test_unit_signal_sums_scalars_and_averages_vectors_over_hfs_units(side, factor):
    g = torch.Generator().manual_seed(side)
    scalars = torch.rand(3, side * side, generator=g, dtype=torch.float64)
    torch.testing.assert_close(unit_signal(scalars, side, factor), hf_shuffle(scalars[..., None], side, factor).sum(-1))
    keys = torch.randn(3, side * side, 5, generator=g, dtype=torch.float64)
    shuffled = hf_shuffle(keys, side, factor)  # [T, U, f*f*5]: the unit's patches' keys, concatenated
    expected = shuffled.view(3, -1, factor * factor, 5).mean(2)
    torch.testing.assert_close(unit_signal(keys, side, factor), expected)


def test_placeholder_runs_in_prompt_order():
    mask = torch.tensor(
        [
            [0, 1, 1, 0, 1, 1, 1, 1],  # two images in one row, the second running to the row's end
            [1, 1, 0, 0, 0, 0, 0, 0],  # a run at the row's start: not joined to the previous row's
            [0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert placeholder_runs(mask) == [(0, 2), (0, 4), (1, 2), (3, 8)]
    assert placeholder_runs(torch.zeros(2, 3, dtype=torch.bool)) == []


def test_tiles_per_image_and_its_refusals():
    assert tiles_per_image([48, 16, 80], 16, 9) == [3, 1, 5]
    with pytest.raises(InputError, match=r"runs \(40 tokens\) do not match the 3 tile\(s\).*at 16 tokens per tile"):
        tiles_per_image([40], 16, 3)
    with pytest.raises(InputError, match=r"runs \(16, 16 tokens\) do not match the 3 tile"):
        tiles_per_image([16, 16], 16, 3)
    with pytest.raises(InputError, match=r"runs \(none tokens\)"):
        tiles_per_image([], 16, 1)


def test_shuffle_factor():
    assert shuffle_factor(0.5, 32) == 2 and shuffle_factor(0.25, 8) == 4 and shuffle_factor(1.0, 5) == 1
    for ratio, side in [(0.4, 10), (0.5, 7), (2.0, 4)]:
        with pytest.raises(InputError, match="1 / downsample_ratio must be an integer dividing the grid side"):
            shuffle_factor(ratio, side)
