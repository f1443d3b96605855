"""Stages inside a ViT encoder with a [CLS] token first (`vision:L`), for encoders whose blocks take
`(hidden_states, attention_mask)` and add an additive `attention_mask` to their attention logits
(CLIP family).

Before block `L`, the stage reduces the patch tokens (the [CLS] token always stays first); blocks
`L..` run on the shorter sequence. A token that stands for `s` original patches gets `+log(s)` on
the attention logits of every key it provides in the later blocks: ToMe's proportional attention
(arXiv 2210.09461), which makes a merged token weigh as much as its members did (for drops, `s = 1`
and nothing is added). Provenance composes across stages: `origin` is each token's encoder patch,
`size` the number of patches it stands for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..checks import DeferredCheck
from ..errors import PlaceError, SignalError
from ..execute import required_signals, run_stage
from ..pipeline import Stage
from ..strategy import ModelInfo
from .base import require_state

if TYPE_CHECKING:
    from .providers import Probe


@dataclass
class EncoderState:
    """Where the patch tokens of the current encoder run came from.

    Attributes:
        origin: `[I, n]` long, the encoder patch index each token stands at (ascending).
        size: `[I, n]` float, how many original patches each token stands for.
        merged: whether any stage merged tokens (then later blocks get proportional attention).
        records: per stage run, `(stage, tokens_in, reduction, scores, origin)`.
        deferred: the stages' NaN checks, for the owning adapter to read at its next host sync.
    """

    origin: Tensor
    size: Tensor
    merged: bool
    records: list[tuple[Stage, int, Any, Tensor | None, Tensor]]
    deferred: list[DeferredCheck]


def current_grid(info: ModelInfo, n: int) -> tuple[int, int] | None:
    """The patch grid when `n` tokens still tile it, else `None` (after a reduction)."""
    return info.grid if info.grid is not None and info.grid[0] * info.grid[1] == n else None


def check_signal_blocks(stages: list[Stage], info: ModelInfo, feature_block: int) -> None:
    """Refuse signals that describe tokens other than those a stage receives: a `vision:L` stage may
    read blocks in `[L_prev, L)` (`L_prev`: the previous vision stage's block, else 0); a stage
    after the encoder may read blocks from the last vision stage's `L` on.

    Raises:
        PlaceError: a vision stage after the block whose output the projector reads.
        SignalError: a stage reads a block before or after its tokens existed.
    """
    start = 0
    for stage in stages:
        place = stage.place
        if place.kind == "vision" and place.layer > feature_block:
            raise PlaceError(
                f"{stage.to_spec()!r} runs at {place}, after block {feature_block}, whose output the projector "
                f"reads; use vision:L with L <= {feature_block}"
            )
        end = place.layer if place.kind == "vision" else info.vision_layers
        for signal in required_signals([stage], info):
            block = signal.read_layer()
            if signal.place == "vision" and block is not None and not start <= block < end:
                raise SignalError(
                    f"{stage.to_spec()!r} reads vision block {block}, but the tokens it receives exist in "
                    f"blocks {start}..{end - 1} only (after the vision stages before it)"
                )
        if place.kind == "vision":
            start = place.layer


class EncoderStages:
    """The `vision:L` stages of a pipeline on one encoder's blocks; `state` describes the last run."""

    def __init__(self, layers: nn.ModuleList, stages: list[Stage], info: ModelInfo, probe: Probe) -> None:
        self.layers, self.stages, self.info, self.probe = layers, stages, info, probe
        self.state: EncoderState | None = None

    def attach(self) -> list[RemovableHandle]:
        """Reset the state at block 0; run each stage before its block; bias the blocks after it."""
        first = min(s.place.layer for s in self.stages)
        handles = [self.layers[0].register_forward_pre_hook(self._begin, with_kwargs=True)]
        by_block = {s.place.layer: s for s in self.stages}
        for index in range(first, len(self.layers)):
            handles.append(
                self.layers[index].register_forward_pre_hook(self._before(by_block.get(index)), with_kwargs=True)
            )
        return handles

    def tokens_per_block(self) -> list[int]:
        """Tokens ([CLS] included) each block saw in the last run."""
        state = require_state(self.state, "the encoder state")
        counts, n = [], state.records[0][1] if state.records else state.origin.shape[1]
        done = {stage.place.layer: reduction.k for stage, _, reduction, _, _ in state.records}
        for block in range(len(self.layers)):
            n = done.get(block, n)
            counts.append(n + 1)
        return counts

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        n = hidden.shape[1] - 1
        origin = torch.arange(n, device=hidden.device).expand(hidden.shape[0], -1)
        self.state = EncoderState(origin, torch.ones(origin.shape, device=hidden.device), False, [], [])

    def _before(self, stage: Stage | None) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            rest = args[1:]
            state = require_state(self.state, "the encoder state")
            if stage is not None:
                hidden = self._reduce(stage, state, hidden)
            if state.merged:
                bias = torch.cat([state.size.new_zeros(hidden.shape[0], 1), state.size.log()], dim=1)
                bias = bias.to(hidden.dtype)[:, None, None, :]  # [I, 1, 1, 1 + n]: per key
                given = rest[0] if rest else kwargs.get("attention_mask")
                mask = bias if given is None else given + bias
                if rest:
                    rest = (mask,) + rest[1:]
                else:
                    kwargs["attention_mask"] = mask
            return (hidden,) + rest, kwargs

        return hook

    def _reduce(self, stage: Stage, state: EncoderState, hidden: Tensor) -> Tensor:
        """Run `stage` on the patch tokens of `hidden` `[I, 1 + n, D]`, updating `state`; returns `[I, 1 + k, D]`."""
        tokens = hidden[:, 1:]
        info = replace(self.info, grid=current_grid(self.info, tokens.shape[1]))
        reduction, scores = run_stage(stage, tokens, info, self.probe.values(), state.deferred)
        if reduction.weights is None:
            size = state.size.gather(1, reduction.index)
        else:
            members = (reduction.weights > 0).to(state.size.dtype)  # [I, k, n]
            size = torch.einsum("ikn,in->ik", members, state.size)
            state.merged = True
        state.origin, state.size = state.origin.gather(1, reduction.index), size
        state.records.append((stage, tokens.shape[1], reduction, scores, state.origin))
        return torch.cat([hidden[:, :1], reduction.tokens.to(hidden.dtype)], dim=1)
