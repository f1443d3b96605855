"""FoPru (arXiv 2411.14164): focal pruning by the significance of each patch in the vision
encoder's patch-to-patch attention map, globally (`rank`) or by whole patch rows (`row`)."""

from typing import ClassVar, Literal

import torch
from einops import rearrange
from torch import Tensor

from tokenprune.errors import SignalError
from tokenprune.registry import register
from tokenprune.signals import PatchAttention, Signal
from tokenprune.strategy import ModelInfo, ScoringContext, ScoringStrategy


@register("fopru")
class FoPru(ScoringStrategy):
    """FoPru: significance from the head-mean patch-to-patch attention map `A` of vision block
    `layer` (default `None`: the block whose output the projector reads), no [CLS] needed.

    * `significance="variance"` (default, as the authors' group's code): per image, the column mean
      (attention each patch receives) or the row mean (attention it gives), whichever has the larger
      variance (the row mean on a tie); `"col"` / `"row"`: always that one.
    * `scores="logits"` (default, as that code): `A = QK^T / sqrt(d)` before the softmax;
      `"softmax"`: post-softmax probabilities over all keys ([CLS] included, then dropped).
    * `variant="rank"` (default): the significance itself, top-k over the image. `variant="row"`:
      rows of the patch grid ranked by their summed significance; the best `k // cols` rows are kept
      whole and the rest of the budget comes from the next row, its best tokens
      (`partial="best"`) or its first ones (`partial="raster"`): exactly `k` tokens.

    Paired with `topk`: kept tokens return to raster order. Inside the encoder
    (`fopru(layer=0)@18@vision:1`, an extension: the paper prunes at the projector) it ranks by an
    earlier block's map.
    """

    places: ClassVar[tuple[str, ...]] = ("projector", "vision")
    layer: int | None = None
    variant: Literal["rank", "row"] = "rank"
    significance: Literal["variance", "col", "row"] = "variance"
    scores: Literal["logits", "softmax"] = "logits"
    partial: Literal["best", "raster"] = "best"

    def _block(self, info: ModelInfo) -> int:
        if self.layer is not None:
            return info.vision_block(self.layer)
        if info.feature_layer is None:
            raise SignalError(
                "the projector reads the patch embeddings, which no attention block produced; "
                "give fopru an explicit layer, e.g. fopru(layer=-1)"
            )
        return info.feature_layer

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        """The column mean then the row mean (`significance="variance"`), or the one axis named."""
        axes: tuple[Literal["col", "row"], ...] = (
            ("col", "row") if self.significance == "variance" else (self.significance,)
        )
        return tuple(PatchAttention(layer=self._block(info), axis=a, scores=self.scores) for a in axes)

    def significance_of(self, ctx: ScoringContext) -> Tensor:
        """`[B, N]` each patch's significance."""
        if self.significance != "variance":
            return ctx.signal()
        col, row = ctx.signal(0), ctx.signal(1)
        return torch.where((col.var(dim=1) > row.var(dim=1))[:, None], col, row)

    def score(self, ctx: ScoringContext) -> Tensor:
        sig = self.significance_of(ctx)
        if self.variant == "rank":
            return sig
        grid = ctx.info.grid
        if grid is None or grid[0] * grid[1] != sig.shape[1]:
            raise SignalError(
                f"fopru(variant='row') needs the patch grid of the {sig.shape[1]} tokens reaching the stage, "
                "which this model does not give (tiled crops, or a stage after another); use fopru(variant='rank')"
            )
        rows, cols = grid
        per_row = rearrange(sig, "b (r c) -> b r c", r=rows)
        order = torch.sort(per_row.sum(-1), dim=1, descending=True, stable=True).indices  # [B, rows]
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(rows, device=sig.device).expand_as(order))
        if self.partial == "best":
            low, high = per_row.amin(-1, keepdim=True), per_row.amax(-1, keepdim=True)
            within = (per_row - low) / (high - low).clamp_min(torch.finfo(sig.dtype).tiny)
        else:
            within = 1 - torch.arange(cols, device=sig.device) / cols
        # a row's rank dominates (steps of 1), the position inside it breaks ties (within [0, 0.5])
        return rearrange((rows - rank)[..., None].double() + 0.5 * within.double(), "b r c -> b (r c)")
