"""Qwen's multimodal RoPE (M-RoPE) positions of a prompt with images, on the device.

The rule Qwen2-VL, Qwen2.5-VL and Qwen3-VL apply to images (their `get_rope_index`, the same in
transformers 5.23 and 5.24), per prompt row and over its unpadded tokens only:

* a text token takes the running position `c` on all three axes, and `c` grows by 1;
* an image of merged grid `t x h x w` (`image_grid_thw` with `h` and `w` divided by the spatial
  merge size), laid out in raster order, gives its token at frame `i`, row `j`, column `k` the
  positions `(c + i, c + j, c + k)`, and `c` grows by `max(h, w)` (not by `t`);
* padding gets position 0; the row's delta (later tokens' offset from their 1D position) is its
  largest position plus 1 minus its unpadded length.

`rope_index` computes this for the whole batch at once: a few element-wise kernels, cumulative
sums and gathers, with no host read, no Python loop over rows or images, and shapes known
from the inputs' shapes alone. Images sit in `image_grid_thw` in prompt order, rows first (as the
model scatters their features). Unlike `get_rope_index`, two images with no text between them are
told apart by their grids (Qwen's processors always put `<|vision_start|>` and `<|vision_end|>`
around an image, so its rule never meets them). Videos (Qwen2.5-VL's temporal spacing, Qwen3-VL's
per-frame grids) are not covered: the caller keeps the model's own rule for them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_index(image: Tensor, grid: Tensor, merge: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """M-RoPE positions and deltas of a batch of prompts whose images are placeholder tokens.

    Args:
        image: `[B, P]` bool, True at image placeholder tokens (`mm_token_type_ids == 1`).
        grid: `[I, 3]` long, each image's `(t, h, w)` patch grid, in prompt order (rows first).
        merge: the tower's spatial merge size (`vision_config.spatial_merge_size`).
        mask: `[B, P]` attention mask (nonzero: a token; zero: padding, anywhere in the row), or `None`.
    Returns:
        positions `[3, B, P]` long (temporal, height, width; 0 at padding) and deltas `[B, 1]` long,
        equal to the model's `get_rope_index(...)` for prompts it accepts.
    """
    valid = torch.ones_like(image, dtype=torch.bool) if mask is None else mask.bool()
    image = image & valid
    if grid.shape[0] == 0:  # no image: 1D positions over the unpadded tokens
        image = torch.zeros_like(image)
        grid = torch.tensor([[1, merge, merge]])
    grid = grid.to(image.device, torch.long)
    t, h, w = grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge  # [I] the merged grid
    sizes = t * h * w
    ends = sizes.cumsum(0)  # [I] each image's end among all images' tokens
    rank = image.flatten().long().cumsum(0).view_as(image) - 1  # [B, P] each image token's rank among them
    # its image: how many images end at or before its rank (ends marked on the ranks, counted by a cumsum)
    marks = torch.zeros(image.numel() + 1, dtype=torch.long, device=image.device)
    marks.scatter_add_(0, ends.clamp(max=image.numel()), torch.ones_like(ends))
    which = _at(marks.cumsum(0), rank.clamp(min=0)).clamp(max=grid.shape[0] - 1)  # [B, P]
    offset = rank - _at(ends - sizes, which)  # [B, P] its raster index in that image
    rows, cols = _at(h, which), _at(w, which)
    frame, row, col = offset // (rows * cols), offset // cols % rows, offset % cols
    last = image & (offset == _at(sizes, which) - 1)
    advance = _at(torch.maximum(h, w), which)  # an image moves the running position by max(h, w) ...
    step = torch.where(image, torch.where(last, advance, 0), valid.long())  # ... once, at its last token
    start = step.cumsum(1) - step  # [B, P] the running position before each token
    within = torch.stack([frame, row, col]) * image  # [3, B, P] an image token's offsets, 0 for text
    positions = (start + within).masked_fill(~valid, 0)
    deltas = positions.amax(dim=(0, 2)) + 1 - valid.sum(1)
    return positions, deltas[:, None]


def _at(values: Tensor, index: Tensor) -> Tensor:
    """`values` `[N]` at `index` `[B, P]` (`index_select`: on a CPU, `take` and advanced indexing split
    even a few thousand reads over threads, and stall for milliseconds when another process holds a core)."""
    return values.index_select(0, index.flatten()).view_as(index)
