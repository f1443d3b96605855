"""Where a pruned prefill's time goes, next to the oracle's (a device-tool run; see docs/benchmarks.md).

Times one prefill forward (as `generate` runs it: logits of the last position only) for the unpruned
model, the oracle at k (as `tokenprune bench` builds it for the architecture) and `SPEC@k`, at each
batch size, then profiles the pruned prefill and the oracle's at the first batch size: Python
functions (cProfile) and device-runtime calls and kernels (torch.profiler, by host and by device time).

`--generate`: time and profile `generate(max_new_tokens=1)` (the TTFT `tokenprune bench` reports) instead
of one forward. `--oracle-k`: the oracle's LLM tokens per image, when they differ from `k` (LLaVA-NeXT keeps its kept
rows' newlines: an oracle of the same LLM tokens).

Usage: python benchmarks/profile_prefill.py OUT_DIR [--arch llava-1.5-7b] [--spec vtc-cls] [--k 64]
    [--oracle-k K] [--batch 1,16] [--generate]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tokenprune import apply, bench
from tokenprune.versions import environment


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", default="llava-1.5-7b")
    parser.add_argument("--spec", default="vtc-cls", help="a strategy spec without budget")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--oracle-k", type=int, default=None, help="the oracle's tokens per image (default: k)")
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--generate", action="store_true", help="generate one token instead of one forward")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = bench.build(args.arch, torch.bfloat16, "cuda")
    n = bench.image_tokens(model)
    spec = bench.budgeted(args.spec, args.k)
    oracle_k = args.k if args.oracle_k is None else args.oracle_k
    rows = []

    def prefill(inputs: dict[str, torch.Tensor]) -> None:
        inputs = bench.with_text_positions(model, inputs)
        with torch.inference_mode():
            if args.generate:
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
            else:
                model(**inputs, logits_to_keep=1)

    for batch in (int(b) for b in args.batch.split(",")):
        full = bench.inputs(model, batch, n)
        short = {**bench.inputs(model, batch, oracle_k), "pixel_values": full["pixel_values"]}
        row = {"batch": batch, "unpruned_ms": bench.timed(lambda full=full: prefill(full), args.repeats, "cuda", 3)}
        with bench.oracle_route(model, oracle_k):
            row["oracle_ms"] = bench.timed(lambda short=short: prefill(short), args.repeats, "cuda", 3)
        with apply(model, spec):
            row["pruned_ms"] = bench.timed(lambda full=full: prefill(full), args.repeats, "cuda", 3)
        row["pruned_over_oracle"] = row["pruned_ms"] / row["oracle_ms"]
        row["speedup_share"] = (row["unpruned_ms"] / row["pruned_ms"]) / (row["unpruned_ms"] / row["oracle_ms"])
        rows.append(row)
        print(json.dumps(row))

    batch = int(args.batch.split(",")[0])
    full = bench.inputs(model, batch, n)
    short = {**bench.inputs(model, batch, oracle_k), "pixel_values": full["pixel_values"]}

    def device_profile(inputs: dict[str, torch.Tensor], name: str) -> None:
        """torch.profiler over 5 prefills: by host time, and by device time (the kernels)."""
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                prefill(inputs)
            torch.cuda.synchronize()
        averages = prof.key_averages()
        (args.out / f"torch_profile{name}.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=45))
        (args.out / f"torch_profile{name}_device.txt").write_text(
            averages.table(sort_by="self_device_time_total", row_limit=45)
        )

    def python_profile(inputs: dict[str, torch.Tensor]) -> str:
        """cProfile of `repeats` prefills: tokenprune's functions by cumulative time, then every
        function by own time."""
        prefill(inputs)
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.repeats):
            prefill(inputs)
        torch.cuda.synchronize()
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats("tokenprune", 40)
        stats.sort_stats("tottime").print_stats(30)
        return text.getvalue()

    with bench.oracle_route(model, oracle_k):
        (args.out / "cprofile_oracle.txt").write_text(python_profile(short))
        device_profile(short, "_oracle")
    with apply(model, spec):
        (args.out / "cprofile.txt").write_text(python_profile(full))
        device_profile(full, "")
    (args.out / "prefill.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "spec": spec,
                "oracle_k": oracle_k,
                "generate": args.generate,
                "arch": args.arch,
                **environment(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
