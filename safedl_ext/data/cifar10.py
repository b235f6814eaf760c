"""CIFAR-10 from the JPEG archives, with an on-disk cache of the decoded pixels.

The archives (``cifar10-train-jpeg.tar.gz``, ``cifar10-test-jpeg.tar.gz``) hold members
``<split>/<class>/<NNNN>.jpg``. Decoding all 60,000 JPEGs takes tens of seconds on a small
CPU, so :func:`load_cifar10` keeps the decoded uint8 pixels as ``.npz`` files in a cache
folder outside the repository, keyed by the archive's name, size and modification time and
by the subset asked for.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .images import check_tar_member, decode_tar_member, list_tar_members, open_tar
from .split import TensorSplit

__all__ = ["CIFAR10_CLASSES", "default_cache_dir", "load_cifar10", "load_cifar10_jpeg"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")

_CACHE_FORMAT = 1  # bump when the cached arrays' meaning changes
_MEMBER_MAX_BYTES = 1 << 20  # a 32 x 32 JPEG is ~1-3 KB; metadata may add some
_MAX_MEMBERS = 200_000  # the archives hold 50,000 / 10,000 images and a few folders


def default_cache_dir() -> Path:
    """``$SAFEDL_CACHE`` if set, else ``~/.cache/safedl_ext/data``."""
    env = os.environ.get("SAFEDL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "safedl_ext" / "data"


def _decode_cifar10_archive(archive: Path, per_class: int | None,
                            seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode (a seeded per-class subset of) a JPEG archive, through the checks of
    :mod:`.images`: every ``<class>/<name>.jpg`` member is a regular file of at most
    ``_MEMBER_MAX_BYTES`` bytes (checked on all of them before any is read); each chosen
    one is read in chunks and must declare exactly 32 x 32 pixels in mode RGB or L (grey,
    repeated into three channels) before it is decoded.

    Returns:
        x: (N, 3, 32, 32) uint8; y: (N,) int64. Classes in label order, and within a class
        the member names in sorted order.

    Raises:
        ValueError: not a gzip-compressed tar archive, no ``<class>/<name>.jpg`` members,
            or a bad member (named with the archive).
    """
    import itertools
    import random
    import tarfile

    with open_tar(archive) as tar:
        members = list_tar_members(tar, archive, max_members=_MAX_MEMBERS)
        by_class: dict[int, list[tarfile.TarInfo]] = {}
        for m in members:
            parts = m.name.split("/")
            if not m.name.endswith(".jpg") or len(parts) < 3 or \
                    parts[-2] not in CIFAR10_CLASSES:
                continue
            by_class.setdefault(CIFAR10_CLASSES.index(parts[-2]), []).append(m)
        if not by_class:
            raise ValueError(f"{archive} holds no <class>/<name>.jpg members")
        rng = random.Random(seed)
        chosen: list[tuple[str, int]] = []
        for label in sorted(by_class):
            names = sorted(m.name for m in by_class[label])
            dup = next((a for a, b in itertools.pairwise(names) if a == b), None)
            if dup is not None:
                raise ValueError(f"{archive}: member {dup!r} appears more than once")
            if per_class is not None and per_class < len(names):
                names = sorted(rng.sample(names, per_class))
            chosen.extend((n, label) for n in names)
        for ms in by_class.values():  # every image member's header, before decoding any
            for m in ms:
                check_tar_member(archive, m, max_bytes=_MEMBER_MAX_BYTES)
        row = {n: i for i, (n, _) in enumerate(chosen)}
        picked = [m for ms in by_class.values() for m in ms if m.name in row]
        x = np.empty((len(chosen), 32, 32, 3), dtype=np.uint8)
        for m in sorted(picked, key=lambda m: m.offset):  # archive order: forward reads
            x[row[m.name]] = decode_tar_member(
                tar, m, archive, max_bytes=_MEMBER_MAX_BYTES, size=(32, 32),
                size_note=" (CIFAR-10)", max_pixels=32 * 32, modes=("RGB", "L"),
                formats=("JPEG",))
    y = np.array([label for _, label in chosen], dtype=np.int64)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y


def _to_float(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
    return torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y).long()


