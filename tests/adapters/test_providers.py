"""Signal providers: each family's table says which signal types it computes at which place kind;
the engine refuses an unprovided signal naming the signal, the place and the types provided there,
and a plugin extends a built-in family's table with `tp.register_provider`."""

from typing import ClassVar

import pytest
import torch
from conftest import images

import tokenprune as tp
import tokenprune.signals
from tokenprune.adapters import providers
from tokenprune.adapters.providers import DECODER, QK_PROBE, BlockOutputs, Computed, assign, register_provider
from tokenprune.errors import RegistryError, SignalError
from tokenprune.signals import ClsAttention, PatchAttention, PatchKeyNorm, PatchKeys, TextAttention


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    """Signal types and providers registered by a test leave with it."""
    monkeypatch.setattr(tokenprune.signals, "_TYPES", dict(tokenprune.signals._TYPES))
    monkeypatch.setattr(providers, "_EXTRA", {k: list(v) for k, v in providers._EXTRA.items()})


class Asks(tp.ScoringStrategy):
    """A scorer (unregistered) that asks for one given signal and scores by it."""

    places: ClassVar[tuple[str, ...]] = ("vision", "projector", "llm")
    wanted: tp.Signal

    def signals(self, info: tp.ModelInfo) -> tuple[tp.Signal, ...]:
        return (self.wanted,)

    def score(self, ctx: tp.ScoringContext) -> torch.Tensor:
        return ctx.signal()


def stage(signal: tp.Signal, at: str) -> tp.Pipeline:
    return tp.Pipeline([tp.Stage(at=at, scorer=Asks(wanted=signal), selector=tp.create("topk"), budget=4)])


def test_assign_splits_signals_by_provider_in_table_order():
    extra = Computed("vision", (PatchAttention, PatchKeys))
    signals = {ClsAttention(layer=1), PatchAttention(layer=0), PatchKeys(layer=2), PatchKeyNorm(layer=1)}
    plan = assign((DECODER, extra, QK_PROBE), signals, "vision", "here", "x")
    assert [(p, sorted(map(repr, s))) for p, s in plan] == [
        (extra, ["PatchAttention(layer=0, axis='col', scores='logits')", "PatchKeys(layer=2, heads='mean')"]),
        (QK_PROBE, ["ClsAttention(layer=1, heads='mean')", "PatchKeyNorm(layer=1, p=2)"]),
    ]
    assert assign((QK_PROBE, DECODER), set(), "llm", "here", "x") == []


def test_an_llm_signal_before_the_projector_is_refused_naming_the_place(tiny):
    message = (
        "TextAttention(layer=0, query='last') is computed in the LLM (place 'llm'), but a stage in the vision "
        "encoder or before the projector (place 'vision') asks for it; the llava adapter provides there: "
        "ClsAttention, PatchAttention, PatchKeyNorm, PatchKeys; read it at an llm:K stage"
    )
    with pytest.raises(SignalError) as refused:
        tp.check(tiny.model, stage(TextAttention(layer=0), "projector"))
    assert str(refused.value) == message


def test_a_vision_signal_inside_the_llm_is_refused_naming_the_place(tiny):
    with pytest.raises(SignalError) as refused:
        tp.check(tiny.model, stage(ClsAttention(layer=1), "llm:1"))
    message = str(refused.value)
    assert message.startswith(
        "ClsAttention(layer=1, heads='mean') is computed in the vision encoder (place 'vision'), but a stage at "
    )
    assert message.endswith(
        "@4@llm:1' inside the LLM (place 'llm') asks for it; the llava adapter provides there: KeyNorm, "
        "NormedTokens, TextAttention, TextPivots; read it at the projector or a vision:L stage"
    )


def test_a_family_without_vision_providers_says_so(tiny_qwen3):
    with pytest.raises(SignalError) as refused:
        tp.check(tiny_qwen3.model, "fopru@4")
    assert str(refused.value) == (
        "the qwen3-vl adapter cannot compute PatchAttention(layer=2, axis='col', scores='logits') in the vision "
        "encoder or before the projector (place 'vision'): the qwen3-vl adapter provides there: none; use "
        "score-free selectors (divprune, tome, pool, uniform) or random"
    )


