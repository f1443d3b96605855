"""Stages (`vision:L`) and signals inside Qwen2-VL / Qwen2.5-VL vision towers, per merge unit.

Qwen's tower runs every image of a call as one packed sequence `[S, D]` of patches. `cu_seqlens`
cuts it into images (full-attention blocks) or windows (Qwen2.5-VL's windowed blocks); each block
gets the 2D rotary tables `(cos, sin)` `[S, d_head]` of every patch. The `m*m` patches the merger
fuses into one LLM token (a *merge unit*, `m = spatial_merge_size`) sit consecutively; Qwen2.5-VL
orders the units by window (`get_vision_window_index`) and restores raster order after the merger.

* A stage before block `L` sees one token per unit, the mean of its `m*m` patch states (`[I, n, D]`,
  images of one grid and count as one batch, units in raster order) and keeps whole units: a drop
  keeps the units' patch states; a merge makes each output unit the provenance-weighted mean of its
  members' patch states, patch by patch, at the representative unit's rotary positions (no
  proportional-attention bias: Qwen's blocks take no attention mask).
* Blocks `L..` get the rotary tables of the kept units and `cu_seqlens` recounted over them: each
  kept unit stays in its image and, on Qwen2.5-VL's windowed blocks, in its original window (the
  window partition is recomputed over the kept units; emptied windows vanish).
* The merger's output is scattered back to every unit (zeros at dropped ones), so the model's per-image
  split and Qwen2.5-VL's reverse window order still hold; `kept()` says which units the LLM gets.
* Signals of block `b` come from its own fused `qkv` output (no extra projection), rotary applied,
  within the block's segments: attention received or given (`PatchAttention`, softmax in query chunks
  of `QUERY_CHUNK`, never an `S x S` map), keys (`PatchKeys`, before rotary) and key norms
  (`PatchKeyNorm`, after rotary), each averaged over the unit's patches.

Contact points with transformers (pinned by tests): the blocks' keyword arguments `cu_seqlens`,
`max_seqlen`, `position_embeddings`; `attn.qkv`, `attn.num_heads`, `attn.scaling`; `merger`;
`transformers.vision_utils.get_vision_window_index`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..checks import DeferredCheck
from ..execute import required_signals, run_stage
from ..pipeline import Stage
from ..signals import PatchAttention, PatchKeyNorm, PatchKeys, Signal
from ..strategy import ModelInfo
from ..trace import StageRecord
from .base import require_state
from .encoder import check_signal_blocks
from .engine import ImageTokens
from .family import resolve
from .packing import ImagePass, Merged, _reduce, image_grid, per_image
from .providers import Computed
from .vision import QUERY_CHUNK

if TYPE_CHECKING:
    from .engine import Engine

TowerSignal = PatchAttention | PatchKeys | PatchKeyNorm
QWEN_TOWER = Computed("vision", (PatchAttention, PatchKeys, PatchKeyNorm))
"""The vision signals a Qwen tower computes per merge unit, from its blocks' fused `qkv` (`QwenTower`)."""


