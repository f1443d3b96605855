"""The typer CLI: list, run, compare; one-line user errors."""

import json

import pytest
from conftest import N_PATCHES, images
from typer.testing import CliRunner

from tokenprune.cli.app import app
from tokenprune.flops import layer_flops

runner = CliRunner()


def test_list_json_names_roles_origins_params():
    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)["strategies"]}
    assert rows["vtc-cls"]["role"] == "scorer" and rows["vtc-cls"]["origin"] == "built-in"
    assert rows["vtc-cls-ensemble"]["params"]["start_layer"]["default"] == -4
    assert rows["topk"]["role"] == "selector" and rows["llava"]["role"] == "adapter"
    assert rows["llava"]["supports"] == "LlavaForConditionalGeneration"
    assert (rows["gemma3"]["role"], rows["gemma3"]["supports"], rows["gemma3"]["places"]) == (
        "adapter",
        "Gemma3ForConditionalGeneration",
        ["projector"],
    )
    places = {name: rows[name]["places"] for name in ("qwen2-vl", "qwen3-vl", "internvl")}
    assert places == {
        "qwen2-vl": ["vision", "projector", "llm"],
        "qwen3-vl": ["projector", "llm"],
        "internvl": ["projector", "llm"],
    }


def test_list_table_shows_each_adapters_places_as_specs_write_them():
    result = runner.invoke(app, ["list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 4}
    assert "places: vision:L, projector, llm:K" in lines["qwen2-vl"]
    assert "places: projector, llm:K" in lines["internvl"] and "places: projector " in lines["gemma3"]


@pytest.mark.parametrize("command", ["list", "run", "compare", "visualize", "bench"])
def test_help_has_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Example" in result.stdout


def test_run_json(tiny, tmp_path):
    image = tmp_path / "img.png"
    images(1, seed=4)[0].save(image)
    result = runner.invoke(
        app,
        [
            "run",
            "--model",
            str(tiny.path),
            "--image",
            str(image),
            "--prompt",
            "what colour is the square",
            "--strategy",
            "vtc-cls@5",
            "--max-new-tokens",
            "3",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert isinstance(out["text"], str)
    (stage,) = out["stages"]
    assert stage["name"] == "vtc-cls@5" and stage["tokens_in"] == N_PATCHES and stage["tokens_out"] == 5
    (kept,) = stage["kept"]
    assert kept == sorted(kept) and len(set(kept)) == 5 and max(kept) < N_PATCHES
    assert out["seq_len_in"] - out["seq_len_out"] == N_PATCHES - 5
    flops = out["llm_flops"]
    assert flops["ratio"] == flops["pruned"] / flops["unpruned"] < 1
    assert flops["pruned"] == layer_flops(out["seq_len_out"], 32, 64) * 3  # tiny LLM: d=32, m=64, 3 layers


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "nope@4"], "unknown strategy 'nope'; known strategies:"),
        (["--strategy", "vtc-cls@0"], "budget 0 keeps no tokens"),
        (["--strategy", "vtc-cls@1.5"], "outside (0, 1]"),
        (["--strategy", "vtc-cls@@"], "malformed"),
        (["--strategy", "vtc-cls@4", "--image", "missing.png"], "does not exist"),
        (["--strategy", "vtc-cls@4", "--model", "/no/such/model"], "cannot load model"),
    ],
)
def test_user_errors_are_one_line(tiny, tmp_path, args, message):
    image = tmp_path / "img.png"
    images(1)[0].save(image)
    base = ["run", "--model", str(tiny.path), "--image", str(image), "--prompt", "what"]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output


def test_visualize_writes_png(tiny, tmp_path):
    from PIL import Image

    image = tmp_path / "img.png"
    images(1)[0].save(image)
    out = tmp_path / "kept.png"
    result = runner.invoke(
        app,
        [
            "visualize",
            "--model",
            str(tiny.path),
            "--image",
            str(image),
            "--strategy",
            "vtc-cls@4,uniform@4",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] > Image.open(out).size[1] > 100
