"""Safe image decoding, shared by every loader that reads image files.

A data file is untrusted input: an 8 KB archive can hold JPEGs that declare 9000 x 9000
pixels, a member can be a 300 MB blob or a symbolic link, a gzip stream can inflate to many
gigabytes. Every image therefore goes through the same steps, each bounded before the next
one costs anything:

1. the declared byte size (tar header, ``stat``) is checked against ``max_bytes``;
2. the bytes are read in chunks, at most ``max_bytes`` (:func:`read_at_most`), and a short
   read is an error (a truncated member);
3. Pillow opens the bytes lazily (headers only), restricted to plain raster formats
   (:data:`IMAGE_FORMATS`: no EPS, whose decoder runs Ghostscript); the declared size is
   checked against the size required and against ``max_pixels``, and the mode against the
   modes accepted, all *before* a pixel is decoded;
4. only then are the pixels decoded and converted.

Every failure is a :class:`ValueError` whose message names the file (for an archive: the
archive and the member). Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)
stays in force on top of ``max_pixels``; it is never changed here.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CONVERTIBLE_MODES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "ImageFolder",
    "check_tar_member",
    "decode_image",
    "decode_tar_member",
    "list_tar_members",
    "load_image_folder",
    "open_tar",
    "read_at_most",
    "read_image_file",
    "read_tar_member",
]

#: Pillow formats that may be opened: plain raster formats with built-in decoders.
IMAGE_FORMATS: tuple[str, ...] = ("BMP", "GIF", "JPEG", "PNG", "PPM", "TIFF", "WEBP")
#: File name endings :func:`load_image_folder` reads (other files are skipped).
IMAGE_EXTENSIONS: tuple[str, ...] = (".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png",
                                     ".ppm", ".tif", ".tiff", ".webp")
#: Default pixel limit per image of :func:`load_image_folder` (4096 x 4096).
DEFAULT_MAX_PIXELS = 4096 * 4096
#: Default byte limit per image file of :func:`load_image_folder` (64 MiB).
DEFAULT_MAX_BYTES = 64 * 2**20
#: Source modes that convert to RGB / L without losing meaning (alpha and palettes aside).
#: 16-bit and float modes (I;16, I, F) are refused: Pillow clips them to 8 bits.
CONVERTIBLE_MODES: tuple[str, ...] = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")

_CHUNK = 1 << 20
_IO_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def read_at_most(fh: BinaryIO, limit: int) -> bytearray:
    """Read from ``fh`` until EOF or ``limit`` bytes, in 1 MiB chunks.

    Memory grows with the bytes actually read, never with ``limit`` (a header may declare
    any size). Pass ``expected + 1`` to tell an over-long input from an exact one.
    """
    buf = bytearray()
    while len(buf) < limit:
        chunk = fh.read(min(_CHUNK, limit - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _check_limit(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _size_pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``size`` as (height, width), or None."""
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                 for v in pair):
        raise ValueError(f"size must be an int >= 1 or a (height, width) pair of them, "
                         f"got {size!r}")
    return pair[0], pair[1]


