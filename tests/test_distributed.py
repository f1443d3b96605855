"""Sharding an evaluation: batches dealt round-robin, results gathered in batch order, and the
launcher's environment validated."""

import pytest
import torch

from tokenprune.distributed import Shard, shard_from_env
from tokenprune.errors import InputError
from tokenprune.evaluation import demo_samples, evaluate
from tokenprune.models import load
from tokenprune.pipeline import Pipeline


@pytest.mark.parametrize("count,world", [(7, 2), (5, 3), (2, 4), (0, 2)])
def test_batches_are_dealt_round_robin_and_cover_everything_once(count, world):
    shares = [Shard(rank=r, world_size=world).batch_indices(count) for r in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(count))
    for rank, share in enumerate(shares):
        assert all(i % world == rank for i in share) and share == sorted(share)


def test_device_follows_local_rank_only_when_sharded():
    assert Shard(rank=3, world_size=4, local_rank=1).device("cuda") == "cuda:1"
    assert Shard().device("cuda") == "cuda"
    assert Shard(rank=1, world_size=2, local_rank=1).device("cpu") == "cpu"
    assert Shard(rank=1, world_size=2, local_rank=1).device("cuda:0") == "cuda:0"


def test_one_process_without_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with shard_from_env() as shard:
        assert shard == Shard() and shard.is_main and shard.gather([1, 2]) == [1, 2]


@pytest.mark.parametrize("rank,world", [("2", "2"), ("-1", "2"), ("0", "0")])
def test_inconsistent_launcher_environment_is_refused(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(InputError, match="RANK=.* WORLD_SIZE=.* inconsistent"):
        with shard_from_env():
            pass


def test_shards_together_equal_one_process_batch_for_batch():
    model, processor = load("demo")
    samples = demo_samples(7)
    pipelines = [None, Pipeline.from_spec("vtc-cls@0.25"), Pipeline.from_spec("fastv@0.5")]
    whole = evaluate(model, processor, samples, pipelines, 2, "cpu")
    shards = [evaluate(model, processor, samples, pipelines, 2, "cpu", Shard(rank=r, world_size=3)) for r in range(3)]
    for slot in range(len(pipelines)):
        merged = sorted((r for part in shards for r in part[slot]), key=lambda r: r.batch)
        assert [r.batch for r in merged] == [r.batch for r in whole[slot]] == [0, 1, 2, 3]
        for got, want in zip(merged, whole[slot], strict=False):
            assert torch.equal(got.pred, want.pred) and torch.equal(got.reference, want.reference)
            assert torch.equal(got.kl, want.kl) and got.lengths == want.lengths and got.kept == want.kept
    assert [r.kept for r in whole[1]] == [[36, 36]] * 3 + [[36]] and whole[0][0].kept is None  # per image
    assert all(float(r.kl.abs().max()) == 0.0 for r in whole[0])
