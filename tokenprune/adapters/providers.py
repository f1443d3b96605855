"""Signal providers: which signal types a family computes, where, and how: an open table.

A provider declares the signal types it computes (`provides`) and at which place kind (`place`:
`"vision"`, inside the tower; `"llm"`, inside the LLM). Each family holds a table of them
(`Family.providers`); a plugin adds its own to built-in families with `register_provider`. At attach
the engine splits a pipeline's signals by place and by provider, refuses any signal no provider of
its place computes (naming the signal, the place, and the types the family does provide there), and
asks each vision provider for a `Probe`: the removable hooks that compute its signals while the tower
runs. Strategies never learn which provider answered.

Built-in providers: `QK_PROBE` (the tower blocks' own query/key projections: `ClsAttention`,
`PatchAttention`, `PatchKeys`, `PatchKeyNorm`; `QK_PATCHES` without [CLS]), `DECODER` (the `llm:K`
stages: `TextAttention`, `KeyNorm`, `TextPivots`, `NormedTokens`) and, for Qwen2-VL, its tower
packing (`qwen_tower.QWEN_TOWER`).
`BlockOutputs` is the plugin hook: a signal computed from a tower block's output hidden states.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from torch import Tensor, nn

from ..errors import RegistryError, SignalError
from ..signals import (
    ClsAttention,
    KeyNorm,
    NormedTokens,
    PatchAttention,
    PatchKeyNorm,
    PatchKeys,
    Signal,
    TextAttention,
    TextPivots,
)
from ..strategy import ModelInfo
from .base import Handle, require_state
from .vision import QKView, VisionProbe, VisionSignal

if TYPE_CHECKING:
    from .engine import Engine

_WHERE = {"vision": "the vision encoder", "llm": "the LLM"}


class Probe(Protocol):
    """Hooks computing some signals while the model runs: `attach()` places them (the caller removes
    the returned handles), `values()` holds the signals of the last run."""

    @property
    def signals(self) -> Collection[Signal]:
        """The signals it computes."""
        ...

    def attach(self) -> Sequence[Handle]: ...

    def values(self) -> dict[Signal, Tensor]:
        """Each signal the last run computed: `[B, N]` or `[B, N, d]` over the `B` images (or crops,
        tiles) the tower saw and their `N` patch tokens ([CLS] excluded)."""
        ...


class Provider(Protocol):
    """Computes the signal types `provides` at place kind `place`."""

    @property
    def place(self) -> Literal["vision", "llm"]: ...

    @property
    def provides(self) -> tuple[type[Signal], ...]: ...

    def probe(self, engine: Engine, signals: set[Signal], info: ModelInfo) -> Probe | None:
        """The hooks computing `signals` (each of a type in `provides`) on `engine`'s model; `None`
        where the family computes them itself (its packing, its `llm:K` stages)."""
        ...


@dataclass(frozen=True)
class Computed:
    """Signal types a family computes in its own machinery (its packing, its `llm:K` stages), with no
    probe of their own."""

    place: Literal["vision", "llm"]
    provides: tuple[type[Signal], ...]

    def probe(self, engine: Engine, signals: set[Signal], info: ModelInfo) -> Probe | None:
        return None


DECODER = Computed("llm", (TextAttention, KeyNorm, TextPivots, NormedTokens))
"""The LLM signals, computed by each `llm:K` stage at the decoder layer it reads (`decoder.DecoderStage`)."""


@dataclass(frozen=True)
class QKProbe:
    """Vision signals from each block's own query and key projections (`vision.VisionProbe`): the
    attention modules at the family's `Layout.attention`, q/k at `Layout.query`/`Layout.key`."""

    place: Literal["vision", "llm"] = "vision"
    provides: tuple[type[Signal], ...] = (ClsAttention, PatchAttention, PatchKeys, PatchKeyNorm)

    def probe(self, engine: Engine, signals: set[Signal], info: ModelInfo) -> Probe | None:
        vision: set[VisionSignal] = {s for s in signals if isinstance(s, VisionSignal)}
        layout = engine.family.layout
        attention = {b: engine.attention(b) for b in {require_state(s.read_layer(), "a block") for s in vision}}
        if (layout.query, layout.key) != ("q_proj", "k_proj"):  # q/k read elsewhere, e.g. after a qk-norm
            attention = {block: QKView.of(a, layout.query, layout.key) for block, a in attention.items()}
        return VisionProbe(attention, vision, info.has_cls)


QK_PROBE = QKProbe()
QK_PATCHES = QKProbe(provides=(PatchAttention, PatchKeys, PatchKeyNorm))
"""The q/k probe of a tower without [CLS] (SigLIP): no [CLS] attention row."""


@dataclass(frozen=True)
class BlockOutputs:
    """A vision provider for plugins: signals computed from the hidden states leaving tower blocks.

    `compute(signal, patches)` gets one signal (of a type in `provides`, its block given by
    `signal.read_layer()`) and the patch tokens `[B, N, D]` that block outputs ([CLS] dropped where
    the tower has one), and returns its value, `[B, N]` or `[B, N, d]`. Works on towers whose blocks
    return their hidden states `[B, T, D]` (CLIP, SigLIP, InternViT: every family but Qwen's);
    `vision:L` stages before the block are honoured (the block sees the kept tokens).

    Cost: what each signal type declares (`Signal.flops`).
    """

    provides: tuple[type[Signal], ...]
    compute: Callable[[Signal, Tensor], Tensor]
    place: Literal["vision", "llm"] = "vision"

    def probe(self, engine: Engine, signals: set[Signal], info: ModelInfo) -> Probe | None:
        """A `BlockProbe` on `engine`'s tower blocks.

        Raises:
            SignalError: a signal names no block (`read_layer()` is `None`) or one the tower lacks.
        """
        depth = len(engine.blocks)
        for signal in signals:
            block = signal.read_layer()
            if block is None or not 0 <= block < depth:
                raise SignalError(
                    f"{signal!r} is computed from a vision block's output, but it names block {block}; the "
                    f"{engine.name} adapter's tower has blocks 0..{depth - 1} (give the signal type a `layer` field)"
                )
        return BlockProbe(engine.blocks, signals, self.compute, 1 if info.has_cls else 0)


