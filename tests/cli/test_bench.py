"""`tokenprune bench` end to end on CPU with the tiny architecture: every reference row, the FLOPs
column against the formula, JSON and markdown written. No timing is asserted."""

import json
from contextlib import contextmanager, nullcontext

import pytest
import torch
from typer.testing import CliRunner

import tokenprune as tp
from tokenprune.bench import ARCHS, TEXT_TOKENS, RowPlan, build, image_tokens, inputs, measure_rows, run
from tokenprune.cli.app import app
from tokenprune.errors import InputError
from tokenprune.flops import prefill_flops


def test_bench_tiny_writes_every_row(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--arch",
            "tiny",
            "--strategies",
            "vtc-cls,fastv",
            "--budgets",
            "16,4",
            "--batch",
            "1,2",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["arch"] == "tiny" and data["meta"]["versions"]["torch"]
    rows = data["rows"]
    expected = [("unpruned", 16)] + [(name, k) for k in (16, 4) for name in ("oracle", "official", "vtc-cls", "fastv")]
    assert [(r["row"], r["kept"]) for r in rows] == expected * 2
    text = ARCHS["tiny"]["text"]
    d, m, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    full = prefill_flops([TEXT_TOKENS + 16] * layers, d, m)
    for r in rows:
        if r["row"] in ("oracle", "official", "vtc-cls"):
            assert r["llm_flops"] == prefill_flops([TEXT_TOKENS + r["kept"]] * layers, d, m)
        if r["row"] == "fastv":  # default llm:2: layers 0-1 see every token
            tokens = [TEXT_TOKENS + 16] * 2 + [TEXT_TOKENS + r["kept"]] * (layers - 2)
            assert r["llm_flops"] == prefill_flops(tokens, d, m)
        assert r["flops_ratio"] == r["llm_flops"] / full
        assert r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 and r["peak_mem_gb"] is None
    assert "| official |" in (tmp_path / "bench.md").read_text() and (tmp_path / "bench.png").stat().st_size > 0


def test_bench_unknown_arch_lists_known(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--arch", "llava-9b", "--device", "cpu", "--out", str(tmp_path)])
    assert (
        result.exit_code == 2
        and (
            "known: llava-1.5-7b, llava-1.5-13b, llava-v1.6-vicuna-7b, tiny-next, llava-onevision-qwen2-7b, "
            "tiny-onevision, qwen2-vl-7b, tiny-qwen, qwen3-vl-8b, tiny-qwen3, tiny"
        )
        in result.stderr
    )


def test_bench_on_a_saved_checkpoint(tiny, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(tiny.path),
            "--strategies",
            "vtc-cls",
            "--budgets",
            "4",
            "--batch",
            "1",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["model"] == str(tiny.path) and data["meta"]["arch"] is None
    assert [(r["row"], r["kept"]) for r in data["rows"]] == [
        ("unpruned", 16),
        ("oracle", 4),
        ("official", 4),
        ("vtc-cls", 4),
    ]


def test_bench_model_and_random_weights_exclude_each_other(tmp_path):
    result = CliRunner().invoke(
        app, ["bench", "--model", "x", "--random-weights", "--device", "cpu", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "exclude each other" in result.stderr


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


def test_bench_tiny_llava_next_rows_and_flops(tmp_path):
    """The anyres architecture: 88 packed tokens for its 64x64 image (16 base, 8x8 crops, 8
    newlines); the oracle keeps k per image, no official row (LLaVA-1.5 only)."""
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--arch",
            "tiny-next",
            "--strategies",
            "vtc-cls",
            "--budgets",
            "16,4",
            "--batch",
            "2",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["row"], r["kept"]) for r in rows] == [
        ("unpruned", 88),
        ("oracle", 16),
        ("vtc-cls", 16),
        ("oracle", 4),
        ("vtc-cls", 4),
    ]
    text = ARCHS["tiny-next"]["text"]
    d, m, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    for r in rows:
        if r["row"] != "vtc-cls":
            assert r["llm_flops"] == prefill_flops([TEXT_TOKENS + r["kept"]] * layers, d, m)
        else:  # k tokens plus the newlines of the grid rows that keep one
            assert (
                prefill_flops([TEXT_TOKENS + r["kept"]] * layers, d, m)
                <= r["llm_flops"]
                <= prefill_flops([TEXT_TOKENS + r["kept"] + 8] * layers, d, m)
            )


def test_bench_tiny_qwen2_vl_rows_and_flops(tmp_path):
    """Qwen2-VL: 16 merged tokens for the 64x64 image; the oracle keeps k, no official row; FastV
    inside the LLM runs too."""
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--arch",
            "tiny-qwen",
            "--strategies",
            "pool,fastv",
            "--budgets",
            "4",
            "--batch",
            "2",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["row"], r["kept"]) for r in rows] == [("unpruned", 16), ("oracle", 4), ("pool", 4), ("fastv", 4)]
    text = ARCHS["tiny-qwen"]["qwen"]["text"]
    d, m, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    assert [r["llm_flops"] for r in rows] == [
        prefill_flops([TEXT_TOKENS + 16] * layers, d, m),
        prefill_flops([TEXT_TOKENS + 4] * layers, d, m),
        prefill_flops([TEXT_TOKENS + 4] * layers, d, m),
        prefill_flops([TEXT_TOKENS + 16] * 2 + [TEXT_TOKENS + 4], d, m),
    ]


def test_bench_tiny_qwen3_vl_rows_and_flops(tmp_path):
    """Qwen3-VL: 16 merged tokens for the 64x64 image; the oracle keeps k (DeepStack features cut with
    them); FastV at its default llm:2, right after the last DeepStack layer (1) of the tiny arch."""
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--arch",
            "tiny-qwen3",
            "--strategies",
            "pool,fastv",
            "--budgets",
            "4",
            "--batch",
            "2",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["row"], r["kept"]) for r in rows] == [("unpruned", 16), ("oracle", 4), ("pool", 4), ("fastv", 4)]
    text = ARCHS["tiny-qwen3"]["qwen"]["text"]
    d, m, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    assert [r["llm_flops"] for r in rows] == [
        prefill_flops([TEXT_TOKENS + 16] * layers, d, m),
        prefill_flops([TEXT_TOKENS + 4] * layers, d, m),
        prefill_flops([TEXT_TOKENS + 4] * layers, d, m),
        prefill_flops([TEXT_TOKENS + 16] * 2 + [TEXT_TOKENS + 4] * 2, d, m),
    ]


