"""The contract every registered strategy passes (built-ins and plugins alike), on a tiny model:
exact output count, keep-all bit-identical, batch equals per-sample, model restored on exit."""

import pytest
import torch
from conftest import N_PATCHES, images

import tokenprune as tp


def spec_for(name: str, budget, at: str | None = None) -> str:
    """A runnable spec: a selector that needs scores goes with the scorer that defaults to it, else
    with vtc-cls; `at` overrides the default place. An adaptive selector (PruMerge's, whose count
    is its own per image, in score order) runs in its fixed-budget raster form, `adaptive=False,
    order='raster'`, which this contract pins; its defaults are tested against the official rule
    in its own tests."""
    entries = tp.list_strategies()
    entry = entries[name]
    place = f"@{at}" if at else ""
    scorer, selector = (None, name) if entry.role == "selector" else (name, entry.cls.default_selector)
    if scorer is None and entry.cls.needs_scores:
        scorer = next(
            (n for n, e in entries.items() if e.role == "scorer" and e.cls.default_selector == name), "vtc-cls"
        )
    if "adaptive" in entries[selector].cls.model_fields:
        selector = f"{selector}(adaptive=False,order='raster')"
    elif scorer is not None and entry.role == "scorer":
        return f"{name}@{budget}{place}"
    return "+".join(t for t in (scorer, selector) if t) + f"@{budget}{place}"


STRATEGIES = sorted(n for n, e in tp.list_strategies().items() if not (e.role == "scorer" and e.cls.withdraws))


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_contract(tiny, name):
    check_contract(tiny, name)


@torch.no_grad()
def check_contract(tiny, name, at: str | None = None):
    """Run `name` through the contract on the tiny model (also used for plugin strategies and other
    places)."""
    model, imgs = tiny.model, images(2, seed=11)
    batch = tiny.inputs(["what colour is the square", "how many"], imgs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(**batch).logits
    with tp.apply(model, spec_for(name, 1.0, at)):
        assert torch.equal(model(**batch).logits, ref)
    for k in (1, 5, N_PATCHES - 1):
        with tp.apply(model, spec_for(name, k, at)) as run:
            logits = model(**batch).logits
        stage = run.trace[0].stages[0]
        assert stage.tokens_out == k and all(len(x) == k for x in stage.kept)
        assert all(x.tolist() == sorted(set(x.tolist())) for x in stage.kept)
        for i, q in enumerate(["what colour is the square", "how many"]):
            with tp.apply(model, spec_for(name, k, at)) as alone:
                single = model(**tiny.inputs([q], [imgs[i]])).logits[0, -1]
            torch.testing.assert_close(logits[i, -1], single, atol=1e-5, rtol=1e-5)
            assert torch.equal(alone.trace[0].stages[0].kept[0], stage.kept[i])
    assert torch.equal(model(**batch).logits, ref)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
