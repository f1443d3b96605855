"""The tutorial's code runs, so it cannot rot."""

import re
from pathlib import Path

import tokenprune as tp
from tokenprune.registry import REGISTRY

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-strategies.md"


def test_writing_strategies_tutorial_runs(capsys):
    REGISTRY.ensure_loaded()
    saved = dict(REGISTRY._strategies)
    try:
        scope: dict = {}
        for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL):
            exec(compile(block, str(DOC), "exec"), scope)
        printed = capsys.readouterr().out.splitlines()
        assert [line.split()[:2] for line in printed] == [
            ["feature-norm@36", "36"], ["last-cls@36", "36"], ["vtc-cls+topk-plus-rest@36", "36"]]
        red = tp.create("topk-plus-rest").reduce(*_case(), 3)
        assert red.index.shape == (1, 3) and abs(float(red.weights.sum()) - 3.0) < 1e-5
    finally:
        REGISTRY._strategies = saved


def _case():
    import torch

    return torch.randn(1, 8, 4), torch.arange(8.0).view(1, 8)
