"""Input gradients: ``dL/dx`` and friends, optionally differentiable (double backprop).

JARN, IGAM, double-backpropagation training and the backdoor scan all need the gradient
of a classifier's loss (or probability, or logit) with respect to its *input*, per sample.
:func:`input_gradients` computes it with one forward pass and vector-Jacobian products:

- ``labels="true"`` (or a label tensor): one VJP, seed chosen by ``wrt``;
- ``labels="all"``: the gradient for every class from the same forward pass, with K
  VJPs through the one backward graph — not K forward+backward passes. ``chunk_size``
  says how many classes' seeds go through the backward together: 1 (the default) runs
  one VJP per class (``retain_graph``); C > 1 runs one batched VJP (``is_grads_batched``,
  vmap over the backward) per C classes, which holds C copies of every activation
  gradient at once.

Why the loop is the default: on a 2-core CPU with torch 2.13 (SmallCNN on 128x3x32x32,
K = 10; four runs of ``bench/test_bench_gradients.py``), one batched VJP of all ten
classes took 1.2-1.5x the loop's time and chunks of five 1.1-1.6x. The profile shows why
(and batching rules sit above the device kernels, so it is likely the same on CUDA, not
yet measured): under vmap, ``convolution_backward`` and
``max_pool2d_with_indices_backward`` still run once per class (inside one batched call),
their results are concatenated (``cat`` took a fifth of the time), and
``threshold_backward`` works on the broadcast (K, N, ...) tensors. So for CNNs the batched
VJP does the loop's work plus copies, in K times the memory. Where per-op overhead
dominates instead (the 8x8 digits CNN), chunks of five took 0.7-1.06x the loop's time, and
models whose backward does batch (matrix products only) may gain on a GPU:
``chunk_size`` is worth a try there (``bench/gpu_bench.py`` races both on CUDA).

With ``create_graph=True`` the result stays in the autograd graph, so a loss built from
it (an adversarial loss on the gradient, an L2 matching term, ``||dL/dx||^2``) can be
back-propagated to the model's parameters.

Seeds (``z`` = logits, ``p = softmax(z)``, ``e_y`` = one-hot label), all per sample:

=========  ========================  ===============================================
``wrt``    seed ``dOut/dz``           gradient of
=========  ========================  ===============================================
"loss"     ``p - e_y``                cross-entropy of sample i with label y_i
"prob"     ``p_y (e_y - p)``          softmax probability of class y_i
"logit"    ``e_y``                    logit of class y_i
=========  ========================  ===============================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from . import ops
from ._checks import check_model_input

__all__ = ["input_gradients", "normalize_per_sample", "seed"]

WrtName = Literal["loss", "prob", "logit"]
NormalizeName = Literal["l2", "zero_mean_l2"]
_WRT = ("loss", "prob", "logit")
_NORMALIZE = (None, "l2", "zero_mean_l2")

def seed(logits: Tensor, labels: Tensor, wrt: WrtName = "loss") -> Tensor:
    """The vector ``dOut/dz`` that turns a VJP through the model into an input gradient.

    Args:
        logits: (N, K) float.
        labels: (N,) int64 class indices in [0, K).
        wrt: ``"loss"`` (cross-entropy, ``softmax(z) - onehot(y)``; native op),
            ``"prob"`` (``p_y (onehot(y) - p)``) or ``"logit"`` (``onehot(y)``).

    Returns:
        (N, K) in ``logits``' dtype, differentiable w.r.t. ``logits`` (twice for "loss").
    """
    if wrt == "loss":
        return ops.xent_seed(logits, labels)
    onehot = torch.zeros_like(logits).scatter_(1, labels.view(-1, 1), 1.0)
    if wrt == "logit":
        return onehot
    if wrt == "prob":
        p = torch.softmax(logits, dim=1)
        p_y = p.gather(1, labels.view(-1, 1))
        return p_y * (onehot - p)
    raise ValueError(f"wrt must be one of {_WRT}, got {wrt!r}")


def _seeds_all(logits: Tensor, classes: Tensor, wrt: WrtName) -> Tensor:
    """(C, N, K) seeds for the classes in ``classes`` (C,), every sample at once."""
    n, k = logits.shape
    c = classes.shape[0]
    onehot = torch.zeros(c, 1, k, dtype=logits.dtype, device=logits.device)
    onehot.scatter_(2, classes.view(c, 1, 1), 1.0)
    if wrt == "logit":
        return onehot.expand(c, n, k)
    p = torch.softmax(logits, dim=1).unsqueeze(0)  # (1, N, K)
    if wrt == "loss":
        return p - onehot
    p_c = p.squeeze(0).index_select(1, classes).t().unsqueeze(2)  # (C, N, 1)
    return p_c * (onehot - p)


def normalize_per_sample(g: Tensor, how: NormalizeName, batch_dims: int = 1,
                         eps: float = 1e-12) -> Tensor:
    """Normalise each sample's gradient over all its non-batch dimensions.

    Args:
        g: (*B, ...) gradients; the first ``batch_dims`` dims index samples.
        how: ``"l2"``: ``g / ||g||_2``; ``"zero_mean_l2"``: subtract the sample's mean,
            then divide by the L2 norm of the result (JARN's normalisation of the Jacobian).
        eps: added to the norm, so an all-zero gradient stays zero.

    Returns:
        Same shape as ``g``; differentiable.
    """
    if how not in ("l2", "zero_mean_l2"):
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {how!r}")
    flat = g.reshape(*g.shape[:batch_dims], -1)
    if how == "zero_mean_l2":
        flat = flat - flat.mean(dim=-1, keepdim=True)
    norm = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    return (flat / (norm + eps)).reshape(g.shape)


def _check(model: Callable[[Tensor], Tensor], x: Tensor, labels: object, y: Tensor | None,
           wrt: str, normalize: object) -> None:
    check_model_input(model, x)
    if wrt not in _WRT:
        raise ValueError(f"wrt must be one of {_WRT}, got {wrt!r}")
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    if isinstance(labels, str):
        if labels not in ("true", "all"):
            raise ValueError(f"labels must be 'true', 'all' or an (N,) label tensor, got "
                             f"{labels!r}")
        if labels == "true" and y is None:
            raise ValueError("labels='true' needs y, the (N,) true labels")
    elif not isinstance(labels, Tensor):
        raise TypeError(f"labels must be 'true', 'all' or an (N,) label tensor, got "
                        f"{type(labels).__name__}")


def _check_label_tensor(t: Tensor, name: str, n: int, k: int, device: torch.device) -> Tensor:
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must hold integer class labels, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match x, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if n and (int(t.min()) < 0 or int(t.max()) >= k):
        raise ValueError(f"{name} must hold labels in [0, {k}) for a model with {k} outputs, "
                         f"got values in [{int(t.min())}, {int(t.max())}]")
    return t.long()


def input_gradients(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor | None = None,
    *,
    labels: Literal["true", "all"] | Tensor = "true",
    wrt: WrtName = "loss",
    normalize: NormalizeName | None = None,
    create_graph: bool = False,
    chunk_size: int = 1,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-sample gradients of the model's loss, probability or logit w.r.t. its input.

    The model runs once, in whatever mode it is in (the caller decides train or eval).
    Gradients flow to ``x`` only: the model's parameters receive no ``.grad``.

    Args:
        model: maps (N, ...) inputs to (N, K) logits.
        x: (N, ...) float inputs (pixel units for images). When ``x`` already requires
            grad (e.g. it is the output of a differentiable resize), gradients are taken
            through it as is; otherwise a detached leaf copy is used. Its memory layout
            is kept: on the CPU a channels-last x
            (``x.contiguous(memory_format=torch.channels_last)``) made the all-label
            gradients of a small CNN 1.2x faster (ties at ReLU/max-pool kinks may then
            resolve differently than with NCHW).
        y: (N,) int64 true labels; needed for ``labels="true"``.
        labels: ``"true"`` (use ``y``), an (N,) label tensor (e.g. attack targets), or
            ``"all"`` for the gradient of every one of the K classes.
        wrt: ``"loss"`` (per-sample cross-entropy), ``"prob"`` (softmax probability of the
            label) or ``"logit"`` (the label's logit). See the module docstring for seeds.
        normalize: ``None``, ``"l2"`` or ``"zero_mean_l2"``, per sample (and per class).
        create_graph: keep the result differentiable w.r.t. the model's parameters (and
            ``x``), for double backpropagation.
        chunk_size: for ``labels="all"``, how many classes' seeds go through the backward
            graph together: 1 (default) is one VJP per class, a loop over the one graph
            with the least memory and, for CNNs, the least time; C > 1 is one batched VJP
            (``is_grads_batched``) per C classes, holding C copies of every activation
            gradient (see the module docstring). The forward pass runs once either way.
        return_logits: also return the (N, K) logits of the forward pass.

    Returns:
        (N, ...) gradients like ``x``, or (N, K, ...) for ``labels="all"``; with
        ``return_logits`` a pair ``(gradients, logits)``. Detached unless ``create_graph``.
    """
    _check(model, x, labels, y, wrt, normalize)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    n = x.shape[0]
    xin = x if x.requires_grad else x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xin)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != n:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"model must return (N, K) logits with N={n}, got {shape}")
        k = logits.shape[1]
        if isinstance(labels, Tensor) or labels == "true":
            lab = labels if isinstance(labels, Tensor) else y
            assert lab is not None
            lab = _check_label_tensor(lab, "labels" if isinstance(labels, Tensor) else "y",
                                      n, k, x.device)
            with torch.set_grad_enabled(create_graph):  # the seed's graph only for double backprop
                s = seed(logits, lab, wrt)
            (g,) = torch.autograd.grad(logits, xin, grad_outputs=s, create_graph=create_graph)
            if normalize is not None:
                g = normalize_per_sample(g, normalize, batch_dims=1)
        else:
            g = _all_labels(logits, xin, k, wrt, create_graph, chunk_size)
            if normalize is not None:
                g = normalize_per_sample(g, normalize, batch_dims=2)
    if not create_graph:
        g = g.detach()
        logits = logits.detach()
    return (g, logits) if return_logits else g


