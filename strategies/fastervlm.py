"""FasterVLM (arXiv 2412.01818): [CLS] attention of the projector's block, top-k before the LLM."""

from typing import Literal

from tokenprune.strategies.vtc_cls import VTCCLS, require_cls

from tokenprune.errors import SignalError
from tokenprune.registry import register
from tokenprune.strategy import ModelInfo


@register("fastervlm")
class FasterVLM(VTCCLS):
    """FasterVLM (arXiv 2412.01818): keep the tokens with the highest head-mean [CLS] attention,
    then `topk`. `read="attentions"` (default, as the official code's `attentions[select_layer]`):
    the block the projector's feature index names in the attention list, i.e. block `-2` for
    LLaVA-1.5's `-2`, but block `h` (not `h - 1`, whose output the projector reads) for a
    non-negative feature index `h`; `read="features"`: the block whose output the projector reads.
    An explicit `layer` overrides both."""

    layer: int | None = None
    read: Literal["attentions", "features"] = "attentions"

    def block(self, info: ModelInfo) -> int:
        if self.layer is not None or self.read == "features":
            return super().block(info)
        require_cls(self.name, info)
        if info.feature_index is None:
            raise SignalError(
                "fastervlm(read='attentions') needs the projector's feature layer, which this adapter does not "
                "report; use fastervlm(read='features') or an explicit layer, e.g. fastervlm(layer=-2)"
            )
        return info.vision_block(info.feature_index)
