"""Argument checks shared by the attack engine, the input-gradient engine and the trainer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .models import model_device_dtype

__all__ = ["NaNLogitsError", "check_box", "check_finite_logits", "check_label_range",
           "check_labels", "check_model_input"]


def check_model_input(model: Callable[[Tensor], Tensor], x: Tensor) -> None:
    """x must be a floating (N, ...) tensor on the model's device and in its dtype."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, ...) with at least 2 dims, got {tuple(x.shape)}")
    if isinstance(model, nn.Module):
        dev, dt = model_device_dtype(model)
        if dev is not None and dev != x.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {dev}")
        if dt is not None and dt != x.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the model's parameters have {dt}")
    elif not callable(model):
        raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")


def check_labels(y: Tensor, x: Tensor, name: str = "y") -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 labels, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must hold integer class labels, got {y.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{name} must have shape ({x.shape[0]},) to match x, got "
                         f"{tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{name} is on {y.device} but x is on {x.device}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} must hold labels >= 0, got {int(y.min())}")


def check_label_range(logits: Tensor, y: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"model must return (N, K) logits with N={y.shape[0]}, got "
                         f"{tuple(logits.shape)}")
    k = logits.shape[1]
    if y.numel() and int(y.max()) >= k:
        raise ValueError(f"y must hold labels in [0, {k}) for a model with {k} outputs, got "
                         f"{int(y.max())}")


def check_box(x: Tensor, lo: float, hi: float, name: str = "x") -> None:
    if not lo < hi:
        raise ValueError(f"lo must be < hi, got lo={lo} hi={hi}")
    if x.numel() == 0:
        return
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    mn, mx = float(x.min()), float(x.max())
    if mn < lo or mx > hi:
        raise ValueError(f"{name} must lie in [lo, hi] = [{lo}, {hi}], got values in [{mn:.4g}, "
                         f"{mx:.4g}]; models take [0, 1] images (normalize inside the model)")


class NaNLogitsError(ValueError):
    """The model returned NaN logits; ``rows`` (a list of ints) names the samples."""

    def __init__(self, rows: list[int] | Tensor, what: str = "x") -> None:
        self.rows = [int(r) for r in (rows.tolist() if isinstance(rows, Tensor) else rows)]
        self.what = what
        shown = ", ".join(str(i) for i in self.rows[:10]) + \
            (", ..." if len(self.rows) > 10 else "")
        super().__init__(f"the model returned NaN logits for {len(self.rows)} sample(s) of "
                         f"{what} (indices {shown}); they cannot be scored as fooled or "
                         "correct (check the model's weights and inputs)")


def check_finite_logits(logits: Tensor, index: Tensor | None = None, what: str = "x") -> None:
    """Refuse NaN logits: argmax would count those samples as misclassified (an attack
    would report them fooled, an accuracy would count them wrong), silently.

    Args:
        logits: (N, K) model outputs.
        index: (N,) sample indices to name in the message (default 0..N-1 of ``what``);
            several rows may name one sample (restarts), which is named once.
        what: what the rows are, for the message.

    Raises:
        NaNLogitsError: naming the samples.
    """
    bad = torch.isnan(logits.detach()).flatten(1).any(1)
    if not bool(bad.any()):
        return
    rows = bad.nonzero().squeeze(1)
    ids = index.to(rows.device)[rows] if index is not None else rows
    raise NaNLogitsError(sorted(set(ids.tolist())), what)
