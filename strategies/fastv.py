"""FastV (arXiv 2403.06764): prune image tokens inside the LLM by the attention they receive."""

from typing import ClassVar, Literal

from torch import Tensor

from tokenprune.registry import register
from tokenprune.signals import Signal, TextAttention
from tokenprune.strategy import ModelInfo, ScoringContext, ScoringStrategy


@register("fastv")
class FastV(ScoringStrategy):
    """FastV (arXiv 2403.06764): after LLM layer K (default 2), keep the image tokens that received
    the most attention at layer K-1; later layers and decoding see only those.

    `query="last"` (default, as the official code): the last prompt token's attention row;
    `query="mean"` (as the paper's text): the mean over all query tokens. Heads averaged. The
    paper's R=50% is the budget `fastv@0.5`.
    """

    places: ClassVar[tuple[str, ...]] = ("llm",)
    default_place: ClassVar[str] = "llm:2"
    query: Literal["last", "mean"] = "last"

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        return (TextAttention(layer=info.layer_before_stage(self.name), query=self.query),)

    def score(self, ctx: ScoringContext) -> Tensor:
        return ctx.signal()
