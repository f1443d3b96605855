"""Signal types as an open extension point: each declares its place kind, the layer it reads and its
FLOPs; a registry lists them and takes new ones."""

import pytest
import torch

import tokenprune as tp
from tokenprune.errors import RegistryError, SignalError
from tokenprune.flops import signal_flops
from tokenprune.signals import (
    ClsAttention,
    KeyNorm,
    NormedTokens,
    PatchAttention,
    PatchKeys,
    TextAttention,
    TextPivots,
    register_signal,
    signal_types,
)

T, D = 577, 1024


@pytest.mark.parametrize(
    ("signal", "place", "layer", "flops"),
    [
        (ClsAttention(layer=22), "vision", 22, 2 * T * D),
        (ClsAttention(layer=3, heads="concat"), "vision", 3, 2 * T * D),
        (PatchAttention(layer=5), "vision", 5, 2 * T * D),
        (PatchAttention(layer=5, scores="softmax"), "vision", 5, 2 * T * T * D),
        (PatchKeys(layer=1), "vision", 1, 0),
        (TextAttention(layer=1), "llm", 1, 2 * T * D),
        (TextAttention(layer=1, query="mean"), "llm", 1, 2 * T * T * D),
        (KeyNorm(layer=1), "llm", 1, 4 * T * D),
        (TextPivots(layer=2, count=4), "llm", 2, 4 * T * D),
        (NormedTokens(), "llm", None, 3 * T * D),
    ],
)
def test_each_built_in_signal_declares_its_place_layer_and_cost(signal, place, layer, flops):
    assert (signal.place, signal.read_layer(), signal.flops(T, D), signal_flops(signal, T, D)) == (
        place,
        layer,
        flops,
        flops,
    )


@pytest.fixture(autouse=True)
def _restore_signal_types(monkeypatch):
    """Signal types registered by a test leave with it."""
    import tokenprune.signals

    monkeypatch.setattr(tokenprune.signals, "_TYPES", dict(tokenprune.signals._TYPES))


def test_registry_lists_the_built_ins_by_place():
    def built_in(place):
        found = signal_types(place)
        assert all(t.place == place for t in found.values())
        return {n for n, t in found.items() if t.__module__ == "tokenprune.signals"}

    assert built_in("vision") == {"ClsAttention", "PatchAttention", "PatchKeyNorm", "PatchKeys"}
    assert built_in("llm") == {"KeyNorm", "NormedTokens", "TextAttention", "TextPivots"}
    assert tp.signal_types()["ClsAttention"] is ClsAttention


def test_a_new_signal_type_registers_and_reaches_a_scorer_through_its_context():
    @register_signal
    class TestOnlyValueNorm(tp.Signal):
        place = "vision"
        layer: int

        def flops(self, tokens: int, width: int) -> int:
            return tokens * width

    assert signal_types("vision")["TestOnlyValueNorm"] is TestOnlyValueNorm
    assert signal_flops(TestOnlyValueNorm(layer=0), 10, 4) == 40 and TestOnlyValueNorm(layer=2).read_layer() == 2
    register_signal(TestOnlyValueNorm)  # the same definition again (a re-run cell) replaces it

    class Scorer(tp.ScoringStrategy):
        def signals(self, info):
            return (TestOnlyValueNorm(layer=info.vision_block(-1)),)

        def score(self, ctx):
            return ctx.signal(TestOnlyValueNorm)

    values = torch.rand(2, 5)
    info = tp.ModelInfo(vision_layers=3)
    ctx = tp.ScoringContext(
        tokens=torch.zeros(2, 5, 4),
        info=info,
        signals={TestOnlyValueNorm(layer=2): values, ClsAttention(layer=2): -values},
        declared=Scorer().signals(info),
    )
    assert torch.equal(Scorer().score(ctx), values)


def test_bad_signal_types_are_refused_clearly():
    class NoPlace(tp.Signal):
        layer: int

    with pytest.raises(RegistryError, match="NoPlace must declare place = 'vision' or 'llm'"):
        register_signal(NoPlace)

    class Elsewhere(tp.Signal):
        place = "projector"  # type: ignore[assignment]

    with pytest.raises(RegistryError, match="got 'projector'"):
        register_signal(Elsewhere)
    with pytest.raises(RegistryError, match="is not a Signal subclass"):
        register_signal(int)  # type: ignore[type-var]

    def clash() -> type:
        class ClsAttention(tp.Signal):  # the built-in's name, another definition
            place = "vision"

        return ClsAttention

    with pytest.raises(RegistryError, match="'ClsAttention' is registered twice"):
        register_signal(clash())
    assert signal_types()["ClsAttention"] is ClsAttention


def test_a_missing_signal_names_the_fix():
    ctx = tp.ScoringContext(tokens=torch.zeros(1, 3, 2), info=tp.ModelInfo())
    with pytest.raises(SignalError, match="must list it in signals"):
        ctx[ClsAttention(layer=0)]
