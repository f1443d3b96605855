"""Plugins found through real entry points (in a fresh interpreter): the example package in
`plugins/`, installed with pip, and a deliberately broken one. The example's strategies pass the
contract suite; its VipLLaVA adapter passes the adapter checks."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import N_PATCHES, Tiny, build_tiny, images
from reference import cls_attention_eager, topk_reference
from test_contract import check_contract

import tokenprune as tp
from tokenprune.errors import UnsupportedModelError
from tokenprune.models import load
from tokenprune.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "tokenprune-example"


def make_dist(site: Path, name: str, entry_points: str) -> None:
    """An installed-distribution record (dist-info) that importlib.metadata discovers on sys.path."""
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """An environment where the example plugin is pip-installed (into a target directory) and a
    broken plugin's distribution record names a module that does not exist."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(EXAMPLE),
        ],
        check=True,
        timeout=300,
    )
    make_dist(site, "tokenprune-broken", "[tokenprune.strategies]\nbroken = tokenprune_no_such_module.strategies\n")
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return os.environ | {"PYTHONPATH": path}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokenprune.cli.app", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_list_names_plugins_with_origin_and_reports_the_broken_one(plugin_env):
    result = cli(plugin_env, "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["strategies"]}
    assert rows["example-norm"]["origin"] == "plugin tokenprune-example"
    assert rows["example-chunk-mean"]["role"] == "selector"
    assert rows["vtc-cls"]["origin"] == "built-in" and "broken" not in rows
    assert (
        rows["example-vipllava"]["role"] == "adapter"
        and rows["example-vipllava"]["origin"] == "plugin tokenprune-example"
    )
    assert rows["llava"]["role"] == "adapter" and rows["llava"]["origin"] == "built-in"
    assert "plugin 'broken'" in result.stderr and "tokenprune-broken" in result.stderr


def test_cli_runs_plugin_strategies(plugin_env, tiny, tmp_path):
    image = tmp_path / "img.png"
    images(1)[0].save(image)
    for spec in ("example-norm@4", "example-chunk-mean@4", "example-norm+topk@0.5"):
        result = cli(
            plugin_env,
            "run",
            "--model",
            str(tiny.path),
            "--image",
            str(image),
            "--prompt",
            "what",
            "--strategy",
            spec,
            "--max-new-tokens",
            "2",
            "--json",
        )
        assert result.returncode == 0, result.stderr
        stage = json.loads(result.stdout)["stages"][0]
        assert stage["tokens_out"] == (8 if spec.endswith("0.5") else 4)


def register_example(monkeypatch, module: str, table: str):
    """Import a module of the example plugin (it registers on import); restore the registry after."""
    REGISTRY.ensure_loaded()
    saved = dict(getattr(REGISTRY, table))
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    importlib.import_module(module)
    yield
    setattr(REGISTRY, table, saved)
    sys.modules.pop(module, None)


@pytest.fixture
def example_registered(monkeypatch):
    yield from register_example(monkeypatch, "tokenprune_example.strategies", "_strategies")


@pytest.mark.parametrize("name", ["example-norm", "example-chunk-mean"])
def test_example_plugin_passes_the_contract(example_registered, tiny, name):
    check_contract(tiny, name)


@pytest.fixture(scope="module")
def tiny_vipllava(tmp_path_factory) -> Tiny:
    """A tiny VipLLaVA: its projector reads blocks -2 and -3 concatenated, without [CLS]."""
    path = build_tiny(
        tmp_path_factory.mktemp("vip"), "vipllava", seed=4, family="vipllava", vision_feature_layer=[-2, -3]
    )
    model, processor = load(str(path))
    return Tiny(path, model, processor)


@pytest.fixture
def vipllava_registered(monkeypatch):
    yield from register_example(monkeypatch, "tokenprune_example.adapters", "_adapters")


def test_vipllava_is_unsupported_without_the_plugin(tiny_vipllava):
    with pytest.raises(
        UnsupportedModelError,
        match=r"VipLlavaForConditionalGeneration; supported models: .*LlavaForConditionalGeneration \(llava\)",
    ):
        with tp.apply(tiny_vipllava.model, "vtc-cls@4"):
            pass


@pytest.mark.parametrize("name", ["vtc-cls", "vtc-cls-ensemble", "fastv", "divprune", "pool"])
def test_plugin_adapter_passes_the_contract(vipllava_registered, tiny_vipllava, name):
    check_contract(tiny_vipllava, name)


@pytest.mark.parametrize("k", [1, 6])
def test_plugin_adapter_vtc_cls_matches_eager_reference(vipllava_registered, tiny_vipllava, k):
    inputs = tiny_vipllava.inputs(["what colour is the square"] * 2, images(2, seed=3))
    with torch.no_grad(), tp.apply(tiny_vipllava.model, f"vtc-cls@{k}") as run:
        tiny_vipllava.model(**inputs)
    rows = cls_attention_eager(str(tiny_vipllava.path), inputs["pixel_values"])[2]  # feature block: max(-2, -3) of 4
    assert [x.tolist() for x in run.trace[0].stages[0].kept] == [topk_reference(r.tolist(), k) for r in rows]
    assert run.trace[0].seq_len_in - run.trace[0].seq_len_out == N_PATCHES - k


def test_cli_runs_the_plugin_adapter(plugin_env, tiny_vipllava, tmp_path):
    image = tmp_path / "img.png"
    images(1)[0].save(image)
    result = cli(
        plugin_env,
        "run",
        "--model",
        str(tiny_vipllava.path),
        "--image",
        str(image),
        "--prompt",
        "what",
        "--strategy",
        "vtc-cls@5",
        "--max-new-tokens",
        "2",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stages"][0]["tokens_out"] == 5
