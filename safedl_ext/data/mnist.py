"""MNIST from IDX files (gzipped or not), parsed with numpy alone."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from .images import read_at_most
from .split import TensorSplit

__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "IDX_MAX_BYTES", "load_mnist_idx", "read_idx"]

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N,)
IDX_MAX_BYTES = 2**30  # default cap on an IDX file's declared data bytes


def read_idx(path: str | os.PathLike[str], *, magic: int | None = None,
             max_bytes: int = IDX_MAX_BYTES) -> np.ndarray:
    """Read an unsigned-byte IDX file (LeCun's MNIST format), ``.gz`` or plain.

    The header is a big-endian 32-bit magic number (two zero bytes, the type code 0x08 for
    unsigned bytes, the number of dimensions) followed by one big-endian 32-bit size per
    dimension; the data follow, exactly as many bytes as the sizes multiply to.

    The header is read first; then at most the declared number of data bytes plus one (to
    tell an over-long file), in chunks: neither a header declaring huge dimensions nor a
    gzip stream that inflates without end (a gzip bomb) takes more memory than the data
    actually there, up to ``max_bytes``.

    Args:
        path: the file; a name ending in ``.gz`` is decompressed.
        magic: the magic number required (2051 for images, 2049 for labels), or None to
            accept any unsigned-byte IDX file.
        max_bytes: refuse a header declaring more data bytes than this (default 1 GiB;
            MNIST's training images are 47 MB).

    Returns:
        uint8 array with the header's dimensions (a view of the bytes read).

    Raises:
        ValueError: a corrupt, truncated or over-long file, the wrong magic number, or
            declared dimensions beyond ``max_bytes``; the message names the file.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
    p = Path(path)
    opener = gzip.open if p.name.endswith(".gz") else open
    try:
        with opener(p, "rb") as fh:
            head = read_at_most(fh, 4)
            if len(head) < 4:
                raise ValueError(f"{p}: truncated IDX file ({len(head)} bytes, no header)")
            got = int.from_bytes(head, "big")
            if magic is not None and got != magic:
                raise ValueError(f"{p}: IDX magic number must be {magic}, got {got}")
            if head[0] != 0 or head[1] != 0 or head[2] != 0x08 or head[3] == 0:
                raise ValueError(f"{p}: not an unsigned-byte IDX file (magic number {got})")
            ndim = head[3]
            sizes = read_at_most(fh, 4 * ndim)
            if len(sizes) < 4 * ndim:
                raise ValueError(f"{p}: truncated IDX header ({4 + len(sizes)} bytes, "
                                 f"{4 + 4 * ndim} expected)")
            dims = tuple(int.from_bytes(sizes[4 * i:4 * i + 4], "big") for i in range(ndim))
            expected = math.prod(dims)
            if expected > max_bytes:
                raise ValueError(f"{p}: the IDX header declares dimensions {dims} "
                                 f"({expected:,} bytes of data), more than max_bytes="
                                 f"{max_bytes:,}")
            data = read_at_most(fh, expected + 1)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{p}: corrupt or truncated IDX file ({err})") from err
    found = len(data)
    if found != expected:
        what, holds = (("truncated", str(found)) if found < expected
                       else ("over-long", f"more than {expected}"))
        raise ValueError(f"{p}: {what} IDX file: the header gives dimensions {dims} "
                         f"({expected} bytes of data), the file holds {holds}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _find(folder: Path, prefix: str, kind: str, ndim: int) -> Path | None:
    for name in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for suffix in (".gz", ""):
            if (folder / (name + suffix)).is_file():
                return folder / (name + suffix)
    return None


def _read_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    images, labels = _find(folder, prefix, "images", 3), _find(folder, prefix, "labels", 1)
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        have, want = (images, "labels") if labels is None else (labels, "images")
        raise FileNotFoundError(f"{have} has no matching {prefix}-{want} IDX file in {folder}")
    x = read_idx(images, magic=IDX_IMAGES_MAGIC)
    y = read_idx(labels, magic=IDX_LABELS_MAGIC)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{images} holds {x.shape[0]} images but {labels} holds "
                         f"{y.shape[0]} labels")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"{images}: image size must be positive, got {x.shape[1:]}")
    if y.size and int(y.max()) > 9:
        raise ValueError(f"{labels}: labels must be digits 0..9, got {int(y.max())}")
    return x, y.astype(np.int64)


def _stratified_subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified subset of ``size`` of the ``len(y)``."""
    if size >= len(y):
        return np.arange(len(y))
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(y)), train_size=size, random_state=seed,
                               stratify=y)
    return np.sort(keep)


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = x if x.flags.writeable else x.copy()  # torch wants writable memory
    xt = torch.from_numpy(x).unsqueeze(1).float().div_(255.0)
    return xt, torch.from_numpy(y).long()


def load_mnist_idx(
    root: str | os.PathLike[str],
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
) -> TensorSplit:
    """MNIST from IDX files: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

    When both the ``train-*`` and the ``t10k-*`` pairs are present they are the train and
    the test split (``test_fraction`` is then unused). When only one pair is present (the
    shared data folder holds only ``t10k``, 10,000 images), it is split into train and test
    with a class-stratified, seeded split.

    Args:
        root: folder holding the files (or its parent, holding an ``mnist/`` folder).
        test_fraction: share of the images that go to the test split, in (0, 1), when only
            one pair of files is present.
        seed: seed of the subset and of the split.
        limit: read at most this many images from each pair of files (a class-stratified,
            seeded subset, before the split); all if None.

    Returns:
        :class:`TensorSplit` with x of shape (N, 1, 28, 28) float32 in [0, 1] (pixel / 255)
        and labels 0..9.

    Raises:
        FileNotFoundError: no IDX files in ``root`` (or one file of a pair missing).
        ValueError: a corrupt or truncated file, or bad arguments.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if limit is not None and limit < 10:
        raise ValueError(f"limit must be >= 10 (one image per class), got {limit}")
    folder = Path(root)
    if _find(folder, "t10k", "images", 3) is None and _find(folder, "train", "images", 3) \
            is None and (folder / "mnist").is_dir():
        folder = folder / "mnist"
    train, test = _read_pair(folder, "train"), _read_pair(folder, "t10k")
    classes = tuple(str(c) for c in range(10))
    if train is not None and test is not None:
        parts = []
        for x, y in (train, test):
            keep = _stratified_subset(y, limit, seed) if limit is not None else slice(None)
            parts.append(_tensors(x[keep], y[keep]))
        (x_tr, y_tr), (x_te, y_te) = parts
        return TensorSplit(x_tr, y_tr, x_te, y_te, classes)
    pair = train if train is not None else test
    if pair is None:
        raise FileNotFoundError(f"no MNIST IDX files (t10k-images-idx3-ubyte.gz, ...) in "
                                f"{Path(root)}; set SAFEDL_DATA or pass root")
    x, y = pair
    if limit is not None:
        keep = _stratified_subset(y, limit, seed)
        x, y = x[keep], y[keep]
    n, k = len(y), len(np.unique(y))
    n_test = math.ceil(test_fraction * n)
    if min(n_test, n - n_test) < k:
        raise ValueError(f"test_fraction={test_fraction} splits {n} images into {n - n_test} "
                         f"train and {n_test} test, fewer than the {k} classes in one split; "
                         "raise limit or change test_fraction")
    from sklearn.model_selection import train_test_split

    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed,
                              stratify=y)
    (x_tr, y_tr), (x_te, y_te) = _tensors(x[tr], y[tr]), _tensors(x[te], y[te])
    return TensorSplit(x_tr, y_tr, x_te, y_te, classes)
