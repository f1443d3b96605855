"""Where the host waits for the device during one `generate` (a device-tool run; see docs/benchmarks.md).

Builds a `tokenprune bench` architecture (random bf16 weights), warms up, then runs one
`generate(max_new_tokens=1)` for the oracle at `--oracle-k` tokens and one under `SPEC@k`, each with
torch's CUDA sync debug mode on, and counts the synchronisations by call site (the innermost frames in
tokenprune or transformers). Writes `OUT` (JSON) and prints the counts.

Usage: python benchmarks/host_syncs.py OUT.json [--arch llava-v1.6-vicuna-7b] [--spec vtc-cls] [--k 160]
    [--oracle-k 206] [--batch 8]
"""

from __future__ import annotations

import argparse
import collections
import json
import traceback
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tokenprune import apply
from tokenprune.bench.archs import budgeted, build, image_tokens, inputs, with_text_positions
from tokenprune.bench.measure import oracle_route
from tokenprune.versions import environment


def call_site(depth: int = 4) -> str:
    """The innermost `depth` frames of the current stack in tokenprune or transformers."""
    frames = [f for f in traceback.extract_stack()[:-2] if "tokenprune" in f.filename or "transformers" in f.filename]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in frames[::-1][:depth])


def count_syncs(run: Callable[[], Any]) -> collections.Counter[str]:
    """Synchronisations during `run()`, by call site."""
    sites: collections.Counter[str] = collections.Counter()
    previous = warnings.showwarning
    warnings.showwarning = lambda *args, **kwargs: sites.update([call_site()])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = previous
    return sites


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", default="llava-v1.6-vicuna-7b")
    parser.add_argument("--spec", default="vtc-cls", help="a strategy spec without budget")
    parser.add_argument("--k", type=int, default=160)
    parser.add_argument("--oracle-k", type=int, default=None, help="the oracle's tokens per image (default: k)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    oracle_k = args.k if args.oracle_k is None else args.oracle_k
    model = build(args.arch, torch.bfloat16, "cuda")
    full = inputs(model, args.batch, image_tokens(model))
    short = {**inputs(model, args.batch, oracle_k), "pixel_values": full["pixel_values"]}

    def generate(given: dict[str, torch.Tensor]) -> None:
        with torch.inference_mode():
            model.generate(**with_text_positions(model, given), max_new_tokens=1, do_sample=False)

    cases: dict[str, tuple[Callable[[], AbstractContextManager[Any]], dict[str, torch.Tensor]]] = {
        "oracle": (lambda: oracle_route(model, oracle_k), short),
        "pruned": (lambda: apply(model, budgeted(args.spec, args.k)), full),
    }
    result: dict[str, Any] = {"arch": args.arch, "spec": budgeted(args.spec, args.k), "oracle_k": oracle_k}
    for name, (context, given) in cases.items():
        with context():
            for _ in range(2):
                generate(given)
            torch.cuda.synchronize()
            sites = count_syncs(partial(generate, given))
        result[name] = {"total": sum(sites.values()), "sites": sites.most_common()}
        print(f"{name}: {result[name]['total']} synchronisations")
        for site, count in sites.most_common():
            print(f"  {count:3d} {site}")
    args.out.write_text(json.dumps({**result, **environment()}, indent=2))


if __name__ == "__main__":
    main()
