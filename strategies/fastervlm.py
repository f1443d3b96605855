"""FasterVLM (arXiv 2412.01818): [CLS] attention of the projector's block, top-k before the LLM."""

from tokenprune.strategies.vtc_cls import VTCCLS

from tokenprune.registry import register


@register("fastervlm")
class FasterVLM(VTCCLS):
    """FasterVLM (arXiv 2412.01818): keep the tokens with the highest head-mean [CLS] attention in
    the block whose output the projector reads (its official code: `attentions[select_layer]`,
    `select_layer = -2` for LLaVA-1.5), then `topk`. The same computation as single-layer
    `vtc-cls` with its default layer; registered so the method is found by its name."""
