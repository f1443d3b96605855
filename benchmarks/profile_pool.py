"""Time the `pool` selector on the device, alone and inside LLaVA-1.5-7B's image encoding, square
and non-square k (a device-tool run): where do non-square pool rows spend their encode time?

Usage: python benchmarks/profile_pool.py OUT.txt
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import tokenprune as tp
from tokenprune import bench

pool = tp.create("pool")
tokens = torch.randn(8, 576, 1024, device="cuda", dtype=torch.bfloat16)
lines = []


def profiled(fn, title: str) -> None:
    """`fn`'s median time, then one profiled call: operators by CUDA time and by CPU time."""
    lines.append(f"{title}: {bench.timed(fn, 20, 'cuda', 3):.2f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    lines.append(events.table(sort_by="cuda_time_total", row_limit=10))
    lines.append(events.table(sort_by="cpu_time_total", row_limit=10))


for k in (64, 128, 192):
    profiled(lambda k=k: pool.reduce(tp.SelectContext(tokens=tokens, k=k, grid=(24, 24))), f"selector alone, k={k}")
model = bench.build("llava-1.5-7b", torch.bfloat16, "cuda")
pixels = bench.inputs(model, 1, 576)["pixel_values"]
with torch.inference_mode():
    profiled(lambda: model.model.get_image_features(pixel_values=pixels), "encode, unpruned")
    for k in (64, 128):
        with tp.apply(model, f"pool@{k}"):
            profiled(lambda: model.model.get_image_features(pixel_values=pixels), f"encode, pool@{k}")
open(sys.argv[1], "w").write("\n".join(lines))
print("\n".join(line for line in lines if line.endswith(" ms")))
