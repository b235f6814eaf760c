"""Pure-PyTorch references of every native op.

Each function computes exactly what its native twin computes, in the same order of
operations where that decides the last bit (the L-inf step is bit-identical in float32).
Tests compare the native ops with these, benchmarks race them, and the package falls back
to them when the extension is not built.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["fwht", "gram_update_", "opmath_dtype", "pgd_step_", "srht_project", "transform_bits"]


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the arithmetic runs in: float32 for half and bfloat16, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _per_sample(p: Tensor, n: int, ndim: int, dtype: torch.dtype) -> Tensor:
    """A one-value or (N,) parameter as a tensor that broadcasts against (N, ...)."""
    p = p.to(dtype)
    if p.numel() == 1:
        return p.reshape(())
    return p.reshape((n,) + (1,) * (ndim - 1))


def pgd_step_(
    x_adv: Tensor,
    x0: Tensor,
    grad: Tensor,
    alpha: Tensor,
    eps: Tensor,
    norm: str,
    lo: float,
    hi: float,
) -> None:
    """Reference of ``safedl::pgd_step_``: one projected-gradient step, in place.

    Args:
        x_adv: (N, ...) current iterate, updated in place.
        x0: (N, ...) clean inputs, the centre of the ball.
        grad: (N, ...) gradient of the loss to ascend w.r.t. ``x_adv``.
        alpha: one value or (N,) step sizes (L-inf: per element; L2: L2 length).
        eps: one value or (N,) ball radii, in the units of the inputs.
        norm: ``"linf"`` or ``"l2"``.
        lo, hi: the box the result is clamped to.
    """
    n = x_adv.shape[0]
    dt = opmath_dtype(x_adv.dtype)
    a = _per_sample(alpha, n, x_adv.dim(), dt)
    e = _per_sample(eps, n, x_adv.dim(), dt)
    x = x_adv.to(dt)
    c = x0.to(dt)
    g = grad.to(dt)
    if norm in ("linf", "inf"):
        out = x + a * torch.sign(g)
        out = torch.minimum(torch.maximum(out, c - e), c + e)
    elif norm == "l2":
        flat = (n, -1)
        gnorm = torch.linalg.vector_norm(g.reshape(flat), dim=1)
        gnorm = gnorm.reshape((n,) + (1,) * (x.dim() - 1))
        step = a / gnorm
        # Zero gradient, or one so small that alpha / ||g|| overflows: no move.
        step = torch.where((gnorm > 0) & torch.isfinite(step), step, torch.zeros_like(step))
        delta = (x + step * g) - c
        dnorm = torch.linalg.vector_norm(delta.reshape(flat), dim=1)
        dnorm = dnorm.reshape(gnorm.shape)
        proj = torch.where(dnorm > e, e / dnorm, torch.ones_like(dnorm))
        out = c + delta * proj
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    x_adv.copy_(out.clamp_(lo, hi))


# ---- linalg: structured projection and the per-class Gram update ----------------------

_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64 finaliser on Python ints (the counter-based generator of sketch_math.h)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix64_np(z):  # numpy uint64 arrays, wrapping arithmetic
    import numpy as np

    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _stream_key(seed: int, stream: int) -> int:
    return _mix64(_mix64(seed & _MASK64) ^ ((0xD1B54A32D192ED03 * (stream + 1)) & _MASK64))


def transform_bits(d: int) -> int:
    """log2 of the padded Walsh-Hadamard size for d coordinates (D = 2^bits >= d)."""
    return max(int(d) - 1, 0).bit_length()


def srht_signs(d: int, seed: int):
    """The +-1 sign flips of coordinates 0..d-1 (numpy float64 array)."""
    import numpy as np

    key = np.uint64(_stream_key(seed, 0))
    i = np.arange(d, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64_np(key ^ (i * np.uint64(0x9E3779B97F4A7C15)))
    return np.where((h >> np.uint64(63)) == 1, -1.0, 1.0)


def srht_pick(d: int, k: int, seed: int):
    """The k distinct transform coordinates the projection keeps (numpy int64 array)."""
    import numpy as np

    bits = transform_bits(d)
    mask = np.uint64((1 << bits) - 1)
    shift = np.uint64(bits // 2 if bits > 1 else 1)
    x = np.arange(k, dtype=np.uint64) & mask
    key = _stream_key(seed, 1)
    with np.errstate(over="ignore"):
        for _ in range(4):
            key = _mix64(key)
            x = (x + np.uint64(key)) & mask
            x = (x * np.uint64((key >> 1) | 1)) & mask
            if bits > 1:
                x ^= x >> shift
    return x.astype(np.int64)


def fwht(x: Tensor) -> Tensor:
    """Unnormalised Walsh-Hadamard transform along the last dimension (a power of two)."""
    b, n = x.shape
    h = 1
    while h < n:
        y = x.reshape(b, n // (2 * h), 2, h)
        x = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2).reshape(b, n)
        h *= 2
    return x


def srht_project(rows: Tensor, out_dim: int, seed: int) -> Tensor:
    """Reference of ``safedl::srht_project``: (B, d) -> (B, out_dim), see sketch_math.h."""
    b, d = rows.shape
    n = 1 << transform_bits(d)
    signs = torch.as_tensor(srht_signs(d, seed), dtype=rows.dtype, device=rows.device)
    padded = torch.zeros((b, n), dtype=rows.dtype, device=rows.device)
    padded[:, :d] = rows * signs
    pick = torch.as_tensor(srht_pick(d, out_dim, seed), device=rows.device)
    return fwht(padded)[:, pick] * (1.0 / math.sqrt(out_dim))


def gram_update_(
    gram: Tensor, sums: Tensor, counts: Tensor, buffer: Tensor, fill: Tensor, rows: Tensor,
    class_ids: Tensor, flush: bool,
) -> None:
    """Reference of ``safedl::gram_update_`` (buffers are not used: every row goes into
    the full Gram matrix at once, so ``triu(gram)`` matches the native op's)."""
    if rows.shape[0]:
        sums.index_add_(0, class_ids, rows)
        counts.index_add_(0, class_ids, torch.ones_like(class_ids))
        for c in torch.unique(class_ids).tolist():
            r = rows[class_ids == c]
            gram[c].addmm_(r.T, r)
    if flush:
        for c in torch.nonzero(fill).flatten().tolist():
            r = buffer[c, : int(fill[c])]
            gram[c].addmm_(r.T, r)
            fill[c] = 0
