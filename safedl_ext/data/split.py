"""The in-memory train/test split every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["TensorSplit"]


@dataclass(frozen=True)
class TensorSplit:
    """A train/test split held in memory.

    Attributes:
        x_train: (N_train, C, H, W) float32 in [0, 1].
        y_train: (N_train,) int64.
        x_test: (N_test, C, H, W) float32 in [0, 1].
        y_test: (N_test,) int64.
        classes: class names, index = label.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: tuple[str, ...]
