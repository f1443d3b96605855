"""Theoretical FLOPs of the LLM and the vision encoder for the token counts a pipeline produced
(FastV's accounting: every transformer layer costs `4nd² + 2n²d + 2ndm`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .signals import (
    ClsAttention,
    KeyNorm,
    NormedTokens,
    PatchAttention,
    PatchKeyNorm,
    Signal,
    TextAttention,
    TextPivots,
)


def layer_flops(n: int, d: int, m: int) -> int:
    """One decoder layer over `n` tokens of width `d` with FFN width `m`: `4nd² + 2n²d + 2ndm`
    (FastV, arXiv 2403.06764, eq. 5: projections, attention, FFN)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def prefill_flops(tokens_per_layer: Sequence[int], d: int, m: int) -> int:
    """Prefill FLOPs of a decoder whose layer `i` sees `tokens_per_layer[i]` tokens."""
    return sum(layer_flops(n, d, m) for n in tokens_per_layer)


def llm_flops(config: Any, seq_len: int, layers_tokens: Sequence[int] | None = None) -> int:
    """Prefill FLOPs of a HF text config (`hidden_size`, `intermediate_size`, `num_hidden_layers`,
    read by name: HF configs are untyped) for `seq_len` tokens in every layer, or per-layer counts
    `layers_tokens`."""
    counts = layers_tokens if layers_tokens is not None else [seq_len] * config.num_hidden_layers
    return prefill_flops(counts, config.hidden_size, config.intermediate_size)


def vision_flops(config: Any, tokens_per_block: Sequence[int]) -> int:
    """FLOPs of a ViT encoder (HF vision config, untyped: `hidden_size`, `intermediate_size`) whose block `i`
    sees `tokens_per_block[i]` tokens, with the same per-layer formula as the LLM."""
    return prefill_flops(tokens_per_block, config.hidden_size, config.intermediate_size)


def signal_flops(signal: Signal, tokens: int, width: int) -> int:
    """FLOPs a signal adds to the forward (the scoring overhead), for one image of `tokens` encoder
    tokens ([CLS] included) of width `width` (vision signals), or one LLM sequence of `tokens`
    tokens of width `width` (LLM signals). Projections the model computes anyway are not counted.

    * `ClsAttention`: the [CLS] query against every key, `2 * tokens * width`;
    * `PatchAttention`: logits, a mean query (or key) against every key (or query), `2 * tokens *
      width`; softmax, every query against every key, `2 * tokens ** 2 * width`;
    * `TextAttention`: one query row (`last`) or every row (`mean`) against every key,
      `2 * tokens * width` times 1 or `tokens`;
    * `KeyNorm`, `PatchKeyNorm`, `TextPivots`: the rotary embedding and norm of every key, `4 * tokens * width`;
    * `NormedTokens`: the final norm of every token, `3 * tokens * width`;
    * `PatchKeys`: 0 (the block's own key projections, kept).
    """
    if isinstance(signal, ClsAttention):
        return 2 * tokens * width
    if isinstance(signal, PatchAttention):
        return 2 * tokens * width * (tokens if signal.scores == "softmax" else 1)
    if isinstance(signal, TextAttention):
        return 2 * tokens * width * (tokens if signal.query == "mean" else 1)
    if isinstance(signal, KeyNorm | PatchKeyNorm | TextPivots):
        return 4 * tokens * width
    if isinstance(signal, NormedTokens):
        return 3 * tokens * width
    return 0
