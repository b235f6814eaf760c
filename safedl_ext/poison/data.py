"""The labelled images a scan reads: :class:`ScanData`, and the readers of the formats the
``safedl scan`` command takes (:func:`load_scan_data`).

A scan streams the data in batches and never needs it as float in memory: images are kept
as given (uint8 pixels stay uint8, a quarter of float32) and each batch is converted to
float (B, C, H, W) in [0, 1] when it is read.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..report import tensor_digest

__all__ = ["ScanData", "load_scan_data"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_NPZ_MAX_BYTES = 2**33  # 8 GiB declared by an .npz member, at most


class ScanData:
    """Labelled images, read in batches as float (B, C, H, W) in [0, 1].

    Args:
        x: (N, C, H, W) float in [0, 1] (a tensor or a numpy array), or uint8 pixels
            (N, C, H, W) as a tensor; numpy uint8 images are taken in numpy's image layout,
            (N, H, W, C) or (N, H, W) for grey. uint8 pixels are divided by 255.
        y: (N,) integer labels >= 0.
        classes: class names (index = label), optional.
        source: where the data came from, for reports.

    Raises:
        TypeError, ValueError: other shapes or dtypes, labels that do not match, float
            pixels outside [0, 1] or not finite.
    """

    def __init__(self, x: Tensor | np.ndarray, y: Tensor | np.ndarray, *,
                 classes: tuple[str, ...] | list[str] | None = None, source: str = "") -> None:
        if isinstance(x, np.ndarray):
            if x.dtype == np.uint8:
                x = x[..., None] if x.ndim == 3 else x
                if x.ndim != 4:
                    raise ValueError(f"x: uint8 images must be (N, H, W, C) or (N, H, W), got "
                                     f"shape {x.shape}")
                x = torch.from_numpy(x if x.flags.writeable else x.copy()).permute(0, 3, 1, 2)
            elif x.dtype in (np.float32, np.float64, np.float16):
                x = torch.from_numpy(np.asarray(x))
            else:
                raise TypeError(f"x must hold uint8 pixels or floats in [0, 1], got {x.dtype}")
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor or a numpy array, got {type(x).__name__}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise TypeError(f"x must hold uint8 pixels or floats in [0, 1], got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        if isinstance(y, np.ndarray):
            if not np.issubdtype(y.dtype, np.integer):
                raise TypeError(f"y must hold integer labels, got {y.dtype}")
            y = torch.from_numpy(y.astype(np.int64))
        if not isinstance(y, Tensor) or y.dtype not in _INT_DTYPES:
            raise TypeError(f"y must be an integer tensor, got "
                            f"{getattr(y, 'dtype', type(y).__name__)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got "
                             f"{tuple(y.shape)}")
        y = y.to("cpu", torch.int64)
        if y.numel() and int(y.min()) < 0:
            raise ValueError(f"y must hold labels >= 0, got {int(y.min())}")
        if x.is_floating_point() and x.numel():
            lo, hi = float(x.min()), float(x.max())
            if not (lo >= 0.0 and hi <= 1.0):  # NaN fails too
                raise ValueError(f"x: float pixels must be in [0, 1], got [{lo:.4g}, {hi:.4g}] "
                                 "(uint8 pixels are divided by 255 for you)")
        self.x, self.y = x, y
        self.classes = tuple(classes) if classes is not None else None
        self.source = source
        self._digest: tuple[tuple[tuple[int, int, tuple[int, ...]], ...], str] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def dim(self) -> int:
        """C * H * W, the length of one flattened image (and of its input gradient)."""
        c, h, w = self.shape
        return c * h * w

    def images(self, index: Tensor | slice, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Tensor:
        """Images ``index`` as (B, C, H, W) float in [0, 1] on ``device``."""
        xb = self.x[index]
        if xb.dtype == torch.uint8:
            return xb.to(device).to(dtype).div_(255.0).contiguous()
        return xb.to(device=device, dtype=dtype).contiguous()

    def digest(self) -> str:
        """A cheap content hash of the images and labels (to refuse resuming a scan on
        other data). Computed once (two passes over the images) and kept until ``x`` or
        ``y`` is replaced or modified in place (their storage and version counters)."""
        key = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in (self.x, self.y))
        cached = self._digest
        if cached is None or cached[0] != key:
            cached = (key, f"{tensor_digest(self.x)}-{tensor_digest(self.y)}")
            self._digest = cached
        return cached[1]


def _npz(path: Path) -> ScanData:
    try:
        with zipfile.ZipFile(path) as z:  # a truncated or non-zip file fails here
            for info in z.infolist():
                if info.file_size > _NPZ_MAX_BYTES:
                    raise ValueError(f"{path}: member {info.filename!r} declares "
                                     f"{info.file_size} bytes, more than {_NPZ_MAX_BYTES}")
            bad = z.testzip()
            if bad is not None:
                raise ValueError(f"{path}: member {bad!r} is corrupt (CRC mismatch)")
        with np.load(path, allow_pickle=False) as blob:
            missing = [k for k in ("x", "y") if k not in blob.files]
            if missing:
                raise ValueError(f"{path} must hold arrays 'x' and 'y', it lacks "
                                 f"{', '.join(missing)} (has {', '.join(blob.files) or 'none'})")
            x, y = blob["x"], blob["y"]
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path} is not a readable .npz (truncated or corrupt: {exc})") from None
    except (EOFError, OSError) as exc:
        raise ValueError(f"{path} is not a readable .npz ({exc})") from None
    if x.dtype == object or y.dtype == object:
        raise ValueError(f"{path}: x and y must be numeric arrays, not objects")
    if x.dtype != np.uint8 and x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        raise ValueError(f"{path}: float x must be (N, C, H, W) in [0, 1], got shape "
                         f"{x.shape} (channels last; uint8 images may be (N, H, W, C))")
    try:
        return ScanData(x, y, source=str(path))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def _idx(path: Path) -> ScanData:
    from ..data.mnist import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx

    name = path.name
    if "images" not in name:
        raise ValueError(f"{path}: give the images IDX file (…-images-idx3-ubyte[.gz]); its "
                         "labels file must lie beside it")
    labels = path.with_name(name.replace("images-idx3", "labels-idx1").replace(
        "images.idx3", "labels.idx1"))
    if not labels.is_file():
        raise FileNotFoundError(f"{path} has no labels file beside it (looked for {labels})")
    x = read_idx(path, magic=IDX_IMAGES_MAGIC)
    y = read_idx(labels, magic=IDX_LABELS_MAGIC)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{path} holds {x.shape[0]} images but {labels} {y.shape[0]} labels")
    return ScanData(x, y.astype(np.int64), classes=[str(i) for i in range(10)],
                    source=str(path))


def load_scan_data(path: str | os.PathLike[str]) -> ScanData:
    """Read labelled images for a scan, in any of the formats ``safedl scan`` takes.

    - ``.npz`` (read with ``allow_pickle=False``): ``x`` as uint8 (N, H, W, C) or (N, H, W)
      images, or float32 (N, C, H, W) in [0, 1]; ``y`` (N,) integer labels.
    - a folder with one subfolder per class (``<class>/<file>.png|jpg``), labels in sorted
      folder order (:func:`~safedl_ext.data.images.load_image_folder`); one grey channel
      when every image is grey (R = G = B), else RGB.
    - MNIST IDX: the images file (``…-images-idx3-ubyte[.gz]``) with its labels file beside.
    - a CIFAR-10 JPEG archive (``cifar10-train-jpeg.tar.gz``), read in place; members
      with unsafe paths or the wrong size are refused (:mod:`safedl_ext.data.cifar10`).

    Raises:
        FileNotFoundError: no such path.
        ValueError: an unreadable, truncated or malformed file (the message names it).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data not found: {p}")
    if p.is_dir():
        from ..data.images import load_image_folder

        folder = load_image_folder(p)
        x = folder.x
        if bool((x[:, 0] == x[:, 1]).all()) and bool((x[:, 1] == x[:, 2]).all()):
            x = x[:, :1].contiguous()  # grey images (read as R = G = B): one channel
        return ScanData(x, folder.y, classes=folder.classes, source=str(p))
    name = p.name.lower()
    if name.endswith(".npz"):
        return _npz(p)
    if "idx3" in name or "idx1" in name:
        return _idx(p)
    if name.endswith((".tar.gz", ".tgz")):
        from ..data.cifar10 import CIFAR10_CLASSES, _decode_cifar10_archive

        x, y = _decode_cifar10_archive(p, None, 0)
        return ScanData(torch.from_numpy(x), torch.from_numpy(y), classes=CIFAR10_CLASSES,
                        source=str(p))
    raise ValueError(f"--data {p}: unknown format (give an .npz, an image folder, an MNIST "
                     "images IDX file or a CIFAR-10 JPEG .tar.gz archive)")
