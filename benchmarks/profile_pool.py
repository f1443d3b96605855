"""Time the `pool` selector alone on the device, square and non-square k (a device-tool run).

Usage: python benchmarks/profile_pool.py OUT.txt
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import tokenprune as tp
from tokenprune.bench import timed

pool = tp.create("pool")
tokens = torch.randn(8, 576, 1024, device="cuda", dtype=torch.bfloat16)
lines = []
for k in (64, 128, 192):
    ms = timed(lambda: pool.reduce(tokens, None, k, (24, 24)), 20, "cuda", 3)
    lines.append(f"k={k}: {ms:.2f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pool.reduce(tokens, None, k, (24, 24))
        torch.cuda.synchronize()
    lines.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
open(sys.argv[1], "w").write("\n".join(lines))
print("\n".join(l for l in lines if l.startswith("k=")))
