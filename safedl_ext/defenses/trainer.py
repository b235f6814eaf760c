"""One trainer under every defence: optimiser, schedule, AMP, checkpoints, metrics.

:func:`fit` trains a model with a :class:`~safedl_ext.defenses.methods.Method` on
in-memory tensors or any iterable of ``(x, y)`` batches (a ``DataLoader``):

- SGD (momentum, Nesterov) or Adam; constant, step or cosine learning-rate schedules,
  stepped per optimiser step; optional linear warm-up.
- AMP on CUDA (``amp="bf16"`` or ``"fp16"`` with a gradient scaler).
- Seeded: the shuffle of epoch ``e`` comes from ``seed`` and ``e``; the methods' noise
  and random starts from one generator whose state is checkpointed.
- Checkpoints (``OUT/checkpoint.pt``) are written atomically at every epoch end, every
  ``checkpoint_every`` steps and on Ctrl-C (which takes effect at the next step boundary;
  a second Ctrl-C stops at once); ``resume=True`` continues from one, mid-epoch
  included, to the weights an uninterrupted run reaches (tensors, ``TensorLoader`` and
  ``DataLoader`` alike), and refuses one written with different settings, other training
  data (count, shapes, a content hash) or another architecture, with one clear message.
- Inputs are checked as the attacks check them: finite images in [0, 1], integer labels
  in [0, K) for a model with K outputs.
- Metrics as JSON lines (``OUT/metrics.jsonl``); the final weights as ``OUT/model.pt``
  (a plain state dict, loadable with ``torch.load(..., weights_only=True)``) and a summary
  ``OUT/train.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._checks import check_box
from ..report import (
    load_torch_safe,
    machine_info,
    save_torch_atomic,
    tensor_digest,
    write_json_atomic,
    write_text_atomic,
)
from ..training import predict
from .methods import Method, StepContext

__all__ = ["TrainConfig", "TrainResult", "fit", "load_checkpoint", "save_checkpoint"]

Augment = Callable[[Tensor, torch.Generator | None], Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes:
        epochs: passes over the training data.
        batch_size: samples per step (tensor data; a DataLoader brings its own).
        optimizer: ``"sgd"`` (momentum, optional Nesterov) or ``"adam"``.
        lr: peak learning rate. momentum, nesterov: SGD only. weight_decay: L2 (coupled).
        schedule: ``"constant"``, ``"step"`` (times ``gamma`` at each of ``milestones``,
            fractions of the run) or ``"cosine"`` (to 0 at the end).
        warmup_steps: linear warm-up from 0 over this many steps.
        amp: ``None``, ``"bf16"`` or ``"fp16"`` (CUDA only).
        grad_clip: clip the global gradient norm (``None``: no clipping).
        seed: seeds initial shuffles and the method's randomness.
        drop_last: drop the last incomplete batch of an epoch (tensor data).
        log_every: steps per metrics line.
        checkpoint_every: also checkpoint every this many steps (``None``: epoch ends only).
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["constant", "step", "cosine"] = "step"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_steps: int = 0
    amp: Literal["bf16", "fp16"] | None = None
    grad_clip: float | None = None
    seed: int = 0
    drop_last: bool = True
    log_every: int = 50
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(is_int(self.epochs) and self.epochs >= 1, f"epochs must be an int >= 1, got "
             f"{self.epochs!r}")
        need(is_int(self.batch_size) and self.batch_size >= 1,
             f"batch_size must be an int >= 1, got {self.batch_size!r}")
        need(self.optimizer in ("sgd", "adam"),
             f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.schedule in ("constant", "step", "cosine"),
             f"schedule must be 'constant', 'step' or 'cosine', got {self.schedule!r}")
        need(all(0 < m < 1 for m in self.milestones),
             f"milestones must be fractions in (0, 1), got {self.milestones}")
        need(0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0,
             f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        need(self.amp in (None, "bf16", "fp16"),
             f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        need(self.grad_clip is None or self.grad_clip > 0,
             f"grad_clip must be None or > 0, got {self.grad_clip}")
        need(is_int(self.log_every) and self.log_every >= 1,
             f"log_every must be an int >= 1, got {self.log_every!r}")
        need(self.checkpoint_every is None or (is_int(self.checkpoint_every)
                                               and self.checkpoint_every >= 1),
             f"checkpoint_every must be None or an int >= 1, got {self.checkpoint_every!r}")


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained model, in eval mode.
        history: one dict per metrics line (also in ``OUT/metrics.jsonl``).
        seconds: wall time of this call's training (excluding evaluation).
        steps: optimiser steps done in total (including those before a resume).
        resumed_from: the step a checkpoint restored, or ``None``.
        test_accuracy: clean test accuracy in [0, 1] after the last epoch (if test data).
    """

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    resumed_from: int | None = None
    test_accuracy: float | None = None


