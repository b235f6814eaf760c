"""Exact-once sharding for runs under torchrun (issue 14's sampler), on one process and
on two gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from safedl_ext.distributed import ExactShardSampler, shard_range, world_info


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_index_on_exactly_one_rank(shuffle):
    for n in (0, 1, 2, 7, 100, 101, 50_000):
        for world in (1, 2, 3, 4, 7, 8):
            parts = [ExactShardSampler(n, rank=r, world=world, shuffle=shuffle, seed=3)
                     for r in range(world)]
            got = torch.cat([p.indices() for p in parts])
            assert got.numel() == n  # nothing repeated, nothing padded
            assert torch.equal(got.sort().values, torch.arange(n))
            sizes = [len(p) for p in parts]
            assert sizes == [len(list(p)) for p in parts]
            assert max(sizes) - min(sizes) <= (1 if n else 0)
            assert sorted(sizes, reverse=True) == sizes  # the first ranks hold the extra


def test_shards_are_contiguous_in_rank_order_and_epochs_reshuffle():
    assert [shard_range(10, r, 4) for r in range(4)] == [range(0, 3), range(3, 6),
                                                       range(6, 8), range(8, 10)]
    s = ExactShardSampler(1000, rank=1, world=3, shuffle=True, seed=0)
    first = s.indices()
    s.set_epoch(1)
    second = s.indices()
    assert not torch.equal(first, second)
    s.set_epoch(0)
    assert torch.equal(s.indices(), first)  # the same seed and epoch: the same shard


def test_refuses_bad_arguments():
    for kw, msg in ((dict(n=-1, rank=0, world=1), "n must"), (dict(n=5, rank=2, world=2),
                    "rank must"), (dict(n=5, rank=0, world=0), "world must")):
        with pytest.raises(ValueError, match=msg):
            ExactShardSampler(kw.pop("n"), **kw)
    with pytest.raises(TypeError, match="n must be an int"):
        shard_range(5.0, 0, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        ExactShardSampler(5, rank=0, world=1, seed=-1)
    with pytest.raises(ValueError, match="epoch"):
        ExactShardSampler(5, rank=0, world=1).set_epoch(-1)


def test_outside_a_process_group_one_rank_holds_everything():
    assert world_info() == (0, 1)
    assert list(ExactShardSampler(5)) == [0, 1, 2, 3, 4]


def _worker(rank: int, world: int, init: str, n: int) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        s = ExactShardSampler(n, shuffle=True, seed=7)  # rank and world from the group
        assert (s.rank, s.world) == (rank, world)
        mine = s.indices()
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([mine.numel()]))
        biggest = int(max(t.item() for t in sizes))
        padded = torch.full((biggest,), -1, dtype=torch.int64)
        padded[:mine.numel()] = mine
        got = [torch.empty(biggest, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(got, padded)
        every = torch.cat([g[g >= 0] for g in got])
        assert every.numel() == n and torch.equal(every.sort().values, torch.arange(n))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_gloo_processes_cover_the_data_once(tmp_path):
    """Two processes in a gloo group (a file rendezvous: no ports), an uneven n: the
    gathered shards are every index once."""
    mp.start_processes(_worker, args=(2, f"file://{tmp_path / 'rdzv'}", 1001), nprocs=2,
                       join=True, start_method="spawn")
