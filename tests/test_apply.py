"""`apply` attaches all or nothing, and `tp.check` raises what `apply` raises without changing the model."""

import pytest
import torch
from conftest import images
from torch import nn

import tokenprune as tp
from tokenprune.errors import InputError, TokenpruneError

EVERY_PLACE = "tome@12@vision:1 > vtc-cls@6 > fastv@3@llm:1"
"""One stage at each place kind: hooks in the tower, before the projector and inside the LLM."""


def hook_state(model: nn.Module) -> list:
    """Every module's hook ids per hook dict and its instance attributes."""
    return [
        (
            name,
            {k: sorted(v) for k, v in vars(m).items() if isinstance(v, dict) and "hooks" in k},
            sorted(vars(m)),
        )
        for name, m in model.named_modules()
    ]


class FailAt:
    """Counts hook registrations on every module; raises at registration number `at` (0-based)."""

    def __init__(self, at: int | None = None) -> None:
        self.at, self.count = at, 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for method in ("register_forward_pre_hook", "register_forward_hook"):
            original = getattr(nn.Module, method)

            def counted(module, *args, __original=original, **kwargs):
                if self.count == self.at:
                    raise RuntimeError(f"injected failure at hook {self.count}")
                self.count += 1
                return __original(module, *args, **kwargs)

            monkeypatch.setattr(nn.Module, method, counted)


@torch.no_grad()
def test_a_failure_at_any_hook_of_attach_leaves_the_model_as_it_was(tiny, monkeypatch):
    inputs = tiny.inputs(["what colour is the square"], images(1, seed=2))
    plain, before = tiny.model(**inputs).logits, hook_state(tiny.model)
    counter = FailAt()
    with monkeypatch.context() as patch:
        counter.install(patch)
        with tp.apply(tiny.model, EVERY_PLACE):
            pass
    assert counter.count >= 6  # the tower's, the projector's, the LLM's and the model's own hooks
    for at in range(counter.count):
        with monkeypatch.context() as patch:
            FailAt(at).install(patch)
            with pytest.raises(RuntimeError, match=f"injected failure at hook {at}"):
                with tp.apply(tiny.model, EVERY_PLACE):
                    pass
        assert hook_state(tiny.model) == before, f"failure at hook {at} left hooks behind"
    assert torch.equal(tiny.model(**inputs).logits, plain)
    with tp.apply(tiny.model, "vtc-cls@6"):  # and the model can be compressed again
        tiny.model(**inputs)


@torch.no_grad()
def test_an_invalid_llm_stage_after_vision_hooks_leaves_nothing_behind(tiny):
    """The reported case: a vision stage's hooks were placed, then the LLM stage was refused; the
    hooks stayed, and a later pipeline ran on top of them with wrong logits."""
    depth = tiny.model.config.text_config.num_hidden_layers
    inputs = tiny.inputs(["what colour is the square"], images(1, seed=4))
    before = hook_state(tiny.model)
    with tp.apply(tiny.model, "vtc-cls@6"):
        expected = tiny.model(**inputs).logits
    with pytest.raises(InputError, match="llm:K needs"):
        with tp.apply(tiny.model, f"tome@12@vision:1 > fastv@3@llm:{depth}"):
            pass
    assert hook_state(tiny.model) == before
    with tp.apply(tiny.model, "vtc-cls@6"):
        assert torch.equal(tiny.model(**inputs).logits, expected)


@pytest.mark.parametrize(
    "spec",
    [EVERY_PLACE, "vtc-cls@6", "fastv@3@llm:9", "vtc-cls@99", "random+visionzip-merge@4", "tome@12@vision:9"],
)
def test_check_raises_exactly_what_apply_raises_and_changes_nothing(tiny, spec):
    before = hook_state(tiny.model)
    try:
        with tp.apply(tiny.model, spec):
            pass
        applied = None
    except TokenpruneError as exc:
        applied = exc
    assert hook_state(tiny.model) == before
    if applied is None:
        assert tp.check(tiny.model, spec) == tp.Pipeline.from_spec(spec)
    else:
        with pytest.raises(type(applied)) as checked:
            tp.check(tiny.model, spec)
        assert str(checked.value) == str(applied)
    assert hook_state(tiny.model) == before
