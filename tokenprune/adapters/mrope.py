"""Qwen's multimodal RoPE (M-RoPE): the position rule of the Qwen2-VL family (`MRope`), and the
positions of a prompt with images computed on the device (`rope_index`).

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
per-frame grids) are not covered: the packings refuse them, and `generate` numbers a prompt with
videos itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .base import require_state

if TYPE_CHECKING:
    from .engine import Engine, Prefill
    from .sequence import Compaction


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
    return positions, rope_deltas(positions, mask)


def rope_deltas(positions: Tensor, mask: Tensor | None = None) -> Tensor:
    """`[B, 1]` long, each row's M-RoPE delta: its largest position (`positions` `[R, B, P]`, over the
    rows and the unpadded columns of `mask` `[B, P]`) plus 1 minus its unpadded length."""
    valid = torch.ones_like(positions[0], dtype=torch.bool) if mask is None else mask.bool().to(positions.device)
    top = positions.masked_fill(~valid, torch.iinfo(positions.dtype).min).amax(dim=(0, 2))
    return (top + 1 - valid.sum(1))[:, None]


def _at(values: Tensor, index: Tensor) -> Tensor:
    """`values` `[N]` at `index` `[B, P]` (`index_select`: on a CPU, `take` and advanced indexing split
    even a few thousand reads over threads, and stall for milliseconds when another process holds a core)."""
    return values.index_select(0, index.flatten()).view_as(index)


@dataclass(frozen=True)
class MRope:
    """Multimodal RoPE (Qwen2-VL family): kept tokens always keep their positions in the full prompt.

    * Prefill: the caller's position ids where given (`generate` passes its own, `[4, B, P]` with
      text positions first), else the model's rule for images computed on the device (`rope_index`),
      gathered at the kept columns; the M-RoPE deltas from those positions (`rope_deltas`).
    * `generate`: the prompt's position ids as the model's `_prepare_position_ids_for_generation`
      computes them (text positions, then `rope_index`'s), and its `rope_deltas` set as it sets them,
      so that `generate` skips the model's `get_rope_index` and its host reads.
    * Later tokens: their original text position plus the row's delta.

    The model's own `get_rope_index` is not used: videos, whose rule differs, are refused by the
    packings (a prompt with videos outside `tp.apply` runs as the model runs it).
    """

    fixed: str | None = "original"

    def prefill(self, engine: Engine, kw: dict[str, Any], comp: Compaction) -> tuple[Tensor | None, Tensor | None]:
        """`[R, B, P']` positions at the kept columns (`R`: 3, or the caller's count; 0 at added
        padding) and the `[B, 1]` deltas of the full prompt."""
        given, mask = kw.get("position_ids"), kw.get("attention_mask")
        if given is None:
            ids, types = kw["input_ids"], kw.get("mm_token_type_ids")
            image = types == 1 if types is not None else ids == getattr(engine.config, engine.family.layout.image_token)
            grid = engine.image_argument(kw, "image_grid_thw", per_copy=True)
            positions, deltas = rope_index(image, grid, _merge_size(engine), mask)
        else:  # [B, P] text positions stand for all three axes, as the model reads them
            positions = given if given.dim() == 3 else given[None].expand(3, -1, -1)
            deltas = rope_deltas(positions[-3:], mask)
        index = comp.source[None].expand(positions.shape[0], -1, -1)
        return positions.gather(2, index).masked_fill(~comp.valid[None], 0), deltas

    def decode(self, prefill: Prefill, mask: Tensor | None, start: int, step: int) -> Tensor:
        """`[3, B, step]`: each row's text position (counted on its original mask, as HF counts it,
        padding excluded) plus its M-RoPE delta."""
        batch = prefill.compaction.source.shape[0]
        deltas = require_state(prefill.deltas, "the M-RoPE deltas")
        if mask is not None:
            text = (mask.long().cumsum(-1) - 1)[:, -step:].to(deltas.device)
        else:
            text = (torch.arange(step, device=deltas.device) + start)[None].expand(batch, -1)
        return (text + deltas.view(batch, 1))[None].expand(3, -1, -1)

    def generation(self, engine: Engine, kwargs: dict[str, Any]) -> Tensor | None:
        """`[4, B, P]` position ids for `generate`'s keyword arguments `kwargs` (a fresh prompt with
        images: `input_ids`, `attention_mask`, `mm_token_type_ids`, `image_grid_thw`), equal to the
        model's own; `None` (the model computes them) for anything else (videos among them)."""
        ids, mask, types = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("mm_token_type_ids")
        grid = kwargs.get("image_grid_thw")
        if ids is None or mask is None or types is None or grid is None or mask.dim() != 2:
            return None
        if kwargs.get("video_grid_thw") is not None or kwargs.get("pixel_values_videos") is not None:
            return None
        positions, deltas = rope_index(types == 1, grid, _merge_size(engine), mask)
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        engine.core.rope_deltas = deltas  # as the model's own leaves it for later calls
        return torch.cat([text[None].to(positions.device), positions])


def _merge_size(engine: Engine) -> int:
    """The tower's spatial merge size, from the config (as the model's `get_rope_index` reads it)."""
    return engine.config.vision_config.spatial_merge_size
