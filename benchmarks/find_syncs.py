"""Where a pruned prefill makes the host wait for the device (a device-tool run).

Runs one `generate` TTFT of `--spec` on a full-size architecture (random weights, bf16) under
`torch.cuda.set_sync_debug_mode("warn")` and prints each synchronising call with the innermost
tokenprune or transformers frames that made it, so a sync between the vision tower and the LLM
shows where it comes from. Also times the row's eager TTFT against the unpruned model's.

Usage: python benchmarks/find_syncs.py [--arch llava-1.5-7b] [--spec vtc-cls@64]
"""

from __future__ import annotations

import argparse
import statistics
import traceback
import warnings

import torch

from tokenprune import apply, bench


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="llava-1.5-7b")
    parser.add_argument("--spec", default="vtc-cls@64")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    model = bench.build(args.arch, torch.bfloat16, "cuda")
    inputs = bench.inputs(model, 1, bench.image_tokens(model))
    ttft = lambda: bench.clock(lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False), "cuda")  # noqa: E731
    with torch.inference_mode():
        unpruned = statistics.median([ttft() for _ in range(args.repeats + 2)][2:])
        with apply(model, args.spec):
            pruned = statistics.median([ttft() for _ in range(args.repeats + 2)][2:])
            calls = []
            original = warnings.showwarning

            def record(message, category, filename, lineno, file=None, line=None) -> None:
                frames = [
                    f
                    for f in traceback.extract_stack()[:-1]
                    if "tokenprune" in f.filename or "transformers" in f.filename
                ]
                calls.append(
                    (
                        str(message).splitlines()[0],
                        [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[-4:]],
                    )
                )

            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("always")
                    warnings.showwarning = record
                    model.generate(**inputs, max_new_tokens=1, do_sample=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = original
    print(f"eager TTFT: unpruned {unpruned:.1f} ms, {args.spec} {pruned:.1f} ms")
    print(f"{len(calls)} synchronising calls in one {args.spec} TTFT:")
    for message, frames in calls:
        print(" -", message)
        for frame in frames:
            print("     ", frame)


if __name__ == "__main__":
    main()
