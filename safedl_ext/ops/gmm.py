"""Python face of ``safedl::gmm1d_em``: fake kernel, native/reference dispatch, final E-step.

Importing this module registers the fake (meta) kernel of the op when the extension is
loaded, so ``torch.compile`` and ``torch.library.opcheck`` can trace it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _NATIVE, reference

__all__ = ["e_step", "gmm1d_em", "native_kernel_for"]

_LOG_2PI = 1.8378770664093454835606594728112

if _NATIVE:

    @torch.library.register_fake("safedl::gmm1d_em")
    def _gmm1d_em_fake(values, lengths, weights, means, variances, max_iter, tol, reg_covar):
        c = values.shape[0]
        f64 = dict(dtype=torch.float64, device=values.device)
        return (
            values.new_empty((c, 2), **f64),
            values.new_empty((c, 2), **f64),
            values.new_empty((c, 2), **f64),
            values.new_empty((c,), **f64),
            values.new_empty((c,), dtype=torch.int64, device=values.device),
            values.new_empty((c,), dtype=torch.bool, device=values.device),
        )


def native_kernel_for(device: torch.device) -> bool:
    """Whether the loaded extension has a ``gmm1d_em`` kernel for ``device``'s type."""
    if not _NATIVE:
        return False
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "safedl::gmm1d_em", key)


def gmm1d_em(
    values: Tensor,
    lengths: Tensor,
    weights: Tensor,
    means: Tensor,
    variances: Tensor,
    max_iter: int,
    tol: float,
    reg_covar: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EM of 2-component 1-D Gaussian mixtures over C padded groups: the native op when
    it has a kernel for ``values``' device, else :func:`reference.gmm1d_em` (same
    semantics, documented there).

    Args:
        values: (C, L) float32/float64. lengths: (C,) int64.
        weights, means, variances: (C, 2) float64 initial parameters.

    Returns:
        weights, means, variances (C, 2) float64, lower bound (C,) float64,
        iterations (C,) int64, converged (C,) bool.
    """
    args = (values, lengths, weights, means, variances, int(max_iter), float(tol),
            float(reg_covar))
    if native_kernel_for(values.device):
        return torch.ops.safedl.gmm1d_em(*args)
    with torch.no_grad():
        return reference.gmm1d_em(*args)


def e_step(
    values: Tensor, lengths: Tensor, weights: Tensor, means: Tensor, variances: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Responsibilities, assignments and mean log-likelihood under given parameters.

    This is the final E-step scikit-learn runs after fitting (``predict``/``score``). It is
    one vectorised elementwise pass whose output (C, L, 2) is as large as the input, so it
    runs as plain torch on either device rather than inside the op: the op then returns
    only per-group results, and callers that need only parameters skip it.

    Args:
        values: (C, L) padded values (finite where ``j < lengths[c]``).
        lengths: (C,) int64.
        weights, means, variances: (C, 2) float64; a weight of 0 gives responsibility 0.

    Returns:
        responsibilities (C, L, 2) float64 (0 at padding), assignments (C, L) int64
        (argmax of the responsibilities, ties to component 0; -1 at padding), and the mean
        log-likelihood per point (C,) float64 (0 for empty groups).
    """
    length = values.shape[1]
    f64 = torch.float64
    mask = torch.arange(length, device=values.device)[None, :] < lengths[:, None]
    x = torch.where(mask, values.to(f64), torch.zeros((), dtype=f64, device=values.device))
    d = x[:, None, :] - means[:, :, None]
    a = (torch.log(weights) - 0.5 * (_LOG_2PI + torch.log(variances)))[:, :, None] \
        - 0.5 * d * d / variances[:, :, None]
    lse = torch.logsumexp(a, dim=1)
    resp = torch.exp(a - lse[:, None, :]) * mask[:, None, :].to(f64)
    assign = (a[:, 1, :] > a[:, 0, :]).to(torch.int64)
    assign = torch.where(mask, assign, torch.full_like(assign, -1))
    ll = (lse * mask.to(f64)).sum(1) / lengths.to(f64).clamp_min(1.0)
    return resp.transpose(1, 2).contiguous(), assign, ll