def tower_order(visual: Any, grid: Tensor) -> Tensor:
    """`[U]` long: the raster unit index (over all images, in image order) at each unit slot of the
    tower's sequence: the identity, or Qwen2.5-VL's window order (`visual`: an HF Qwen tower, read by
    name: a `window_size` attribute means windowed blocks)."""
    if getattr(visual, "window_size", None) is None:
        units = int((grid.prod(-1) // visual.spatial_merge_size**2).sum())
        return torch.arange(units, device=grid.device)
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(
        grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size, patch_size=visual.patch_size
    )
    return index.to(grid.device)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Qwen's vision rotary on `x` `[H, S, d]` with tables `[S, d]` (float32)."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.float() + turned * sin.float()


def segment_attention(q: Tensor, k: Tensor, scale: float, signal: PatchAttention) -> Tensor:
    """Head-mean column or row mean of one segment's attention map `softmax(q k^T * scale)` (or its
    logits): `q`, `k` `[H, s, d]` -> `[s]`; softmax in chunks of `QUERY_CHUNK` queries."""
    if signal.scores == "logits":
        if signal.axis == "col":  # mean_i q_i . k_j = (mean_i q_i) . k_j
            return torch.einsum("hd,hsd->hs", q.mean(1), k).mul(scale).mean(0)
        return torch.einsum("hsd,hd->hs", q, k.mean(1)).mul(scale).mean(0)
    parts = []
    for chunk in q.split(QUERY_CHUNK, dim=1):
        probs = torch.softmax((chunk @ k.transpose(-1, -2)) * scale, dim=-1)  # [H, c, s]
        parts.append(probs.sum(1) if signal.axis == "col" else probs.mean(-1))
    out = torch.stack(parts).sum(0) / q.shape[1] if signal.axis == "col" else torch.cat(parts, dim=-1)
    return out.mean(0)


@dataclass
class TowerRun:
    """One tower call's merge-unit bookkeeping.

    Attributes:
        image: `[U]` long, the image of each unit slot of the original sequence (tower order).
        raster: `[U]` long, each unit slot's raster index inside its image.
        grid: `[I, 3]` the images' `(t, h, w)` patch grids.
        alive: `[U']` long, the original unit slots present now, ascending (tower order kept).
        tables: the rotary tables `(cos, sin)` `[4U', d]` of the present units, once a stage ran.
        signals: per asked signal, its value per present unit `[U', ...]`.
        records: per stage and image: `(stage, tokens_in, kept raster [k], weights [k, n] | None, scores [n] | None)`.
        deferred: the stages' device-side checks, for the adapter to read at its next host sync.
    """

    image: Tensor
    raster: Tensor
    grid: Tensor
    alive: Tensor
    tables: tuple[Tensor, Tensor] | None = None
    signals: dict[Signal, Tensor] = field(default_factory=dict)
    records: list[list[tuple[Stage, int, Tensor, Tensor | None, Tensor | None]]] = field(default_factory=list)
    deferred: list[DeferredCheck] = field(default_factory=list)
    _segments: dict[tuple[int, int], tuple[Tensor, int]] = field(default_factory=dict)

    def rows(self, images: list[int]) -> Tensor:
        """`[G, n]` long: the present positions of each image's units, in raster order (equal counts)."""
        image, raster = self.image[self.alive], self.raster[self.alive]
        rows = []
        for i in images:
            where = (image == i).nonzero()[:, 0]
            rows.append(where[raster[where].argsort()])
        return torch.stack(rows)

    def kept(self) -> list[Tensor]:
        """Per image, the raster indices `[k_i]` (ascending) of its units present now."""
        image, raster = self.image[self.alive], self.raster[self.alive]
        return [raster[image == i].sort().values for i in range(self.grid.shape[0])]

    def signal_rows(self, at: Tensor) -> dict[Signal, Tensor]:
        """Each recorded signal at present positions `at` `[G, n]`: `[G, n, ...]`."""
        return {s: v[at] for s, v in self.signals.items()}


class QwenTower:
    """`vision:L` stages and per-unit signals on one Qwen tower; `run` describes its last call."""

    def __init__(self, visual: nn.Module, stages: list[Stage], info: ModelInfo, signals: set[TowerSignal]) -> None:
        self.visual: Any = visual  # an HF Qwen vision tower: submodules read by name
        self.blocks: Any = self.visual.blocks  # an nn.ModuleList of HF vision blocks
        self.unit = self.visual.spatial_merge_size**2
        self.stages = {s.place.layer: s for s in stages}
        self.info, self.signals = info, signals
        self.signal_blocks = {s.layer for s in signals}
        self.run: TowerRun | None = None
        self._args: dict[int, tuple[tuple[Tensor, Tensor], Tensor]] = {}

    def attach(self) -> list[RemovableHandle]:
        """Hooks: the run's bookkeeping at the tower's call, each block's arguments (and its stage),
        the signals at the blocks' `qkv`, the merger's output scattered back to every unit."""
        handles = [self.visual.register_forward_pre_hook(self._begin, with_kwargs=True)]
        first = min(self.stages, default=len(self.blocks))
        for index, block in enumerate(self.blocks):
            if index >= first or index in self.signal_blocks:
                handles.append(block.register_forward_pre_hook(self._before(index), with_kwargs=True))
        for index in sorted(self.signal_blocks):
            handles.append(self.blocks[index].attn.qkv.register_forward_hook(self._signal_hook(index)))
        if self.stages:
            handles.append(self.visual.merger.register_forward_hook(self._scatter))
        return handles

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        order = tower_order(self.visual, grid)
        sizes = grid.prod(-1) // self.unit
        starts = torch.nn.functional.pad(sizes.cumsum(0), (1, 0))[:-1].to(order.device)
        image = torch.searchsorted(sizes.cumsum(0).to(order.device), order, right=True)
        alive = torch.arange(order.shape[0], device=order.device)
        self.run = TowerRun(image=image, raster=order - starts[image], grid=grid, alive=alive)
        self._args = {}

    def _before(self, index: int) -> Callable:
        stage = self.stages.get(index)

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            run = require_state(self.run, "the tower run")
            if stage is not None:
                hidden = self._reduce(stage, run, hidden, kwargs["position_embeddings"])
            if run.tables is not None:
                kwargs["position_embeddings"] = run.tables
                kwargs["cu_seqlens"], longest = self._recount(run, kwargs["cu_seqlens"])
                if kwargs.get("max_seqlen") is not None:
                    kwargs["max_seqlen"] = longest
            if index in self.signal_blocks:
                self._args[index] = (kwargs["position_embeddings"], kwargs["cu_seqlens"])
            return (hidden, *args[1:]), kwargs

        return hook

    def _recount(self, run: TowerRun, cu: Tensor) -> tuple[Tensor, int]:
        """`cu_seqlens` over the present units: each keeps its original segment (image or window);
        empty segments vanish. Returns it and its longest segment (cached per run state)."""
        key = (cu.data_ptr(), run.alive.shape[0])
        if key not in run._segments:
            starts = (torch.arange(run.image.shape[0], device=cu.device) * self.unit).to(cu.dtype)
            segment = torch.searchsorted(cu, starts, right=True) - 1  # [U] each unit slot's segment
            counts = torch.bincount(segment[run.alive.to(cu.device)], minlength=cu.shape[0] - 1) * self.unit
            recount = torch.unique_consecutive(torch.nn.functional.pad(counts.cumsum(0), (1, 0))).to(cu.dtype)
            run._segments[key] = (recount, int(counts.max()))
        return run._segments[key]

    def _reduce(self, stage: Stage, run: TowerRun, hidden: Tensor, tables: tuple[Tensor, Tensor]) -> Tensor:
        """Run `stage` on the present units of `hidden` `[4U', D]`, image group by image group;
        returns the kept units' patch states `[4k, D]` (tower order) and updates `run`."""
        units = rearrange(hidden, "(u p) d -> u p d", p=self.unit)
        present = run.image[run.alive]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (t, h, w) in enumerate(run.grid.tolist()):
            groups.setdefault((t, h, w, int((present == i).sum())), []).append(i)
        positions, states = [], []
        records: dict[int, tuple[Stage, int, Tensor, Tensor | None, Tensor | None]] = {}
        merge = self.visual.spatial_merge_size
        for (t, h, w, n), members in groups.items():
            at = run.rows(members)  # [G, n]
            tokens = units[at].mean(dim=2)  # [G, n, D]: one token per unit
            full = t == 1 and n == (h // merge) * (w // merge)
            info = replace(self.info, grid=(h // merge, w // merge) if full else None)
            reduction, scores = run_stage(stage, tokens, info, run.signal_rows(at), run.deferred)
            for g, (i, c) in enumerate(zip(members, reduction.row_counts(), strict=True)):
                chosen = at[g].gather(0, reduction.index[g, :c])
                weights = None if reduction.weights is None else reduction.weights[g, :c]
                positions.append(chosen)
                states.append(
                    units[chosen]
                    if weights is None
                    else torch.einsum("kn,npd->kpd", weights.to(units.dtype), units[at[g]])
                )
                kept = run.raster[run.alive[chosen]]
                records[i] = (stage, n, kept, weights, None if scores is None else scores[g])
        run.records.append([records[i] for i in range(run.grid.shape[0])])
        order = torch.cat(positions).argsort()
        run.alive = run.alive[torch.cat(positions)[order]]
        run.tables = tuple(  # type: ignore[assignment]
            rearrange(rearrange(t, "(u p) d -> u p d", p=self.unit)[run.alive], "u p d -> (u p) d") for t in tables
        )
        run.signals, run._segments = {}, {}
        return rearrange(torch.cat(states)[order], "u p d -> (u p) d")

    def _signal_hook(self, index: int) -> Callable:
        wanted = [s for s in self.signals if s.layer == index]

        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            run = require_state(self.run, "the tower run")
            (cos, sin), cu = self._args.pop(index)
            attn = self.blocks[index].attn
            heads = attn.num_heads
            q, k, _ = rearrange(output.float(), "s (three h d) -> three h s d", three=3, h=heads)
            per_patch: dict[TowerSignal, Tensor] = {}
            rotated_q, rotated_k = rotate(q, cos, sin), rotate(k, cos, sin)
            bounds = cu.tolist()
            for signal in wanted:
                if isinstance(signal, PatchAttention):
                    per_patch[signal] = torch.cat(
                        [
                            segment_attention(rotated_q[:, a:b], rotated_k[:, a:b], attn.scaling, signal)
                            for a, b in zip(bounds, bounds[1:], strict=False)
                        ]
                    )
                elif isinstance(signal, PatchKeyNorm):
                    per_patch[signal] = rearrange(rotated_k, "h s d -> s (h d)").norm(p=signal.p, dim=-1)
                else:
                    keys = rearrange(k, "h s d -> s h d")
                    per_patch[signal] = keys.flatten(1) if signal.heads == "concat" else keys.mean(1)
            for signal, value in per_patch.items():
                run.signals[signal] = rearrange(value, "(u p) ... -> u p ...", p=self.unit).mean(1)

        return hook

    def _scatter(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """The merger's `[U', D]` output at the present units of a `[U, D]` zero tensor."""
        run = require_state(self.run, "the tower run")
        if run.tables is None:
            return None
        full = output.new_zeros(run.image.shape[0], output.shape[-1])
        return full.index_copy(0, run.alive, output)


def build_tower(visual: Any, stages: list[Stage], info: ModelInfo) -> QwenTower | None:
    """The tower hooks `stages` need (their `vision:L` stages and the signals of those and the
    projector stages), or `None` when they need none.

    The engine refuses the signals no provider of the family computes (`QWEN_TOWER` here).

    Raises:
        PlaceError, SignalError: a stage runs after the last block, or reads a block before or after
            its tokens existed.
    """
    before_llm = [s for s in stages if s.place.kind in ("vision", "projector")]
    check_signal_blocks(before_llm, info, len(visual.blocks) - 1)
    signals = {s for s in required_signals(before_llm, info) if isinstance(s, TowerSignal)}
    vision = [s for s in before_llm if s.place.kind == "vision"]
    if not vision and not signals:
        return None
    return QwenTower(visual, vision, info, signals)


@dataclass(frozen=True)
class TowerMerged(Merged):
    """`Merged` packing with stages and signals inside Qwen's tower (`QwenTower`): `vision:L` stages
    keep whole merge units, and projector stages get the per-unit signals and the units the tower kept
    (the family sets `tower_stages` and lists `QWEN_TOWER` as its vision provider, so the engine
    leaves both to this packing)."""

    def check(self, engine: Engine, stages: list[Stage], info: ModelInfo) -> None:
        build_tower(engine.tower, stages, info)

    def attach(self, engine: Engine) -> list[Any]:
        state = engine.state
        tower = build_tower(engine.tower, list(state.pipeline.stages), state.info)
        engine.memo["tower"] = tower
        return [engine.capture_calls(), *(tower.attach() if tower is not None else [])]

    def prune(self, engine: Engine, kw: dict[str, Any], encoded: Any) -> ImageTokens:
        """As `Merged.prune`, on the units the tower kept (each image's merged tokens at them), with
        the tower's signals; the trace starts with the tower's stages."""
        grid = image_grid(engine, kw)
        grids = grid.tolist()  # read before the tower is queued: the host does not wait for it
        packed = encode_images(engine.core.visual, kw["pixel_values"], grid, grids) if encoded is None else None
        if packed is None:
            packed = list(getattr(encoded, "pooler_output", encoded))
        tower: QwenTower | None = engine.memo.get("tower")
        run = tower.run if tower is not None else None
        present = run.kept() if run is not None else None  # None: every unit reached the projector
        merge = resolve(engine.core, self.merge)
        groups: dict[tuple[int, ...], list[int]] = {}  # images of one merged grid and count run as one batch
        for i, (t, h, w) in enumerate(grids):
            groups.setdefault(
                (t, h // merge, w // merge, len(packed[i] if present is None else present[i])), []
            ).append(i)
        state = engine.state
        stage = state.projector_stages[0] if state.projector_stages else None
        deferred: list[DeferredCheck] = list(run.deferred) if run is not None else []
        by_image: dict[int, ImagePass] = {}
        for (t, rows, cols, n), members in groups.items():
            info = replace(state.info, grid=(rows, cols) if t == 1 and n == rows * cols else None)
            if present is None:
                tokens = torch.stack([packed[i] for i in members])
                at = torch.arange(n, device=tokens.device).expand(
                    len(members), -1
                )  # [G, n] the units reaching the stage
            else:
                at = torch.stack([present[i] for i in members])
                tokens = torch.stack([packed[i][present[i]] for i in members])
            signals = run.signal_rows(run.rows(members)) if run is not None and stage is not None else {}
            reduction, scores = _reduce(stage, tokens, info, signals, deferred)
            kept = at.gather(1, reduction.index)  # raster indices among the image's merged tokens
            total = len(packed[members[0]])
            slots = torch.zeros(len(members), total, dtype=torch.bool, device=tokens.device).scatter_(1, kept, True)
            weights = reduction.weights
            if weights is not None and n < total:  # provenance over every merged token of the image
                weights = weights.new_zeros(*weights.shape[:2], total).scatter_(
                    2, at[:, None].expand(-1, weights.shape[1], -1), weights
                )
            counts = reduction.row_counts()  # a ragged row's padding repeats a kept index: the scatter holds
            image_tokens = slots.new_ones(max(counts))
            for g, i in enumerate(members):
                by_image[i] = ImagePass(
                    slots=slots[g],
                    features=reduction.tokens[g, : counts[g]],
                    llm_tokens=image_tokens[: counts[g]],
                    tokens_in=n,
                    kept=kept[g, : counts[g]],
                    weights=None if weights is None else weights[g, : counts[g]],
                    scores=None if scores is None else scores[g],
                )
        tokens_out = per_image(stage, [by_image[i] for i in range(len(packed))], deferred)
        return replace(tokens_out, records=_tower_records(run) + tokens_out.records)


def encode_images(visual: Any, pixel_values: Tensor, grid: Tensor, grids: list[list[int]]) -> list[Tensor]:
    """The model's `get_image_features` for Qwen2-VL / Qwen2.5-VL (the tower on `pixel_values`, its
    merged tokens split per image), split by `grids` (`image_grid_thw` already read to the host)
    instead of reading the grid again once the tower is queued: the host can queue the pruning and
    the LLM while the tower's last blocks run. Per image `[t * h * w / merge^2, D]`."""
    out = visual(pixel_values.type(visual.dtype), grid_thw=grid, return_dict=True)
    merge = visual.spatial_merge_size
    return list(torch.split(out.pooler_output, [t * h * w // merge**2 for t, h, w in grids]))


def _tower_records(run: TowerRun | None) -> list[StageRecord]:
    """The trace records of the `vision:L` stages of a tower run (kept: each image's unit raster indices)."""
    records = []
    for per_image_run in [] if run is None else run.records:
        stage = per_image_run[0][0]
        counts = [(n, len(kept)) for _, n, kept, _, _ in per_image_run]
        records.append(
            StageRecord(
                stage=stage.to_spec(),
                at=stage.at,
                tokens_in=max(c[0] for c in counts),
                tokens_out=max(c[1] for c in counts),
                kept=[kept for _, _, kept, _, _ in per_image_run],
                weights=[w for _, _, _, w, _ in per_image_run if w is not None] or None,
                scores=[s for _, _, _, _, s in per_image_run if s is not None] or None,
                counts=counts if len(set(counts)) > 1 else None,
            )
        )
    return records