# ------------------------------------------------------------------------- data


class _TensorBatches:
    """Seeded mini-batches of in-memory tensors: epoch ``e``'s order is a permutation
    drawn from a generator seeded with ``(seed, e)``, so it needs no saved state."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int, drop_last: bool
                 ) -> None:
        self.x, self.y, self.bs, self.seed, self.drop_last = x, y, batch_size, seed, drop_last
        n = x.shape[0]
        self.n_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
        if self.n_batches == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} training samples "
                             "(drop_last=True leaves no batch)")

    def __len__(self) -> int:
        return self.n_batches

    def epoch(self, e: int, skip: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        perm = torch.randperm(self.x.shape[0], generator=g)
        for b in range(skip, self.n_batches):
            idx = perm[b * self.bs:(b + 1) * self.bs].to(self.x.device)
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)


class _LoaderBatches:
    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        try:
            self.n_batches = len(loader)  # type: ignore[arg-type]
        except TypeError as exc:
            raise TypeError("the training data must have a length (a DataLoader over a "
                            "map-style dataset, or a list of batches)") from exc
        if self.n_batches == 0:
            raise ValueError("the training data holds no batches")

    def __len__(self) -> int:
        return self.n_batches

    def generators(self) -> list[torch.Generator]:
        """The loader's own generators (shuffle order, worker seeds), deduplicated."""
        found: list[torch.Generator] = []
        for owner in (self.loader, getattr(self.loader, "sampler", None),
                      getattr(getattr(self.loader, "batch_sampler", None), "sampler", None)):
            g = getattr(owner, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not h for h in found):
                found.append(g)
        return found

    def epoch(self, e: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Epoch ``e``'s pass (a resume skips batches itself: see :func:`_start_pass`)."""
        for owner in (self.loader, getattr(self.loader, "sampler", None)):
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(e)  # TensorLoader, DistributedSampler
        for batch in self.loader:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise TypeError("each training batch must be an (x, y) pair")
            yield batch[0], batch[1]


def _rng_state(batches: Any) -> dict[str, Any]:
    """The random state a pass over ``batches`` draws from: torch's global generator and
    the loader's own generators (a DataLoader draws its shuffle and worker seeds there)."""
    gens = batches.generators() if isinstance(batches, _LoaderBatches) else []
    return {"torch": torch.get_rng_state(), "loader": [g.get_state() for g in gens]}


def _set_rng_state(batches: Any, state: dict[str, Any], loader_too: bool = True) -> None:
    torch.set_rng_state(state["torch"].to("cpu"))
    gens = batches.generators() if isinstance(batches, _LoaderBatches) else []
    if loader_too and len(gens) == len(state["loader"]):
        for g, st in zip(gens, state["loader"], strict=True):
            g.set_state(st.to("cpu"))


@contextlib.contextmanager
def _rng_untouched(batches: Any) -> Iterator[None]:
    """Run a look at the data (the setup batch) without consuming randomness."""
    state = _rng_state(batches)
    try:
        yield
    finally:
        _set_rng_state(batches, state)


def _start_pass(batches: Any, epoch: int, skip: int, epoch_rng: dict[str, Any]
                ) -> tuple[Iterator[tuple[Tensor, Tensor]], dict[str, Any]]:
    """The iterator of epoch ``epoch``'s pass, positioned after ``skip`` batches, and the
    random state the pass started from (to checkpoint).

    A fresh pass records the state it starts from. A mid-epoch resume of a loader replays
    its pass from that recorded state, fetches and drops the ``skip`` batches already
    trained on (so the loader's own generators and the global draws of a dataset's
    augmentation are where they were), then puts the global RNG back to the checkpoint's,
    before the next batch is fetched. Tensor batches need no replay: their order is a
    function of (seed, epoch)."""
    if not skip:
        state = _rng_state(batches)
        return batches.epoch(epoch), state
    if isinstance(batches, _TensorBatches):
        return batches.epoch(epoch, skip), epoch_rng
    now = _rng_state(batches)
    _set_rng_state(batches, epoch_rng)
    it = batches.epoch(epoch)
    for _ in range(skip):
        if next(it, None) is None:
            break
    _set_rng_state(batches, now, loader_too=False)
    return it, epoch_rng


class _DeferredInterrupt:
    """Ctrl-C (SIGINT) while training takes effect at the next step boundary, where the
    trainer writes a consistent checkpoint and then raises ``KeyboardInterrupt``; a second
    Ctrl-C interrupts at once (no checkpoint of a half-done step). Only in the main thread
    (elsewhere signals cannot be handled and nothing changes)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nsafedl_ext: stopping after this step with a checkpoint (Ctrl-C again to "
              "stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._old if self._old is not None
                          else signal.default_int_handler)


# ------------------------------------------------------------------ digests


def _data_digest(train: Any) -> dict[str, Any]:
    """What the training data is, to refuse resuming on other data: the count, shapes,
    dtypes and (for tensors, ``TensorLoader`` and ``DataLoader`` over a ``TensorDataset``)
    a content hash; other loaders give their lengths and the element shapes only."""
    from torch.utils.data import TensorDataset

    tensors: tuple[Tensor, ...] | None = None
    info: dict[str, Any] = {}
    if isinstance(train, (tuple, list)) and len(train) == 2 and all(
            isinstance(t, Tensor) for t in train):
        tensors, info["form"] = tuple(train), "tensors"
    elif isinstance(getattr(train, "x", None), Tensor) and isinstance(
            getattr(train, "y", None), Tensor):
        tensors, info["form"] = (train.x, train.y), type(train).__name__
    elif isinstance(getattr(train, "dataset", None), TensorDataset):
        tensors, info["form"] = tuple(train.dataset.tensors), type(train).__name__
    else:
        info["form"] = type(train).__name__
        ds = getattr(train, "dataset", None)
        with contextlib.suppress(TypeError):
            info["n"] = len(ds) if ds is not None else None  # type: ignore[arg-type]
    if tensors is not None:
        info["n"] = int(tensors[0].shape[0])
        info["shapes"] = [list(t.shape[1:]) for t in tensors]
        info["dtypes"] = [str(t.dtype) for t in tensors]
        info["hash"] = hashlib.sha256("|".join(tensor_digest(t) for t in tensors).encode()
                                      ).hexdigest()[:16]
    return info


def _model_digest(model: nn.Module) -> dict[str, Any]:
    """The architecture: class, parameter count, and a hash of the state dict's names,
    shapes and dtypes."""
    sd = model.state_dict()
    spec = "|".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sd.items())
    return {"class": type(model).__qualname__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "hash": hashlib.sha256(spec.encode()).hexdigest()[:16]}


def _describe_data(d: dict[str, Any]) -> str:
    shapes = " and ".join(f"{tuple(s)} {t.removeprefix('torch.')}"
                          for s, t in zip(d.get("shapes", []), d.get("dtypes", []),
                                          strict=False))
    text = f"{d.get('n')} samples" + (f" of {shapes}" if shapes else "")
    text += f", content hash {d['hash']}" if "hash" in d else ""
    text += f", {d['batches_per_epoch']} batches per epoch" if "batches_per_epoch" in d else ""
    return text + f" ({d['form']})"


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k, "<unset>"), new.get(k, "<unset>"),
                                f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _as_batches(train: Any, cfg: TrainConfig):
    if isinstance(train, (tuple, list)) and len(train) == 2 and all(
            isinstance(t, Tensor) for t in train):
        x, y = train
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"train: x and y must have the same length, got {x.shape[0]} "
                             f"and {y.shape[0]}")
        return _TensorBatches(x, y, cfg.batch_size, cfg.seed, cfg.drop_last)
    if isinstance(train, Iterable):
        return _LoaderBatches(train)
    raise TypeError("train must be an (x, y) pair of tensors or an iterable of (x, y) batches "
                    f"such as a DataLoader, got {type(train).__name__}")


def _check_batch(x: Tensor, y: Tensor, model_device: torch.device, dtype: torch.dtype,
                 num_classes: int | None = None, what: str = "training", values: bool = True
                 ) -> tuple[Tensor, Tensor]:
    """Types, shapes, finite values in [0, 1] and labels in [0, num_classes): the checks
    the attacks make (``safedl_ext._checks``), so a [0, 255] image or an out-of-range label
    fails here with a clear message instead of training badly or in torch's IndexError.
    ``values=False`` skips the value checks (data already checked whole: no device syncs)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{what} inputs must be a float tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16,
                                                     torch.uint8, torch.int8):
        raise TypeError(f"{what} labels must be an integer tensor, got "
                        f"{getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{what} labels must have shape ({x.shape[0]},), got "
                         f"{tuple(y.shape)}")
    if not values:
        return x.to(model_device, dtype, non_blocking=True), y.to(model_device).long()
    check_box(x, 0.0, 1.0, f"{what} inputs")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{what} labels must be >= 0, got {int(y.min())}")
    if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
        raise ValueError(f"{what} labels must be in [0, {num_classes}) for a model with "
                         f"{num_classes} outputs, got {int(y.max())}")
    return x.to(model_device, dtype, non_blocking=True), y.to(model_device).long()


