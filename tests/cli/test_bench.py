"""`tokenprune bench` end to end on CPU with the tiny architecture: every reference row, the FLOPs
column against the formula, JSON and markdown written. No timing is asserted."""

import json

from typer.testing import CliRunner

from tokenprune.bench.archs import ARCHS, TEXT_TOKENS
from tokenprune.cli.app import app
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
            "tiny-onevision, qwen2-vl-7b, tiny-qwen, qwen3-vl-8b, tiny-qwen3, tiny, internvl3-8b, tiny-internvl, "
            "gemma-3-4b-it, gemma-3-12b-it, tiny-gemma3"
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


def test_bench_in_tower_rows_take_their_place_after_the_budget(tmp_path):
    """`--strategies name@vision:L` benches `name@k@vision:L`: the tower keeps k merge units, the LLM
    sees k tokens; a suffix that names no place is refused in one line."""
    args = ["bench", "--arch", "tiny-qwen", "--budgets", "4", "--batch", "2", "--repeats", "1", "--new-tokens", "2"]
    args += ["--dtype", "float32", "--device", "cpu", "--out", str(tmp_path), "--strategies"]
    result = CliRunner().invoke(app, [*args, "divprune@vision:1"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["row"], r["spec"], r["kept"]) for r in rows][2:] == [("divprune@vision:1", "divprune@4@vision:1", 4)]
    assert rows[2]["llm_flops"] == rows[1]["llm_flops"]
    refused = CliRunner().invoke(app, [*args, "divprune@4"])
    assert refused.exit_code != 0 and "optionally with a place" in refused.output
    assert "Traceback" not in refused.output


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


def test_bench_tiny_gemma3_rows_and_flops(tmp_path):
    """Gemma 3: 16 pooled soft tokens per image; the oracle keeps the first k, no official row;
    FoPru runs on the pooled tokens."""
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--arch",
            "tiny-gemma3",
            "--strategies",
            "fopru,divprune",
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
    assert [(r["row"], r["kept"]) for r in rows] == [("unpruned", 16), ("oracle", 4), ("fopru", 4), ("divprune", 4)]
    text = ARCHS["tiny-gemma3"]["gemma3"]["text"]
    d, m, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    assert [r["llm_flops"] for r in rows] == [prefill_flops([TEXT_TOKENS + n] * layers, d, m) for n in (16, 4, 4, 4)]