class BlockProbe:
    """Forward hooks on the tower blocks `signals` read: each block's output computes its signals."""

    def __init__(
        self, blocks: nn.ModuleList, signals: set[Signal], compute: Callable[[Signal, Tensor], Tensor], first: int
    ) -> None:
        self.blocks, self.signals, self.compute, self.first = blocks, signals, compute, first
        self.by_block: dict[int, list[Signal]] = {}
        for signal in sorted(signals, key=repr):
            block = require_state(signal.read_layer(), f"the block {signal!r} reads")  # checked by `BlockOutputs`
            self.by_block.setdefault(block, []).append(signal)
        self._values: dict[Signal, Tensor] = {}

    def attach(self) -> list[Handle]:
        return [self.blocks[b].register_forward_hook(self._hook(b)) for b in sorted(self.by_block)]

    def _hook(self, block: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # [B, T, D]
            for signal in self.by_block[block]:
                self._values[signal] = self.compute(signal, hidden[:, self.first :])

        return hook

    def values(self) -> dict[Signal, Tensor]:
        return dict(self._values)


class Probes:
    """Several providers' probes as one (what the engine's packings read)."""

    def __init__(self, probes: Iterable[Probe]) -> None:
        self.probes = list(probes)
        self.signals: set[Signal] = {s for p in self.probes for s in p.signals}

    def attach(self) -> list[Handle]:
        return [h for p in self.probes for h in p.attach()]

    def values(self) -> dict[Signal, Tensor]:
        return {s: v for p in self.probes for s, v in p.values().items()}


_EXTRA: dict[str, list[Provider]] = {}
_LOCK = threading.Lock()


P = TypeVar("P", bound=Provider)


def register_provider(provider: P, adapters: Iterable[str]) -> P:
    """Add a vision `provider` (e.g. a `BlockOutputs`) to the tables of the built-in or plugin
    families registered as `adapters` (e.g. `("llava", "llava-next")`): their pipelines may then ask
    for its signal types. A family's own providers come first; registering a provider again for the
    same signal types (a re-run notebook cell) replaces it. Returns `provider`.

    Raises:
        RegistryError: not a provider, a place other than `"vision"` (LLM signals are computed by the
            `llm:K` stages), or no adapter named.
    """
    place, provides = getattr(provider, "place", None), getattr(provider, "provides", None)
    if not callable(getattr(provider, "probe", None)) or not isinstance(provides, tuple) or not provides:
        raise RegistryError(f"{provider!r} is no signal provider: it needs `place`, `provides` and `probe()`")
    if place != "vision":
        raise RegistryError(
            f"signal providers register for place 'vision' only (got {place!r}); LLM signals are computed "
            "by the llm:K stages"
        )
    if not all(isinstance(t, type) and issubclass(t, Signal) and t.place == place for t in provides):
        raise RegistryError(f"{provider!r} provides {provides!r}, not only Signal types of place {place!r}")
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    if not names:
        raise RegistryError("register_provider needs the names of the adapters whose families it extends")
    with _LOCK:
        for name in names:
            kept = [p for p in _EXTRA.get(name, []) if set(p.provides).isdisjoint(provides)]
            _EXTRA[name] = [*kept, provider]
    return provider


def providers_of(adapter: str, own: Iterable[Provider]) -> tuple[Provider, ...]:
    """The provider table of the family behind `adapter`: its `own` ones, then those registered for it."""
    with _LOCK:
        return (*own, *_EXTRA.get(adapter, []))


def assign(
    providers: Iterable[Provider],
    signals: Iterable[Signal],
    place: Literal["vision", "llm"],
    where: str,
    adapter: str,
    advice: str = "",
) -> list[tuple[Provider, set[Signal]]]:
    """`signals` asked for at a stage of place kind `place` (`where` says which, for messages), split
    by the first of `providers` that computes each.

    Raises:
        SignalError: a signal of the other place kind, or of a type no provider of `place` computes:
            the message names the signal, the place and the types provided there (then `advice`).
    """
    table = [p for p in providers if p.place == place]
    plan: dict[int, set[Signal]] = {}
    for signal in sorted(signals, key=repr):
        index = next((i for i, p in enumerate(table) if isinstance(signal, p.provides)), None)
        if index is None or signal.place != place:
            raise SignalError(_refusal(signal, place, where, adapter, table, advice))
        plan.setdefault(index, set()).add(signal)
    return [(table[i], plan[i]) for i in sorted(plan)]


def _refusal(signal: Signal, place: str, where: str, adapter: str, table: list[Provider], advice: str) -> str:
    provided = sorted({t.__name__ for p in table for t in p.provides if t.place == place})
    there = f"the {adapter} adapter provides there: {', '.join(provided) or 'none'}"
    if signal.place != place:
        other = "an llm:K stage" if signal.place == "llm" else "the projector or a vision:L stage"
        return (
            f"{signal!r} is computed in {_WHERE[signal.place]} (place {signal.place!r}), but a stage {where} "
            f"(place {place!r}) asks for it; {there}; read it at {other}"
        )
    return f"the {adapter} adapter cannot compute {signal!r} {where} (place {place!r}): {there}" + (
        f"; {advice}" if advice else ""
    )
