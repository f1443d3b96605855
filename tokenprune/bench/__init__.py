"""`tokenprune bench`'s tooling, outside the library's core: `import tokenprune` loads none of it.

* `archs`: the architectures measured (full-size shapes with random weights, and the tiny ones of
  `tokenprune.testing`) and their synthetic prompts;
* `measure`: the reference rows (unpruned, oracle, official route) and the timing of every row;
* `compiled`: `bench --compile`'s CUDA-graph backend, compiled tower and LLM, static KV caches.

Public names of the submodules are reachable from here too (`tokenprune.bench.run`), each submodule
imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOME = {
    **dict.fromkeys(
        (
            "ARCHS",
            "TEXT_TOKENS",
            "budgeted",
            "build",
            "image_tokens",
            "inputs",
            "is_gemma3",
            "is_internvl",
            "is_next",
            "is_qwen",
            "load_checkpoint",
            "with_text_positions",
        ),
        "archs",
    ),
    **dict.fromkeys(("COMPILE_MODES", "compile_model", "graph_backend", "static_cache", "static_inputs"), "compiled"),
    **dict.fromkeys(
        (
            "RowPlan",
            "clock",
            "features_cut_to",
            "markdown",
            "measure_rows",
            "official_route",
            "oracle_route",
            "packed_cut_to",
            "plot",
            "run",
            "soft_tokens_cut_to",
            "timed",
        ),
        "measure",
    ),
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOME[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
