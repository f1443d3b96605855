"""Where a compiled batch-1 time to first token goes (a device-tool run; see docs/benchmarks.md).

Measures `generate` TTFT (one new token) for the unpruned model, the oracle at k and `vtc-cls@k`,
first eager, then with `compiled.compile_model`, row after row; for each compiled row it records the
warm-up times (compilation, graph recording), the time of one prefill forward without `generate`
(`prefill_forward_ms`), dynamo's counters, and a device profile of one TTFT
(how many kernels were launched one by one, how many CUDA graphs were replayed, how many
times the host waited for the device). Writes
`compiled.json`, `profile_<row>.txt` and `trace_<row>.json` (Chrome trace) into OUT_DIR after every row,
so a run cut short keeps what it measured.

Usage: python benchmarks/profile_compiled.py OUT_DIR [--arch llava-1.5-7b] [--k 64] [--mode cudagraphs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from tokenprune import apply, bench
from tokenprune.bench import compiled
from tokenprune.compat import cache_kwarg
from tokenprune.versions import environment


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", default="llava-1.5-7b")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--mode", default="cudagraphs", choices=compiled.COMPILE_MODES)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = bench.build(args.arch, torch.bfloat16, args.device)
    n = bench.image_tokens(model)
    full, short = bench.inputs(model, 1, n), bench.inputs(model, 1, args.k)
    short["pixel_values"] = full["pixel_values"]
    rows: list[tuple[str, dict[str, torch.Tensor], Callable[[], Any]]] = [
        ("unpruned", full, nullcontext),
        ("oracle", short, lambda: bench.oracle_route(model, args.k)),
        ("vtc-cls", full, lambda: apply(model, f"vtc-cls@{args.k}")),
    ]
    result: dict[str, Any] = {
        "arch": args.arch,
        "k": args.k,
        "mode": args.mode,
        "eager": {},
        "compiled": {},
        **environment(),
    }

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - started
        (args.out / "compiled.json").write_text(json.dumps(result, indent=2))

    def ttft(inputs: dict[str, torch.Tensor], cache: Any) -> float:
        extra = {} if cache is None else {cache_kwarg(): cache}
        if cache is not None:
            cache.reset()
        return bench.clock(lambda: model.generate(**inputs, **extra, max_new_tokens=1, do_sample=False), args.device)

    def prefill(inputs: dict[str, torch.Tensor], cache: Any) -> float:
        """One forward on the prompt, last position's logits only: the first token without generate."""
        cache.reset()
        positions = torch.arange(inputs["input_ids"].shape[1], device=args.device)
        return bench.clock(
            lambda: model(**inputs, **{cache_kwarg(): cache}, cache_position=positions, logits_to_keep=1), args.device
        )

    with torch.inference_mode():
        for name, inputs, enter in rows:
            with enter():
                times = [ttft(inputs, None) for _ in range(args.repeats + 2)][2:]
            result["eager"][name] = statistics.median(times)
            print(name, "eager", result["eager"][name], flush=True)
        save()
        compiled.compile_model(model, args.mode)
        torch._logging.set_logs(recompiles=True, graph_breaks=True, perf_hints=True)
        for name, inputs, enter in rows:
            cache = compiled.static_cache(model, 1, inputs["input_ids"].shape[1] + 1)
            with enter():
                warm = [ttft(inputs, cache) for _ in range(3)]
                print(name, "warm-up", warm, flush=True)
                times = [ttft(inputs, cache) for _ in range(args.repeats)]
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    ttft(inputs, cache)
                forward = [prefill(inputs, cache) for _ in range(args.repeats + 3)][3:]
            events = prof.key_averages()
            count = lambda key, events=events: sum(e.count for e in events if e.key == key)  # noqa: E731
            result["compiled"][name] = {
                "ttft_ms": statistics.median(times),
                "warmup_ms": warm,
                "prefill_forward_ms": statistics.median(forward),
                "kernel_launches": count("cudaLaunchKernel") + count("cuLaunchKernelEx") + count("cudaLaunchKernelExC"),
                "graph_launches": count("cudaGraphLaunch"),
                "host_syncs": count("cudaStreamSynchronize") + count("cudaDeviceSynchronize"),
                "counters": {k: dict(v) for k, v in torch._dynamo.utils.counters.items()},
            }
            (args.out / f"profile_{name}.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=30))
            prof.export_chrome_trace(str(args.out / f"trace_{name}.json"))
            print(
                name,
                "compiled",
                result["compiled"][name]["ttft_ms"],
                "forward",
                result["compiled"][name]["prefill_forward_ms"],
                flush=True,
            )
            save()
            del cache


if __name__ == "__main__":
    main()
