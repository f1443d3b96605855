"""VTW (arXiv 2405.05803): visual token withdrawal, every visual token leaves after LLM layer K."""

from typing import ClassVar

import torch
from torch import Tensor

from tokenprune.registry import register
from tokenprune.strategy import ScoringContext, ScoringStrategy


@register("vtw")
class VTW(ScoringStrategy):
    """VTW: after LLM layer `K` every visual token is withdrawn and the later layers and decoding
    see text only. Its budget is always 0: `vtw@0` at the default place `llm:16` (the paper's
    LLaVA-1.5 setting, chosen there by a KL criterion on a small set), `vtw@0@llm:K` elsewhere. The
    same as any strategy at budget 0 inside the LLM (`uniform@0@llm:16`); no score is consulted."""

    places: ClassVar[tuple[str, ...]] = ("llm",)
    default_place: ClassVar[str] = "llm:16"
    default_selector: ClassVar[str] = "uniform"
    withdraws: ClassVar[bool] = True

    def score(self, ctx: ScoringContext) -> Tensor:
        return torch.zeros(ctx.tokens.shape[:2], device=ctx.tokens.device)
