"""`tokenprune compare` on a tiny slice of the demo model writes well-formed results."""

import csv
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from tokenprune.cli.app import app


def test_compare_writes_json_csv_png(tmp_path):
    out = tmp_path / "res"
    result = CliRunner().invoke(
        app,
        [
            "compare",
            "--strategies",
            "vtc-cls,uniform",
            "--budgets",
            "1.0,0.25",
            "--limit",
            "12",
            "--batch-size",
            "6",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["versions"]["torch"] and data["meta"]["seed"] == 0 and data["meta"]["limit"] == 12
    rows = data["rows"]
    assert [r["spec"] for r in rows] == ["", "vtc-cls@1.0", "vtc-cls@0.25", "uniform@1.0", "uniform@0.25"]
    for row in rows:
        if row["budget"] == 1.0 or row["budget"] is None:
            assert row["agreement"] == 1.0 and row["kl"] == 0.0 and row["flops_ratio"] == 1.0
        else:
            assert row["kept"] == 36 and row["flops_ratio"] < 0.5
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    for png in ("accuracy.png", "agreement.png"):
        assert Image.open(out / png).size[0] > 100


def test_compare_own_data_without_answers(tmp_path, tiny):
    from conftest import images

    lines = []
    for i, img in enumerate(images(3)):
        img.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": "what colour"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    result = CliRunner().invoke(
        app,
        [
            "compare",
            "--model",
            str(tiny.path),
            "--data",
            str(tmp_path / "data.jsonl"),
            "--strategies",
            "vtc-cls",
            "--budgets",
            "4",
            "--out",
            str(tmp_path / "o"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert rows[1]["accuracy"] is None and 0.0 <= rows[1]["agreement"] <= 1.0 and rows[1]["kept"] == 4


def test_compare_sharded_over_two_processes_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU): one results file, identical to one process's
    but for the timings."""
    import os
    import socket
    import subprocess
    import sys

    args = [
        "compare",
        "--strategies",
        "vtc-cls,random,fastv",
        "--budgets",
        "0.25",
        "--limit",
        "10",
        "--batch-size",
        "3",
        "--json",
    ]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "-m",
            "tokenprune.cli.app",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    sharded, single = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("two", "one"))
    assert json.loads(two.stdout) == sharded  # only rank 0 printed
    assert sharded["meta"]["processes"] == 2 and single["meta"]["processes"] == 1
    for row in sharded["rows"] + single["rows"]:
        assert row.pop("latency_ms") > 0
    assert sharded["rows"] == single["rows"]
    assert [r["spec"] for r in single["rows"]] == ["", "vtc-cls@0.25", "random@0.25", "fastv@0.25"]


def test_compare_reports_the_mean_kept_count_of_a_budget_rule(tmp_path):
    import torch

    import tokenprune as tp
    from tokenprune.cli.compare_cmd import default_strategies
    from tokenprune.evaluation import demo_samples
    from tokenprune.models import build_prompt, load

    out = tmp_path / "res"
    args = ["compare", "--strategies", "vtc-cls@mass(0.9)", "--budgets", "0.25", "--limit", "6"]
    result = CliRunner().invoke(app, [*args, "--batch-size", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    row = json.loads((out / "results.json").read_text())["rows"][1]
    assert row["spec"] == "vtc-cls@mass(0.9)" and row["budget"] == "mass(0.9)"
    model, processor = load("demo")
    counts = []
    for sample in demo_samples(6):  # each image alone: the counts the rule gives it
        inputs = processor(images=[sample.image], text=[build_prompt(processor, sample.question)], return_tensors="pt")
        with torch.no_grad(), tp.apply(model, "vtc-cls@mass(0.9)") as run:
            model(**inputs)
        counts += run.trace[0].stages[0].kept_per_image()
    assert row["kept"] == pytest.approx(sum(counts) / len(counts))
    with (out / "results.csv").open() as handle:
        assert float(list(csv.DictReader(handle))[1]["kept"]) == pytest.approx(row["kept"])
    assert "vtc-cls@mass(0.9)" in default_strategies(model)
