"""The contract every registered strategy passes (built-ins and plugins alike), on a tiny model:
exact output count, keep-all bit-identical, batch equals per-sample, model restored on exit."""

import pytest
import torch
from conftest import N_PATCHES, images

import tokenprune as tp


def spec_for(name: str, budget, at: str | None = None) -> str:
    """A runnable spec: a selector that needs scores goes with the scorer that defaults to it, else
    with vtc-cls; `at` overrides the default place."""
    entries = tp.list_strategies()
    entry = entries[name]
    place = f"@{at}" if at else ""
    if entry.role == "selector" and entry.cls.needs_scores:
        partner = next(
            (n for n, e in entries.items() if e.role == "scorer" and e.cls.default_selector == name), "vtc-cls"
        )
        return f"{partner}+{name}@{budget}{place}"
    return f"{name}@{budget}{place}"


STRATEGIES = sorted(tp.list_strategies())


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
