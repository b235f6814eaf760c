"""Python face of ``safedl::xent_seed`` and ``safedl::xent_seed_backward``.

``xent_seed(z, y) = softmax(z) - onehot(y)`` is the seed ``dL/dz`` of the cross-entropy,
the vector a VJP through a classifier turns into an input gradient. Its derivative is the
Jacobian of softmax, ``(diag(p) - p p^T)``, applied by the second op::

    xent_seed_backward(v, z) = p * (v - (p . v))    row-wise, p = softmax(z)

What the autograd formula saves: the logits only. The forward's result is not enough
(``p = seed + onehot`` loses the relative precision of small probabilities: in float32
``p_y = 1e-9`` comes back as 0, in float16 everything below ~5e-4), and storing ``p``
as well would cost a second (N, K) tensor and a second write per forward call. The
backward recomputes the softmax of its row instead, in the same pass that uses it: the
row is in cache, the exponentials are libm-free, and the logits are kept alive anyway by
whatever consumes the model's output. Taking the logits (not ``p``) as input also makes
the backward op a function of the forward op's own input, so its derivative closes on
the same op:

    d/dv [xent_seed_backward(v, z)] . u = xent_seed_backward(u, z)          (symmetric)
    d/dz [xent_seed_backward(v, z)] . u = xent_seed_backward(w, z),
        w = u * (v - p.v) - v * (p.u)

which is registered below, so ``gradgradcheck`` (and any higher order) passes. Labels get
no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _NATIVE, reference

__all__ = ["native_kernel_for", "xent_seed", "xent_seed_backward"]

_WIDE = (torch.float32, torch.float64)
_NARROW = (torch.float16, torch.bfloat16)


if _NATIVE:

    @torch.library.register_fake("safedl::xent_seed")
    def _xent_seed_fake(logits: Tensor, labels: Tensor) -> Tensor:
        torch._check(logits.dim() == 2, lambda: f"logits must be 2-D (N, K), got {logits.dim()}-D")
        torch._check(labels.dim() == 1 and labels.shape[0] == logits.shape[0],
                     lambda: "labels must have shape (N,) to match logits")
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("safedl::xent_seed_backward")
    def _xent_seed_backward_fake(grad: Tensor, logits: Tensor) -> Tensor:
        torch._check(logits.dim() == 2, lambda: f"logits must be 2-D (N, K), got {logits.dim()}-D")
        torch._check(grad.shape == logits.shape,
                     lambda: "grad and logits must have the same shape")
        return logits.new_empty(logits.shape)

    def _seed_setup_context(ctx, inputs, output) -> None:
        logits, _labels = inputs
        ctx.save_for_backward(logits)

    def _seed_backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:
        (logits,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return torch.ops.safedl.xent_seed_backward(grad, logits), None

    torch.library.register_autograd("safedl::xent_seed", _seed_backward,
                                    setup_context=_seed_setup_context)

    def _backward_setup_context(ctx, inputs, output) -> None:
        grad, logits = inputs
        ctx.save_for_backward(grad, logits)

    def _backward_backward(ctx, u: Tensor) -> tuple[Tensor | None, Tensor | None]:
        v, z = ctx.saved_tensors
        grad_v = grad_z = None
        if ctx.needs_input_grad[0]:
            grad_v = torch.ops.safedl.xent_seed_backward(u, z)
        if ctx.needs_input_grad[1]:
            p = torch.softmax(z, dim=1)
            w = u * (v - (p * v).sum(1, keepdim=True)) - v * (p * u).sum(1, keepdim=True)
            grad_z = torch.ops.safedl.xent_seed_backward(w, z)
        return grad_v, grad_z

    torch.library.register_autograd("safedl::xent_seed_backward", _backward_backward,
                                    setup_context=_backward_setup_context)


def native_kernel_for(logits: Tensor) -> bool:
    """Whether the loaded extension has a kernel for ``logits``' device and dtype
    (float32/float64 on CPU and CUDA, float16/bfloat16 on CUDA)."""
    if not _NATIVE:
        return False
    if logits.device.type == "cuda":
        key, dtypes = "CUDA", _WIDE + _NARROW
    elif logits.device.type == "cpu":
        key, dtypes = "CPU", _WIDE
    else:
        return False
    return logits.dtype in dtypes and torch._C._dispatch_has_kernel_for_dispatch_key(
        "safedl::xent_seed", key)


def _check_args(logits: Tensor, labels: Tensor) -> None:
    """The checks the native op makes, for the reference path."""
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("logits and labels must be tensors, got "
                        f"{type(logits).__name__} and {type(labels).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, K), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    n, k = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n}) to match logits {tuple(logits.shape)}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels must be on {logits.device} like logits, got {labels.device}")
    if n:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"labels must lie in [0, {k}) for logits with {k} classes, got "
                             f"values in [{lo}, {hi}]")


def xent_seed(logits: Tensor, labels: Tensor) -> Tensor:
    """``softmax(logits) - onehot(labels)`` row-wise: the gradient of the summed
    cross-entropy w.r.t. the logits, the seed of a loss input gradient.

    The native op when it has a kernel for ``logits``' device and dtype, else
    :func:`reference.xent_seed` (same checks and results). Differentiable w.r.t.
    ``logits`` to any order (see the module docstring); ``labels`` get no gradient.

    Args:
        logits: (N, K) float, any strides.
        labels: (N,) int64 class indices in [0, K) on ``logits``' device.

    Returns:
        (N, K) contiguous, ``logits``' dtype.
    """
    if native_kernel_for(logits):
        return torch.ops.safedl.xent_seed(logits, labels)
    _check_args(logits, labels)
    return reference.xent_seed(logits, labels)


def xent_seed_backward(grad: Tensor, logits: Tensor) -> Tensor:
    """The VJP of :func:`xent_seed` (and of softmax): ``p * (grad - (p . grad))`` row-wise
    with ``p = softmax(logits)``; differentiable w.r.t. both arguments.

    Args:
        grad: (N, K) the vector, ``logits``' dtype and device.
        logits: (N, K) float.

    Returns:
        (N, K) contiguous.
    """
    if native_kernel_for(logits):
        return torch.ops.safedl.xent_seed_backward(grad, logits)
    if grad.shape != logits.shape:
        raise ValueError(f"grad and logits must have the same shape, got {tuple(grad.shape)} "
                         f"and {tuple(logits.shape)}")
    return reference.xent_seed_backward(grad, logits)
