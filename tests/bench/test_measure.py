"""`tokenprune.bench.measure`: the order rows are measured in, and refusals before any model is built."""

import subprocess
import sys
from contextlib import contextmanager, nullcontext

import pytest
import torch

import tokenprune as tp
from tokenprune.bench.archs import TEXT_TOKENS, build, inputs
from tokenprune.bench.measure import RowPlan, measure_rows, run
from tokenprune.errors import InputError


def _plans(model, order: list[str]) -> list[RowPlan]:
    """Unpruned and vtc-cls@4 rows on the tiny architecture; entering a row appends its name."""
    full = inputs(model, 1, 16)

    def entering(name, make):
        @contextmanager
        def enter():
            order.append(name)
            with make() as handle:
                yield handle

        return enter

    return [
        RowPlan("unpruned", "", 16, 1, full, entering("unpruned", nullcontext), lambda h: [TEXT_TOKENS + 16] * 3),
        RowPlan(
            "vtc-cls",
            "vtc-cls@4",
            4,
            1,
            full,
            entering("vtc-cls", lambda: tp.apply(model, "vtc-cls@4")),
            lambda h: h.trace[-1].tokens_per_layer(),
        ),
    ]


def test_rows_are_measured_round_robin_after_every_warm_up():
    model, order = build("tiny", torch.float32, "cpu"), []
    rows = measure_rows(
        model, _plans(model, order), repeats=3, new_tokens=2, device="cpu", warmup=1, interleave=True, compiled=False
    )
    assert order == ["unpruned", "vtc-cls"] + ["unpruned", "vtc-cls"] * 3
    assert [r["layer_tokens"] for r in rows] == [[TEXT_TOKENS + 16] * 3, [TEXT_TOKENS + 4] * 3]


def test_static_cache_rows_run_plan_after_plan_each_in_one_context():
    """Every run of a row (warm-up and timed: an encode and two generates each) inside one entry
    of its context, the rows one after the other."""
    model, order, towers = build("tiny", torch.float32, "cpu"), [], []
    handle = model.model.vision_tower.register_forward_pre_hook(lambda *a: towers.append(order[-1]))
    try:
        rows = measure_rows(
            model,
            _plans(model, order),
            repeats=2,
            new_tokens=3,
            device="cpu",
            warmup=1,
            interleave=False,
            compiled=True,
        )
    finally:
        handle.remove()
    assert order == ["unpruned", "vtc-cls"]
    assert towers == ["unpruned"] * 9 + ["vtc-cls"] * 9
    assert all(r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 for r in rows)


def test_compile_refuses_qwen_and_llm_stages_before_building():
    with pytest.raises(InputError, match="LLaVA architectures, not 'tiny-qwen'.*tiny-next"):
        run("tiny-qwen", ["pool"], [4], [1], "cpu", torch.float32, 1, 2, compile_mode="cudagraphs")
    with pytest.raises(InputError, match="LLaVA architectures, not 'tiny-gemma3'"):
        run("tiny-gemma3", ["pool"], [4], [1], "cpu", torch.float32, 1, 2, compile_mode="cudagraphs")
    with pytest.raises(InputError, match="llm:K stages do not support: fastv"):
        run("tiny", ["fastv"], [4], [1], "cpu", torch.float32, 1, 2, compile_mode="cudagraphs")


def test_the_library_and_the_cli_load_no_timing_tooling():
    """`import tokenprune` loads nothing of `tokenprune.bench` and no tiny-model builder; the CLI loads the
    timing machinery only when `bench` runs."""
    code = (
        "import sys, tokenprune\n"
        "assert not [m for m in sys.modules if m.startswith(('tokenprune.bench', 'tokenprune.testing'))]\n"
        "import tokenprune.cli.app\n"
        "assert 'tokenprune.bench.measure' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