def test_qwen3_vl_8b_shapes_build_the_published_model_size():
    """Built on the meta device (no memory): Qwen3-VL-8B-Instruct's 8.77B parameters (its model card),
    576 merged tokens for the 768x768 bench image, DeepStack after LLM layers 0-2."""
    model = build("qwen3-vl-8b", torch.bfloat16, "meta")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 8.77
    assert image_tokens(model) == 576 == len(inputs(model, 1, 576)["pixel_values"]) // 4
    assert model.config.vision_config.deepstack_visual_indexes == [8, 16, 24]


def test_bench_tiny_llava_onevision_rows(tmp_path):
    """LLaVA-OneVision (SigLIP, Qwen2 LLM): 88 packed tokens for its 64x64 image; the oracle keeps k."""
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--arch",
            "tiny-onevision",
            "--strategies",
            "divprune",
            "--budgets",
            "16",
            "--batch",
            "2",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["row"], r["kept"]) for r in rows] == [("unpruned", 88), ("oracle", 16), ("divprune", 16)]
    text = ARCHS["tiny-onevision"]["onevision"]["text"]
    assert rows[1]["llm_flops"] == prefill_flops(
        [TEXT_TOKENS + 16] * text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"]
    )


def test_compile_refuses_qwen_and_llm_stages_before_building():
    with pytest.raises(InputError, match="LLaVA architectures, not 'tiny-qwen'.*tiny-next"):
        run("tiny-qwen", ["pool"], [4], [1], "cpu", torch.float32, 1, 2, compile_mode="cudagraphs")
    with pytest.raises(InputError, match="llm:K stages do not support: fastv"):
        run("tiny", ["fastv"], [4], [1], "cpu", torch.float32, 1, 2, compile_mode="cudagraphs")
