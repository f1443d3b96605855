"""Benchmark the README's main job: the default `tokenprune compare` on the demo model.

Writes `docs/results/<name>/` (results.json, results.csv, plots), `docs/results/<name>-timing.json`
and a markdown table `docs/results/<name>.md`. Usage:

    python benchmarks/demo_compare.py                      # the default run, timed
    python benchmarks/demo_compare.py --name sweep --limit 2000 --budgets 0.25,0.125,0.0625 \
        --strategies "vtc-cls,vtc-cls(layer=-1),vtc-cls-ensemble(start_layer=0),..."
    python benchmarks/demo_compare.py --name demo-qwen-default --model demo-qwen   # the Qwen2-VL demo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from tokenprune.versions import environment

ROOT = Path(__file__).resolve().parents[1]


def markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| strategy | spec | kept | accuracy | agreement | KL | LLM FLOPs | latency/sample |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        kept = "all" if r["kept"] is None else f"{r['kept']:.0f}"
        lines.append(
            f"| {r['strategy']} | `{r['spec'] or '-'}` | {kept} | {acc} | {100 * r['agreement']:.1f}% | "
            f"{r['kl']:.3f} | {r['flops_ratio']:.2f} | {r['latency_ms']:.2f} ms |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="demo-default")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--budgets")
    parser.add_argument("--strategies")
    parser.add_argument("--model", help="demo (the default), demo-qwen, or a checkpoint path")
    args = parser.parse_args()
    out = ROOT / "docs" / "results" / args.name
    command = [sys.executable, "-m", "tokenprune.cli.app", "compare", "--out", str(out), "--overwrite"]
    for flag in ("limit", "budgets", "strategies", "model"):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    timing = {
        "command": " ".join(command[1:]).replace(str(ROOT) + "/", ""),
        "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        **environment(),
    }
    (ROOT / "docs" / "results" / f"{args.name}-timing.json").write_text(json.dumps(timing, indent=2))
    rows = json.loads((out / "results.json").read_text())["rows"]
    title = f"{args.name}: {seconds:.0f} s wall on {environment()['platform']}"
    (ROOT / "docs" / "results" / f"{args.name}.md").write_text(markdown(rows, title))
    print(f"{seconds:.1f} s")


if __name__ == "__main__":
    main()
