"""Loading a trained model from a file without running code from it.

:func:`load_model` takes what ``safedl scan`` takes: a ``torch.export`` archive (``.pt2``),
a run folder written by ``safedl train`` (``model.json`` + ``model.pt``), or a state dict
(``.pt``/``.pth``, read with ``weights_only=True``; or ``.safetensors``, parsed here) with
the zoo architecture's name. Nothing is unpickled beyond tensors and plain containers:
``torch.export.load`` may unpickle weights or constants that were saved with pickle, so
the archive's configuration is checked first (every payload must be raw tensor bytes) and
``torch.load`` is held to ``weights_only=True`` while it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["ExportedModel", "load_model", "load_safetensors"]

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_HEADER_MAX = 100 * 2**20


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file (its format: an 8-byte little-endian header
    length, a JSON header naming each tensor's dtype, shape and byte range, the raw bytes),
    parsed with numpy: no code runs. BF16 tensors are read as raw 16-bit values.

    Raises:
        FileNotFoundError: no such file. ValueError: truncated or malformed (named).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"safetensors file not found: {p}")
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{p} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_ST_HEADER_MAX, size - 8):
            raise ValueError(f"{p}: header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{p}: the safetensors header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{p}: the safetensors header must be a JSON object")
        data_len = size - 8 - n
        out: dict[str, Tensor] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (b, e) = meta["dtype"], meta["shape"], meta["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{p}: tensor {name!r} has a malformed entry") from None
            if dtype == "BF16":
                np_dtype, bf16 = np.dtype(np.int16), True
            elif dtype in _ST_DTYPES:
                np_dtype, bf16 = np.dtype(_ST_DTYPES[dtype]), False
            else:
                raise ValueError(f"{p}: tensor {name!r} has an unsupported dtype {dtype!r}")
            if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0
                                                    for s in shape)):
                raise ValueError(f"{p}: tensor {name!r} has a bad shape {shape!r}")
            count = int(np.prod(shape)) if shape else 1
            if not (isinstance(b, int) and isinstance(e, int) and 0 <= b <= e <= data_len
                    and e - b == count * np_dtype.itemsize):
                raise ValueError(f"{p}: tensor {name!r}: byte range [{b}, {e}) does not fit "
                                 f"{dtype}{shape} in the file's {data_len} data bytes")
            fh.seek(8 + n + b)
            buf = fh.read(e - b)
            arr = np.frombuffer(buf, dtype=np_dtype).reshape(shape).copy()
            t = torch.from_numpy(arr)
            out[name] = t.view(torch.bfloat16) if bf16 else t
    return out


class ExportedModel:
    """A loaded ``torch.export`` program as a callable ``x -> logits`` (not an
    ``nn.Module``: exported graphs do not switch train/eval modes).

    Attributes:
        graph_module: the program's ``module()``.
        path: where it came from.
    """

    def __init__(self, graph_module: Any, path: Path) -> None:
        self.graph_module, self.path = graph_module, path

    def __call__(self, x: Tensor) -> Tensor:
        return self.graph_module(x)

    def state_dict(self) -> dict[str, Tensor]:
        return self.graph_module.state_dict()


@contextlib.contextmanager
def _weights_only() -> Iterator[None]:
    """``torch.load`` held to ``weights_only=True`` and pickle refused, for the duration."""
    import pickle

    from torch.export.pt2_archive import _package

    real_load = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def refuse(*_: Any, **__: Any) -> Any:
        raise pickle.UnpicklingError("refused: the archive holds a pickled object")

    class _NoPickle:
        loads = staticmethod(refuse)
        load = staticmethod(refuse)
        UnpicklingError = pickle.UnpicklingError

    real_pickle = getattr(_package, "pickle", None)
    torch.load = load  # type: ignore[assignment]
    if real_pickle is not None:
        _package.pickle = _NoPickle  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.load = real_load  # type: ignore[assignment]
        if real_pickle is not None:
            _package.pickle = real_pickle  # type: ignore[attr-defined]


def _check_pt2(p: Path) -> None:
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            for name in names:
                info = z.getinfo(name)
                if info.file_size > 2**34:
                    raise ValueError(f"{p}: member {name!r} declares {info.file_size} bytes")
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    cfg = json.loads(z.read(name)).get("config", {})
                    for fqn, meta in cfg.items():
                        path_name = str(meta.get("path_name", ""))
                        if meta.get("use_pickle") or path_name.startswith(
                                ("custom_obj", "opaque_obj")):
                            raise ValueError(f"{p}: {fqn!r} is stored as a pickled object; "
                                             "refused (only raw tensor payloads are loaded)")
            legacy = [n for n in names if ("/data/weights/" in n and n.endswith(".pt"))
                      or ("/data/constants/" in n and n.endswith(".pt"))]
            if legacy:
                raise ValueError(f"{p}: legacy pickled weights ({legacy[0]}); re-save it with "
                                 "torch.export.save() of torch >= 2.6")
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{p} is not a torch.export archive (truncated or corrupt: {exc})"
                         ) from None


def _load_pt2(p: Path) -> ExportedModel:
    import pickle

    _check_pt2(p)
    try:
        with _weights_only():
            ep = torch.export.load(p)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{p}: {exc}") from None
    except (RuntimeError, KeyError, ValueError, AssertionError, zipfile.BadZipFile) as exc:
        msg = " ".join(str(exc).split())[:200]
        raise ValueError(f"{p} is not a loadable torch.export archive ({msg})") from None
    return ExportedModel(ep.module(), p)


def _state_dict(p: Path) -> dict[str, Tensor]:
    from ..report import load_torch_safe

    if p.suffix == ".safetensors":
        return load_safetensors(p)
    state = load_torch_safe(p, what="--model")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"--model {p} must hold a state dict (names -> tensors), got "
                         f"{type(state).__name__}")
    return state


def _build(arch: str, state: dict[str, Tensor], in_channels: int, num_classes: int,
           path: Path, mean: list[float] | None = None, std: list[float] | None = None,
           **kwargs: Any) -> nn.Module:
    from . import build_model

    normalized = "mean" in state and "std" in state and all(
        k in ("mean", "std") or k.startswith("model.") for k in state)
    if normalized and mean is None:
        mean, std = state["mean"].flatten().tolist(), state["std"].flatten().tolist()
    net = build_model(arch, in_channels=in_channels, num_classes=num_classes,
                      mean=mean if normalized else None, std=std if normalized else None,
                      **kwargs)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        detail = " ".join(ln.strip() for ln in lines[1:3]) if len(lines) > 1 else lines[0]
        raise ValueError(f"{path} does not fit --arch {arch} (in_channels {in_channels}, "
                         f"num_classes {num_classes}): {detail[:300]}") from None
    return net.eval()


def load_model(path: str | os.PathLike[str], *, arch: str | None = None,
               in_channels: int | None = None, num_classes: int | None = None,
               **kwargs: Any) -> nn.Module | ExportedModel:
    """A trained classifier from ``path`` (module docstring: the forms).

    Args:
        path: ``.pt2``, a run folder, or a state dict (``.pt``, ``.pth``, ``.safetensors``).
        arch: the zoo name (:data:`safedl_ext.models.MODEL_NAMES`) for a state dict.
        in_channels, num_classes: for a state dict (the caller knows them from the data);
            ``num_classes=None`` reads it from the state dict's head.
        **kwargs: architecture options (``width``, ...).

    Returns:
        An ``nn.Module`` in eval mode, or an :class:`ExportedModel`.

    Raises:
        FileNotFoundError: no such path. ValueError: unreadable, pickled objects, or
        weights that do not fit the architecture.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--model not found: {p}")
    if p.is_dir():
        spec_path, weights = p / "model.json", p / "model.pt"
        if not spec_path.is_file() or not weights.is_file():
            raise ValueError(f"--model {p} is a folder but not a run folder of `safedl train` "
                             "(needs model.json and model.pt)")
        try:
            spec = json.loads(spec_path.read_text())
            arch_, c, k = spec["arch"], int(spec["in_channels"]), int(spec["num_classes"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{spec_path} is not a model spec ({exc})") from None
        return _build(arch_, _state_dict(weights), c, k, weights, spec.get("mean"),
                      spec.get("std"), **kwargs)
    if p.suffix == ".pt2":
        return _load_pt2(p)
    if p.suffix not in (".pt", ".pth", ".safetensors"):
        raise ValueError(f"--model {p}: unknown format (give a .pt2 torch.export archive, a "
                         "run folder, or a .pt/.pth/.safetensors state dict with --arch)")
    if arch is None:
        raise ValueError(f"--model {p} is a state dict: give its architecture with --arch")
    if in_channels is None:
        raise ValueError("in_channels is needed to build a state dict's architecture")
    state = _state_dict(p)
    if num_classes is None:
        num_classes = state_num_classes(state, p)
    return _build(arch, state, in_channels, num_classes, p, **kwargs)


def state_num_classes(state: dict[str, Tensor], path: str | os.PathLike[str] = "state dict"
                      ) -> int:
    """The number of outputs of a classifier's state dict: the rows of its last 2-D
    ``*.weight`` (the head; state dicts list parameters in definition order).

    Raises:
        ValueError: no 2-D weight in the state dict.
    """
    heads = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if not heads:
        raise ValueError(f"--model {path}: no 2-D weight to read the number of classes "
                         "from; give --num-classes")
    return int(heads[-1].shape[0])
