"""`tokenprune compare` on a tiny slice of the demo model writes well-formed results."""

import csv
import json

from PIL import Image
from typer.testing import CliRunner

from tokenprune.cli.app import app


def test_compare_writes_json_csv_png(tmp_path):
    out = tmp_path / "res"
    result = CliRunner().invoke(app, ["compare", "--strategies", "vtc-cls,uniform", "--budgets", "1.0,0.25",
                                      "--limit", "12", "--batch-size", "6", "--out", str(out)])
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
    result = CliRunner().invoke(app, ["compare", "--model", str(tiny.path), "--data", str(tmp_path / "data.jsonl"),
                                      "--strategies", "vtc-cls", "--budgets", "4", "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert rows[1]["accuracy"] is None and 0.0 <= rows[1]["agreement"] <= 1.0 and rows[1]["kept"] == 4
