"""`tokenprune compare` never loses finished work: rows on disk as they finish, SIGINT/SIGTERM write
what is done and exit 130/143, `--resume` finishes with results equal to an uninterrupted run's,
a non-empty or foreign `--out` is refused, a failing strategy fails only its row."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

import tokenprune as tp
from tokenprune.cli.app import app
from tokenprune.registry import REGISTRY
from tokenprune.strategy import ScoringContext, ScoringStrategy

runner = CliRunner()
SMALL = ["--budgets", "0.5,0.25", "--limit", "6", "--batch-size", "3"]
MANY = "vtc-cls,uniform,random,pool,divprune,fastv"


def compare(out, *extra: str, strategies: str = "vtc-cls,uniform"):
    return runner.invoke(app, ["compare", "--strategies", strategies, *SMALL, "--out", str(out), *extra])


def without_timings(results: dict) -> dict:
    rows = [{k: v for k, v in r.items() if k != "latency_ms"} for r in results["rows"]]
    return {"meta": results["meta"], "rows": rows}


def rows_on_disk(out) -> int:
    path = out / "rows.jsonl"
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, signum, code):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "tokenprune.cli.app", "compare", "--strategies", MANY, *SMALL, "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while rows_on_disk(out) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == code, stderr[-2000:]
    assert f"interrupted by {signal.Signals(signum).name}" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    partial = json.loads((out / "results.json").read_text())
    done = rows_on_disk(out)
    assert 3 <= len(partial["rows"]) == done < 13  # the rows on disk, and not all of them
    assert partial["rows"][0]["strategy"] == "unpruned"

    resumed = runner.invoke(app, ["compare", "--strategies", MANY, *SMALL, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert rows_on_disk(out) == 13  # the finished rows were not run again
    whole = runner.invoke(app, ["compare", "--strategies", MANY, *SMALL, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    final, reference = (json.loads((d / "results.json").read_text()) for d in (out, tmp_path / "whole"))
    assert without_timings(final) == without_timings(reference)
    assert [r["spec"] for r in final["rows"]][:3] == ["", "vtc-cls@0.5", "vtc-cls@0.25"]


def test_resume_refuses_another_run(tmp_path):
    out = tmp_path / "run"
    assert compare(out).exit_code == 0
    for extra, field in [(["--seed", "1"], "seed: 0 there, 1 now"), (["--batch-size", "2"], "batch_size")]:
        result = compare(out, "--resume", *extra)
        assert result.exit_code == 2
        assert "cannot resume" in result.stderr and field in result.stderr and "--overwrite" in result.stderr
    again = compare(out, "--resume")  # same settings: every row is already done
    assert again.exit_code == 0 and rows_on_disk(out) == 5


def test_out_is_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    result = compare(tmp_path / "file", "--model", "/no/such/model")  # refused before the model is loaded
    assert result.exit_code == 2 and "is a file" in result.stderr and "cannot load model" not in result.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = compare(busy)
    assert result.exit_code == 2 and "is not empty (notes.txt)" in result.stderr and "--resume" in result.stderr
    result = compare(busy, "--resume", "--overwrite")
    assert result.exit_code == 2 and "exclude each other" in result.stderr
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


def test_overwrite_leaves_no_stale_plot(tmp_path):
    from conftest import images

    out = tmp_path / "run"
    assert compare(out).exit_code == 0 and (out / "accuracy.png").exists()
    lines = []
    for i, img in enumerate(images(3)):
        img.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": "what colour is the circle ?"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    result = compare(out, "--overwrite", "--data", str(tmp_path / "data.jsonl"))
    assert result.exit_code == 0, result.output
    assert not (out / "accuracy.png").exists() and (out / "agreement.png").exists() and (out / "pareto.png").exists()
    assert json.loads((out / "results.json").read_text())["rows"][1]["accuracy"] is None
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


CALLS: list[int] = []


class FailsOnSecondBatch(ScoringStrategy):
    """Scores every token alike on its first call, raises on its second: a strategy failing mid-run."""

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        CALLS.append(1)
        if len(CALLS) == 2:
            raise RuntimeError("boom on the second batch")
        return torch.ones(ctx.tokens.shape[:2])


def test_failing_strategy_fails_its_row_only(tmp_path):
    REGISTRY.ensure_loaded()
    saved = dict(REGISTRY._strategies)
    try:
        tp.register("test-fails-midway")(FailsOnSecondBatch)
        result = runner.invoke(
            app,
            ["compare", "--strategies", "test-fails-midway,uniform", "--budgets", "0.25"]
            + ["--limit", "6", "--batch-size", "3", "--out", str(tmp_path / "o")],
        )
    finally:
        REGISTRY._strategies = saved
    assert result.exit_code == 1
    assert "1 row(s) failed (test-fails-midway@0.25)" in result.stderr
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    assert [r["spec"] for r in rows] == ["", "test-fails-midway@0.25", "uniform@0.25"]
    assert rows[1]["error"] == "RuntimeError: boom on the second batch" and rows[1]["accuracy"] is None
    assert rows[2]["error"] is None and rows[2]["kept"] == 36 and rows[2]["accuracy"] is not None
    lines = [json.loads(line) for line in (tmp_path / "o" / "rows.jsonl").read_text().splitlines()]
    assert [bool(e["row"]["error"]) for e in lines[1:]] == [False, True, False]


def test_a_line_cut_short_by_a_crash_is_run_again(tmp_path):
    out = tmp_path / "run"
    assert compare(out).exit_code == 0
    path = out / "rows.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # the last row half-written
    before = json.loads((out / "results.json").read_text())
    result = compare(out, "--resume")
    assert result.exit_code == 0, result.output
    assert len(path.read_text().splitlines()) == len(lines)
    assert without_timings(json.loads((out / "results.json").read_text())) == without_timings(before)


def test_progress_file_is_synced_row_by_row(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    assert compare(tmp_path / "o").exit_code == 0
    assert len(synced) >= 1 + 5  # the meta line and each of the 5 rows, before the summary files
