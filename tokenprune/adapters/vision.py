"""Cheap vision-encoder signals from a block's own q/k projections: [CLS] attention rows, patch keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..signals import ClsAttention, PatchKeys, Signal


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


def split_vision_signals(signals: set[Signal]) -> tuple[set[ClsAttention | PatchKeys], list[Signal]]:
    """`signals` split into those a `VisionProbe` computes and the rest (which it cannot provide)."""
    vision = {s for s in signals if isinstance(s, ClsAttention | PatchKeys)}
    return vision, [s for s in signals if s not in vision]


class VisionProbe:
    """Records vision-encoder signals of chosen blocks while the encoder runs, at no extra projection.

    Forward hooks on each chosen block's `k_proj` (and `q_proj` for [CLS] rows) keep their outputs:
    `rows[layer]` is the `[B, N]` [CLS] attention row (one `[B, H, 1, 1 + N]` product, once both
    fired), `keys[layer]` the `[B, N, D]` patch keys (the [CLS] key dropped when `has_cls`).
    `attach` installs the hooks and returns them.
    """

    def __init__(
        self, attention: Mapping[int, Any], signals: set[ClsAttention | PatchKeys], has_cls: bool = True
    ) -> None:
        # HF attention modules, per block: `num_heads`, `scale`, `q_proj`, `k_proj` are read by name (untyped)
        self.attention = dict(attention)
        self.first_patch = 1 if has_cls else 0
        self.signals = signals
        self.cls_layers = {s.layer for s in signals if isinstance(s, ClsAttention)}
        self.key_layers = {s.layer for s in signals if isinstance(s, PatchKeys)}
        self.rows: dict[int, Tensor] = {}
        self.keys: dict[int, Tensor] = {}
        self._pending: dict[int, dict[str, Tensor]] = {}

    def _hook(self, layer: int, part: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            if part == "k" and layer in self.key_layers:
                self.keys[layer] = output[:, self.first_patch :]
            if layer not in self.cls_layers:
                return
            pending = self._pending.setdefault(layer, {})
            pending[part] = output[:, :1] if part == "q" else output
            if len(pending) == 2:
                attn = self.attention[layer]
                self.rows[layer] = cls_attention_row(pending["q"], pending["k"], attn.num_heads, attn.scale)
                del self._pending[layer]

        return hook

    def attach(self) -> list[RemovableHandle]:
        """Install the hooks; the caller removes the returned handles."""
        handles = []
        for layer, attn in self.attention.items():
            if layer in self.cls_layers:
                handles.append(attn.q_proj.register_forward_hook(self._hook(layer, "q")))
            handles.append(attn.k_proj.register_forward_hook(self._hook(layer, "k")))
        return handles

    def values(self) -> dict[Signal, Tensor]:
        """Each signal the last encoder run computed: `ClsAttention` `[B, N]`; `PatchKeys` `[B, N, D]`,
        or `[B, N, d_head]` averaged over heads."""
        out: dict[Signal, Tensor] = {}
        for signal in self.signals:
            if isinstance(signal, ClsAttention) and signal.layer in self.rows:
                out[signal] = self.rows[signal.layer]
            elif isinstance(signal, PatchKeys) and signal.layer in self.keys:
                keys = self.keys[signal.layer]
                heads = self.attention[signal.layer].num_heads
                out[signal] = (
                    keys if signal.heads == "concat" else rearrange(keys, "b n (h d) -> b n h d", h=heads).mean(2)
                )
        return out
