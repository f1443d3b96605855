"""Cheap vision-encoder signals from a block's own q/k projections: [CLS] attention rows, patch
keys, and the column or row means of the patch-to-patch attention map."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..signals import ClsAttention, PatchAttention, PatchKeyNorm, PatchKeys, Signal

VisionSignal = ClsAttention | PatchKeys | PatchAttention | PatchKeyNorm

QUERY_CHUNK = 256
"""Queries per step of a softmax `PatchAttention`: the map is built `[B, H, 256, T]` at a time."""


def cls_attention_row(query: Tensor, keys: Tensor, heads: int, scale: float) -> Tensor:
    """Head-mean attention of the first token's query over the other keys.

    Args:
        query: `[B, 1, D]` the [CLS] query projection.
        keys: `[B, 1 + N, D]` the key projections, [CLS] first.
        heads: the number of heads `H` the width `D` splits into (1: one attention over all of `D`).
        scale: the factor applied to each query-key product.
    Returns:
        `[B, N]` float32: softmax over all `1 + N` keys, mean over heads, the [CLS] key dropped.
    """
    q = rearrange(query.float(), "b t (h d) -> b h t d", h=heads)
    k = rearrange(keys.float(), "b n (h d) -> b h n d", h=heads)
    probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)  # [B, H, 1, 1 + N]
    return probs.mean(dim=1)[:, 0, 1:]


def patch_attention(
    query: Tensor,
    keys: Tensor,
    heads: int,
    scale: float,
    first: int,
    axis: Literal["col", "row"] = "col",
    scores: Literal["logits", "softmax"] = "logits",
) -> Tensor:
    """Head-mean column or row mean (`axis`) of the patch-to-patch attention map, of its `scores`
    (pre-softmax logits or softmax probabilities), as `PatchAttention` defines them.

    Args:
        query: `[B, T, D]` the query projections of all `T` tokens (`first` leading non-patch ones).
        keys: `[B, T, D]` the key projections.
        first: index of the first patch token (1 with a [CLS] token, else 0).
    Returns:
        `[B, N]` float32 over the `N = T - first` patches. Logits are linear in the queries and keys,
        so their means need only the mean query or key; softmax probabilities are built in chunks
        of `QUERY_CHUNK` queries, never the whole `[B, H, N, T]` map.
    """
    q = rearrange(query.float(), "b t (h d) -> b h t d", h=heads)[:, :, first:]
    k = rearrange(keys.float(), "b t (h d) -> b h t d", h=heads)
    if scores == "logits":
        patches = k[:, :, first:]
        if axis == "col":  # mean_i q_i . k_j = (mean_i q_i) . k_j
            return torch.einsum("bhd,bhnd->bhn", q.mean(dim=2), patches).mul(scale).mean(dim=1)
        return torch.einsum("bhnd,bhd->bhn", q, patches.mean(dim=2)).mul(scale).mean(dim=1)
    parts = []
    for chunk in q.split(QUERY_CHUNK, dim=2):
        probs = torch.softmax((chunk @ k.transpose(-1, -2)) * scale, dim=-1)[..., first:]  # [B, H, c, N]
        parts.append(probs.sum(dim=2) if axis == "col" else probs.mean(dim=-1))
    out = torch.stack(parts).sum(0) / q.shape[2] if axis == "col" else torch.cat(parts, dim=-1)
    return out.mean(dim=1)


def _block(signal: Signal) -> int:
    """The tower block whose forward computes `signal` (a vision signal always names one)."""
    block = signal.read_layer()
    if block is None:
        raise RuntimeError(f"tokenprune internal error: {signal!r} names no vision block")
    return block


def _cls_row_of(query: Tensor, keys: Tensor, heads: int, scale: float | None) -> Tensor:
    """`cls_attention_row` from a block's full query projections; `scale` `None`: `D^-0.5` over the
    whole width (one attention over all heads' width, as PruMerge's official score)."""
    return cls_attention_row(query[:, :1], keys, heads, keys.shape[-1] ** -0.5 if scale is None else scale)


@dataclass(frozen=True)
class QKView:
    """A tower attention as `VisionProbe` reads it, with its query and key taken from other submodules
    than `q_proj`/`k_proj` (e.g. InternViT's `q_norm`/`k_norm`, applied after the projections)."""

    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    scale: float

    @classmethod
    def of(cls, attention: Any, query: str, key: str) -> QKView:
        return cls(getattr(attention, query), getattr(attention, key), attention.num_heads, attention.scale)


class VisionProbe:
    """Records vision-encoder signals of chosen blocks while the encoder runs, at no extra projection.

    Forward hooks on each chosen block's `k_proj` (and `q_proj` for attention signals) keep their
    outputs; once both fired, each attention signal of that block is computed from them:
    `ClsAttention` `[B, N]` rows, `PatchAttention` `[B, N]` column or row means. `keys[layer]` holds
    the `[B, N, D]` patch keys (the [CLS] key dropped when `has_cls`). `attach` installs the hooks
    and returns them.
    """

    def __init__(self, attention: Mapping[int, Any], signals: set[VisionSignal], has_cls: bool = True) -> None:
        # HF attention modules, per block: `num_heads`, `scale`, `q_proj`, `k_proj` are read by name (untyped)
        self.attention = dict(attention)
        self.first_patch = 1 if has_cls else 0
        self.signals = signals
        self.attention_signals = [s for s in signals if isinstance(s, ClsAttention | PatchAttention)]
        self.query_layers = {_block(s) for s in self.attention_signals}
        self.full_query = {_block(s) for s in signals if isinstance(s, PatchAttention)}
        self.key_layers = {_block(s) for s in signals if isinstance(s, PatchKeys | PatchKeyNorm)}
        # per block, each attention signal's index and computation, fixed here so that the hooks
        # (traced by dynamo under `bench --compile`) see plain functions and ints, not signal objects
        self._plans: dict[int, list[tuple[int, Callable[[Tensor, Tensor], Tensor]]]] = {}
        for index, signal in enumerate(self.attention_signals):
            self._plans.setdefault(_block(signal), []).append((index, self._computation(signal)))
        self._computed: dict[int, Tensor] = {}
        self.keys: dict[int, Tensor] = {}
        self._pending: dict[int, dict[str, Tensor]] = {}

    def _computation(self, signal: ClsAttention | PatchAttention) -> Callable[[Tensor, Tensor], Tensor]:
        """`(query, keys) -> [B, N]` for one attention signal of its block."""
        attn = self.attention[_block(signal)]
        if isinstance(signal, PatchAttention):
            return partial(
                patch_attention,
                heads=attn.num_heads,
                scale=attn.scale,
                first=self.first_patch,
                axis=signal.axis,
                scores=signal.scores,
            )
        if signal.heads == "concat":
            return partial(_cls_row_of, heads=1, scale=None)
        return partial(_cls_row_of, heads=attn.num_heads, scale=attn.scale)

    def _compute(self, layer: int, query: Tensor, keys: Tensor) -> None:
        for index, computation in self._plans[layer]:
            self._computed[index] = computation(query, keys)

    def _hook(self, layer: int, part: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            if part == "k" and layer in self.key_layers:
                self.keys[layer] = output[:, self.first_patch :]
            if layer not in self.query_layers:
                return
            pending = self._pending.setdefault(layer, {})
            pending[part] = output[:, :1] if part == "q" and layer not in self.full_query else output
            if len(pending) == 2:
                self._compute(layer, pending["q"], pending["k"])
                del self._pending[layer]

        return hook

    def attach(self) -> list[RemovableHandle]:
        """Install the hooks; the caller removes the returned handles."""
        handles = []
        for layer, attn in self.attention.items():
            if layer in self.query_layers:
                handles.append(attn.q_proj.register_forward_hook(self._hook(layer, "q")))
            handles.append(attn.k_proj.register_forward_hook(self._hook(layer, "k")))
        return handles

    def values(self) -> dict[Signal, Tensor]:
        """Each signal the last encoder run computed: attention signals `[B, N]`; `PatchKeys`
        `[B, N, D]`, or `[B, N, d_head]` averaged over heads; `PatchKeyNorm` `[B, N]`."""
        out: dict[Signal, Tensor] = {}
        for signal in self.signals:
            if isinstance(signal, ClsAttention | PatchAttention):
                index = self.attention_signals.index(signal)
                if index in self._computed:
                    out[signal] = self._computed[index]
            elif isinstance(signal, PatchKeys) and _block(signal) in self.keys:
                keys = self.keys[_block(signal)]
                heads = self.attention[_block(signal)].num_heads
                out[signal] = (
                    keys if signal.heads == "concat" else rearrange(keys, "b n (h d) -> b n h d", h=heads).mean(2)
                )
            elif isinstance(signal, PatchKeyNorm) and _block(signal) in self.keys:
                out[signal] = self.keys[_block(signal)].float().norm(p=signal.p, dim=-1)
        return out