def _check_per_class(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def load_cifar10_jpeg(
    archive: str | os.PathLike[str],
    per_class: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """CIFAR-10 from one JPEG archive (members ``<split>/<class>/<NNNN>.jpg``), no cache.

    Reads the ``.tar.gz`` directly (no extraction) and decodes with Pillow, safely: each
    chosen member must be a regular file of at most 1 MiB, and must declare exactly 32 x 32
    pixels in mode RGB or L (grey, repeated into three channels) before it is decoded.

    Args:
        archive: path to ``cifar10-train-jpeg.tar.gz`` or ``cifar10-test-jpeg.tar.gz``.
        per_class: keep this many images per class (a seeded random choice); all if None.
        seed: seed of that choice.

    Returns:
        x: (N, 3, 32, 32) float32 in [0, 1]; y: (N,) int64, index into ``CIFAR10_CLASSES``.

    Raises:
        FileNotFoundError: no such archive.
        ValueError: a corrupt or truncated archive, or a bad member (not a regular file,
            too large, corrupt or truncated JPEG, not 32 x 32, another mode); the message
            names the archive and the member.
    """
    path = Path(archive)
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 archive not found: {archive}")
    _check_per_class("per_class", per_class)
    return _to_float(*_decode_cifar10_archive(path, per_class, seed))


def _cache_path(folder: Path, archive: Path, per_class: int | None, seed: int) -> Path:
    st = archive.stat()
    # Without a subset the seed plays no part, so all seeds share one entry.
    key = (f"{_CACHE_FORMAT}|{archive.name}|{st.st_size}|{st.st_mtime_ns}|"
           f"{per_class}|{seed if per_class is not None else 0}")
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = archive.name.removesuffix(".tar.gz")
    subset = "all" if per_class is None else f"pc{per_class}-s{seed}"
    return folder / f"{stem}-{subset}-{digest}.npz"


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None when the entry is missing or unreadable."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        warnings.warn(f"ignoring unreadable CIFAR-10 cache entry {path}: {err}", stacklevel=3)
        return None
    if (x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, 32, 32)
            or y.shape != (x.shape[0],)):
        warnings.warn(f"ignoring malformed CIFAR-10 cache entry {path}", stacklevel=3)
        return None
    return x, y.astype(np.int64, copy=False)


def _write_cache(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write atomically (:func:`safedl_ext.report.write_atomic`); a cache that cannot be
    written (read-only folder, full disk) is a warning, not an error."""
    from ..report import write_atomic

    try:
        write_atomic(path, lambda fh: np.savez(fh, x=x, y=y))
    except OSError as err:
        warnings.warn(f"CIFAR-10 cache not written ({path}: {err})", stacklevel=3)


def _find_archive(root: Path, split: str) -> Path:
    name = f"cifar10-{split}-jpeg.tar.gz"
    for folder in (root, root / "cifar10"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"CIFAR-10 archive not found: {name} in {root} or "
                            f"{root / 'cifar10'}; set SAFEDL_DATA or pass root")


def _load_split(archive: Path, per_class: int | None, seed: int,
                cache_dir: Path | None) -> tuple[Tensor, Tensor]:
    if cache_dir is None:
        return _to_float(*_decode_cifar10_archive(archive, per_class, seed))
    path = _cache_path(cache_dir, archive, per_class, seed)
    cached = _read_cache(path)
    if cached is None:
        cached = _decode_cifar10_archive(archive, per_class, seed)
        _write_cache(path, *cached)
    return _to_float(*cached)


def load_cifar10(
    root: str | os.PathLike[str],
    *,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> TensorSplit:
    """CIFAR-10 train and test splits from the two JPEG archives.

    Args:
        root: folder holding ``cifar10-{train,test}-jpeg.tar.gz`` (or its parent, holding a
            ``cifar10/`` folder with them).
        train_per_class, test_per_class: keep this many images per class of each split (a
            seeded random choice, as :func:`load_cifar10_jpeg`); all (5,000 and 1,000) if None.
        seed: seed of those choices.
        cache_dir: where decoded pixels are kept; :func:`default_cache_dir` if None
            (``$SAFEDL_CACHE`` or ``~/.cache/safedl_ext/data``). Entries are keyed by the
            archive's name, size and modification time and by the subset, and are written
            atomically; an unreadable entry is decoded again and replaced.
        cache: False decodes the archives every time and touches no cache.

    Returns:
        :class:`TensorSplit` with x of shape (N, 3, 32, 32) float32 in [0, 1], labels index
        into ``CIFAR10_CLASSES``; images sorted by class, then by member name.

    Raises:
        FileNotFoundError: an archive is missing.
        ValueError: bad arguments, or a bad archive or member, as :func:`load_cifar10_jpeg`.
    """
    _check_per_class("train_per_class", train_per_class)
    _check_per_class("test_per_class", test_per_class)
    root_path = Path(root)
    train, test = _find_archive(root_path, "train"), _find_archive(root_path, "test")
    folder = None
    if cache:
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    x_tr, y_tr = _load_split(train, train_per_class, seed, folder)
    x_te, y_te = _load_split(test, test_per_class, seed, folder)
    return TensorSplit(x_tr, y_tr, x_te, y_te, CIFAR10_CLASSES)
