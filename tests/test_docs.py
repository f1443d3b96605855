"""The docs site builds with `mkdocs build --strict`, and the tutorial's code runs, so neither can rot."""

import os
import re
import subprocess
import sys
from pathlib import Path

import tokenprune as tp
import tokenprune.signals
from tokenprune.adapters import providers
from tokenprune.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "writing-strategies.md"


def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in (
        "tokenprune.apply.apply",
        "tokenprune.pipeline.Pipeline",
        "tokenprune.strategy.Selector",
        "tokenprune.integrations.harness.PrunedLMM",
        "tokenprune.distributed.Shard",
    ):
        assert f'id="{name}"' in api
    for page in ("adapters", "evaluation", "strategies", "writing-strategies", "cli"):
        assert (tmp_path / "site" / page / "index.html").is_file()


def test_writing_strategies_tutorial_runs(capsys, monkeypatch):
    monkeypatch.setattr(tokenprune.signals, "_TYPES", dict(tokenprune.signals._TYPES))  # the tutorial's
    monkeypatch.setattr(providers, "_EXTRA", {k: list(v) for k, v in providers._EXTRA.items()})  # leave with it
    REGISTRY.ensure_loaded()
    saved = dict(REGISTRY._strategies)
    try:
        scope: dict = {}
        for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL):
            exec(compile(block, str(DOC), "exec"), scope)
        printed = capsys.readouterr().out.splitlines()
        assert [line.split()[:2] for line in printed] == [
            ["feature-norm@36", "36"],
            ["last-cls@36", "36"],
            ["vtc-cls+topk-plus-rest@36", "36"],
        ]
        red = tp.create("topk-plus-rest").reduce(tp.SelectContext(tokens=_case()[0], scores=_case()[1], k=3))
        assert red.index.shape == (1, 3) and abs(float(red.weights.sum()) - 3.0) < 1e-5
        assert scope["spread_run"].trace[0].scoring_flops > 0  # the tutorial's signal counted its cost
        assert scope["ValueNorm"].place == "vision" and tp.create("value-norm").signals(
            tp.ModelInfo(vision_layers=4)
        ) == (scope["ValueNorm"](layer=2),)
    finally:
        REGISTRY._strategies = saved


def _case():
    import torch

    return torch.randn(1, 8, 4), torch.arange(8.0).view(1, 8)


def test_getting_started_example_runs():
    from PIL import Image

    from tokenprune.demo.scenes import sample

    scope = {"image": Image.fromarray(sample("eval", 0)[0].render())}
    for block in re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "index.md").read_text(), re.DOTALL):
        exec(compile(block, "docs/index.md", "exec"), scope)
    assert scope["run"].trace[0].stages[0].tokens_out == 36 and scope["out"].shape[0] == 1


def test_strategy_catalogue_lists_every_built_in_with_its_places():
    rows = {}
    for line in (ROOT / "docs" / "strategies.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 6:
            rows[cells[0].strip("`")] = cells
    built_in = {name: e for name, e in tp.list_strategies().items() if e.origin == "built-in"}
    assert set(rows) == set(built_in)
    kinds = {"projector": "`projector`", "vision": "`vision:L`", "llm": "`llm:K`"}
    for name, entry in built_in.items():
        assert rows[name][1] == entry.role
        if entry.role == "scorer":
            assert rows[name][4] == ", ".join(kinds[k] for k in entry.cls.places)
