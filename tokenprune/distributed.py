"""Sharding an evaluation over processes started by `torchrun` or `accelerate launch`.

Both launchers set `RANK`, `WORLD_SIZE` and `LOCAL_RANK` (and the rendezvous address). Whole batches
are dealt round-robin to the processes, so every batch is computed exactly as a single process would
compute it; results are gathered over `gloo` (CPU tensors, small per-sample records), so no GPU
collective is needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import InputError


@dataclass(frozen=True)
class Shard:
    """This process's share of an evaluation: `rank` of `world_size` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batch_indices(self, count: int) -> list[int]:
        """The batch numbers (of `count`) this process evaluates: every `world_size`-th from `rank`."""
        return list(range(self.rank, count, self.world_size))

    def device(self, device: str) -> str:
        """`device` for this process: a bare `"cuda"` becomes `cuda:LOCAL_RANK` when sharded."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world_size > 1 else device

    @classmethod
    def from_env(cls) -> Shard:
        """The shard the launcher's `RANK`, `WORLD_SIZE` and `LOCAL_RANK` describe (one process when unset).

        Raises:
            InputError: `RANK`/`WORLD_SIZE` are inconsistent.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world < 1 or not 0 <= rank < world:
            raise InputError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent; need 0 <= RANK < WORLD_SIZE")
        return cls(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (every process must call this together)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, item: Any) -> Any:
        """Rank 0's `item` (picklable), on every process."""
        if self.world_size == 1:
            return item
        box = [item]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, items: list[Any]) -> list[Any]:
        """Every process's `items` (picklable), concatenated in rank order, on every process."""
        if self.world_size == 1:
            return list(items)
        parts: list[list[Any] | None] = [None] * self.world_size
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]


@contextmanager
def shard_from_env() -> Iterator[Shard]:
    """The shard described by the launcher's environment (one process when there is none); joins
    and leaves the process group around the block.

    Raises:
        InputError: `RANK`/`WORLD_SIZE` are inconsistent.
    """
    shard = Shard.from_env()
    if shard.world_size == 1:
        yield shard
        return
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    try:
        yield shard
    finally:
        if owned:
            dist.destroy_process_group()
