"""VTC-CLS, single layer (arXiv 2412.05819)."""

from typing import ClassVar

from torch import Tensor

from tokenprune.errors import SignalError
from tokenprune.registry import register
from tokenprune.signals import ClsAttention, Signal
from tokenprune.strategy import ModelInfo, ScoringContext, ScoringStrategy


def require_cls(name: str, info: ModelInfo) -> None:
    """Refuse clearly on encoders without a [CLS] token (no silent fallback)."""
    if not info.has_cls:
        raise SignalError(
            f"{name!r} scores tokens by [CLS] attention, but this model's vision encoder has no "
            "[CLS] token; use a scorer that needs none (e.g. fopru, random) or a score-free selector "
            "(e.g. uniform)"
        )


@register("vtc-cls")
class VTCCLS(ScoringStrategy):
    """VTC-CLS (arXiv 2412.05819): keep the tokens the [CLS] query attends to most, one layer.

    Score of a patch = post-softmax attention of [CLS] on it, mean over heads, in vision block
    `layer` (Python index; default `-2`: the penultimate block, as the official code's
    `attentions[-2]`, whatever layer the projector reads; `None`: the block whose output the
    projector uses, the same block for LLaVA-1.5). Paired with `topk`; kept tokens return to raster
    order. Inside the encoder (`vtc-cls(layer=4)@288@vision:8`) it prunes by an earlier block's
    [CLS] row.
    """

    places: ClassVar[tuple[str, ...]] = ("projector", "vision")
    layer: int | None = -2

    def block(self, info: ModelInfo) -> int:
        """The non-negative vision block this scorer reads."""
        require_cls(self.name, info)
        if self.layer is not None:
            return info.vision_block(self.layer)
        if info.feature_layer is None:
            raise SignalError(
                "the projector reads the patch embeddings, which no attention block produced; "
                f"give {self.name} an explicit layer, e.g. {self.name}(layer=-1)"
            )
        return info.feature_layer

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        return (ClsAttention(layer=self.block(info)),)

    def score(self, ctx: ScoringContext) -> Tensor:
        return ctx.signal()
