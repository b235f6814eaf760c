"""Argument checks shared by the attack engine and the input-gradient engine."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .models import model_device_dtype

__all__ = ["check_model_input"]


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
