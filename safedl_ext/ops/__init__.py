"""Python face of safedl_ext's native ops.

The extension (``safedl_ext._C``) registers its kernels with the PyTorch dispatcher under
the ``safedl`` namespace (``torch.ops.safedl.*``). This module loads it, registers fake
kernels for ``torch.compile``/``opcheck``, and exposes wrappers that take Python scalars.
Without the extension every wrapper runs the pure-PyTorch reference in
:mod:`safedl_ext.ops.reference` after one warning; ``SAFEDL_REQUIRE_NATIVE=1`` makes a
missing extension an error instead.
"""

from __future__ import annotations

import glob
import importlib.machinery
import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import reference

__all__ = [
    "as_budget",
    "backend",
    "has_cuda_kernels",
    "native_error",
    "pgd_step_",
    "pgd_step_checked_",
    "random_start",
    "reference",
    "xent_seed",
    "xent_seed_backward",
]

_PKG_DIR = Path(__file__).resolve().parent.parent
_NATIVE = False
_NATIVE_ERROR: str | None = None


def _find_library() -> str | None:
    """``$SAFEDL_LIBRARY`` when set (a build kept outside the package), else the
    extension module built into the package folder."""
    override = os.environ.get("SAFEDL_LIBRARY")
    if override:
        return override
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        hits = sorted(glob.glob(str(_PKG_DIR / f"_C{suffix}")))
        if hits:
            return hits[0]
    return None


def _load() -> None:
    global _NATIVE, _NATIVE_ERROR
    path = _find_library()
    if path is None:
        _NATIVE_ERROR = f"no compiled extension _C*.so in {_PKG_DIR}"
    else:
        try:
            torch.ops.load_library(path)
            _NATIVE = True
        except (OSError, RuntimeError) as exc:  # wrong torch ABI, missing symbols, ...
            _NATIVE_ERROR = f"{path}: {exc}"
    if _NATIVE:
        return
    msg = (
        f"safedl_ext native extension unavailable ({_NATIVE_ERROR}); using the pure-PyTorch "
        "reference ops. Build it with `pip install --no-build-isolation -e .`."
    )
    if os.environ.get("SAFEDL_REQUIRE_NATIVE", "0") not in ("", "0"):
        raise ImportError(msg + " (SAFEDL_REQUIRE_NATIVE is set)")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


_load()


def backend() -> str:
    """``"native"`` when the compiled kernels are in use, ``"reference"`` otherwise."""
    return "native" if _NATIVE else "reference"


def native_error() -> str | None:
    """Why the extension did not load, or ``None`` when it did."""
    return _NATIVE_ERROR


def has_cuda_kernels() -> bool:
    """Whether the loaded extension registered CUDA kernels (it can without a GPU)."""
    return _NATIVE and torch._C._dispatch_has_kernel_for_dispatch_key("safedl::pgd_step_", "CUDA")


if _NATIVE:

    @torch.library.register_fake("safedl::pgd_step_")
    def _pgd_step_fake(x_adv, x0, grad, alpha, eps, norm, lo, hi) -> None:
        return None


def as_budget(value: float | Tensor, name: str, like: Tensor, *, positive: bool = False) -> Tensor:
    """Validate a step size or radius and put it on ``like``'s device in the dtype the
    kernels compute in (float32 for half inputs).

    Args:
        value: a float, or a tensor with one value or one value per sample (N,).
        name: the argument's name, for error messages.
        like: (N, ...) the tensor it applies to.
        positive: require > 0 instead of >= 0.

    Returns:
        a 0-d tensor (one value) or an (N,) tensor.
    """
    n = like.shape[0] if like.dim() else 1
    dtype = reference.opmath_dtype(like.dtype)
    if isinstance(value, Tensor):
        if not (value.numel() == 1 or tuple(value.shape) == (n,)):
            raise ValueError(f"{name} must be a float or a tensor with one value or shape "
                             f"({n},), got shape {tuple(value.shape)}")
        t = value.detach().to(device=like.device, dtype=torch.float64)
        t = t.reshape(()) if t.numel() == 1 else t
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        t = torch.tensor(float(value), device=like.device, dtype=torch.float64)
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {value}")
    bad = (t <= 0) if positive else (t < 0)
    if bool(bad.any()):
        got = value if not isinstance(value, Tensor) else float(t.min())
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {got}")
    return t.to(dtype)


