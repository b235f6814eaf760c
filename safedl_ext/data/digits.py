"""scikit-learn's bundled 8x8 digits."""

from __future__ import annotations

import torch

from .split import TensorSplit

__all__ = ["load_digits"]


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