def test_a_block_provider_is_refused_where_the_packing_computes_the_tower_signals(tiny_qwen):
    @tp.register_signal
    class TestOnlyBlockMean(tp.Signal):
        place = "vision"
        layer: int

    register_provider(BlockOutputs((TestOnlyBlockMean,), lambda s, h: h.mean(-1)), adapters=("qwen2-vl",))
    pipeline = stage(TestOnlyBlockMean(layer=0), "projector")
    with pytest.raises(SignalError) as refused:
        tp.check(tiny_qwen.model, pipeline)
    assert str(refused.value) == (
        "the qwen2-vl adapter's packing runs the tower and computes its signals itself, so the provider "
        "registered for TestOnlyBlockMean cannot hook its blocks; its packing provides: PatchAttention, PatchKeys, "
        "PatchKeyNorm"
    )


def test_a_registered_provider_feeds_a_built_in_family_and_re_registering_replaces_it(tiny):
    @tp.register_signal
    class TestOnlyHiddenMax(tp.Signal):
        place = "vision"
        layer: int

    pipeline = stage(TestOnlyHiddenMax(layer=1), "projector")
    with pytest.raises(SignalError, match=r"cannot compute TestOnlyHiddenMax\(layer=1\)"):
        tp.check(tiny.model, pipeline)
    register_provider(BlockOutputs((TestOnlyHiddenMax,), lambda s, h: -h.amax(-1)), adapters=("llava",))
    register_provider(BlockOutputs((TestOnlyHiddenMax,), lambda s, h: h.amax(-1)), adapters="llava")
    assert len(providers._EXTRA["llava"]) == 1
    inputs = tiny.inputs(["what colour is the square"], images(1, seed=2))
    with torch.no_grad(), tp.apply(tiny.model, pipeline) as run:
        tiny.model(**inputs)
        hidden = tiny.model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[2]
    best = hidden[0, 1:].amax(-1).argsort(descending=True, stable=True)[:4].sort().values
    assert run.trace[0].stages[0].kept[0].tolist() == best.tolist()


def test_bad_providers_are_refused_clearly():
    block, before = BlockOutputs((PatchKeys,), lambda s, h: h), {k: list(v) for k, v in providers._EXTRA.items()}
    with pytest.raises(RegistryError, match="is no signal provider"):
        register_provider(object(), adapters=("llava",))  # type: ignore[type-var]
    with pytest.raises(RegistryError, match="register for place 'vision' only"):
        register_provider(Computed("llm", (TextAttention,)), adapters=("llava",))
    with pytest.raises(RegistryError, match="not only Signal types of place 'vision'"):
        register_provider(BlockOutputs((TextAttention,), lambda s, h: h), adapters=("llava",))
    with pytest.raises(RegistryError, match="needs the names of the adapters"):
        register_provider(block, adapters=())
    assert providers._EXTRA == before  # nothing registered


def test_a_block_provider_refuses_a_signal_without_a_block_of_the_tower(tiny, tiny_next):
    """No block named (llava), or one past the tower (llava-next, whose packing has no block check of its own)."""

    @tp.register_signal
    class TestOnlyNoBlock(tp.Signal):
        place = "vision"

    @tp.register_signal
    class TestOnlyAnyBlock(tp.Signal):
        place = "vision"
        layer: int

    provider = BlockOutputs((TestOnlyNoBlock, TestOnlyAnyBlock), lambda s, h: h.mean(-1))
    register_provider(provider, adapters=("llava", "llava-next"))
    for model, name, signal in ((tiny.model, "llava", TestOnlyNoBlock()), (tiny_next.model, "llava-next", None)):
        depth = model.config.vision_config.num_hidden_layers
        signal = signal or TestOnlyAnyBlock(layer=depth)
        with pytest.raises(SignalError) as refused:
            tp.check(model, stage(signal, "projector"))
        assert str(refused.value) == (
            f"{signal!r} is computed from a vision block's output, but it names block {signal.read_layer()}; the "
            f"{name} adapter's tower has blocks 0..{depth - 1} (give the signal type a `layer` field)"
        )
