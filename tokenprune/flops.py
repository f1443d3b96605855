"""Theoretical FLOPs of the LLM and the vision encoder for the token counts a pipeline produced
(FastV's accounting: every transformer layer costs `4nd² + 2n²d + 2ndm`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .signals import Signal


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


def signal_flops(signal: Signal, tokens: int, width: int) -> int:
    """FLOPs a signal adds to the forward (the scoring overhead): `signal.flops(tokens, width)`, for
    one image of `tokens` encoder tokens ([CLS] included) of width `width` (vision signals), or one
    LLM sequence of `tokens` tokens of width `width` (LLM signals). Each signal type declares its
    own cost (`Signal.flops`), so a plugin's signal is counted as the built-in ones are."""
    return signal.flops(tokens, width)