def decode_image(
    data: bytes | bytearray,
    where: str,
    *,
    size: tuple[int, int] | None = None,
    size_note: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    modes: Sequence[str] = CONVERTIBLE_MODES,
    formats: Sequence[str] = IMAGE_FORMATS,
    resize: tuple[int, int] | None = None,
    mode: Literal["RGB", "L"] = "RGB",
) -> np.ndarray:
    """Decode one image held in memory, checking what it declares before decoding it.

    Args:
        data: the file's bytes.
        where: what to call it in errors (a path, or ``"archive: member 'name'"``).
        size: the (height, width) the image must declare, or None for any.
        size_note: appended to the wrong-size message (why that size is required).
        max_pixels: refuse images declaring more pixels (checked before decoding).
        modes: Pillow modes accepted as they are declared.
        formats: Pillow formats that may be opened.
        resize: (height, width) to resize to after decoding (bilinear), or None.
        mode: ``"RGB"`` (3 channels) or ``"L"`` (grey, 1 channel) to convert to.

    Returns:
        (H, W, 3) uint8 for ``mode="RGB"``, (H, W) uint8 for ``"L"``.

    Raises:
        ValueError: not an image of ``formats``, a wrong or too large declared size, a mode
            not accepted, or corrupt/truncated pixel data; the message starts with ``where``.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=list(formats))
    except UnidentifiedImageError as err:
        raise ValueError(f"{where}: not a {'/'.join(formats)} image") from err
    except Image.DecompressionBombError as err:
        raise ValueError(f"{where}: image too large for Pillow's decompression-bomb limit "
                         f"({err})") from err
    except MemoryError:
        raise
    except Exception as err:  # Pillow's plugins raise many types on bad headers
        raise ValueError(f"{where}: corrupt image header ({type(err).__name__}: {err})") \
            from err
    with img:
        w, h = img.size
        if size is not None and (h, w) != size:
            raise ValueError(f"{where}: image must be {size[1]}x{size[0]} pixels (width x "
                             f"height), it declares {w}x{h}{size_note}")
        if w * h > max_pixels:
            raise ValueError(f"{where}: image declares {w}x{h} = {w * h:,} pixels, more than "
                             f"max_pixels={max_pixels:,}")
        if img.mode not in modes:
            raise ValueError(f"{where}: image mode must be one of {', '.join(modes)}, got "
                             f"{img.mode}")
        try:
            img.load()
            out = img.convert(mode)
        except MemoryError:
            raise
        except Exception as err:
            raise ValueError(f"{where}: corrupt or truncated image data "
                             f"({type(err).__name__}: {err})") from err
    if resize is not None and out.size != (resize[1], resize[0]):
        out = out.resize((resize[1], resize[0]), Image.Resampling.BILINEAR)
    arr = np.asarray(out, dtype=np.uint8)
    want = (out.size[1], out.size[0], 3) if mode == "RGB" else (out.size[1], out.size[0])
    if arr.shape != want:  # Pillow guarantees this; a cheap guard all the same
        raise ValueError(f"{where}: decoded to shape {arr.shape}, expected {want}")
    return arr


# ---------------------------------------------------------------- tar archives


def open_tar(archive: str | os.PathLike[str], mode: str = "r:gz") -> tarfile.TarFile:
    """``tarfile.open`` whose failures are ValueErrors naming the archive."""
    try:
        return tarfile.open(archive, mode)
    except _IO_ERRORS as err:
        raise ValueError(f"{archive}: not a readable tar archive ({mode}; "
                         f"{type(err).__name__}: {err})") from err


def list_tar_members(tar: tarfile.TarFile, archive: str | os.PathLike[str], *,
                     max_members: int) -> list[tarfile.TarInfo]:
    """All members' headers, at most ``max_members``; errors name the archive and the
    last member read (a truncated archive usually breaks inside that member's data)."""
    members: list[tarfile.TarInfo] = []
    try:
        for m in tar:
            members.append(m)
            if len(members) > max_members:
                raise ValueError(f"{archive}: more than {max_members:,} members")
    except _IO_ERRORS as err:
        after = f" at or after member {members[-1].name!r}" if members else ""
        raise ValueError(f"{archive}: truncated or corrupt archive{after} "
                         f"({type(err).__name__}: {err})") from err
    return members


def _member_where(archive: str | os.PathLike[str], member: tarfile.TarInfo) -> str:
    return f"{archive}: member {member.name!r}"


def check_tar_member(archive: str | os.PathLike[str], member: tarfile.TarInfo, *,
                     max_bytes: int) -> None:
    """A regular file with a relative path without ``..`` whose header declares at most
    ``max_bytes`` bytes (no reading)."""
    where = _member_where(archive, member)
    if member.name.startswith("/") or ".." in member.name.split("/"):
        raise ValueError(f"{where}: unsafe path (absolute, or with a '..' component)")
    if not member.isreg():
        kind = ("a directory" if member.isdir() else "a symbolic link" if member.issym()
                else "a hard link" if member.islnk() else "a device or FIFO")
        raise ValueError(f"{where}: must be a regular file, got {kind}")
    if member.size > max_bytes:
        raise ValueError(f"{where}: declares {member.size:,} bytes, more than the "
                         f"{max_bytes:,} allowed")


def read_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo,
                    archive: str | os.PathLike[str], *, max_bytes: int) -> bytearray:
    """The member's bytes: header checked first (:func:`check_tar_member`), then read in
    chunks; a member shorter than its header declares is an error."""
    check_tar_member(archive, member, max_bytes=max_bytes)
    where = _member_where(archive, member)
    try:
        fh = tar.extractfile(member)
        if fh is None:
            raise ValueError(f"{where}: cannot be read")
        data = read_at_most(fh, member.size)
    except _IO_ERRORS as err:
        raise ValueError(f"{where}: truncated or corrupt member "
                         f"({type(err).__name__}: {err})") from err
    if len(data) != member.size:
        raise ValueError(f"{where}: truncated member ({len(data):,} of {member.size:,} bytes)")
    return data


