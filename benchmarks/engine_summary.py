"""Summarise the H200 runs in `docs/results/bench-h200-engine/` into `docs/results/bench-h200-engine.md`:
each row's share of the oracle's TTFT speed-up (same k, same run), and the before/after comparison of
the engine refactor (runs `before-*` and `after-*`, alternated on one machine).

    python benchmarks/engine_summary.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "docs" / "results"
RUNS = ROOT / "bench-h200-engine"


def rows(run: str) -> list[dict]:
    return json.loads((RUNS / run / "bench.json").read_text())["rows"]


def speedups(run: str) -> list[tuple[str, int, float, float]]:
    """(row, kept, TTFT speed-up, share of the oracle's speed-up at that k) per non-reference row."""
    table = rows(run)
    unpruned = next(r["ttft_ms"] for r in table if r["row"] == "unpruned")
    oracle = {r["kept"]: unpruned / r["ttft_ms"] for r in table if r["row"] == "oracle"}
    out = []
    for r in table:
        if r["row"] in ("unpruned", "oracle"):
            continue
        speed = unpruned / r["ttft_ms"]
        out.append((f"{r['row']} `{r['spec']}`", r["kept"], speed, 100 * (speed - 1) / (oracle[r["kept"]] - 1)))
    return out


def share(run: str, k: int) -> float:
    return next(s for name, kept, _, s in speedups(run) if name.startswith("vtc-cls ") and kept == k)


def main() -> None:
    lines = ["# H200: the engine and the new families", ""]
    lines += ["Random bf16 weights, transformers 5.24, torch 2.11; every ratio is against the same run's rows.", ""]
    lines += ["## LLaVA-1.5-7B, before and after the engine (VTC-CLS's share of the oracle's TTFT speed-up)", ""]
    lines += ["| setting | before (341e539) | after | runs |", "|---|---:|---:|---|"]
    for k in (64, 192):
        before = [share(f"before-b16-{i}", k) for i in range(1, 5)]
        after = [share(f"after-b16-{i}", k) for i in range(1, 5)]
        lines.append(
            f"| batch 16, k = {k} | {statistics.mean(before):.1f}% | {statistics.mean(after):.1f}% | "
            f"4 each, alternated: before {', '.join(f'{s:.1f}' for s in before)}; after "
            f"{', '.join(f'{s:.1f}' for s in after)} |"
        )
    lines.append(
        f"| compiled batch 1 (`reduce-overhead`), k = 64 | {share('before-c1', 64):.1f}% | "
        f"{share('after-c1', 64):.1f}% | 1 each |"
    )
    for run, title in [
        ("qwen2", "Qwen2-VL-7B, batch 8 (in-tower rows: `name@vision:L`)"),
        ("qwen3", "Qwen3-VL-8B, batch 8"),
        ("next", "LLaVA-NeXT (vicuna-7b), 672x672, batch 8"),
        (
            "next-same",
            "LLaVA-NeXT, batch 8, with oracles of the same LLM tokens (`vtc-cls@320` feeds 368 with its "
            "newlines, `vtc-cls@160` 206)",
        ),
        ("internvl", "InternVL3-8B, one 448-px tile, batch 8"),
        ("gemma3", "Gemma-3-4b-it, batch 8"),
    ]:
        lines += [
            "",
            f"## {title}",
            "",
            "| row | kept | TTFT speed-up | share of the oracle's |",
            "|---|---:|---:|---:|",
        ]
        table = rows(run)
        unpruned = next(r["ttft_ms"] for r in table if r["row"] == "unpruned")
        for r in table:
            if r["row"] == "oracle":
                lines.append(f"| oracle | {r['kept']} | {unpruned / r['ttft_ms']:.2f}x | 100% |")
        lines += [f"| {name} | {kept} | {speed:.2f}x | {s:.0f}% |" for name, kept, speed, s in speedups(run)]
        lines.append(
            f"\nUnpruned TTFT {unpruned:.1f} ms; full table: [`{run}/bench.md`](bench-h200-engine/{run}/bench.md)."
        )
    (ROOT / "bench-h200-engine.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
