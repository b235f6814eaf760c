"""Data loaders that need nothing but numpy/scikit-learn (no torchvision).

Images come back as float32 tensors in [0, 1], NCHW, labels as int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CIFAR10_CLASSES", "TensorSplit", "load_cifar10_jpeg", "load_digits"]


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


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def load_cifar10_jpeg(
    archive: str,
    per_class: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """CIFAR-10 from a JPEG archive (members ``<split>/<class>/<NNNN>.jpg``).

    Reads the ``.tar.gz`` directly (no extraction) and decodes with Pillow.

    Args:
        archive: path to ``cifar10-train-jpeg.tar.gz`` or ``cifar10-test-jpeg.tar.gz``.
        per_class: keep this many images per class (a seeded random choice); all if None.
        seed: seed of that choice.

    Returns:
        x: (N, 3, 32, 32) float32 in [0, 1]; y: (N,) int64, index into ``CIFAR10_CLASSES``.
    """
    import io
    import os
    import random
    import tarfile

    import numpy as np
    from PIL import Image

    if not os.path.exists(archive):
        raise FileNotFoundError(f"CIFAR-10 archive not found: {archive}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by_class: dict[int, list[tarfile.TarInfo]] = {}
        for m in members:
            parts = m.name.split("/")
            if len(parts) < 3 or parts[-2] not in CIFAR10_CLASSES:
                continue
            by_class.setdefault(CIFAR10_CLASSES.index(parts[-2]), []).append(m)
        if not by_class:
            raise ValueError(f"{archive} holds no <class>/<name>.jpg members")
        rng = random.Random(seed)
        chosen: list[tuple[str, int]] = []
        for label in sorted(by_class):
            names = sorted(m.name for m in by_class[label])
            if per_class is not None and per_class < len(names):
                names = sorted(rng.sample(names, per_class))
            chosen.extend((n, label) for n in names)
        wanted = {n for n, _ in chosen}
        images: dict[str, np.ndarray] = {}
        for m in members:
            if m.name in wanted:
                fh = tar.extractfile(m)
                assert fh is not None
                img = Image.open(io.BytesIO(fh.read())).convert("RGB")
                images[m.name] = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(np.stack([images[n] for n, _ in chosen])).permute(0, 3, 1, 2)
    y = torch.tensor([label for _, label in chosen], dtype=torch.long)
    return x.float().div_(255.0).contiguous(), y
