"""Where the data live, the data sets by name, and their normalization statistics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .cifar10 import load_cifar10
from .digits import load_digits
from .mnist import load_mnist_idx
from .split import TensorSplit

__all__ = ["DATASET_NAMES", "DATASET_STATS", "default_data_root", "load_dataset"]

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "cifar10")

DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # Per-channel mean and standard deviation of the training pixels in [0, 1], for
    # models.Normalized / models.build_model(mean=..., std=...).
    # digits: all 1,797 scikit-learn images, pixel / 16 (measured).
    "digits": ((0.3053,), (0.3760,)),
    # mnist: the 60,000 training images (LeCun et al.), the customary values.
    "mnist": ((0.1307,), (0.3081,)),
    # cifar10: the 50,000 training images (Krizhevsky 2009): per-pixel standard deviation,
    # not the (0.2023, 0.1994, 0.2010) that some public code passes around. The shared JPEG
    # copy measures mean (0.4913, 0.4821, 0.4465), std (0.2452, 0.2428, 0.2606): the lossy
    # re-encoding smooths a little; the original statistics are kept.
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def default_data_root() -> Path:
    """The folder holding the shared data sets (``mnist/``, ``cifar10/``, ...).

    ``$SAFEDL_DATA`` if set; else ``<repository root>/../shared/data`` if it exists, where
    the repository root is the folder above the ``safedl_ext`` package.

    Raises:
        FileNotFoundError: neither exists; the message says to set ``SAFEDL_DATA``.
    """
    env = os.environ.get("SAFEDL_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"SAFEDL_DATA={env} is not a folder")
        return path
    repo = Path(__file__).resolve().parents[2]
    shared = (repo / ".." / "shared" / "data").resolve()
    if shared.is_dir():
        return shared
    raise FileNotFoundError(f"no data folder: {shared} does not exist; set SAFEDL_DATA to the "
                            "folder holding mnist/ and cifar10/")


def load_dataset(name: str, root: str | os.PathLike[str] | None = None,
                 **kwargs: Any) -> TensorSplit:
    """A data set by name, as a :class:`TensorSplit` of [0, 1] float32 NCHW images.

    Args:
        name: "digits" (scikit-learn, bundled; ``root`` unused), "mnist" or "cifar10".
        root: the data folder (holding ``mnist/`` and ``cifar10/``), or the data set's own
            folder; :func:`default_data_root` if None.
        **kwargs: passed on: ``test_fraction``, ``seed`` (digits); ``test_fraction``,
            ``seed``, ``limit`` (:func:`load_mnist_idx`); ``train_per_class``,
            ``test_per_class``, ``seed``, ``cache_dir``, ``cache`` (:func:`load_cifar10`).
    """
    if name == "digits":
        return load_digits(**kwargs)
    if name not in DATASET_NAMES:
        raise ValueError(f"name must be one of {', '.join(DATASET_NAMES)}, got {name!r}")
    base = Path(root) if root is not None else default_data_root()
    folder = base / name if (base / name).is_dir() else base
    if name == "mnist":
        return load_mnist_idx(folder, **kwargs)
    return load_cifar10(folder, **kwargs)
