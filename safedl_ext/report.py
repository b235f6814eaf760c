"""Small report helpers: atomic file writes, safe torch loads, Markdown tables, run metadata."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["load_torch_safe", "machine_info", "markdown_table", "save_torch_atomic",
           "tensor_digest",
           "write_atomic", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


def _umask() -> int:
    """The process's file-creation mask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(fh)`` on a temporary file in the same folder, then
    ``os.replace``: a reader never sees a half-written file, and an interruption leaves
    the old file intact. The file gets the permissions a plain ``open(path, "w")`` would
    give (an existing file's own mode, else 0666 less the umask), not ``mkstemp``'s 0600.
    Every atomic write of the package (reports, checkpoints, weights, caches) goes
    through here.

    Raises:
        OSError: the folder cannot be created or written (the message names the path).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            mode = path.stat().st_mode & 0o7777  # replacing a file keeps its mode
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """``data`` written atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda fh: fh.write(data))


def save_torch_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save(obj)`` written atomically (see :func:`write_atomic`); read it back
    with :func:`load_torch_safe`."""
    return write_atomic(path, lambda fh: torch.save(obj, fh))


def load_torch_safe(path: str | os.PathLike[str], *, what: str = "file",
                    map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Only tensors, plain containers and numbers load; a pickle that would run code is
    refused (never retried with ``weights_only=False``).

    Args:
        path: the file.
        what: what the file is, for messages (``"checkpoint"``, ``"--model-file"``, ...).
        map_location: as for ``torch.load``.

    Raises:
        FileNotFoundError: no such file. ValueError: empty, truncated, corrupt, not a
        torch file, or a pickle that needs code to load; one line naming ``path``.
    """
    import pickle
    import zipfile

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if p.is_dir():
        raise ValueError(f"{what} {p} is a folder, not a file")
    size = p.stat().st_size
    if size == 0:
        raise ValueError(f"{what} {p} is empty (0 bytes)")
    _check_torch_zip(p, size, what)
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        import re

        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a refusal: bytes that are no pickle torch can read
            raise ValueError(f"{what} {p} is truncated, corrupt or not a torch file "
                             "(unreadable pickle)") from None
        raise ValueError(f"{what} {p} holds objects that would need code to load (it asks "
                         f"for {found.group(1)}); refused: only tensors, numbers and plain "
                         "containers are loaded") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError,
            AttributeError, TypeError, IndexError, MemoryError, OverflowError) as err:
        msg = " ".join(str(err).split()).split(". ")[0][:160]
        raise ValueError(f"{what} {p} is truncated, corrupt or not a torch file "
                         f"({type(err).__name__}: {msg})") from None


def _check_torch_zip(p: Path, size: int, what: str) -> None:
    """A torch file (a zip archive) loads into at most about its own size: ``torch.save``
    stores its entries uncompressed, so a compressed entry (which could inflate a small
    file to gigabytes) or entries declaring more bytes than the file holds are refused
    before ``torch.load`` reads them."""
    import zipfile

    try:
        if not zipfile.is_zipfile(p):
            return  # the legacy (pre-1.6) format, or not a torch file: torch.load decides
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"{what} {p} is truncated, corrupt or not a torch file "
                         f"({type(err).__name__}: {err})") from None
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise ValueError(f"{what} {p} holds compressed entries ({packed[0]}, ...); torch "
                         "files are stored uncompressed, and a compressed entry can inflate "
                         "far beyond the file's size: refused")
    declared = sum(i.file_size for i in infos)
    if declared > size:
        raise ValueError(f"{what} {p} declares {declared} bytes of entries in a {size}-byte "
                         "file: refused")


_DIGEST_CHUNK = 1 << 20  # elements per chunk of tensor_digest's sums (8 MiB of float64)


def tensor_digest(t: torch.Tensor) -> str:
    """A cheap content hash of a tensor (16 hex digits): shape, dtype, up to 65,536
    evenly spaced elements and the float64 sums of all elements and of their absolute values."""
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    flat = t.detach().reshape(-1)
    if flat.numel():
        step = max(1, flat.numel() // 65536)
        sample = flat[::step].to("cpu", torch.float64 if flat.is_floating_point() else
                                 torch.int64).contiguous()
        h.update(sample.numpy().tobytes())
        # In chunks: sum(dtype=...) and vector_norm(dtype=...) cast their whole input to
        # the wider dtype first (a float64 copy of float32 data is 2x its size, an int64
        # copy of uint8 images 8x: 1.2 GB for 50,000 CIFAR images). Integer sums are
        # exact either way; float64 sums of chunks differ from one sum in the last bits.
        is_float = flat.is_floating_point()
        total = absolute = 0.0 if is_float else 0
        for start in range(0, flat.numel(), _DIGEST_CHUNK):
            part = flat[start:start + _DIGEST_CHUNK]
            if is_float:
                total += float(part.sum(dtype=torch.float64))
                absolute += float(torch.linalg.vector_norm(part, 1, dtype=torch.float64))
            else:
                total += int(part.sum(dtype=torch.int64))
                absolute += int(part.abs().sum(dtype=torch.int64))
        # Rounded to 10 digits: the sums' last bits depend on the device and the threads.
        h.update(f"{float(total):.10g}|{float(absolute):.10g}".encode())
    return h.hexdigest()[:16]


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` as UTF-8, written atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """``json.dumps(obj, indent=2)`` written atomically (see :func:`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats are printed with two decimals."""

    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_info() -> Mapping[str, Any]:
    """Where a figure came from: host CPU/GPU, thread count, torch version, backend."""
    from . import ops

    info: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "safedl_backend": ops.backend(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
