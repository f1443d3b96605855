"""Stages inside a decoder-only LLM (`llm:K`), for HF decoders whose layers take
`(hidden_states, attention_mask=4D|None, position_embeddings=(cos, sin), position_ids, past_key_values)`
and whose attention has `q_proj`/`k_proj`, rotary embeddings, `head_dim` and `scaling` (Llama family),
optionally with a per-head RMS norm of queries and keys before the rotary embedding (`q_norm`/`k_norm`,
as in Qwen3): the signals read the normed projections then.

Layers `0..K-1` see every token; before layer `K` the stage picks the image tokens to keep, and
layers `K..` get the shortened hidden states, 4D mask, rotary embeddings and position ids (kept
tokens keep their original positions, as FastV does), so their KV cache holds only kept tokens.
Later decoding steps keep their positions; only the mask columns of layers `K..` are remapped.

Several stages chain (`fastv@0.5@llm:2 > uniform@0@llm:16`): each maps the kwargs it receives,
already in the previous stage's frame, into its own, and hands the next stage the image columns,
provenance and key mask of its output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..compat import cache_of
from ..errors import InputError, SignalError
from ..execute import required_signals, run_stage, stage_info
from ..flops import signal_flops
from ..pipeline import Stage
from ..reduction import Reduction
from ..signals import KeyNorm, NormedTokens, Signal, TextAttention, TextPivots
from ..strategy import ModelInfo
from ..trace import StageRecord
from .base import require_state
from .sequence import Compaction, compact


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of `x` `[B, H, S, d]` with `cos`/`sin` `[B, S, d]` (rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def received_attention(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, attn: Any, key_mask: Tensor, query: str
) -> Tensor:
    """Head-mean attention each key position receives, `[B, S]` float32.

    q `[B, Sq, H*d]` (the last row for `query="last"`), k `[B, S, Hkv*d]`: projection outputs.
    attn: the HF attention module (its `head_dim` and `scaling` are read by name, untyped).
    key_mask `[B, S]` bool (False for padding). `"mean"` averages over non-padding queries.
    """
    d = attn.head_dim
    s = k.shape[1]
    qh = rotate(
        rearrange(q.float(), "b s (h d) -> b h s d", d=d), cos[:, -q.shape[1] :].float(), sin[:, -q.shape[1] :].float()
    )
    kh = rotate(rearrange(k.float(), "b s (h d) -> b h s d", d=d), cos.float(), sin.float())
    kh = kh.repeat_interleave(qh.shape[1] // kh.shape[1], dim=1)
    logits = (qh @ kh.transpose(-1, -2)) * attn.scaling  # [B, H, Sq, S]
    allowed = key_mask[:, None, None, :]
    if query == "mean":
        allowed = allowed & torch.ones(s, s, dtype=torch.bool, device=k.device).tril()
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    if query == "last":
        return probs.mean(dim=1)[:, -1]
    valid_q = key_mask.float()[:, None, :, None]  # average over real queries only
    return ((probs * valid_q).sum(dim=2) / valid_q.sum(dim=2)).mean(dim=1)


def query_key_module(attn: Any, part: str) -> nn.Module:
    """The module whose output is the attention's query (`part="q"`) or key (`"k"`) before the
    rotary embedding: its per-head norm (`q_norm`/`k_norm`, output `[B, S, H, d]`) where it has one,
    else its projection (`q_proj`/`k_proj`, output `[B, S, H*d]`). `attn`: an HF attention module."""
    norm = getattr(attn, f"{part}_norm", None)
    return norm if isinstance(norm, nn.Module) else getattr(attn, f"{part}_proj")


@dataclass
class ImageLayout:
    """The current prefill's image layout in the sequence entering the stage's layer."""

    positions: Tensor  # [I, n] columns of each image's stage tokens
    rows: Tensor  # [I] batch row of each image
    origin: Tensor  # [I, n] encoder patch index of each
    key_mask: Tensor  # [B, S] bool
    record: Callable[[StageRecord, int, int, float], None]  # (record, from layer, tokens, scoring FLOPs)
    offset: int = 0  # columns that earlier stages removed from the prompt


class DecoderStage:
    """One `llm:K` stage on a decoder's layers; the owning adapter tells it about each forward."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module, stage: Stage, info: ModelInfo) -> None:
        self.layers, self.norm, self.stage = layers, norm, stage
        self.k = stage.place.layer
        if not 1 <= self.k < len(layers):
            raise InputError(f"{stage.to_spec()!r}: llm:K needs 1 <= K < {len(layers)} (the LLM's depth)")
        self.info = stage_info(stage, info)
        self.wanted = required_signals([stage], info)
        """The signals the stage reads (the engine refuses any its family's `DECODER` provider does not compute)."""
        layers_read = {layer for s in self.wanted if (layer := s.read_layer()) is not None}
        if len(layers_read) > 1:
            raise SignalError(
                f"{stage.to_spec()!r}: one llm:K stage reads one decoder layer, not {sorted(layers_read)}"
            )
        self.read_layer = next(iter(layers_read), None)
        self.query = next((s.query for s in self.wanted if isinstance(s, TextAttention)), None)
        self.next: DecoderStage | None = None  # the following llm:K stage, fed by this one's output
        self.on_prune: Callable[[Compaction, ImageLayout, Reduction, Tensor], None] | None = None
        """Told after the stage prunes a prefill: its compaction, its input layout, the image tokens'
        reduction and their columns `[I, k]` in the output; a family that keeps per-column state beside
        the hidden states (Qwen3-VL's DeepStack features) prunes that state alike."""
        self._offset = 0
        self._prefill: ImageLayout | None = None
        self._keep: Compaction | None = None
        self._captured: dict[str, Any] = {}

    def attach(self) -> list[RemovableHandle]:
        handles = []
        if self.read_layer is not None:
            attn: Any = self.layers[self.read_layer].self_attn  # an HF attention module, read by name
            handles.append(attn.register_forward_pre_hook(self._capture_rope, with_kwargs=True))
            if self.query is not None:
                handles.append(query_key_module(attn, "q").register_forward_hook(self._capture("q")))
            handles.append(query_key_module(attn, "k").register_forward_hook(self._capture("k")))
        for index in range(self.k, len(self.layers)):
            handles.append(self.layers[index].register_forward_pre_hook(self._before_layer(index), with_kwargs=True))
        return handles

    def begin_prefill(self, prefill: ImageLayout) -> None:
        """Called before the LLM runs a (compressed) prompt (by the adapter), or by the previous
        stage once it has pruned."""
        self._prefill, self._keep, self._offset = prefill, None, prefill.offset

    def begin_decode(self) -> None:
        """Called by the adapter before a later forward of the same generation."""
        self._prefill = None

    def reset(self) -> None:
        self._prefill, self._keep = None, None

    def _capture(self, part: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self._prefill is not None:
                output = output.flatten(2)  # a per-head norm's `[B, S, H, d]` -> `[B, S, H*d]`
                self._captured[part] = output[:, -1:] if part == "q" and self.query == "last" else output

        return hook

    def _capture_rope(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._prefill is not None:
            self._captured["rope"] = kwargs["position_embeddings"]

    def _before_layer(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
            prefill = self._prefill
            if prefill is None and self._keep is None:
                return None
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == self.k and prefill is not None:
                if getattr(cache_of(kwargs), "is_compileable", False):
                    raise InputError(
                        f"{self.stage.to_spec()!r}: llm:K stages need a dynamic KV cache (layers K.. cache "
                        "fewer tokens); static caches (cache_implementation='static') work with projector stages only"
                    )
                hidden = self._prune(hidden, prefill)
            comp = require_state(self._keep, f"the compaction of {self.stage.to_spec()!r}")
            kwargs = self._remap(kwargs, comp, prefill=prefill is not None, q_len=hidden.shape[1])
            return (hidden,) + tuple(args[1:]), kwargs

        return hook

    def _signals(self, hidden: Tensor, p: ImageLayout) -> dict[Signal, Tensor]:
        """The requested signals for the image tokens of prefill `p`; `hidden` `[B, S, D]` enters layer K."""
        batch = hidden.shape[0]
        at_images = lambda t: t[p.rows[:, None], p.positions]  # noqa: E731  [B, S, ...] -> [I, n, ...]
        values: dict[Signal, Tensor] = {}
        normed = self.norm(hidden) if any(isinstance(s, NormedTokens | TextPivots) for s in self.wanted) else None
        if self.read_layer is not None:
            cos, sin = (t.expand(batch, *t.shape[1:]) for t in self._captured.pop("rope"))
            k = self._captured.pop("k")
            attn: Any = self.layers[self.read_layer].self_attn  # an HF attention module, read by name
            keys = rotate(rearrange(k.float(), "b s (h d) -> b h s d", d=attn.head_dim), cos.float(), sin.float())
            l1 = keys.abs().sum(dim=(1, 3))  # [B, S]
            for signal in self.wanted:
                if isinstance(signal, TextAttention):
                    rows = received_attention(self._captured.pop("q"), k, cos, sin, attn, p.key_mask, signal.query)
                    values[signal] = at_images(rows)
                elif isinstance(signal, KeyNorm):
                    values[signal] = at_images(
                        l1 if signal.p == 1 else keys.abs().pow(signal.p).sum(dim=(1, 3)).pow(1 / signal.p)
                    )
                elif isinstance(signal, TextPivots) and normed is not None:  # normed: computed for TextPivots
                    values[signal] = self._text_pivots(p, normed, l1, signal)
        for signal in self.wanted:
            if isinstance(signal, NormedTokens):
                values[signal] = at_images(normed)
        return values

    def _text_pivots(self, p: ImageLayout, normed: Tensor, l1: Tensor, signal: TextPivots) -> Tensor:
        """`[I, count, D]` final-normed states (`normed` `[B, S, D]`) of each image's `count` best
        prompt tokens after it (in prefill `p`), ranked by key L1 norm `l1` `[B, S]`."""
        after = torch.arange(normed.shape[1], device=normed.device)[None] > p.positions.max(dim=1).values[:, None]
        candidates = after & p.key_mask[p.rows]  # [I, S]: valid columns after the image
        is_image = torch.zeros_like(p.key_mask)
        is_image[p.rows[:, None], p.positions] = True
        candidates &= ~is_image[p.rows]
        fewest = int(candidates.sum(dim=1).min())
        if fewest < signal.count:
            raise SignalError(
                f"{self.stage.to_spec()!r} needs {signal.count} prompt tokens after each image for its "
                f"text pivots, but an image has {fewest}; lower the pivot count"
            )
        ranked = l1[p.rows].masked_fill(~candidates, -float("inf"))
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, : signal.count]
        return normed[p.rows[:, None], order.sort(dim=1).values]

    def _prune(self, hidden: Tensor, p: ImageLayout) -> Tensor:
        """Run the stage on the image tokens (laid out as in prefill `p`) of the hidden states `[B, S, D]`
        and shorten the sequence."""
        tokens = hidden[p.rows[:, None], p.positions]  # [I, n, D]
        reduction, scores = run_stage(self.stage, tokens, self.info, self._signals(hidden, p))
        kept_cols = p.positions.gather(1, reduction.index)
        keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        keep[p.rows[:, None], p.positions] = False
        keep[p.rows[:, None], kept_cols] = True
        self._keep = comp = compact(keep)
        new_col = (keep.long().cumsum(1) - 1) + (comp.length_out - keep.sum(1))[:, None]
        out = comp.gather(hidden)
        out[p.rows[:, None], new_col[p.rows[:, None], kept_cols]] = reduction.tokens.to(out.dtype)
        origin = p.origin.gather(1, reduction.index)
        if self.on_prune is not None:
            self.on_prune(comp, p, reduction, new_col[p.rows[:, None], kept_cols])
        p.record(
            StageRecord(
                stage=self.stage.to_spec(),
                at=self.stage.at,
                tokens_in=tokens.shape[1],
                tokens_out=reduction.k,
                kept=list(origin.unbind(0)),
                weights=None if reduction.weights is None else list(reduction.weights.unbind(0)),
                scores=None if scores is None else list(scores.unbind(0)),
                image_sample=p.rows.tolist(),
            ),
            self.k,
            comp.length_out,
            sum(signal_flops(s, comp.length_in, hidden.shape[-1]) for s in self.wanted),
        )
        if self.next is not None:
            self.next.begin_prefill(
                ImageLayout(
                    positions=new_col[p.rows[:, None], kept_cols],
                    rows=p.rows,
                    origin=origin,
                    key_mask=comp.gather(p.key_mask) & comp.valid,
                    record=p.record,
                    offset=p.offset + comp.length_in - comp.length_out,
                )
            )
        return out

    def _remap(self, kwargs: dict[str, Any], comp: Compaction, prefill: bool, q_len: int) -> dict[str, Any]:
        """Masks, rotary embeddings and positions of a layer at or after K, for the columns `comp` kept.

        Padding added by the compaction is masked as a key; as a query it attends to itself only
        (a fully masked row would turn into NaN and leak through the values)."""
        mask = kwargs.get("attention_mask")
        if mask is None and not comp.padded and not prefill:
            return kwargs  # decoding without padding: nothing to remap, no work on the hot path
        cache = cache_of(kwargs)
        b = comp.source.shape[0]
        if prefill:
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = tuple(comp.gather(t.expand(b, *t.shape[1:])) for t in (cos, sin))
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = comp.gather(kwargs["position_ids"].expand(b, -1))
            cols, rows = comp.source, comp.source
            valid = comp.valid
        else:
            total = cache.get_seq_length(0) - self._offset if cache is not None else comp.length_in
            extra = torch.arange(comp.length_in, total, device=comp.source.device).expand(b, -1)
            cols = torch.cat([comp.source, extra], dim=1)
            valid = torch.cat([comp.valid, torch.ones_like(extra, dtype=torch.bool)], dim=1)
            rows = None
        if mask is None and not comp.padded:
            return kwargs
        if mask is None:
            causal = torch.ones(q_len, cols.shape[1], dtype=torch.bool, device=cols.device).tril(cols.shape[1] - q_len)
            mask = causal[None, None].expand(b, 1, -1, -1)
        elif mask.dim() != 4:
            raise InputError("llm:K stages need a 4D attention mask or none (sdpa/eager attention)")
        else:
            mask = mask.expand(b, *mask.shape[1:])
            mask = torch.gather(mask, 3, cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
            if rows is not None:
                mask = torch.gather(mask, 2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
        blocked, allowed = (False, True) if mask.dtype == torch.bool else (torch.finfo(mask.dtype).min, 0.0)
        mask = mask.masked_fill(~valid[:, None, None, :], blocked)
        if prefill and comp.padded:
            diagonal = (
                torch.eye(q_len, dtype=torch.bool, device=mask.device)[None, None] & ~comp.valid[:, None, :, None]
            )
            mask = mask.masked_fill(diagonal, allowed)
        kwargs["attention_mask"] = mask
        return kwargs
