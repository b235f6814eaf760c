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

__all__ = [
    "fwht",
    "gmm1d_em",
    "gram_symmetrize",
    "gram_update_",
    "opmath_dtype",
    "pgd_step_",
    "srht_project",
    "transform_bits",
]


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the arithmetic runs in: float32 for half and bfloat16, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _per_sample(p: Tensor, n: int, ndim: int, dtype: torch.dtype) -> Tensor:
    """A one-value or (N,) parameter as a tensor that broadcasts against (N, ...)."""
    p = p.to(dtype)
    if p.numel() == 1:
        return p.reshape(())
    return p.reshape((n,) + (1,) * (ndim - 1))


def _l2_norm_parts(v: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's L2 norm as ``div * r``, shaped to broadcast against ``v`` (N, ...).

    ``div`` is the sample's max-abs (1 when that is 0, inf or NaN) and ``r`` the norm of
    ``v / div``, so no square underflows or overflows: unscaled, float32 elements below
    ~1e-19 or above ~1e19 gave a norm of 0 or inf (pgd_math.h, norm_divisor).
    """
    n = v.shape[0]
    flat = v.reshape(n, -1)
    m = flat.abs().amax(dim=1, keepdim=True)  # NaN if the sample holds one
    div = torch.where((m > 0) & (m <= torch.finfo(v.dtype).max), m, torch.ones_like(m))
    r = torch.linalg.vector_norm(flat / div, dim=1, keepdim=True)
    shape = (n,) + (1,) * (v.dim() - 1)
    return div.reshape(shape), r.reshape(shape)


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
        if x_adv.numel() == 0:
            return
        gdiv, gr = _l2_norm_parts(g)
        step = a / gr
        # Zero gradient: no move. (A NaN gradient also gets step 0, but 0 * NaN keeps
        # its NaN elements NaN in the result, as in the native op.)
        step = torch.where((gr > 0) & torch.isfinite(step), step, torch.zeros_like(step))
        delta = (x + step * (g / gdiv)) - c
        ddiv, dr = _l2_norm_parts(delta)
        q = e / ddiv
        proj = torch.where(dr > q, q / dr, torch.ones_like(dr))
        out = c + delta * proj
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    x_adv.copy_(out.clamp_(lo, hi))


# ---- linalg: structured projection and the per-class Gram update ----------------------

_MASK64 = (1 << 64) - 1


def _mix64(z):
    """SplitMix64 finaliser (the counter-based generator of sketch_math.h) on numpy uint64
    values, scalar or array, with wrapping arithmetic."""
    import numpy as np

    with np.errstate(over="ignore"):
        z = np.uint64(z) if np.isscalar(z) else z
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _stream_key(seed: int, stream: int) -> int:
    salt = (0xD1B54A32D192ED03 * (stream + 1)) & _MASK64
    return int(_mix64(int(_mix64(seed & _MASK64)) ^ salt))


def transform_bits(d: int) -> int:
    """log2 of the padded Walsh-Hadamard size for d coordinates (D = 2^bits >= d)."""
    return max(int(d) - 1, 0).bit_length()


def srht_signs(d: int, seed: int):
    """The +-1 sign flips of coordinates 0..d-1 (numpy float64 array)."""
    import numpy as np

    key = np.uint64(_stream_key(seed, 0))
    i = np.arange(d, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(key ^ (i * np.uint64(0x9E3779B97F4A7C15)))
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
            key = int(_mix64(key))
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


def gram_symmetrize(gram: Tensor, mean: Tensor, count: int, center: bool) -> Tensor:
    """Reference of ``safedl::gram_symmetrize``: triu(g) + triu(g, 1)^T (- n mu mu^T)."""
    g = gram.to(torch.float64).triu()
    out = g + g.triu(1).T
    if center:
        out = out - count * torch.outer(mean, mean)
    return out.to(gram.dtype)


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


_LOG_2PI = 1.8378770664093454835606594728112
# scikit-learn adds 10 * machine epsilon to every component's effective count.
_COUNT_EPS = 10.0 * torch.finfo(torch.float64).eps


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
    """Reference of ``safedl::gmm1d_em``: batched EM for 2-component 1-D Gaussian mixtures.

    All groups iterate together (vectorised over groups); a group stops changing after its
    own last iteration. One iteration, as scikit-learn's ``GaussianMixture(2, 'full')``:
    E-step from the current parameters (lower bound = mean log-sum-exp per point), M-step
    (``n_k = sum r_k + 10 eps``, variances ``+ reg_covar``), stop when the lower bound
    changed by less than ``tol`` or after ``max_iter`` iterations.

    Degenerate groups are not iterated: ``lengths[c] == 0`` gives weights ``(1, 0)``, means
    ``(0, 0)``, variances ``(reg_covar, reg_covar)``, log-likelihood 0; a group of one
    point or of equal values ``x`` gives weights ``(1, 0)``, means ``(x, x)``, variances
    ``(reg_covar, reg_covar)`` and log-likelihood ``log N(x | x, reg_covar)``; both report
    0 iterations and converged. A NaN or infinity among a group's values is a ValueError
    naming the group.

    Args:
        values: (C, L) float32/float64, padded; group c is ``values[c, :lengths[c]]``.
        lengths: (C,) int64 in [0, L].
        weights, means, variances: (C, 2) float64 initial parameters (variances > 0).
        max_iter: >= 1. tol: >= 0, on the mean log-likelihood per point. reg_covar: > 0.

    Returns:
        weights, means, variances (C, 2) float64; lower bound (C,) float64 (the mean
        log-likelihood per point of the last E-step, scikit-learn's ``lower_bound_``);
        iterations (C,) int64; converged (C,) bool.
    """
    c, length = values.shape
    dev = values.device
    f64 = torch.float64
    x = values.to(f64)
    mask = torch.arange(length, device=dev)[None, :] < lengths[:, None]
    bad = (~torch.isfinite(x) & mask).any(1)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        shown = ", ".join(str(i) for i in idx[:10])
        more = f", ... ({len(idx)} groups)" if len(idx) > 10 else ""
        raise ValueError(f"values must be finite: NaN or infinity in group(s) {shown}{more}")
    xz = torch.where(mask, x, torch.zeros((), dtype=f64, device=dev))
    inf = torch.tensor(float("inf"), dtype=f64, device=dev)
    lo = torch.where(mask, x, inf).amin(1) if length else torch.zeros(c, dtype=f64, device=dev)
    hi = torch.where(mask, x, -inf).amax(1) if length else lo
    n = lengths.to(f64)
    empty = lengths == 0
    constant = ~empty & (lo == hi)
    fit = ~empty & ~constant

    w = weights.to(f64) / weights.to(f64).sum(1, keepdim=True)
    mu = means.to(f64).clone()
    var = variances.to(f64).clone()
    lower = torch.full((c,), -float("inf"), dtype=f64, device=dev)
    n_iter = torch.zeros(c, dtype=torch.int64, device=dev)
    converged = torch.zeros(c, dtype=torch.bool, device=dev)
    active = fit.clone()
    maskf = mask.to(f64)
    for it in range(1, max_iter + 1):
        if not bool(active.any()):
            break
        d = xz[:, None, :] - mu[:, :, None]  # (C, 2, L)
        a = (torch.log(w) - 0.5 * (_LOG_2PI + torch.log(var)))[:, :, None] \
            - 0.5 * d * d / var[:, :, None]
        lse = torch.logsumexp(a, dim=1)  # (C, L)
        r = torch.exp(a - lse[:, None, :]) * maskf[:, None, :]
        raw = r.sum(-1)
        nk = raw + _COUNT_EPS
        s = (r * d).sum(-1)
        q = (r * d * d).sum(-1)
        delta = s / nk
        ss = (q - 2.0 * delta * s + delta * delta * raw).clamp_min(0.0)
        new_w = nk / nk.sum(1, keepdim=True)
        new_mu = mu + delta
        new_var = ss / nk + reg_covar
        new_lower = (lse * maskf).sum(1) / n.clamp_min(1.0)
        done = active & ((new_lower - lower).abs() < tol)
        upd = active[:, None]
        w = torch.where(upd, new_w, w)
        mu = torch.where(upd, new_mu, mu)
        var = torch.where(upd, new_var, var)
        lower = torch.where(active, new_lower, lower)
        n_iter = torch.where(active, torch.full_like(n_iter, it), n_iter)
        converged |= done
        active &= ~done

    # Documented results of the degenerate groups.
    deg = (empty | constant)[:, None]
    centre = torch.where(constant, lo, torch.zeros_like(lo))
    w = torch.where(deg, torch.tensor([1.0, 0.0], dtype=f64, device=dev), w)
    mu = torch.where(deg, centre[:, None].expand(c, 2), mu)
    var = torch.where(deg, torch.full_like(var, reg_covar), var)
    const_ll = -0.5 * (_LOG_2PI + torch.log(torch.tensor(reg_covar, dtype=f64)))
    lower = torch.where(constant, const_ll.to(dev), lower)
    lower = torch.where(empty, torch.zeros_like(lower), lower)
    converged |= ~fit
    return w, mu, var, lower, n_iter, converged


def xent_seed(logits: Tensor, labels: Tensor) -> Tensor:
    """(N, K) ``softmax(logits) - onehot(labels)``: the gradient of the summed
    cross-entropy w.r.t. the logits (differentiable through torch's own autograd)."""
    p = torch.softmax(logits, dim=1)
    return p - torch.zeros_like(p).scatter_(1, labels.long().view(-1, 1), 1.0)


def xent_seed_backward(grad: Tensor, logits: Tensor) -> Tensor:
    """(N, K) ``(diag(p) - p p^T) grad`` row-wise, ``p = softmax(logits)``: the
    vector-Jacobian product of :func:`xent_seed` (and of softmax)."""
    p = torch.softmax(logits, dim=1)
    return p * (grad - (p * grad).sum(dim=1, keepdim=True))
