"""Cheap vision-encoder signals: [CLS] attention rows from a block's own q/k projections."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def cls_attention_row(query: Tensor, keys: Tensor, heads: int, scale: float) -> Tensor:
    """Head-mean attention of the first token's query over the other keys.

    Args:
        query: `[B, 1, D]` the [CLS] query projection.
        keys: `[B, 1 + N, D]` the key projections, [CLS] first.
    Returns:
        `[B, N]` float32: softmax over all `1 + N` keys, mean over heads, the [CLS] key dropped.
    """
    q = rearrange(query.float(), "b t (h d) -> b h t d", h=heads)
    k = rearrange(keys.float(), "b n (h d) -> b h n d", h=heads)
    probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)  # [B, H, 1, 1 + N]
    return probs.mean(dim=1)[:, 0, 1:]


class ClsAttentionProbe:
    """Records `ClsAttention` rows of chosen blocks while the encoder runs, at no extra projection.

    Forward hooks on each chosen block's `q_proj` and `k_proj` keep their outputs; once both fired,
    the `[B, N]` row is computed from the [CLS] query and all keys (one `[B, H, 1, 1 + N]` product).
    `attach` installs the hooks and returns their handles.
    """

    def __init__(self, attention: Mapping[int, nn.Module]) -> None:
        self.attention = dict(attention)
        self.rows: dict[int, Tensor] = {}
        self._pending: dict[int, dict[str, Tensor]] = {}

    def _hook(self, layer: int, part: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            pending = self._pending.setdefault(layer, {})
            pending[part] = output[:, :1] if part == "q" else output
            if len(pending) == 2:
                attn = self.attention[layer]
                self.rows[layer] = cls_attention_row(
                    pending["q"], pending["k"], attn.num_heads, attn.scale
                )
                del self._pending[layer]

        return hook

    def attach(self) -> list[RemovableHandle]:
        """Install the hooks; the caller removes the returned handles."""
        handles = []
        for layer, attn in self.attention.items():
            handles.append(attn.q_proj.register_forward_hook(self._hook(layer, "q")))
            handles.append(attn.k_proj.register_forward_hook(self._hook(layer, "k")))
        return handles