def decode_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo,
                      archive: str | os.PathLike[str], *, max_bytes: int,
                      **decode: Any) -> np.ndarray:
    """:func:`read_tar_member`, then :func:`decode_image` (keyword arguments passed on);
    errors name the archive and the member."""
    data = read_tar_member(tar, member, archive, max_bytes=max_bytes)
    return decode_image(data, _member_where(archive, member), **decode)


# ---------------------------------------------------------------- image folders


def read_image_file(path: Path, *, max_bytes: int) -> bytearray:
    """A regular file's bytes (symbolic links followed), at most ``max_bytes``."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err})") from err
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: must be a regular file")
    if st.st_size > max_bytes:
        raise ValueError(f"{path}: {st.st_size:,} bytes, more than max_bytes={max_bytes:,}")
    try:
        with open(path, "rb") as fh:
            data = read_at_most(fh, max_bytes + 1)
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err})") from err
    if len(data) > max_bytes:  # grew since stat
        raise ValueError(f"{path}: more than max_bytes={max_bytes:,} bytes")
    return data


class ImageFolder(NamedTuple):
    """What :func:`load_image_folder` returns.

    Attributes:
        x: (N, C, H, W) float32 in [0, 1] (C = 3 for RGB, 1 for L).
        y: (N,) int64, index into ``classes``.
        classes: the class folders' names, sorted.
        paths: each image's path relative to the root, in the order of ``x``.
    """

    x: Tensor
    y: Tensor
    classes: tuple[str, ...]
    paths: tuple[str, ...]


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, symbolic links to folders not followed),
    sorted by path; hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames)
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    size: int | tuple[int, int] | None = None,
    mode: Literal["RGB", "L"] = "RGB",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ImageFolder:
    """Labelled images from a folder with one subfolder per class (``root/<class>/*.png``).

    Class names are the subfolders' names, sorted (label = index); within a class, images
    are in sorted path order (subfolders of a class folder included). Files whose names do
    not end in one of :data:`IMAGE_EXTENSIONS`, and hidden files, are skipped. Each image
    is read and checked as the module docstring says before it is decoded.

    Args:
        root: the folder.
        size: None: every image must have the size of the first; an int or a (height,
            width) pair: every image is resized to it (bilinear).
        mode: ``"RGB"`` (3 channels; grey images repeated, alpha dropped) or ``"L"`` (grey).
        max_pixels: refuse an image declaring more pixels (before decoding it).
        max_bytes: refuse an image file larger than this.

    Returns:
        :class:`ImageFolder` ``(x, y, classes, paths)``: x (N, C, H, W) float32 in [0, 1],
        y (N,) int64.

    Raises:
        FileNotFoundError, NotADirectoryError: ``root`` is not a folder.
        ValueError: bad arguments, no class folders, a class without images, or a bad image
            (too many bytes or pixels, corrupt, truncated, another size, not a regular
            file); the message names the file.
    """
    resize = _size_pair(size)
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    _check_limit("max_pixels", max_pixels)
    _check_limit("max_bytes", max_bytes)
    base = Path(root)
    if not base.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not base.is_dir():
        raise NotADirectoryError(f"root must be a folder, got the file {root}")
    classes = tuple(sorted(p.name for p in base.iterdir()
                           if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise ValueError(f"{root}: no class folders (expected root/<class>/<image>)")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = _image_files(base / name)
        if not found:
            raise ValueError(f"{base / name}: class folder holds no images (file names "
                             f"ending in {', '.join(IMAGE_EXTENSIONS)})")
        files.extend((f, label) for f in found)
    out: np.ndarray | None = None
    first: Path | None = None
    for i, (path, _) in enumerate(files):
        want = resize
        note = ""
        if resize is None and out is not None:
            want, note = out.shape[1:3], f" like {first} (pass size= to resize)"
        img = decode_image(read_image_file(path, max_bytes=max_bytes), str(path),
                           size=None if resize is not None else want, size_note=note,
                           max_pixels=max_pixels, resize=resize, mode=mode)
        if out is None:
            out = np.empty((len(files), *img.shape), dtype=np.uint8)
            first = path
        out[i] = img
    assert out is not None
    arr = out if mode == "RGB" else out[..., None]
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2))).float().div_(255.0)
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageFolder(x, y, classes, tuple(str(p.relative_to(base)) for p, _ in files))
