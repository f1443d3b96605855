"""Plugins found through real entry points (in a fresh interpreter): the example package in
`plugins/` and a deliberately broken one. The example's strategies pass the contract suite."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import images
from test_contract import check_contract
from tokenprune.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "tokenprune-example"
EXAMPLE_EP = 'example = "tokenprune_example.strategies"'


def make_dist(site: Path, name: str, entry_points: str) -> None:
    """An installed-distribution record (dist-info) that importlib.metadata discovers on sys.path."""
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    assert EXAMPLE_EP in (EXAMPLE / "pyproject.toml").read_text()
    site = tmp_path_factory.mktemp("site")
    make_dist(site, "tokenprune-example", "[tokenprune.strategies]\n" + EXAMPLE_EP.replace('"', "") + "\n")
    make_dist(site, "tokenprune-broken", "[tokenprune.strategies]\nbroken = tokenprune_no_such_module.strategies\n")
    path = os.pathsep.join([str(site), str(EXAMPLE / "src"), os.environ.get("PYTHONPATH", "")])
    return os.environ | {"PYTHONPATH": path}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenprune.cli.app", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_list_names_plugins_with_origin_and_reports_the_broken_one(plugin_env):
    result = cli(plugin_env, "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["strategies"]}
    assert rows["example-norm"]["origin"] == "plugin tokenprune-example"
    assert rows["example-chunk-mean"]["role"] == "selector"
    assert rows["vtc-cls"]["origin"] == "built-in" and "broken" not in rows
    assert "plugin 'broken'" in result.stderr and "tokenprune-broken" in result.stderr


def test_cli_runs_plugin_strategies(plugin_env, tiny, tmp_path):
    image = tmp_path / "img.png"
    images(1)[0].save(image)
    for spec in ("example-norm@4", "example-chunk-mean@4", "example-norm+topk@0.5"):
        result = cli(plugin_env, "run", "--model", str(tiny.path), "--image", str(image), "--prompt", "what",
                     "--strategy", spec, "--max-new-tokens", "2", "--json")
        assert result.returncode == 0, result.stderr
        stage = json.loads(result.stdout)["stages"][0]
        assert stage["tokens_out"] == (8 if spec.endswith("0.5") else 4)


@pytest.fixture
def example_registered(monkeypatch):
    REGISTRY.ensure_loaded()
    saved = dict(REGISTRY._strategies)
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    import tokenprune_example.strategies  # noqa: F401  (registers on import)

    yield
    REGISTRY._strategies = saved
    sys.modules.pop("tokenprune_example.strategies", None)


@pytest.mark.parametrize("name", ["example-norm", "example-chunk-mean"])
def test_example_plugin_passes_the_contract(example_registered, tiny, name):
    check_contract(tiny, name)
