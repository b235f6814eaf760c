"""Data loaders that need nothing but numpy/scikit-learn/Pillow (no torchvision).

Images come back as float32 tensors in [0, 1], NCHW, labels as int64:

- :func:`load_digits` (scikit-learn's 8x8 digits), :func:`load_mnist_idx` (IDX files),
  :func:`load_cifar10` (the JPEG archives, cached decoded) and :func:`load_cifar10_jpeg`
  (one archive), or any of them by name with :func:`load_dataset`;
- :func:`load_image_folder` reads a class-per-subfolder image folder; it and the CIFAR-10
  loader decode through one safe path (:mod:`.images`: byte and pixel limits checked
  before anything is read or decoded, errors naming the file or the archive member);
- :func:`default_data_root` finds the shared data folder; :data:`DATASET_STATS` holds the
  per-channel mean and std for ``models.Normalized``;
- :func:`random_crop_flip` augments a batch; :func:`batches` and :class:`TensorLoader`
  give seeded mini-batches.
"""

from __future__ import annotations

from .augment import random_crop_flip
from .cifar10 import CIFAR10_CLASSES, default_cache_dir, load_cifar10, load_cifar10_jpeg
from .datasets import DATASET_NAMES, DATASET_STATS, default_data_root, load_dataset
from .digits import load_digits
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageFolder, load_image_folder
from .loader import TensorLoader, batches
from .mnist import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, IDX_MAX_BYTES, load_mnist_idx, read_idx
from .split import TensorSplit

__all__ = [
    "CIFAR10_CLASSES",
    "DATASET_NAMES",
    "DATASET_STATS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IDX_MAX_BYTES",
    "ImageFolder",
    "TensorLoader",
    "TensorSplit",
    "batches",
    "default_cache_dir",
    "default_data_root",
    "load_cifar10",
    "load_cifar10_jpeg",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_mnist_idx",
    "random_crop_flip",
    "read_idx",
]
