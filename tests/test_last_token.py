"""The modules after the last attention computed for the last position only: bit-identical last-position
results, checked per shape, never where a hook watches or where the last position depends on others."""

import pytest
import torch
from torch import nn

import tokenprune as tp
from tokenprune.evaluation import Evaluation, demo_samples
from tokenprune.last_token import LastToken, per_token_modules
from tokenprune.models import load
from tokenprune.pipeline import Pipeline

SPECS = ["vtc-cls@1.0", "vtc-cls@0.25", "fastv@0.5", "dart@1.0", "tome@0.5@vision:1"]


@pytest.fixture(scope="module")
def demo():
    model, processor = load("demo")
    samples = demo_samples(3)
    inputs = processor(
        images=[s.image for s in samples],
        text=[f"USER: <image>\n{s.question} ASSISTANT:" for s in samples],
        return_tensors="pt",
        padding=True,
    )
    return model, dict(inputs)


def test_the_per_token_modules_are_the_last_layers_output_projection_mlp_and_lm_head(demo):
    model, _ = demo
    last = model.get_decoder().layers[-1]
    assert per_token_modules(model, model.get_decoder().layers) == [
        last.self_attn.o_proj,
        last.mlp,
        model.get_output_embeddings(),
    ]


def test_an_mlp_with_parameters_outside_linear_layers_is_not_per_token():
    class Experts(nn.Module):  # a mixture of experts keeps its experts' weights in raw parameters
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(4, 2)
            self.weights = nn.Parameter(torch.zeros(2, 4, 4))

    layer = nn.Module()
    layer.mlp = Experts()
    assert per_token_modules(nn.Module(), nn.ModuleList([layer])) == []


@pytest.mark.parametrize("spec", [None, *SPECS])
def test_last_position_logits_are_bit_identical(demo, spec):
    model, inputs = demo
    trim = LastToken(per_token_modules(model, model.get_decoder().layers))
    with torch.inference_mode(), tp.apply(model, spec) if spec else torch.inference_mode():
        want = model(**inputs, use_cache=False).logits[:, -1]
        with trim.trimmed():
            first = model(**inputs, use_cache=False).logits[:, -1]  # each shape checked: full computation
            second = model(**inputs, use_cache=False).logits[:, -1]  # trimmed where the check found it exact
    assert torch.equal(first, want) and torch.equal(second, want)
    assert len(trim.exact) == 3 and trim.trimmed_calls == sum(trim.exact.values())
    assert all("forward" not in vars(m) for m in trim.modules)


class Doubling(nn.Module):  # per position, and exact on any number of positions
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_a_per_position_module_is_trimmed_after_its_shape_is_checked():
    module = Doubling()
    trim = LastToken([module])
    x = torch.arange(24.0).reshape(2, 3, 4)
    with trim.trimmed():
        first, second = module(x), module(x)
        other = module(x[:, :2])
    assert torch.equal(first, 2 * x)
    assert torch.equal(second[:, -1], 2 * x[:, -1]) and not second[:, :-1].any()  # the rest zero-filled
    assert torch.equal(other, 2 * x[:, :2])  # a new shape: checked again, in full
    assert trim.trimmed_calls == 1 and list(trim.exact.values()) == [True, True]
    assert "forward" not in vars(module)


def test_a_hooked_module_runs_in_full(demo):
    model, inputs = demo
    mlp = model.get_decoder().layers[-1].mlp
    seen: list[torch.Tensor] = []
    handle = mlp.register_forward_hook(lambda module, args, out: seen.append(out))
    trim = LastToken([mlp])
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False)
            with trim.trimmed():
                model(**inputs, use_cache=False)
                model(**inputs, use_cache=False)
    finally:
        handle.remove()
    assert trim.trimmed_calls == 0 and not trim.exact
    assert torch.equal(seen[1], seen[0]) and torch.equal(seen[2], seen[0])  # the hook sees every position


def test_a_module_whose_last_position_reads_the_others_is_never_trimmed():
    class Running(nn.Module):  # position t sees positions <= t: not per position
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.cumsum(dim=-2)

    module = Running()
    trim = LastToken([module])
    x = torch.arange(24.0).reshape(2, 3, 4)
    with trim.trimmed():
        outs = [module(x), module(x)]
    assert trim.exact == {(0, (2, 3, 4), torch.float32, torch.device("cpu"), torch.get_num_threads()): False}
    assert trim.trimmed_calls == 0
    assert all(torch.equal(out, x.cumsum(dim=-2)) for out in outs)


def test_evaluation_with_last_position_equals_every_row_in_full():
    model, processor = load("demo")
    samples = demo_samples(6)
    pipelines = [None] + [Pipeline.from_spec(s) for s in SPECS]
    runner = Evaluation(model, processor, samples, pipelines, 3, "cpu", reuse_layers=False)
    got = [r for p in pipelines for r in runner.run(p)]
    assert runner.last_token is not None and runner.last_token.exact  # shapes were checked (trimmed where exact)
    full = Evaluation(model, processor, samples, pipelines, 3, "cpu", reuse_layers=False, last_position=False)
    assert full.last_token is None
    want = [r for p in pipelines for r in full.run(p)]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.pred, b.pred) and torch.equal(a.kl, b.kl)
        assert a.lengths == b.lengths and a.kept == b.kept