def _all_labels(logits: Tensor, xin: Tensor, k: int, wrt: WrtName, create_graph: bool,
                chunk_size: int) -> Tensor:
    """(N, K, ...) gradients for every class from one forward pass."""
    n = xin.shape[0]
    chunk = min(k, chunk_size)
    # Without a graph to keep, each chunk is copied into the result as it comes, so only
    # one chunk's gradients exist beside it.
    out = None if create_graph else xin.new_empty((n, k, *xin.shape[1:]))
    parts: list[Tensor] = []
    for start in range(0, k, chunk):
        stop = min(k, start + chunk)
        retain = create_graph or stop < k
        if stop - start == 1:
            labels = torch.full((n,), start, dtype=torch.int64, device=logits.device)
            with torch.set_grad_enabled(create_graph):
                s = seed(logits, labels, wrt)
            (g,) = torch.autograd.grad(logits, xin, grad_outputs=s, retain_graph=retain,
                                       create_graph=create_graph)
            g = g.unsqueeze(1)
        else:
            classes = torch.arange(start, stop, device=logits.device)
            with torch.set_grad_enabled(create_graph):
                s = _seeds_all(logits, classes, wrt)
            (g,) = torch.autograd.grad(logits, xin, grad_outputs=s, retain_graph=retain,
                                       create_graph=create_graph, is_grads_batched=True)
            g = g.transpose(0, 1)  # (C, N, ...) -> (N, C, ...)
        if out is None:
            parts.append(g)
        else:
            out[:, start:stop].copy_(g)
    return out if out is not None else torch.cat(parts, dim=1)
