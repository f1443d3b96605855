"""Versions and environment recorded in every result file."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """Package versions, Python, platform and accelerator."""
    packages: dict[str, str | None] = {}
    for name in ("tokenprune", "torch", "transformers", "pydantic"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "versions": packages,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
    }
