"""`tokenprune compare`'s CPU fast paths (layer reuse, last position only) change no result: the
default run and `--no-reuse-layers --all-positions` give the same rows but for the latencies."""

import json

from typer.testing import CliRunner

from tokenprune.cli.app import app

runner = CliRunner()


def test_fast_paths_give_the_full_forwards_results(tmp_path):
    args = ["compare", "--strategies", "vtc-cls,fastv,dart,tome", "--budgets", "1.0,0.25"]
    args += ["--limit", "20", "--batch-size", "20", "--json"]  # 20 rows per product: trimmed with MKL
    rows = []
    for extra, out in (([], "fast"), (["--no-reuse-layers", "--all-positions"], "full")):
        result = runner.invoke(app, [*args, *extra, "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        rows.append(json.loads(result.stdout)["rows"])
    fast, full = rows
    assert len(fast) == len(full) == 9
    for a, b in zip(fast, full, strict=True):
        assert {k: v for k, v in a.items() if k != "latency_ms"} == {k: v for k, v in b.items() if k != "latency_ms"}
    samples = [
        [json.loads(line) for line in (tmp_path / out / "rows.jsonl").read_text().splitlines()][1:]
        for out in ("fast", "full")
    ]
    assert [r["samples"] for r in samples[0]] == [r["samples"] for r in samples[1]]  # every sample's token and KL
