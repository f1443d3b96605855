"""The README stays true: its quickstart is what CI runs, and its Python examples execute."""

import re
from pathlib import Path

from PIL import Image

from tokenprune.demo.scenes import sample

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quickstart_matches_ci():
    quickstart = README.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    install, tests = quickstart
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.split(" && ")[0] in ci.splitlines()
    assert install.split(" && ")[1].startswith("tokenprune compare")
    assert tests in ci.splitlines()


def test_python_examples_run():
    scope = {"image": Image.fromarray(sample("eval", 0)[0].render())}
    for block in re.findall(r"```python\n(.*?)```", README, re.DOTALL):
        exec(compile(block, "README.md", "exec"), scope)
    assert len(scope["run"].trace[0].stages[0].kept[0]) == 36
