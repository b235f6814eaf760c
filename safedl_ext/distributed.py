"""Pieces for running under ``torchrun`` (issue 14; the distributed scan is not built yet).

:func:`shard_range` and :class:`ExactShardSampler` split ``n`` samples over ``world`` ranks
so that every sample is seen exactly once: contiguous blocks of ``n // world`` samples, the
first ``n % world`` ranks one more (uneven shards; ``DistributedSampler`` instead pads by
repeating samples, which would count them twice in a scan). :func:`world_info` reads the
rank and world size of a process group, ``(0, 1)`` outside one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["ExactShardSampler", "shard_range", "world_info"]


def world_info(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (the default group when ``None``), or ``(0, 1)``
    when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check(n: int, rank: int, world: int) -> None:
    for name, v in (("n", n), ("rank", rank), ("world", world)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")


def shard_range(n: int, rank: int, world: int) -> range:
    """The positions ``[start, stop)`` of rank ``rank``'s shard of ``n`` samples: the
    ranks' shards are disjoint, contiguous, in rank order and cover ``range(n)``; sizes
    differ by at most one (the first ``n % world`` ranks hold the extra samples)."""
    _check(n, rank, world)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class ExactShardSampler(Sampler[int]):
    """This rank's share of ``range(n)``, every index on exactly one rank.

    Without ``shuffle`` the shard is :func:`shard_range` in order. With it, every rank
    draws the same permutation of ``range(n)`` from ``seed + epoch`` (:meth:`set_epoch`)
    and takes its :func:`shard_range` of it, so the shards stay disjoint and complete in
    every epoch. ``rank`` and ``world`` default to :func:`world_info` of ``group``.
    """

    def __init__(self, n: int, *, rank: int | None = None, world: int | None = None,
                 shuffle: bool = False, seed: int = 0,
                 group: dist.ProcessGroup | None = None) -> None:
        r, w = world_info(group)
        self.n, self.rank = n, r if rank is None else rank
        self.world = w if world is None else world
        _check(self.n, self.rank, self.world)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.shuffle, self.seed, self.epoch = bool(shuffle), seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose permutation :meth:`__iter__` yields (with ``shuffle``)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's indices (int64, 1-D), in the order :meth:`__iter__` yields them."""
        part = shard_range(self.n, self.rank, self.world)
        if not self.shuffle:
            return torch.arange(part.start, part.stop, dtype=torch.int64)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g)[part.start:part.stop]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return len(shard_range(self.n, self.rank, self.world))
