"""Data loaders that need nothing but numpy/scikit-learn (no torchvision).

Images come back as float32 tensors in [0, 1], NCHW, labels as int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TensorSplit", "load_digits"]


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


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> TensorSplit:
    """scikit-learn's 8x8 handwritten digits (1,797 images, bundled, no download).

    Pixel values 0..16 are scaled to [0, 1]; the split is stratified and seeded.

    Returns:
        :class:`TensorSplit` with x of shape (N, 1, 8, 8).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    x = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target).long()
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed,
                              stratify=bunch.target)
    tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
    return TensorSplit(x[tr_t], y[tr_t], x[te_t], y[te_t], tuple(str(c) for c in range(10)))