def _accuracy(model: nn.Module, data: tuple[Tensor, Tensor], device: torch.device,
              dtype: torch.dtype, batch_size: int = 512) -> float:
    x, y = data
    pred = predict(model, x, batch_size=batch_size, device=device, dtype=dtype,
                   what="the test split")
    return int((pred == y.cpu()).sum()) / max(1, x.shape[0])


# ------------------------------------------------------------------- schedule


def _lr_factor(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    marks = sorted(round(m * total) for m in cfg.milestones)

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= m for m in marks)
        span = max(1, total - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def _optimizer(params: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """``torch.save`` through a temporary file and ``os.replace``: an interruption never
    leaves a half-written checkpoint (:func:`safedl_ext.report.save_torch_atomic`)."""
    return save_torch_atomic(path, state)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        ValueError: an empty, truncated or corrupt file, one that is not a checkpoint, or
            a pickle that needs code to load (the message names the file).
    """
    state = load_torch_safe(path, what="checkpoint", map_location=map_location)
    need = ("settings", "step", "model", "optimizer", "scheduler", "scaler", "method",
            "generator", "torch_rng")
    if not isinstance(state, dict) or any(k not in state for k in need):
        missing = [k for k in need if not isinstance(state, dict) or k not in state]
        raise ValueError(f"checkpoint {path} is not a safedl_ext training checkpoint "
                         f"(missing {', '.join(missing)})")
    return state


def _settings(cfg: TrainConfig, method: Method) -> dict[str, Any]:
    return json.loads(json.dumps({"train": asdict(cfg), "method": method.settings()},
                                 default=str))


def _check_resume(path: Path, state: dict[str, Any], settings: dict[str, Any],
                  data: dict[str, Any], arch: dict[str, Any]) -> None:
    """Refuse a checkpoint of another run, naming what differs, in one line."""
    hint = "use another out_dir, or resume=False (the CLI's --no-resume) to start over"
    if state["settings"] != settings:
        diff = "; ".join(_differences(state["settings"], settings)[:6])
        raise ValueError(f"{path} was written with other settings ({diff}); {hint}")
    if "arch" not in state or "data" not in state:
        warnings.warn(f"{path} predates data and architecture digests; resuming without "
                      "checking that the data and the model are the same", stacklevel=3)
        return
    if state["arch"] != arch:
        old, new = state["arch"], arch
        raise ValueError(f"{path} was written for another architecture ({old['class']}, "
                         f"{old['parameters']} parameters, hash {old['hash']}; now "
                         f"{new['class']}, {new['parameters']} parameters, hash "
                         f"{new['hash']}); {hint}")
    if state["data"] != data:
        raise ValueError(f"{path} was written for other training data "
                         f"({_describe_data(state['data'])}; now {_describe_data(data)}); "
                         f"{hint}")


# -------------------------------------------------------------------------- fit


def fit(
    model: nn.Module,
    method: Method,
    train: Any,
    *,
    config: TrainConfig | None = None,
    test: tuple[Tensor, Tensor] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    augment: Augment | None = None,
    progress: bool = True,
    max_steps: int | None = None,
) -> TrainResult:
    """Train ``model`` with ``method``.

    Args:
        model: takes [0, 1] inputs (normalisation inside) and returns (N, K) logits; it
            stays on its device and dtype; batches are moved there.
        method: the loss of a step (:mod:`~safedl_ext.defenses.methods`, JARN).
        train: ``(x, y)`` tensors (x: (N, ...) in [0, 1]; y: (N,) int64) batched by the
            trainer, or an iterable of ``(x, y)`` batches with a length (a
            :class:`~safedl_ext.data.TensorLoader` or a ``DataLoader``; ``set_epoch`` is
            called before every pass when the loader or its sampler has one).
        config: :class:`TrainConfig` (defaults if ``None``).
        test: ``(x, y)`` tensors; clean accuracy is measured after every epoch.
        out_dir: where checkpoints, metrics and the final weights go (nothing is written
            when ``None``).
        resume: continue from ``out_dir/checkpoint.pt`` when it exists; it must have been
            written with the same settings, the same training data and the same
            architecture (else ``ValueError``).
        augment: ``augment(x, generator) -> x`` applied to each training batch (e.g.
            :func:`safedl_ext.data.random_crop_flip`).
        progress: show a tqdm bar.
        max_steps: stop (with a checkpoint) after this many optimiser steps in total; the
            schedule still spans ``epochs`` (for tests of interruption and resume).

    Returns:
        :class:`TrainResult`.

    Raises:
        ValueError: bad data (non-finite or outside [0, 1], labels outside [0, K)), or a
            checkpoint in ``out_dir`` from another run; TypeError: wrong types.
    """
    from tqdm.auto import tqdm

    cfg = config or TrainConfig()
    if not isinstance(method, Method):
        raise TypeError(f"method must be a safedl_ext.defenses Method, got "
                        f"{type(method).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    device, dtype = params[0].device, params[0].dtype
    if cfg.amp is not None and device.type != "cuda":
        raise ValueError(f"amp is supported on CUDA only, got the model on {device}")
    batches = _as_batches(train, cfg)
    per_epoch = len(batches)
    total = cfg.epochs * per_epoch
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoint.pt" if out is not None else None
    metrics_path = out / "metrics.jsonl" if out is not None else None

    if test is not None and not (isinstance(test, (tuple, list)) and len(test) == 2):
        raise TypeError("test must be an (x, y) pair of tensors")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with _rng_untouched(batches):  # the look at the first batch consumes no randomness
        first_x, first_y = next(iter(batches.epoch(0)))
        first_x, _ = _check_batch(first_x, first_y, device, dtype)
        was = model.training
        model.eval()
        with torch.no_grad():
            num_classes = int(model(first_x[:1]).shape[-1])
        model.train(was)
    if isinstance(batches, _TensorBatches):  # all of it, before any work
        _check_batch(batches.x, batches.y, batches.x.device, batches.x.dtype, num_classes)
    else:
        _check_batch(first_x, first_y, device, dtype, num_classes)
    if test is not None:
        _check_batch(test[0], test[1], test[0].device, test[0].dtype, num_classes, "test")
    model.train()
    method.setup(model, first_x[: min(2, first_x.shape[0])])
    groups = [{"params": params}]
    extra = method.extra_parameters()
    if extra:
        groups.append({"params": extra})
    opt = _optimizer(groups, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg, total))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
    settings = _settings(cfg, method)
    data_digest = {**_data_digest(train), "batches_per_epoch": per_epoch}
    model_digest = _model_digest(model)

    step = 0
    resumed: int | None = None
    history: list[dict[str, Any]] = []
    epoch_rng = _rng_state(batches)  # where the current epoch's pass started
    if ckpt_path is not None and resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        _check_resume(ckpt_path, state, settings, data_digest, model_digest)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        method.load_state_dict(state["method"])
        gen.set_state(state["generator"].to("cpu"))
        step = resumed = int(state["step"])
        if "loader_rng" in state:  # a loader's own generators, as at the checkpoint
            _set_rng_state(batches, state["loader_rng"])
        if "epoch_rng" in state and step % per_epoch:
            epoch_rng = state["epoch_rng"]
        torch.set_rng_state(state["torch_rng"].to("cpu"))
        if "cuda_rng" in state and device.type == "cuda":  # dropout on the GPU
            torch.cuda.set_rng_state(state["cuda_rng"].to("cpu"), device)
        if metrics_path is not None and metrics_path.exists():
            lines = metrics_path.read_text().splitlines()
            history = [json.loads(ln) for ln in lines if ln.strip()]
            history = [h for h in history if h.get("step", 0) <= step]
    if metrics_path is not None:
        write_text_atomic(metrics_path, "".join(json.dumps(h) + "\n" for h in history))

    def checkpoint() -> None:
        if ckpt_path is None:
            return
        save_checkpoint(ckpt_path, {
            "settings": settings, "data": data_digest, "arch": model_digest, "step": step,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "method": method.state_dict(),
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "loader_rng": _rng_state(batches), "epoch_rng": epoch_rng,
            **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda"
               else {})})

    def log(rec: dict[str, Any]) -> None:
        history.append(rec)
        if metrics_path is not None:
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp or "")
    stop_at = total if max_steps is None else min(total, max_steps)
    train_seconds = 0.0
    acc_sum: dict[str, float] = {}
    acc_cnt: dict[str, int] = {}
    acc_n = 0
    t_log = time.perf_counter()
    bar = tqdm(total=stop_at, initial=step, desc=f"train {method.name}", disable=not progress,
               leave=False)
    test_acc: float | None = None
    stop = _DeferredInterrupt()
    try:
        with stop:
            while step < stop_at:
                epoch, skip = divmod(step, per_epoch)
                model.train()
                t_epoch = time.perf_counter()
                eval_seconds = 0.0
                pass_iter, epoch_rng = _start_pass(batches, epoch, skip, epoch_rng)
                while step < stop_at:  # checked before a batch is fetched, not after
                    batch = next(pass_iter, None)
                    if batch is None:
                        raise ValueError(f"the training data yielded {step % per_epoch} "
                                         f"batches in epoch {epoch}, but its len() is "
                                         f"{per_epoch}")
                    xb, yb = _check_batch(*batch, device, dtype, num_classes,
                                          values=not isinstance(batches, _TensorBatches))
                    if augment is not None:
                        xb = augment(xb, gen)
                    ctx = StepContext(step=step, total_steps=total, epoch=epoch,
                                      generator=gen, device=device)
                    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                                        enabled=amp_dtype is not None):
                        loss, logits, logs = method.loss(model, xb, yb, ctx)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss became {float(loss)} at step {step} "
                                                 f"(epoch {epoch}); lower lr or check the "
                                                 "data")
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.grad_clip is not None:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(params + extra, cfg.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    logs = {**logs, **method.after_step(model, ctx)}
                    step += 1
                    bar.update(1)
                    end_of_pass = step % per_epoch == 0
                    if end_of_pass:  # exhaust the pass: a sampler draws its last numbers
                        next(pass_iter, None)  # when asked for more (RandomSampler)
                    vals = {"loss": float(loss.detach()),
                            "acc": float((logits.detach().argmax(1) == yb).float().mean()),
                            **logs}
                    for k, v in vals.items():  # per key: some appear only on some steps
                        acc_sum[k] = acc_sum.get(k, 0.0) + float(v)
                        acc_cnt[k] = acc_cnt.get(k, 0) + 1
                    acc_n += 1
                    if step % cfg.log_every == 0 or step == stop_at or end_of_pass:
                        now = time.perf_counter()
                        rec = {"step": step,
                               "epoch": epoch + (step - epoch * per_epoch) / per_epoch,
                               "lr": opt.param_groups[0]["lr"],
                               **{k: v / acc_cnt[k] for k, v in acc_sum.items()},
                               "seconds_per_step": (now - t_log) / acc_n}
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}")
                        acc_sum, acc_cnt, acc_n, t_log = {}, {}, 0, now
                        if end_of_pass and test is not None:
                            test_acc = _accuracy(model, test, device, dtype)
                            rec["test_acc"] = test_acc
                            t_log = time.perf_counter()
                            eval_seconds += t_log - now
                        log(rec)
                    if end_of_pass:
                        break  # the epoch-end checkpoint below
                    if stop.requested:  # Ctrl-C: stop at this step boundary, resumable
                        checkpoint()
                        raise KeyboardInterrupt
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                        checkpoint()
                train_seconds += time.perf_counter() - t_epoch - eval_seconds
                checkpoint()
                if stop.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        raise
    bar.close()
    model.eval()
    if test is not None and test_acc is None:
        test_acc = _accuracy(model, test, device, dtype)
    if out is not None and step >= total:
        save_torch_atomic(out / "model.pt", model.state_dict())
        write_json_atomic(out / "train.json", {
            "settings": settings, "steps": step, "seconds_this_run": round(train_seconds, 2),
            "resumed_from": resumed, "test_accuracy": test_acc, "machine": dict(machine_info())})
    return TrainResult(model=model, history=history, seconds=train_seconds, steps=step,
                       resumed_from=resumed, test_accuracy=test_acc)
