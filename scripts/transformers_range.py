"""The transformers range pyproject.toml declares: `python scripts/transformers_range.py oldest|spec`.

`oldest` prints the lower bound (the oldest release CI tests), `spec` the whole specifier.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def transformers_requirement() -> Requirement:
    """The `transformers` entry of the project's dependencies."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == "transformers")


def oldest() -> str:
    """The version of the `>=` bound."""
    return next(s.version for s in transformers_requirement().specifier if s.operator == ">=")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "spec"
    print(oldest() if what == "oldest" else str(transformers_requirement().specifier))
