"""Python face of the sketch ops: ``safedl::srht_project`` and ``safedl::gram_update_``.

Fake kernels are registered here for ``torch.compile``/``opcheck``; the wrappers validate
arguments and run the native op, or the pure-PyTorch reference without the extension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _NATIVE, reference

__all__ = ["gram_symmetrize", "gram_update_", "srht_project"]

_SEED_MAX = (1 << 63) - 1

if _NATIVE:

    @torch.library.register_fake("safedl::srht_project")
    def _srht_project_fake(rows: Tensor, out_dim: int, seed: int) -> Tensor:
        return rows.new_empty((rows.shape[0], out_dim))

    @torch.library.register_fake("safedl::gram_update_")
    def _gram_update_fake(gram, sums, counts, buffer, fill, rows, class_ids, flush) -> None:
        return None

    @torch.library.register_fake("safedl::gram_symmetrize")
    def _gram_symmetrize_fake(gram: Tensor, mean: Tensor, count: int, center: bool) -> Tensor:
        return gram.new_empty(gram.shape)


def gram_symmetrize(gram: Tensor, mean: Tensor, count: int, center: bool) -> Tensor:
    """One class's Gram matrix as :func:`gram_update_` left it (upper triangle valid) as the
    full symmetric matrix, minus ``count * outer(mean, mean)`` when ``center`` (computed in
    float64, stored in gram's dtype).

    Args:
        gram: (d, d) float32/float64. mean: (d,) float64. count: rows summed into gram.
    Returns:
        (d, d) of gram's dtype.
    """
    if _NATIVE:
        return torch.ops.safedl.gram_symmetrize(gram, mean, int(count), bool(center))
    return reference.gram_symmetrize(gram, mean, int(count), bool(center))


def srht_project(rows: Tensor, out_dim: int, seed: int = 0) -> Tensor:
    """Structured random projection (subsampled randomized Hadamard transform) of rows.

    ``out[b] = sqrt(1/k) * P H S [rows[b], 0...]``: S flips signs, H is the Walsh-Hadamard
    transform of the zero-padded row (size D = next power of two >= d), P keeps k of its D
    coordinates. S and P come from a counter-based generator keyed by ``seed``, so nothing
    of size d x k is stored and every process and device computes the same projection.
    ``E ||out[b]||^2 = ||rows[b]||^2`` and inner products are preserved in expectation.
    Cost: D log2 D additions per row.

    Args:
        rows: (B, d) float32 or float64, CPU or CUDA.
        out_dim: k, 1 <= k <= D.
        seed: non-negative int selecting the projection.
    Returns:
        (B, k) tensor of rows' dtype and device.
    """
    if not isinstance(rows, Tensor):
        raise TypeError(f"rows must be a tensor, got {type(rows).__name__}")
    if rows.dim() != 2:
        raise ValueError(f"rows must be a (B, d) matrix, got shape {tuple(rows.shape)}")
    if rows.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"rows must be float32 or float64, got {rows.dtype}")
    n = 1 << reference.transform_bits(rows.shape[1])
    if isinstance(out_dim, bool) or not isinstance(out_dim, int) or not 1 <= out_dim <= n:
        raise ValueError(f"out_dim must be an int in [1, {n}] for d={rows.shape[1]}, "
                         f"got {out_dim!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _SEED_MAX:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if _NATIVE:
        return torch.ops.safedl.srht_project(rows, out_dim, seed)
    return reference.srht_project(rows, out_dim, seed)


def gram_update_(
    gram: Tensor, sums: Tensor, counts: Tensor, buffer: Tensor, fill: Tensor, rows: Tensor,
    class_ids: Tensor, flush: bool = False,
) -> None:
    """Route rows by class into per-class Gram matrices (see ``csrc/safedl.cpp``).

    Only the upper triangle of each ``gram[c]`` is maintained; read it as
    ``triu(g) + triu(g, 1).T``. Shapes: gram (C, d, d), sums (C, d), counts (C,) int64,
    buffer (C, cap, d), fill (C,) int64 on the CPU, rows (B, d), class_ids (B,) int64.
    """
    if _NATIVE:
        torch.ops.safedl.gram_update_(gram, sums, counts, buffer, fill, rows, class_ids, flush)
    else:
        if rows.shape[0] and (int(class_ids.min()) < 0 or int(class_ids.max()) >= gram.shape[0]):
            raise ValueError(f"class_ids must be in [0, {gram.shape[0]}), got values in "
                             f"[{int(class_ids.min())}, {int(class_ids.max())}]")
        reference.gram_update_(gram, sums, counts, buffer, fill, rows, class_ids, flush)
