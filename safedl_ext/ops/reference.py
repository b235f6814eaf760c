"""Pure-PyTorch references of every native op.

Each function computes exactly what its native twin computes, in the same order of
operations where that decides the last bit (the L-inf step is bit-identical in float32).
Tests compare the native ops with these, benchmarks race them, and the package falls back
to them when the extension is not built.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["opmath_dtype", "pgd_step_"]


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
