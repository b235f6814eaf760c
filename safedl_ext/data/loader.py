"""Seeded mini-batches from in-memory tensors (the trainers' data source)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["TensorLoader", "batches"]

Transform = Callable[[Tensor, "torch.Generator | None"], Tensor]


def _check(x: Tensor, y: Tensor, batch_size: int) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    transform: Transform | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass over ``(x, y)`` in mini-batches.

    Args:
        x: (N, ...) inputs. y: (N,) labels (or any (N, ...) tensor).
        batch_size: B.
        shuffle: visit the samples in an order drawn from ``generator`` (one
            ``randperm`` at the start); in their stored order otherwise.
        generator: CPU generator for the order and for ``transform``; the global one if None.
        drop_last: skip a final batch smaller than B.
        transform: ``transform(x_batch, generator) -> x_batch``, e.g.
            ``lambda xb, g: random_crop_flip(xb, generator=g)``; drawn after the order.

    Returns:
        An iterator of (x_batch, y_batch) with B samples each (the last may be smaller
        unless ``drop_last``), on x's and y's devices.
    """
    _check(x, y, batch_size)  # here, not at the first next()
    return _batches(x, y, batch_size, shuffle, generator, drop_last, transform)


def _batches(x: Tensor, y: Tensor, batch_size: int, shuffle: bool,
             generator: torch.Generator | None, drop_last: bool,
             transform: Transform | None) -> Iterator[tuple[Tensor, Tensor]]:
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            xb, yb = x[idx.to(x.device)], y[idx.to(y.device)]
        if transform is not None:
            xb = transform(xb, generator)
        yield xb, yb


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"safedl-loader:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63


class TensorLoader:
    """Reproducible, resumable mini-batches from in-memory tensors.

    Each pass (``for xb, yb in loader``) uses a generator seeded from ``(seed, epoch)``:
    the order and the augmentation of epoch e depend only on the seed and e, so a trainer
    resuming at epoch e calls ``set_epoch(e)`` and sees the same batches as an uninterrupted
    run. The epoch counter advances by one at the start of every pass.

    Args:
        x: (N, ...) inputs. y: (N,) labels.
        batch_size: B.
        shuffle: new random order every epoch.
        drop_last: skip a final batch smaller than B.
        seed: the seed of every epoch's generator.
        transform: ``transform(x_batch, generator) -> x_batch`` applied to every batch
            (e.g. :func:`~safedl_ext.data.random_crop_flip`), with the epoch's generator.

    ``len(loader)`` is the number of batches per epoch.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0,
                 transform: Transform | None = None) -> None:
        _check(x, y, batch_size)
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed = seed
        self.transform = transform
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` (>= 0)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        return batches(self.x, self.y, self.batch_size, shuffle=self.shuffle, generator=gen,
                       drop_last=self.drop_last, transform=self.transform)
