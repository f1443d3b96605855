"""Theoretical FLOPs of the LLM for the token counts a pipeline produced (FastV's accounting)."""

from __future__ import annotations

from collections.abc import Sequence


def layer_flops(n: int, d: int, m: int) -> int:
    """One decoder layer over `n` tokens of width `d` with FFN width `m`: `4nd² + 2n²d + 2ndm`
    (FastV, arXiv 2403.06764, eq. 5: projections, attention, FFN)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def prefill_flops(tokens_per_layer: Sequence[int], d: int, m: int) -> int:
    """Prefill FLOPs of a decoder whose layer `i` sees `tokens_per_layer[i]` tokens."""
    return sum(layer_flops(n, d, m) for n in tokens_per_layer)


def llm_flops(config: object, seq_len: int, layers_tokens: Sequence[int] | None = None) -> int:
    """Prefill FLOPs of a HF text config (`hidden_size`, `intermediate_size`, `num_hidden_layers`)
    for `seq_len` tokens in every layer, or per-layer counts `layers_tokens`."""
    counts = layers_tokens if layers_tokens is not None else [seq_len] * config.num_hidden_layers
    return prefill_flops(counts, config.hidden_size, config.intermediate_size)
