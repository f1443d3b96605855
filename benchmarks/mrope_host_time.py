"""Time of the prefill's M-RoPE positions: the model's `get_rope_index` (the rule `MRope.prefill` ran
before) against `tokenprune.adapters.mrope.rope_index`, each gathered at the kept columns, on the
prompts `tokenprune bench` builds (one image of `--tokens` merged tokens per prompt, 32 words around it).

On a CPU the time is host time (on a busy machine, measure with `--threads 1`: torch's thread pool
waits for cores another process holds); on CUDA each repeat ends with a synchronisation, so the time is the
host's plus what the device still had to run.

Usage: python benchmarks/mrope_host_time.py [--batch 8] [--tokens 576] [--kept 64] [--repeats 200]
    [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import timeit

import torch
from transformers import AutoModel

from tokenprune.adapters.mrope import rope_index
from tokenprune.adapters.sequence import compact
from tokenprune.bench.archs import TEXT_TOKENS
from tokenprune.testing import tiny_qwen_config
from tokenprune.versions import environment

IMAGE = 5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=576, help="merged tokens per image (a square grid)")
    parser.add_argument("--kept", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: its default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    core = AutoModel.from_config(tiny_qwen_config("qwen2-vl", vocab_size=16, image_token_id=IMAGE))  # its rule only
    side = math.isqrt(args.tokens) * 2  # patches per side, merged 2x2
    ids = torch.cat(
        [
            torch.full((args.batch, 4), 9),
            torch.full((args.batch, args.tokens), IMAGE),
            torch.full((args.batch, TEXT_TOKENS - 4), 9),
        ],
        dim=1,
    ).to(device)
    mask, types = torch.ones_like(ids), (ids == IMAGE).int()
    grid = torch.tensor([[1, side, side]] * args.batch, device=device)
    keep = ids != IMAGE
    keep[:, 4 : 4 + args.kept] = True
    comp = compact(keep)

    def kept(positions: torch.Tensor) -> torch.Tensor:
        return positions.gather(2, comp.source[None].expand(3, -1, -1))

    def old() -> None:
        positions, _ = core.get_rope_index(ids, types, image_grid_thw=grid, attention_mask=mask)
        kept(positions)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def new() -> None:
        positions, _ = rope_index(types == 1, grid, 2, mask)
        kept(positions)
        if device.type == "cuda":
            torch.cuda.synchronize()

    expected, deltas = core.get_rope_index(ids, types, image_grid_thw=grid, attention_mask=mask)
    got, got_deltas = rope_index(types == 1, grid, 2, mask)
    assert torch.equal(got, expected) and torch.equal(got_deltas, deltas)
    row: dict = {"batch": args.batch, "tokens": args.tokens, "kept": args.kept, "device": str(device)}
    for name, fn in (("get_rope_index_ms", old), ("rope_index_ms", new)):
        fn()
        row[name] = min(timeit.repeat(fn, number=args.repeats, repeat=5)) / args.repeats * 1e3
    row["speedup"] = row["get_rope_index_ms"] / row["rope_index_ms"]
    print(json.dumps({**row, "threads": torch.get_num_threads(), "versions": environment()["versions"]}))


if __name__ == "__main__":
    main()
