"""Writing comparison results: JSON, CSV, PNG plots (each replaced atomically) and a rich table."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from rich.table import Table

from .rundir import SUMMARY, atomic_write

COLUMNS = (
    "strategy",
    "budget",
    "spec",
    "metric",
    "kept",
    "accuracy",
    "agreement",
    "kl",
    "flops_ratio",
    "latency_ms",
    "error",
)
TABLE_COLUMNS = ("strategy", "spec", "kept", "accuracy", "agreement", "kl", "flops_ratio", "latency_ms")

# 20 colours that stay apart (matplotlib's tab10 then its darker/lighter partners), and markers
COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#08306b",
    "#a63603",
    "#00441b",
    "#67000d",
    "#3f007d",
    "#fdae6b",
    "#74c476",
    "#9ecae1",
    "#fa9fb5",
    "#000000",
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p", "d", "8", "H")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    atomic_write(path, write)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(COLUMNS) + ["seq_len"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def family(strategy: str) -> str:
    """The strategy a variant belongs to: its name up to the first `(`, `+`, `@` or `>`."""
    return re.split(r"[(+@>]", strategy, maxsplit=1)[0].strip()


def styles(strategies: list[str]) -> dict[str, dict[str, Any]]:
    """A distinct colour and marker per strategy (in order of appearance), and a line style per
    variant within a family (the first variant solid, the next dashed, dotted, ...). Markers shrink
    along the order and every other one is hollow, so strategies that land on the same points
    still show, one inside the other."""
    out: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    named = [name for name in dict.fromkeys(strategies) if name != "unpruned"]
    if len(named) < len(dict.fromkeys(strategies)):
        out["unpruned"] = {"color": "#555555", "marker": "*", "linestyle": "-", "markersize": 11.0, "fillstyle": "full"}
    for i, name in enumerate(named):
        nth = seen.get(family(name), 0)
        seen[family(name)] = nth + 1
        out[name] = {
            "color": COLOURS[i % len(COLOURS)],
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[nth % len(LINESTYLES)],
            "markersize": max(3.5, 9.0 - 0.4 * i),
            "fillstyle": "full" if i % 2 == 0 else "none",
        }
    return out


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def plot(path: Path, rows: list[dict[str, Any]], metric: str, reference: float | None = None) -> None:
    """One line per strategy of `metric` against the kept visual tokens, legend outside the axes."""
    plt = _pyplot()
    look = styles([r["strategy"] for r in rows])
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for name, style in look.items():
        points = sorted(
            (r["kept"], r[metric]) for r in rows if r["strategy"] == name and r[metric] is not None and r["kept"]
        )
        if points:
            ax.plot(*zip(*points, strict=True), label=name, linewidth=1.4, markeredgewidth=1.3, **style)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual tokens kept per image")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    _save(fig, path)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower x, higher y), by ascending x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot_pareto(path: Path, rows: list[dict[str, Any]], metric: str) -> None:
    """`metric` against LLM prefill FLOPs (and against measured latency per sample), one marker per
    row, the Pareto front (cheaper and at least as good) drawn as a step line."""
    plt = _pyplot()
    look = styles([r["strategy"] for r in rows])
    axes_of = [("flops_ratio", "LLM prefill FLOPs (fraction of unpruned)")]
    if all(r.get("latency_ms") for r in rows):
        axes_of.append(("latency_ms", "measured latency per sample (ms)"))
    fig, axes = plt.subplots(1, len(axes_of), figsize=(6 * len(axes_of) + 1.5, 4.5), dpi=120, squeeze=False)
    for ax, (key, label) in zip(axes[0], axes_of, strict=True):
        usable = [r for r in rows if r.get(key) is not None and r.get(metric) is not None]
        for r in usable:
            style = look[r["strategy"]]
            hollow = style["fillstyle"] == "none"
            ax.scatter(
                r[key],
                r[metric],
                marker=style["marker"],
                s=style["markersize"] ** 2,
                facecolors="none" if hollow else style["color"],
                edgecolors=style["color"],
                linewidths=1.3,
                zorder=3,
            )
        front = pareto_front([(r[key], r[metric]) for r in usable])
        if front:
            xs, ys = zip(*front, strict=True)
            ax.step(xs, ys, where="post", color="black", linewidth=1.2, zorder=2, label="Pareto front")
            ax.scatter(xs, ys, facecolors="none", edgecolors="black", s=90, zorder=4)
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], color=s["color"], marker=s["marker"], fillstyle=s["fillstyle"], linestyle="", label=name)
        for name, s in look.items()
    ]
    handles.append(plt.Line2D([], [], color="black", marker="o", markerfacecolor="none", label="Pareto front"))
    fig.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.suptitle(f"{metric} against cost; the front: no row is cheaper and better", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def write_summary(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """`results.json`, `results.csv` and the plots of `rows`, each replaced atomically; a plot this
    run cannot draw (no answers: no accuracy) is removed, so none from an earlier run survives.

    Returns:
        the names written.
    """
    write_json(out / "results.json", meta, rows)
    write_csv(out / "results.csv", rows)
    written = ["results.json", "results.csv"]
    done = [r for r in rows if not r.get("error")]
    pruned = [r for r in done if r["budget"] is not None]
    unpruned = next((r for r in done if r["budget"] is None), None)
    has_accuracy = any(r.get("accuracy") is not None for r in done)
    if pruned:
        if has_accuracy:
            plot(out / "accuracy.png", pruned, "accuracy", unpruned["accuracy"] if unpruned else None)
            written.append("accuracy.png")
        plot(out / "agreement.png", pruned, "agreement", 1.0 if unpruned else None)
        plot_pareto(out / "pareto.png", done, "accuracy" if has_accuracy else "agreement")
        written += ["agreement.png", "pareto.png"]
    for name in SUMMARY:
        if name not in written:
            (out / name).unlink(missing_ok=True)
    return written


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(rows: list[dict[str, Any]], title: str) -> Table:
    out = Table(title=title)
    for column in TABLE_COLUMNS:
        out.add_column(column, justify="left" if column in ("strategy", "spec") else "right")
    for row in rows:
        if row.get("error"):
            out.add_row(row["strategy"], row["spec"], f"[red]failed: {row['error']}[/red]", *[""] * 5)
        else:
            out.add_row(*(fmt(row[c]) for c in TABLE_COLUMNS))
    return out
