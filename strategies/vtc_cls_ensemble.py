"""VTC-CLS multi-layer ensemble (arXiv 2412.05819)."""

import torch
from pydantic import field_validator
from tokenprune.strategies.vtc_cls import require_cls
from torch import Tensor

from tokenprune.errors import SignalError
from tokenprune.registry import register
from tokenprune.signals import ClsAttention, Signal
from tokenprune.strategy import ModelInfo, ScoringContext, ScoringStrategy


@register("vtc-cls-ensemble")
class VTCCLSEnsemble(ScoringStrategy):
    """VTC-CLS ensemble (arXiv 2412.05819): the plain sum of [CLS] attention over several blocks.

    As the official code: blocks `start_layer` through the penultimate (Python slice
    `[start_layer:-1]` of the blocks; the last block is never used). Default `start_layer=-4`: the
    three blocks before the last. Or an explicit, duplicate-free `layers` list.
    """

    start_layer: int = -4
    layers: list[int] | None = None

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise ValueError("layers must be a non-empty list without duplicates")
        return layers

    def blocks(self, info: ModelInfo) -> list[int]:
        """The non-negative vision blocks summed, ascending."""
        require_cls(self.name, info)
        if self.layers is not None:
            blocks = sorted({info.vision_block(layer) for layer in self.layers})
            if len(blocks) != len(self.layers):
                raise SignalError(f"layers {self.layers} name the same block twice")
            return blocks
        depth = info.vision_layers or 0
        blocks = list(range(depth))[self.start_layer : -1]
        if not blocks:
            raise SignalError(
                f"start_layer={self.start_layer} selects no block before the last of {depth}; "
                f"use a value in [{-depth}, {depth - 2}]"
            )
        return blocks

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        return tuple(ClsAttention(layer=b) for b in self.blocks(info))

    def score(self, ctx: ScoringContext) -> Tensor:
        return torch.stack(ctx.signals_of(ClsAttention)).sum(dim=0)
