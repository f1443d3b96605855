"""Writing comparison results: JSON, CSV, PNG plots and a rich table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from rich.table import Table

COLUMNS = ("strategy", "budget", "spec", "kept", "accuracy", "agreement", "kl", "flops_ratio", "latency_ms")


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS) + ["seq_len"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, rows: list[dict[str, Any]], metric: str, reference: float | None = None) -> None:
    """One line per strategy of `metric` against the kept visual tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name in dict.fromkeys(r["strategy"] for r in rows):
        points = sorted((r["kept"], r[metric]) for r in rows if r["strategy"] == name and r[metric] is not None)
        if points:
            ax.plot(*zip(*points, strict=False), marker="o", label=name)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", label="unpruned")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual tokens kept per image")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(rows: list[dict[str, Any]], title: str) -> Table:
    out = Table(title=title)
    for column in COLUMNS[:1] + COLUMNS[2:]:
        out.add_column(column, justify="left" if column in ("strategy", "spec") else "right")
    for row in rows:
        out.add_row(*(fmt(row[c]) for c in COLUMNS[:1] + COLUMNS[2:]))
    return out
