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
        counts: per image, its number of outputs when images keep different counts (a budget
            rule); `k` is then the largest, and a row's outputs past its count repeat its last
            output (so scattering or gathering a padded row is the same as the real one). `None`:
            every image keeps `k`.
    """

    tokens: Tensor
    index: Tensor
    weights: Tensor | None = None
    counts: tuple[int, ...] | None = None

    @property
    def k(self) -> int:
        """Number of output tokens per image."""
        return self.index.shape[1]

    def row_counts(self) -> list[int]:
        """Outputs per image (`k` for each unless `counts` is set)."""
        return list(self.counts) if self.counts is not None else [self.k] * self.index.shape[0]

    @staticmethod
    def ragged(parts: list[tuple[list[int], Reduction]], batch: int, n: int) -> Reduction:
        """Assemble reductions of disjoint image subsets (`parts`: the rows each one holds, and its
        reduction of those rows) into one of `batch` images, padded as `counts` describes (see the
        class); `n`: the tokens in per image (for dense weights when only some parts merge)."""
        k = max(part.k for _, part in parts)
        merged = any(part.weights is not None for _, part in parts)
        first = parts[0][1]
        tokens = first.tokens.new_empty(batch, k, first.tokens.shape[-1])
        index = first.index.new_empty(batch, k)
        dtype = next((p.weights.dtype for _, p in parts if p.weights is not None), torch.float32)
        weights = first.tokens.new_empty(batch, k, n, dtype=dtype) if merged else None
        counts = [0] * batch

        def pad(t: Tensor) -> Tensor:  # [G, k_part, ...] -> [G, k, ...], repeating the last output
            return torch.cat([t, t[:, -1:].expand(-1, k - t.shape[1], *t.shape[2:])], dim=1)

        for rows, part in parts:
            at = torch.tensor(rows, device=index.device)
            tokens[at], index[at] = pad(part.tokens), pad(part.index)
            if weights is not None:
                weights[at] = pad(part.dense_weights(n).to(dtype))
            for row in rows:
                counts[row] = part.k
        return Reduction(tokens=tokens, index=index, weights=weights, counts=tuple(counts))

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