def pgd_step_(
    x_adv: Tensor,
    x0: Tensor,
    grad: Tensor,
    alpha: float | Tensor,
    eps: float | Tensor,
    norm: str = "linf",
    lo: float = 0.0,
    hi: float = 1.0,
) -> Tensor:
    """One fused projected-gradient ascent step, in place; returns ``x_adv``.

    L-inf: ``x_adv + alpha * sign(grad)``, projected onto ``[x0 - eps, x0 + eps]`` and then
    ``[lo, hi]``. L2: a step of L2 length ``alpha`` along ``grad / ||grad||_2`` per sample
    (zero gradient: no move), projected onto the L2 ball of radius ``eps`` around ``x0``
    per sample, then onto ``[lo, hi]``. One read of each input and one write, instead of a
    chain of temporaries. L2 norms are taken scaled by the sample's max-abs, so a gradient of
    any finite size (1e-30 or 1e30 in float32) still steps ``alpha``. A NaN in ``x_adv`` or
    ``x0`` gives NaN in the result; float16 and bfloat16 are computed in float32.

    Args:
        x_adv: (N, ...) float tensor, updated in place (may be non-contiguous).
        x0: (N, ...) clean inputs, same shape, dtype and device.
        grad: (N, ...) input gradient of the loss to ascend.
        alpha: step size, a float or (N,) tensor (pixel units for L-inf, L2 length for L2).
        eps: radius, a float or (N,) tensor; several radii or restarts stack into one batch.
        norm: ``"linf"`` or ``"l2"``.
        lo, hi: box constraint of valid inputs (``[0, 1]`` images by default).
    """
    a = as_budget(alpha, "alpha", x_adv)
    e = as_budget(eps, "eps", x_adv)
    if not _NATIVE:
        _check_reference_args(x_adv, x0, grad, norm, lo, hi)
    pgd_step_checked_(x_adv, x0, grad, a, e, norm, lo, hi)
    return x_adv


def pgd_step_checked_(
    x_adv: Tensor, x0: Tensor, grad: Tensor, alpha: Tensor, eps: Tensor, norm: str,
    lo: float, hi: float,
) -> None:
    """:func:`pgd_step_` for callers that validated ``alpha``/``eps`` once with
    :func:`as_budget` (an attack loop): the native op, or the reference without it."""
    if _NATIVE:
        torch.ops.safedl.pgd_step_(x_adv, x0, grad, alpha, eps, norm, float(lo), float(hi))
    else:
        with torch.no_grad():
            reference.pgd_step_(x_adv, x0, grad, alpha, eps, norm, float(lo), float(hi))


def _check_reference_args(x_adv, x0, grad, norm, lo, hi) -> None:
    """The checks the native op makes, for the reference path."""
    for name, t in (("x0", x0), ("grad", grad)):
        if t.shape != x_adv.shape:
            raise ValueError(f"x_adv and {name} must have the same shape, got "
                             f"{tuple(x_adv.shape)} and {tuple(t.shape)}")
        if t.dtype != x_adv.dtype or t.device != x_adv.device:
            raise TypeError(f"x_adv and {name} must share dtype and device, got "
                            f"{x_adv.dtype}/{x_adv.device} and {t.dtype}/{t.device}")
    if norm not in ("linf", "inf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if lo > hi:
        raise ValueError(f"lo must be <= hi, got lo={lo} hi={hi}")


def random_start(
    x0: Tensor,
    eps: float | Tensor,
    norm: str = "linf",
    lo: float = 0.0,
    hi: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A random point of the eps-ball around ``x0``, clamped to ``[lo, hi]`` (new tensor).

    L-inf: uniform in the cube ``[x0 - eps, x0 + eps]``. L2: uniform in the L2 ball per
    sample (Gaussian direction, radius ``eps * u**(1/d)``). The same ``generator`` state
    gives the same start; noise is drawn on the generator's device and moved to ``x0``'s,
    so a CPU generator reproduces a start on any device.

    Args:
        x0: (N, ...) clean inputs.
        eps: float or (N,) radii.
        generator: source of randomness (the global one when ``None``).
    Returns:
        (N, ...) tensor like ``x0``.
    """
    e = as_budget(eps, "eps", x0)
    n = x0.shape[0]
    gen_device = generator.device if generator is not None else x0.device
    dt = reference.opmath_dtype(x0.dtype)
    shape_b = (n,) + (1,) * (x0.dim() - 1)
    e_b = e.reshape(()) if e.numel() == 1 else e.reshape(shape_b)
    if norm in ("linf", "inf"):
        u = torch.rand(x0.shape, generator=generator, device=gen_device, dtype=dt)
        delta = (u.to(x0.device) * 2 - 1) * e_b
    elif norm == "l2":
        d = x0[0].numel() if n else 1
        z = torch.randn((n, d), generator=generator, device=gen_device, dtype=dt)
        r = torch.rand((n, 1), generator=generator, device=gen_device, dtype=dt)
        z = z.to(x0.device)
        r = r.to(x0.device).pow(1.0 / d)
        z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(math.ulp(1.0))
        delta = (z * r).reshape(x0.shape) * e_b
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return (x0.to(dt) + delta).clamp_(lo, hi).to(x0.dtype)


# The cross-entropy seed ops register their fake kernels and autograd formulas on import.
from .xent import xent_seed, xent_seed_backward  # noqa: E402
