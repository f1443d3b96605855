"""`tokenprune bench` end to end on CPU with the tiny architecture: every reference row, the FLOPs
column against the formula, JSON and markdown written. No timing is asserted."""

import json

from typer.testing import CliRunner

from tokenprune.bench import ARCHS, TEXT_TOKENS
from tokenprune.cli.app import app
from tokenprune.flops import prefill_flops


def test_bench_tiny_writes_every_row(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--arch", "tiny", "--strategies", "vtc-cls,fastv", "--budgets", "16,4",
                                      "--batch", "1,2", "--repeats", "1", "--new-tokens", "2", "--dtype", "float32",
                                      "--device", "cpu", "--out", str(tmp_path)])
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
    assert result.exit_code == 2 and "known: llava-1.5-7b, llava-1.5-13b, tiny" in result.stderr


def test_bench_on_a_saved_checkpoint(tiny, tmp_path):
    result = CliRunner().invoke(app, ["bench", "--model", str(tiny.path), "--strategies", "vtc-cls", "--budgets", "4",
                                      "--batch", "1", "--repeats", "1", "--new-tokens", "2", "--dtype", "float32",
                                      "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["model"] == str(tiny.path) and data["meta"]["arch"] is None
    assert [(r["row"], r["kept"]) for r in data["rows"]] == [("unpruned", 16), ("oracle", 4), ("official", 4), ("vtc-cls", 4)]


def test_bench_model_and_random_weights_exclude_each_other(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--model", "x", "--random-weights", "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "exclude each other" in result.stderr
