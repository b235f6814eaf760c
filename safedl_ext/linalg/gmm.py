"""Batched EM for 2-component 1-D Gaussian mixtures, and the 2-Wasserstein distance of
1-D Gaussians.

:func:`gmm1d` fits one mixture per group, for many groups of different sizes at once
(a padded ``(C, L)`` tensor with ``lengths``, or flat values with ``group_ids``). The EM
iteration is scikit-learn's ``GaussianMixture(n_components=2, covariance_type='full')``
in 1-D, so given the same initial parameters it gives the same fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import gmm as _gmm_ops

__all__ = [
    "STATUS_CONSTANT",
    "STATUS_EMPTY",
    "STATUS_FITTED",
    "STATUS_OMITTED_ALL",
    "STATUS_SINGLE",
    "GMM1DResult",
    "gmm1d",
    "wasserstein2_gaussian1d",
]

#: EM ran on the group.
STATUS_FITTED = 0
#: The group has no points: weights (1, 0), means (0, 0), variances (reg_covar, reg_covar).
STATUS_EMPTY = 1
#: One point x: weights (1, 0), means (x, x), variances (reg_covar, reg_covar).
STATUS_SINGLE = 2
#: Two or more points, all equal to x: the same result as a single point.
STATUS_CONSTANT = 3
#: nan_policy="omit" removed every point of a non-empty group: the empty-group result.
STATUS_OMITTED_ALL = 4

InitParams = Mapping[str, Tensor] | Sequence[Tensor]


@dataclass(frozen=True)
class GMM1DResult:
    """Per-group 2-component mixtures fitted by :func:`gmm1d`.

    Attributes:
        weights: (C, 2) float64 mixing weights, summing to 1 per group.
        means: (C, 2) float64 component means (units of the values).
        variances: (C, 2) float64 component variances (squared units), >= reg_covar.
        responsibilities: (C, L, 2) float64 posterior probabilities of the components
            under the final parameters (0 at padding and at omitted points), or (N, 2) for
            flat input with ``group_ids``.
        assignments: (C, L) int64 most probable component (ties to 0; -1 at padding and at
            omitted points), or (N,) for flat input.
        log_likelihood: (C,) float64 mean log-likelihood per point under the final
            parameters (scikit-learn's ``score``); 0 for empty groups.
        lower_bound: (C,) float64 mean log-likelihood per point of the last E-step, the
            quantity the convergence test uses (scikit-learn's ``lower_bound_``).
        n_iter: (C,) int64 EM iterations run (0 for degenerate groups).
        converged: (C,) bool; degenerate groups count as converged.
        status: (C,) int64, one of ``STATUS_FITTED``, ``STATUS_EMPTY``, ``STATUS_SINGLE``,
            ``STATUS_CONSTANT``, ``STATUS_OMITTED_ALL``.
        lengths: (C,) int64 number of (finite, kept) points per group.
    """

    weights: Tensor
    means: Tensor
    variances: Tensor
    responsibilities: Tensor
    assignments: Tensor
    log_likelihood: Tensor
    lower_bound: Tensor
    n_iter: Tensor
    converged: Tensor
    status: Tensor
    lengths: Tensor

    @property
    def degenerate(self) -> Tensor:
        """(C,) bool: groups that were not fitted by EM (status other than fitted)."""
        return self.status != STATUS_FITTED

    def wasserstein2(self) -> Tensor:
        """(C,) float64 2-Wasserstein distance between each group's two components
        (0 for degenerate groups, whose components coincide)."""
        return wasserstein2_gaussian1d(self.means[:, 0], self.variances[:, 0],
                                       self.means[:, 1], self.variances[:, 1])


def wasserstein2_gaussian1d(
    mean1: Tensor | float, var1: Tensor | float, mean2: Tensor | float, var2: Tensor | float
) -> Tensor:
    """Closed-form 2-Wasserstein distance of 1-D Gaussians N(mean1, var1), N(mean2, var2):
    ``sqrt((mean1 - mean2)^2 + (sqrt(var1) - sqrt(var2))^2)``, in the units of the means.

    Arguments broadcast against each other; variances must be >= 0.
    """
    tensors = [torch.as_tensor(t) for t in (mean1, var1, mean2, var2)]
    dtype = torch.promote_types(torch.result_type(tensors[0], tensors[2]), torch.float32)
    m1, v1, m2, v2 = (t.to(dtype) for t in tensors)
    for name, v in (("var1", v1), ("var2", v2)):
        if bool((v < 0).any()) or bool(torch.isnan(v).any()):
            raise ValueError(f"{name} must be >= 0, got a minimum of {float(v.min())}")
    return torch.sqrt((m1 - m2) ** 2 + (v1.sqrt() - v2.sqrt()) ** 2)


def _check_number(value: object, name: str, *, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a float"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    return value


def _masked_moments(x: Tensor, sel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean and (population) variance of x over sel, per row; 0 for empty rows."""
    self_f = sel.to(x.dtype)
    cnt = self_f.sum(1)
    mean = (torch.where(sel, x, 0.0)).sum(1) / cnt.clamp_min(1.0)
    dev = torch.where(sel, x - mean[:, None], 0.0)
    var = (dev * dev).sum(1) / cnt.clamp_min(1.0)
    return cnt, mean, var


def _params_from_split(x: Tensor, lower: Tensor, upper: Tensor, n: Tensor,
                       reg_covar: float) -> tuple[Tensor, Tensor, Tensor]:
    n0, m0, v0 = _masked_moments(x, lower)
    n1, m1, v1 = _masked_moments(x, upper)
    nn = n.clamp_min(1.0)
    w = torch.stack([n0 / nn, n1 / nn], 1)
    # Groups with fewer than 2 points are not iterated; give them harmless parameters.
    small = (n0 < 1) | (n1 < 1)
    w = torch.where(small[:, None], torch.full_like(w, 0.5), w)
    mu = torch.stack([m0, m1], 1)
    var = torch.stack([v0, v1], 1) + reg_covar
    return w, mu, var


def _init_quantile(x: Tensor, lengths: Tensor, reg_covar: float) -> tuple[Tensor, Tensor, Tensor]:
    """Split each group at its median: the lower half (n // 2 smallest points) starts
    component 0, the rest component 1, with their weights, means and variances."""
    length = x.shape[1]
    idx = torch.arange(length, device=x.device)[None, :]
    xs = torch.where(idx < lengths[:, None], x, torch.inf).sort(dim=1).values
    h = (lengths // 2)[:, None]
    lower = idx < h
    upper = (idx >= h) & (idx < lengths[:, None])
    return _params_from_split(xs, lower, upper, lengths.to(x.dtype), reg_covar)


def _init_kmeanspp(x: Tensor, lengths: Tensor, reg_covar: float,
                   lloyd_iter: int = 20) -> tuple[Tensor, Tensor, Tensor]:
    """A deterministic k-means++-like start: the first centre is the group's median, the
    second the D^2-weighted median (the point where the cumulative squared distance to
    the first centre, over the sorted points, reaches half its total) instead of a D^2
    sample; then up to ``lloyd_iter`` 1-D Lloyd iterations, and the hard clusters give
    weights, means and variances, component 0 the lower centre."""
    length = x.shape[1]
    if length == 0:  # only empty groups: nothing to place centres on
        return _init_quantile(x, lengths, reg_covar)
    idx = torch.arange(length, device=x.device)[None, :]
    valid = idx < lengths[:, None]
    xs = torch.where(valid, x, torch.inf).sort(dim=1).values
    xz = torch.where(valid, xs, 0.0)
    med_pos = ((lengths - 1).clamp_min(0) // 2)[:, None]
    c0 = xz.gather(1, med_pos).squeeze(1)
    d2 = torch.where(valid, (xz - c0[:, None]) ** 2, 0.0)
    cum = d2.cumsum(1)
    half = 0.5 * cum[:, -1:] if length else cum
    pos = (cum < half).sum(1, keepdim=True).clamp(max=max(length - 1, 0))
    c1 = xz.gather(1, pos).squeeze(1) if length else c0
    lo_c, hi_c = torch.minimum(c0, c1), torch.maximum(c0, c1)
    for _ in range(lloyd_iter):
        lower = valid & (xz < 0.5 * (lo_c + hi_c)[:, None])
        upper = valid & ~lower
        n0, m0, _ = _masked_moments(xz, lower)
        n1, m1, _ = _masked_moments(xz, upper)
        new_lo = torch.where(n0 > 0, m0, lo_c)
        new_hi = torch.where(n1 > 0, m1, hi_c)
        if torch.equal(new_lo, lo_c) and torch.equal(new_hi, hi_c):
            break
        lo_c, hi_c = new_lo, new_hi
    lower = valid & (xz < 0.5 * (lo_c + hi_c)[:, None])
    upper = valid & ~lower
    w, mu, var = _params_from_split(xz, lower, upper, lengths.to(x.dtype), reg_covar)
    # A group whose split left one side empty (too few distinct values) uses the
    # quantile start instead.
    qw, qmu, qvar = _init_quantile(x, lengths, reg_covar)
    one_sided = ((lower.sum(1) == 0) | (upper.sum(1) == 0))[:, None]
    return (torch.where(one_sided, qw, w), torch.where(one_sided, qmu, mu),
            torch.where(one_sided, qvar, var))


def _explicit_init(init: InitParams, c: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(init, Mapping):
        missing = [k for k in ("weights", "means", "variances") if k not in init]
        if missing:
            raise ValueError(f"init dict must have keys 'weights', 'means', 'variances', "
                             f"missing {missing}")
        parts = [init["weights"], init["means"], init["variances"]]
    else:
        if len(init) != 3:
            raise ValueError(f"init must be (weights, means, variances), got {len(init)} items")
        parts = list(init)
    out = []
    for name, p in zip(("weights", "means", "variances"), parts, strict=True):
        t = torch.as_tensor(p, dtype=torch.float64).to(device)
        try:
            t = torch.broadcast_to(t, (c, 2)).contiguous()
        except RuntimeError:
            raise ValueError(f"init {name} must broadcast to ({c}, 2), got shape "
                             f"{tuple(t.shape)}") from None
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"init {name} must be finite")
        out.append(t)
    w, mu, var = out
    if bool((w < 0).any()) or not bool(torch.allclose(w.sum(1), torch.ones_like(w[:, 0]),
                                                      atol=1e-6)):
        raise ValueError("init weights must be >= 0 and sum to 1 in every group")
    if bool((var <= 0).any()):
        raise ValueError(f"init variances must be > 0, got a minimum of {float(var.min())}")
    return w, mu, var


def _pack(flat: Tensor, gid: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flat values with group ids -> padded (C, L), lengths (C,), and the (row, column)
    of every flat point; the order of points within a group is kept."""
    order = torch.argsort(gid, stable=True)
    g_sorted = gid[order]
    counts = torch.bincount(gid, minlength=c)
    starts = counts.cumsum(0) - counts
    col_sorted = torch.arange(gid.numel(), device=gid.device) - starts[g_sorted]
    length = int(counts.max()) if c and gid.numel() else 0
    padded = flat.new_zeros((c, length))
    padded[g_sorted, col_sorted] = flat[order]
    col = torch.empty_like(col_sorted)
    col[order] = col_sorted
    return padded, counts, gid, col


def gmm1d(
    values: Tensor,
    lengths: Tensor | None = None,
    *,
    group_ids: Tensor | None = None,
    num_groups: int | None = None,
    init: str | InitParams = "quantile",
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    nan_policy: str = "raise",
) -> GMM1DResult:
    """Fit a 2-component Gaussian mixture to each of C groups of 1-D values by EM.

    The iteration is scikit-learn's ``GaussianMixture(n_components=2,
    covariance_type='full', tol=tol, max_iter=max_iter, reg_covar=reg_covar, n_init=1)``
    started from the same parameters: E-step, M-step (variances ``+ reg_covar``, the
    variance floor), stop once the mean log-likelihood per point changes by less than
    ``tol`` or after ``max_iter`` iterations. Responsibilities and assignments come from
    a final E-step under the returned parameters. Runs the native op (CPU or CUDA) when
    built, else the pure-PyTorch reference.

    Degenerate groups are not iterated and get a documented result (see ``status``):
    no points -> weights (1, 0), means (0, 0); one point, or all points equal to x ->
    weights (1, 0), means (x, x); variances (reg_covar, reg_covar) in both cases, all
    points assigned to component 0, 0 iterations, converged. NaN or infinite values are a
    ValueError naming the groups (``nan_policy="raise"``) or are dropped from their group
    (``nan_policy="omit"``: responsibility 0, assignment -1).

    Args:
        values: (C, L) padded float values, group c is ``values[c, :lengths[c]]``; or (N,)
            flat values with ``group_ids``; or (N,) alone for a single group.
        lengths: (C,) int64 group sizes in [0, L] (default: all L). Not with group_ids.
        group_ids: (N,) int64 group of each flat value, in [0, num_groups).
        num_groups: C for flat input (default: ``group_ids.max() + 1``).
        init: ``"quantile"`` (split at the median: lower half component 0),
            ``"kmeans++"`` (deterministic k-means++-like start, then Lloyd iterations), or
            explicit initial parameters: a dict with keys ``weights``, ``means``,
            ``variances`` or a tuple in that order, each broadcastable to (C, 2)
            (variances, not precisions).
        max_iter: >= 1 EM iterations at most.
        tol: >= 0 convergence threshold on the change of the mean log-likelihood.
        reg_covar: > 0 added to every variance estimate.
        nan_policy: ``"raise"`` or ``"omit"``.

    Returns:
        :class:`GMM1DResult`; parameters are float64 on ``values``' device.
    """
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if not values.is_floating_point():
        raise TypeError(f"values must be a floating-point tensor, got {values.dtype}")
    max_iter = int(_check_number(max_iter, "max_iter", integer=True))
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    tol = float(_check_number(tol, "tol"))
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be finite and >= 0, got {tol}")
    reg_covar = float(_check_number(reg_covar, "reg_covar"))
    if not (math.isfinite(reg_covar) and reg_covar > 0):
        raise ValueError(f"reg_covar must be finite and > 0, got {reg_covar}")
    if nan_policy not in ("raise", "omit"):
        raise ValueError(f"nan_policy must be 'raise' or 'omit', got {nan_policy!r}")
    dev = values.device
    vals = values if values.dtype in (torch.float32, torch.float64) else values.float()
    vals = vals.detach()

    flat_gid: Tensor | None = None
    if group_ids is not None:
        if lengths is not None:
            raise ValueError("pass either lengths (padded input) or group_ids (flat input), "
                             "not both")
        if vals.dim() != 1:
            raise ValueError(f"values must be 1-D (N,) with group_ids, got shape "
                             f"{tuple(vals.shape)}")
        if not isinstance(group_ids, Tensor) or group_ids.dtype not in (
                torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError("group_ids must be an integer tensor, got "
                            f"{getattr(group_ids, 'dtype', type(group_ids).__name__)}")
        if group_ids.shape != vals.shape:
            raise ValueError(f"group_ids must have the shape of values {tuple(vals.shape)}, "
                             f"got {tuple(group_ids.shape)}")
        gid = group_ids.to(device=dev, dtype=torch.int64)
        if num_groups is None:
            num_groups = int(gid.max()) + 1 if gid.numel() else 0
        num_groups = int(_check_number(num_groups, "num_groups", integer=True))
        if gid.numel() and (int(gid.min()) < 0 or int(gid.max()) >= num_groups):
            raise ValueError(f"group_ids must lie in [0, {num_groups}), got values in "
                             f"[{int(gid.min())}, {int(gid.max())}]")
        flat_gid = gid
        padded, lens, rows, cols = _pack(vals, gid, num_groups)
    else:
        if vals.dim() == 1:
            vals = vals[None, :]
        if vals.dim() != 2:
            raise ValueError(f"values must be (C, L) or (N,), got shape {tuple(vals.shape)}")
        padded = vals
        if lengths is None:
            lens = torch.full((vals.shape[0],), vals.shape[1], dtype=torch.int64, device=dev)
        else:
            if not isinstance(lengths, Tensor) or lengths.is_floating_point() \
                    or lengths.dtype == torch.bool:
                raise TypeError("lengths must be an integer tensor, got "
                                f"{getattr(lengths, 'dtype', type(lengths).__name__)}")
            lens = lengths.to(device=dev, dtype=torch.int64)
            if lens.shape != (vals.shape[0],):
                raise ValueError(f"lengths must have shape ({vals.shape[0]},), got "
                                 f"{tuple(lens.shape)}")
            if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > vals.shape[1]):
                raise ValueError(f"lengths must lie in [0, {vals.shape[1]}], got values in "
                                 f"[{int(lens.min())}, {int(lens.max())}]")
    c, length = padded.shape
    valid = torch.arange(length, device=dev)[None, :] < lens[:, None]
    nonfinite = valid & ~torch.isfinite(padded)
    omitted_all = torch.zeros(c, dtype=torch.bool, device=dev)
    keep_rows = keep_cols = None
    if bool(nonfinite.any()):
        bad = torch.nonzero(nonfinite.any(1)).flatten().tolist()
        if nan_policy == "raise":
            shown = ", ".join(str(i) for i in bad[:10])
            more = f", ... ({len(bad)} groups)" if len(bad) > 10 else ""
            raise ValueError(f"values must be finite (nan_policy='raise'): NaN or infinity "
                             f"in group(s) {shown}{more}")
        keep = valid & ~nonfinite
        r_idx, c_idx = torch.nonzero(keep, as_tuple=True)
        new_padded, new_lens, _, new_cols = _pack(padded[r_idx, c_idx], r_idx, c)
        omitted_all = (lens > 0) & (new_lens == 0)
        keep_rows, keep_cols, keep_newcols = r_idx, c_idx, new_cols
        padded, lens = new_padded, new_lens

    if isinstance(init, str):
        if init == "quantile":
            w0, m0, v0 = _init_quantile(padded.to(torch.float64), lens, reg_covar)
        elif init == "kmeans++":
            w0, m0, v0 = _init_kmeanspp(padded.to(torch.float64), lens, reg_covar)
        else:
            raise ValueError(f"init must be 'quantile', 'kmeans++' or explicit (weights, "
                             f"means, variances), got {init!r}")
    elif isinstance(init, (Mapping, Sequence)):
        w0, m0, v0 = _explicit_init(init, c, dev)
    else:
        raise TypeError(f"init must be a str, a dict or a tuple, got {type(init).__name__}")

    w, mu, var, lower, n_iter, conv = _gmm_ops.gmm1d_em(
        padded.contiguous(), lens, w0.contiguous(), m0.contiguous(), v0.contiguous(),
        max_iter, tol, reg_covar)
    resp, assign, ll = _gmm_ops.e_step(padded, lens, w, mu, var)

    status = torch.full((c,), STATUS_FITTED, dtype=torch.int64, device=dev)
    status = torch.where(n_iter == 0, torch.full_like(status, STATUS_CONSTANT), status)
    status = torch.where(lens == 1, torch.full_like(status, STATUS_SINGLE), status)
    status = torch.where(lens == 0, torch.full_like(status, STATUS_EMPTY), status)
    status = torch.where(omitted_all, torch.full_like(status, STATUS_OMITTED_ALL), status)

    if keep_rows is not None:  # back to the caller's padded layout (or flat order)
        full_resp = resp.new_zeros((c, length, 2))
        full_assign = assign.new_full((c, length), -1)
        full_resp[keep_rows, keep_cols] = resp[keep_rows, keep_newcols]
        full_assign[keep_rows, keep_cols] = assign[keep_rows, keep_newcols]
        resp, assign = full_resp, full_assign
    if flat_gid is not None:
        resp = resp[rows, cols]
        assign = assign[rows, cols]
    return GMM1DResult(weights=w, means=mu, variances=var, responsibilities=resp,
                       assignments=assign, log_likelihood=ll, lower_bound=lower,
                       n_iter=n_iter, converged=conv, status=status, lengths=lens)
