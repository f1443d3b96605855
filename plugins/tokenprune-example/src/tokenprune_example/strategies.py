"""Strategies of the example plugin; importing this module registers them (and the plugin's signal
type with its provider, which `example-hidden-norm` reads)."""

from typing import ClassVar

import torch
from einops import repeat
from torch import Tensor

import tokenprune as tp
from tokenprune.reduction import Reduction

from .signals import PatchHiddenNorm


@tp.register("example-norm")
class ExampleNorm(tp.ScoringStrategy):
    """Plugin example: score tokens by their feature L2 norm."""

    def score(self, ctx: tp.ScoringContext) -> Tensor:
        return ctx.tokens.float().norm(dim=-1)


@tp.register("example-hidden-norm")
class ExampleHiddenNorm(tp.ScoringStrategy):
    """Plugin example: keep the patches whose hidden state leaving vision block `layer` has the largest
    L2 norm (the plugin's own signal, `PatchHiddenNorm`)."""

    places: ClassVar[tuple[str, ...]] = ("projector", "vision")
    layer: int = -2

    def signals(self, info: tp.ModelInfo) -> tuple[tp.Signal, ...]:
        return (PatchHiddenNorm(layer=info.vision_block(self.layer)),)

    def score(self, ctx: tp.ScoringContext) -> Tensor:
        return ctx.signal()


@tp.register("example-chunk-mean")
class ExampleChunkMean(tp.Selector):
    """Plugin example: merge k contiguous runs of tokens (raster order) into their means."""

    needs_scores = False

    def select(self, tokens: Tensor, scores: Tensor | None, k: int, grid=None) -> Reduction:
        b, n, _ = tokens.shape
        run = torch.div(torch.arange(n) * k, n, rounding_mode="floor")  # [N] run of each token
        weights = torch.nn.functional.one_hot(run, k).T.float()  # [k, N]
        weights = weights / weights.sum(dim=1, keepdim=True)
        first = torch.searchsorted(run, torch.arange(k))  # first token of each run
        merged = torch.einsum("kn,bnd->bkd", weights.to(tokens.dtype), tokens)
        return Reduction(
            tokens=merged,
            index=repeat(first, "k -> b k", b=b).to(tokens.device),
            weights=repeat(weights, "k n -> b k n", b=b).to(tokens.device),
        )
