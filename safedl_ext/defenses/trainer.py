"""One trainer under every defence: optimiser, schedule, AMP, checkpoints, metrics.

:func:`fit` trains a model with a :class:`~safedl_ext.defenses.methods.Method` on
in-memory tensors or any iterable of ``(x, y)`` batches (a ``DataLoader``):

- SGD (momentum, Nesterov) or Adam; constant, step or cosine learning-rate schedules,
  stepped per optimiser step; optional linear warm-up.
- AMP on CUDA (``amp="bf16"`` or ``"fp16"`` with a gradient scaler).
- Seeded: the shuffle of epoch ``e`` comes from ``seed`` and ``e``; the methods' noise
  and random starts from one generator whose state is checkpointed.
- Checkpoints (``OUT/checkpoint.pt``) are written atomically at every epoch end, every
  ``checkpoint_every`` steps and on Ctrl-C; ``resume=True`` continues from one, mid-epoch
  included, and refuses one written with different settings.
- Metrics as JSON lines (``OUT/metrics.jsonl``); the final weights as ``OUT/model.pt``
  (a plain state dict, loadable with ``torch.load(..., weights_only=True)``) and a summary
  ``OUT/train.json``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..report import machine_info, write_json_atomic, write_text_atomic
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

    def epoch(self, e: int, skip: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(e)  # DistributedSampler
        for b, batch in enumerate(self.loader):
            if b < skip:
                continue
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise TypeError("each training batch must be an (x, y) pair")
            yield batch[0], batch[1]


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


def _check_batch(x: Tensor, y: Tensor, model_device: torch.device, dtype: torch.dtype
                 ) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"training inputs must be a float tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16,
                                                     torch.uint8, torch.int8):
        raise TypeError(f"training labels must be an integer tensor, got "
                        f"{getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    return x.to(model_device, dtype, non_blocking=True), y.to(model_device).long()


@torch.no_grad()
def _accuracy(model: nn.Module, data: tuple[Tensor, Tensor], device: torch.device,
              dtype: torch.dtype, batch_size: int = 512) -> float:
    x, y = data
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(device, dtype)
        correct += int((model(xb).argmax(1).cpu() == y[i:i + batch_size].cpu()).sum())
    model.train(was)
    return correct / max(1, x.shape[0])


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
    leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _settings(cfg: TrainConfig, method: Method) -> dict[str, Any]:
    return json.loads(json.dumps({"train": asdict(cfg), "method": method.settings()},
                                 default=str))


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
            trainer, or an iterable of ``(x, y)`` batches with a length (a DataLoader).
        config: :class:`TrainConfig` (defaults if ``None``).
        test: ``(x, y)`` tensors; clean accuracy is measured after every epoch.
        out_dir: where checkpoints, metrics and the final weights go (nothing is written
            when ``None``).
        resume: continue from ``out_dir/checkpoint.pt`` when it exists (same settings).
        augment: ``augment(x, generator) -> x`` applied to each training batch (e.g.
            :func:`safedl_ext.data.random_crop_flip`).
        progress: show a tqdm bar.
        max_steps: stop (with a checkpoint) after this many optimiser steps in total; the
            schedule still spans ``epochs`` (for tests of interruption and resume).

    Returns:
        :class:`TrainResult`.
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

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    first_x, first_y = next(iter(batches.epoch(0)))
    first_x, _ = _check_batch(first_x, first_y, device, dtype)
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

    step = 0
    resumed: int | None = None
    history: list[dict[str, Any]] = []
    if ckpt_path is not None and resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        if state["settings"] != settings:
            raise ValueError(f"{ckpt_path} was written with different settings; use another "
                             f"out_dir or resume=False.\n checkpoint: {state['settings']}\n "
                             f"now: {settings}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        method.load_state_dict(state["method"])
        gen.set_state(state["generator"].to("cpu"))
        torch.set_rng_state(state["torch_rng"].to("cpu"))
        step = resumed = int(state["step"])
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
            "settings": settings, "step": step, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "method": method.state_dict(),
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state()})

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
    try:
        while step < stop_at:
            epoch, skip = divmod(step, per_epoch)
            model.train()
            t_epoch = time.perf_counter()
            eval_seconds = 0.0
            for xb, yb in batches.epoch(epoch, skip):
                if step >= stop_at:
                    break
                xb, yb = _check_batch(xb, yb, device, dtype)
                if augment is not None:
                    xb = augment(xb, gen)
                ctx = StepContext(step=step, total_steps=total, epoch=epoch, generator=gen,
                                  device=device)
                with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                                    enabled=amp_dtype is not None):
                    loss, logits, logs = method.loss(model, xb, yb, ctx)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {float(loss)} at step {step} "
                                             f"(epoch {epoch}); lower lr or check the data")
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
                vals = {"loss": float(loss.detach()),
                        "acc": float((logits.detach().argmax(1) == yb).float().mean()), **logs}
                for k, v in vals.items():  # per key: some appear only on some steps
                    acc_sum[k] = acc_sum.get(k, 0.0) + float(v)
                    acc_cnt[k] = acc_cnt.get(k, 0) + 1
                acc_n += 1
                if step % cfg.log_every == 0 or step == stop_at or step % per_epoch == 0:
                    now = time.perf_counter()
                    rec = {"step": step, "epoch": epoch + (step - epoch * per_epoch) / per_epoch,
                           "lr": opt.param_groups[0]["lr"],
                           **{k: v / acc_cnt[k] for k, v in acc_sum.items()},
                           "seconds_per_step": (now - t_log) / acc_n}
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}")
                    acc_sum, acc_cnt, acc_n, t_log = {}, {}, 0, now
                    if step % per_epoch == 0 and test is not None:
                        test_acc = _accuracy(model, test, device, dtype)
                        rec["test_acc"] = test_acc
                        t_log = time.perf_counter()
                        eval_seconds += t_log - now
                    log(rec)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint()
            train_seconds += time.perf_counter() - t_epoch - eval_seconds
            checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        bar.close()
        raise
    bar.close()
    model.eval()
    if test is not None and test_acc is None:
        test_acc = _accuracy(model, test, device, dtype)
    if out is not None and step >= total:
        tmp = out / ".model.pt.tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, out / "model.pt")
        write_json_atomic(out / "train.json", {
            "settings": settings, "steps": step, "seconds_this_run": round(train_seconds, 2),
            "resumed_from": resumed, "test_accuracy": test_acc, "machine": dict(machine_info())})
    return TrainResult(model=model, history=history, seconds=train_seconds, steps=step,
                       resumed_from=resumed, test_accuracy=test_acc)
