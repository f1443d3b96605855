"""The result of a selector: fewer tokens and where each came from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Reduction:
    """`k` output tokens per image and their provenance.

    Attributes:
        tokens: `[B, k, D]` the output tokens.
        index: `[B, k]` long, distinct per row and ascending unless the selector's docstring says
            otherwise (`prumerge-merge`'s score order): each output's representative input token (the
            kept token itself for a drop; for a merge, the input token whose position the output
            takes). The outputs reach the LLM in this order.
        weights: `[B, k, N]` provenance weights, each row summing to 1, or `None` for a pure drop
            (one-hot at `index`).
    """

    tokens: Tensor
    index: Tensor
    weights: Tensor | None = None

    @property
    def k(self) -> int:
        """Number of output tokens per image."""
        return self.index.shape[1]

    def dense_weights(self, n: int) -> Tensor:
        """Provenance as `[B, k, N]` weights (one-hot rows for a pure drop)."""
        if self.weights is not None:
            return self.weights
        one_hot = torch.zeros(*self.index.shape, n, dtype=torch.float32, device=self.index.device)
        return one_hot.scatter_(-1, self.index.unsqueeze(-1), 1.0)

    def in_index_order(self) -> Reduction:
        """The same outputs reordered so that `index` ascends per row (merging selectors build
        their outputs in another order)."""
        order = self.index.argsort(dim=1)
        take = lambda t: t.gather(1, order.view(*order.shape, *([1] * (t.dim() - 2))).expand_as(t))  # noqa: E731
        return Reduction(
            tokens=take(self.tokens),
            index=take(self.index),
            weights=None if self.weights is None else take(self.weights),
        )

    @staticmethod
    def drop(tokens: Tensor, index: Tensor) -> Reduction:
        """Keep the tokens at `index` (`[B, k]`, ascending) of `tokens` (`[B, N, D]`)."""
        gathered = torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return Reduction(tokens=gathered, index=index)
