"""Neutralizing a backdoored model (thesis §5.4.4, Algorithms 5-6): counter-poison,
relabel, retrain.

Given the model trained on poisoned data, the data, and what a scan found (target class,
base class, the filtered samples), :func:`neutralize` fine-tunes a copy of the model on a
*neutralization set* built from the data, with one of four remedies run by one code path:

* ``"both"`` (the thesis's Algorithm 6): the filtered samples relabelled to the base class,
  and counter-poisoned copies of the other classes' images, which keep their labels;
* ``"relabel"``: the filtered samples relabelled only;
* ``"counter"``: the counter-poisoned copies only (the filtered samples keep the target);
* ``"remove"``: the filtered samples dropped (the usual remedy after Spectral Signatures or
  Activation Clustering).

**Counter-poison (Algorithm 5).** The thesis prints only the algorithm's input line. The
reading implemented here is the one its text supports: the poison signal is taken from
the *filtered* samples only, from their input gradients with each label y other than the
target (one forward pass, one VJP per label), each gradient scaled to unit L2 norm; the
signal of class y is the top right singular vector of those rows (not centred: their
common direction is the signal), v_y, a unit vector in input space; every image of class
y gets a copy ``clip(x + (rho / 255) * s * v_y, 0, 1)`` with its own label y (always
clipped: the models here take images in [0, 1], and the trainer refuses others). Pixels are
in [0, 1] here, so the thesis's rho = 500 for 0-255 images and a unit-norm signal is
``rho / 255`` = 1.96 in these units (a 3,072-pixel unit vector's entries are ~0.018, so
~0.035, or 9 of 255, per pixel). The sign s: ``"ascent"`` (default) points v_y along the
filtered samples' mean gradient of the loss with label y, i.e. toward what makes them
*less* y and more the target: the trigger's own direction as the model sees it, added to
images that keep their true labels; ``"descent"`` is the opposite (the thesis's phrase
"against the gradient of the loss" read literally). The choices the thesis leaves open
are options of :class:`NeutralizeConfig` (sign, add copies or replace the originals, the
share of each class's images); their defaults were measured (docs/poison-neutralize.md).

**Retraining** uses the package's trainer (:func:`~safedl_ext.defenses.trainer.fit`):
checkpoints every epoch and on Ctrl-C, resume, progress bar, seeded (the same seeds give
the same model). The neutralization set is never materialised: batches are assembled
from the data's images, the plan (source index, label, which signal) and the signals.

A ``torch.export`` program (:class:`~safedl_ext.models.io.ExportedModel`) trains with
autograd, but its batch norm stays in eval mode (``train()`` raises on an exported
module): it is fine-tuned with its running statistics frozen (those layers normalise with
the statistics of the poisoned training run; their affine weights still train), and
written back as a ``torch.export`` archive.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..report import load_torch_safe, save_torch_atomic, write_atomic, write_json_atomic
from ._rows import top_vectors
from .data import ScanData
from .scan import _gradients, attack_mode

__all__ = [
    "MEASURES",
    "REMEDIES",
    "NeutralizationLoader",
    "NeutralizationPlan",
    "NeutralizeConfig",
    "NeutralizeResult",
    "backdoor_metrics",
    "check_scan_report",
    "counter_poison_signals",
    "neutralization_plan",
    "neutralize",
    "save_neutralized",
    "write_neutralize_report",
]

Remedy = Literal["both", "relabel", "counter", "remove"]
REMEDIES: tuple[str, ...] = ("both", "relabel", "counter", "remove")
#: What :func:`backdoor_metrics` measures: (key, name for tables).
MEASURES: tuple[tuple[str, str], ...] = (("clean_accuracy", "clean accuracy"),
                                         ("base_accuracy", "base class, untriggered"),
                                         ("poisoned_accuracy", "poisoned-base accuracy"),
                                         ("attack_success", "attack success"))
#: The signal's per-label gradient rows held in memory at most (float32 bytes); more
#: filtered samples than fit are subsampled evenly.
_SIGNAL_BYTES = 256 * 2**20


@dataclass(frozen=True)
class NeutralizeConfig:
    """Settings of :func:`neutralize`.

    Attributes:
        remedy: ``"both"`` (relabel + counter-poison, the thesis), ``"relabel"``,
            ``"counter"`` or ``"remove"``.
        rho: counter-poison factor in 0-255 pixel units for a unit-norm signal (thesis:
            500); the images here are in [0, 1], so ``rho / 255`` is added per unit.
        sign: ``"ascent"`` (along the filtered samples' mean loss gradient for the label:
            the trigger's direction) or ``"descent"`` (against it).
        mode: ``"add"`` (counter-poisoned copies join the originals) or ``"replace"``
            (they take the originals' place).
        fraction: the share of each non-target class's images that get a copy (chosen by
            a seeded permutation).
        epochs: retraining epochs (thesis: 1).
        optimizer, lr, weight_decay, batch_size: the retraining's optimiser.
        schedule: the learning rate over the retraining: ``"constant"`` or ``"cosine"``
            (from ``lr`` to 0 over all its steps). The defaults, Adam at 2e-3 with the
            cosine, were chosen on 7 CIFAR-10 backdoors (docs/poison-neutralize.md): the
            constant 1e-3 cost up to 3.1 points of clean accuracy.
        signal_samples: at most this many filtered samples (evenly spaced) give the
            signal; the per-label rows are also held to 256 MiB.
        gradient_batch: images per forward/VJP pass for the signal.
        seed: the retraining's shuffle and the copies' selection.
        device: where the gradients and the retraining run.
    """

    remedy: Remedy = "both"
    rho: float = 500.0
    sign: Literal["ascent", "descent"] = "ascent"
    mode: Literal["add", "replace"] = "add"
    fraction: float = 1.0
    epochs: int = 1
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "cosine"
    batch_size: int = 128
    signal_samples: int = 2000
    gradient_batch: int = 128
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        def pos_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        need(self.remedy in REMEDIES, f"remedy must be one of {', '.join(REMEDIES)}, got "
             f"{self.remedy!r}")
        need(isinstance(self.rho, (int, float)) and math.isfinite(self.rho) and self.rho > 0,
             f"rho must be a finite number > 0, got {self.rho!r}")
        need(self.sign in ("ascent", "descent"),
             f"sign must be 'ascent' or 'descent', got {self.sign!r}")
        need(self.mode in ("add", "replace"), f"mode must be 'add' or 'replace', got "
             f"{self.mode!r}")
        need(isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1,
             f"fraction must be in (0, 1], got {self.fraction!r}")
        need(self.optimizer in ("adam", "sgd"),
             f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        need(isinstance(self.lr, (int, float)) and self.lr > 0, f"lr must be > 0, got "
             f"{self.lr!r}")
        need(self.schedule in ("constant", "cosine"),
             f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("epochs", "batch_size", "signal_samples", "gradient_batch"):
            need(pos_int(getattr(self, name)), f"{name} must be an int >= 1, got "
                 f"{getattr(self, name)!r}")
        need(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an int >= 0, "
             f"got {self.seed!r}")

    def identity(self) -> dict[str, Any]:
        """What a resume must match (all but the device)."""
        d = asdict(self)
        d.pop("device")
        return d


# ------------------------------------------------------------------ the signal


def counter_poison_signals(model: Callable[[Tensor], Tensor], data: ScanData,
                           suspicious: Tensor | list[int], target: int,
                           config: NeutralizeConfig | None = None) -> Tensor:
    """The counter-poison signal of every class (Algorithm 5, see the module docstring).

    Args:
        model: images (B, C, H, W) in [0, 1] -> (B, K) logits.
        data: the (poisoned) training data.
        suspicious: indices into ``data`` of the filtered samples (the scan's
            ``suspicious_indices``).
        target: the target class (its row stays zero).
        config: ``signal_samples``, ``gradient_batch``, ``sign``, ``device``.

    Returns:
        (K, C, H, W) float32: unit-norm signals ``s * v_y`` (oriented by ``config.sign``),
        zero for the target class.

    Raises:
        ValueError: no filtered samples, an index out of range, a target outside [0, K).
    """
    cfg = config or NeutralizeConfig()
    idx = torch.as_tensor(suspicious, dtype=torch.int64).flatten()
    n, d = len(data), data.dim
    if idx.numel() == 0:
        raise ValueError("no filtered samples: there is no poison signal to extract")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"filtered sample indices must be in [0, {n}), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    device = torch.device(cfg.device)
    with attack_mode(model):
        k = int(model(data.images(idx[:1], device)).shape[1])
        if not 0 <= target < k:
            raise ValueError(f"target must be in [0, {k}), got {target}")
        cap = max(1, min(cfg.signal_samples, _SIGNAL_BYTES // (4 * k * d)))
        if idx.numel() > cap:  # evenly spaced, deterministic
            idx = idx[torch.linspace(0, idx.numel() - 1, cap).round().long()]
        rows = torch.empty((idx.numel(), k, d), dtype=torch.float32)
        for s in range(0, idx.numel(), cfg.gradient_batch):
            ib = idx[s:s + cfg.gradient_batch]
            g, _ = _gradients(model, data.images(ib, device), "all", None, ib)
            rows[s:s + ib.numel()] = g.cpu()
    out = torch.zeros((k, d), dtype=torch.float32)
    gen = torch.Generator().manual_seed(cfg.seed)
    for y in range(k):
        if y == target:
            continue
        m = rows[:, y, :].contiguous()
        if float(m.abs().max()) == 0.0:  # the model's loss for y is flat on these samples
            continue
        _, v, _, _ = top_vectors(lambda b, m=m: m.T @ (m @ b), d, 1, gen,
                                 torch.device("cpu"), tol=1e-4, dtype=torch.float32)
        v = v[0]
        along = float((m @ v).mean())  # > 0: v points along the mean loss gradient
        s = 1.0 if along >= 0 else -1.0
        if cfg.sign == "descent":
            s = -s
        out[y] = s * v
    c, h, w = data.shape
    return out.reshape(k, c, h, w)


# ------------------------------------------------------------------ the set


@dataclass(frozen=True)
class NeutralizationPlan:
    """The neutralization set, as indices: sample ``i`` is image ``source[i]`` of the data
    with label ``label[i]``, plus the signal of class ``signal[i]`` (-1: none).

    Attributes:
        source, label, signal: (M,) int64.
        counts: how many samples were kept, relabelled, removed and counter-poisoned.
    """

    source: Tensor
    label: Tensor
    signal: Tensor
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.source.numel())


def neutralization_plan(y: Tensor, suspicious: Tensor | list[int], target: int,
                        base: int | None, config: NeutralizeConfig | None = None
                        ) -> NeutralizationPlan:
    """Which images, labels and signals make the neutralization set of ``config.remedy``.

    Args:
        y: (N,) the data's labels.
        suspicious: the filtered samples' indices (labelled ``target``).
        target, base: the scan's classes (``base`` is needed by the relabelling remedies).

    Raises:
        ValueError: a relabelling remedy without a base class, indices out of range.
    """
    cfg = config or NeutralizeConfig()
    y = torch.as_tensor(y, dtype=torch.int64).flatten()
    n = int(y.numel())
    sus = torch.as_tensor(suspicious, dtype=torch.int64).flatten()
    if sus.numel() and (int(sus.min()) < 0 or int(sus.max()) >= n):
        raise ValueError(f"filtered sample indices must be in [0, {n}), got "
                         f"[{int(sus.min())}, {int(sus.max())}]")
    if cfg.remedy in ("both", "relabel") and base is None:
        raise ValueError(f"remedy {cfg.remedy!r} relabels the filtered samples to the base "
                         "class, but the scan named none")
    flagged = torch.zeros(n, dtype=torch.bool)
    flagged[sus] = True
    label = y.clone()
    keep = torch.ones(n, dtype=torch.bool)
    counts = {"data": n, "filtered": int(flagged.sum()), "relabelled": 0, "removed": 0,
              "counter_poisoned": 0}
    if cfg.remedy in ("both", "relabel"):
        label[flagged] = int(base)  # type: ignore[arg-type]
        counts["relabelled"] = int(flagged.sum())
    elif cfg.remedy == "remove":
        keep &= ~flagged
        counts["removed"] = int(flagged.sum())
    signal = torch.full((n,), -1, dtype=torch.int64)
    src = torch.arange(n)
    parts_src, parts_lab, parts_sig = [src[keep]], [label[keep]], [signal[keep]]
    if cfg.remedy in ("both", "counter"):
        gen = torch.Generator().manual_seed(cfg.seed)
        chosen = []
        for c in torch.unique(y).tolist():
            if c == target:
                continue
            members = torch.nonzero((y == c) & ~flagged).flatten()
            take = max(1, round(cfg.fraction * members.numel())) if members.numel() else 0
            perm = torch.randperm(members.numel(), generator=gen)[:take]
            chosen.append(members[perm.sort().values])
        cp = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64)
        counts["counter_poisoned"] = int(cp.numel())
        if cfg.mode == "replace":
            replaced = torch.zeros(n, dtype=torch.bool)
            replaced[cp] = True
            sel = keep & ~replaced
            parts_src, parts_lab, parts_sig = [src[sel]], [label[sel]], [signal[sel]]
        parts_src.append(cp)
        parts_lab.append(y[cp])
        parts_sig.append(y[cp])
    source = torch.cat(parts_src)
    order = torch.argsort(source, stable=True)  # originals and copies side by side
    counts["total"] = int(source.numel())
    return NeutralizationPlan(source[order], torch.cat(parts_lab)[order],
                              torch.cat(parts_sig)[order], counts)


class NeutralizationLoader:
    """Seeded, resumable mini-batches of a :class:`NeutralizationPlan`, assembled on the
    fly (the set is never materialised): the trainer's loader protocol (``set_epoch``,
    ``len``, iteration), the order of epoch e a function of ``(seed, e)``.

    Args:
        data: the images.
        plan: the set.
        signals: (K, C, H, W) unit signals (:func:`counter_poison_signals`), or ``None``
            when the plan uses none.
        rho: 0-255 units (``rho / 255`` per unit of signal is added; then clipped to
            [0, 1]).
        batch_size: B. seed: the shuffle's seed.
        device: where batches are made.
    """

    def __init__(self, data: ScanData, plan: NeutralizationPlan, signals: Tensor | None,
                 rho: float, batch_size: int, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        if len(plan) == 0:
            raise ValueError("the neutralization set is empty")
        if bool((plan.signal >= 0).any()) and signals is None:
            raise ValueError("the plan counter-poisons images but no signals were given")
        self.data, self.plan, self.rho = data, plan, float(rho)
        self.device = torch.device(device)
        self.signals = signals.to(self.device, torch.float32) if signals is not None else None
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.plan) / self.batch_size)

    def batch(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Samples ``rows`` of the plan: ((B, C, H, W) float32 in [0, 1], (B,) int64)."""
        src, sig = self.plan.source[rows], self.plan.signal[rows]
        x = self.data.images(src, self.device)
        hit = torch.nonzero(sig >= 0).flatten()
        if hit.numel():
            assert self.signals is not None
            add = self.signals.index_select(0, sig[hit].to(self.device)) * (self.rho / 255.0)
            hd = hit.to(self.device)
            x[hd] = (x[hd] + add).clamp_(0.0, 1.0)
        return x, self.plan.label[rows].to(self.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        perm = torch.randperm(len(self.plan), generator=g)
        for s in range(0, perm.numel(), self.batch_size):
            yield self.batch(perm[s:s + self.batch_size])


# ------------------------------------------------------------------ measuring


def backdoor_metrics(model: Callable[[Tensor], Tensor], *, test: tuple[Tensor, Tensor] | None
                     = None, triggered: tuple[Tensor, Tensor] | None = None,
                     target: int | None = None, batch_size: int = 512,
                     device: str | torch.device = "cpu") -> dict[str, float]:
    """Clean accuracy on ``test``; on ``triggered`` (images with the trigger, their true
    labels): accuracy against the true labels (the thesis's "poisoned-base accuracy",
    Tables 5.3-5.7) and the attack success rate (the share classified as ``target``); with
    both, the accuracy on ``test``'s images of the labels in ``triggered`` (the base
    class) without the trigger: what the poisoned-base accuracy would be if the trigger
    changed nothing.

    Returns:
        ``{"clean_accuracy", "base_accuracy", "poisoned_accuracy", "attack_success"}``
        (those measured), each a fraction in [0, 1].
    """
    out: dict[str, float] = {}

    def preds(x: Tensor) -> Tensor:
        parts = []
        with attack_mode(model), torch.no_grad():
            for s in range(0, x.shape[0], batch_size):
                xb = x[s:s + batch_size].to(device)
                xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
                parts.append(model(xb).argmax(dim=1).cpu())
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    if test is not None and test[0].shape[0]:
        hit = preds(test[0]) == test[1].cpu()
        out["clean_accuracy"] = float(hit.float().mean())
        if triggered is not None and triggered[0].shape[0]:
            keep = torch.isin(test[1].cpu(), triggered[1].cpu().unique())
            if bool(keep.any()):
                out["base_accuracy"] = float(hit[keep].float().mean())
    if triggered is not None and triggered[0].shape[0]:
        p = preds(triggered[0])
        out["poisoned_accuracy"] = float((p == triggered[1].cpu()).float().mean())
        if target is not None:
            out["attack_success"] = float((p == target).float().mean())
    return out


# ------------------------------------------------------------------ the remedy


class _Trainable(nn.Module):
    """An exported program's module trained in place: ``train()``/``eval()`` switch this
    wrapper only (an exported module raises on ``train()``), so batch norm keeps the
    running statistics it was exported with; parameters require grad."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def train(self, mode: bool = True) -> _Trainable:
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


def _fresh_graph_module(model: Any) -> nn.Module:
    """A trainable copy of an exported program's module: loaded again from its archive
    when it came from one (no deep copy of the graph, whose pytree specs trip torch's
    LeafSpec deprecation warning), else deep-copied with that warning silenced."""
    path = getattr(model, "path", None)
    if path is not None and Path(path).is_file():
        from ..models.io import load_model

        return load_model(path).graph_module  # type: ignore[union-attr]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(model.graph_module)


@dataclass
class NeutralizeResult:
    """What :func:`neutralize` returns.

    Attributes:
        model: the neutralized model (an ``nn.Module``; for an exported program its
            ``module()``, trained).
        config: the settings.
        target, base: the scan's classes.
        counts: the set's make-up (:attr:`NeutralizationPlan.counts`).
        signals: (K, C, H, W) counter-poison signals, or ``None`` (remedies without).
        before, after: :func:`backdoor_metrics` of the model before and after.
        timings: seconds per step.
        train: the trainer's summary (epochs, steps, final loss).
    """

    model: nn.Module
    config: NeutralizeConfig
    target: int
    base: int | None
    counts: dict[str, int]
    signals: Tensor | None
    before: dict[str, float]
    after: dict[str, float]
    timings: dict[str, float]
    train: dict[str, Any]


def _scan_fields(scan: Any) -> tuple[int | None, int | None, list[int], bool]:
    """(target, base, suspicious, poisoned) from a ScanResult or a report.json dict."""
    if isinstance(scan, dict):
        return (scan.get("target_class"), scan.get("base_class"),
                list(scan.get("suspicious_indices", [])), bool(scan.get("poisoned")))
    return (scan.target_class, scan.base_class, list(scan.suspicious_indices),
            bool(scan.poisoned))


def neutralize(model: Any, data: ScanData, scan: Any, *,
               config: NeutralizeConfig | None = None, out: str | Path | None = None,
               test: tuple[Tensor, Tensor] | None = None,
               triggered: tuple[Tensor, Tensor] | None = None,
               progress: bool = True, max_steps: int | None = None) -> NeutralizeResult:
    """Fine-tune a copy of ``model`` on the neutralization set of ``config.remedy``.

    Args:
        model: the poisoned model: an ``nn.Module`` (copied; the original is left as it
            is) or an :class:`~safedl_ext.models.io.ExportedModel` (its module is copied
            and trained with batch norm frozen, see the module docstring).
        data: the training data the scan saw.
        scan: a :class:`~safedl_ext.poison.scan.ScanResult` of the gradient scan, or its
            ``report.json`` as a dict; its ``suspicious_indices`` index ``data``.
        config: :class:`NeutralizeConfig`.
        out: a folder for the retraining's checkpoints (``out/train``; rerun with the same
            folder to resume) and ``out/neutralize.json``; ``None``: nothing written.
        test: clean ``(x, y)`` test images (float in [0, 1] or uint8), for the clean
            accuracy before and after.
        triggered: triggered test images and their *true* labels, for the poisoned-base
            accuracy and the attack success before and after.
        progress: progress bars.
        max_steps: stop the retraining (with a checkpoint) after this many steps (tests of
            interruption; a rerun with the same ``out`` resumes).

    Raises:
        ValueError: a scan that found nothing (nothing to neutralize), a relabelling remedy
            without a base class, indices outside the data, a checkpoint in ``out`` of
            another neutralization.
    """
    from ..defenses.methods import Standard
    from ..defenses.trainer import TrainConfig, fit

    cfg = config or NeutralizeConfig()
    target, base, suspicious, poisoned = _scan_fields(scan)
    if not poisoned or target is None:
        raise ValueError("the scan found no backdoor: there is nothing to neutralize")
    if not suspicious:
        raise ValueError("the scan flagged no samples: there is nothing to neutralize")
    n = len(data)
    if max(suspicious) >= n or min(suspicious) < 0:
        raise ValueError(f"the scan's suspicious indices reach {max(suspicious)}, but the "
                         f"data holds {n} samples: it is not the data the scan saw")
    device = torch.device(cfg.device)
    if isinstance(model, nn.Module):
        net = copy.deepcopy(model).to(device)
    elif hasattr(model, "graph_module"):
        net = _Trainable(_fresh_graph_module(model)).to(device)
    else:
        raise TypeError(f"model must be an nn.Module or an ExportedModel, got "
                        f"{type(model).__name__}")
    for p in net.parameters():
        p.requires_grad_(True)
    timings: dict[str, float] = {}
    outp = Path(out) if out is not None else None
    if outp is not None:  # the resume's identity
        identity = {"config": cfg.identity(), "data": data.digest(), "target": target,
                    "base": base, "suspicious": len(suspicious),
                    "suspicious_sum": int(sum(suspicious))}
        outp.mkdir(parents=True, exist_ok=True)
        ident_path = outp / "neutralize.identity.json"
        if ident_path.exists():
            was = json.loads(ident_path.read_text())
            if was != identity:
                diff = sorted(k for k in set(was) | set(identity) if was.get(k) != identity.get(k))
                raise ValueError(f"{outp} holds a neutralization with other "
                                 f"{', '.join(diff)}; use another output folder or delete it")
        else:
            write_json_atomic(ident_path, identity)

    t0 = time.perf_counter()
    before = backdoor_metrics(net, test=test, triggered=triggered, target=target,
                              device=device)
    timings["measure_before"] = time.perf_counter() - t0
    signals = None
    sig_path = outp / "signals.pt" if outp is not None else None
    if cfg.remedy in ("both", "counter"):
        t0 = time.perf_counter()
        if sig_path is not None and sig_path.exists():
            signals = load_torch_safe(sig_path, what="counter-poison signals")["signals"]
        else:
            signals = counter_poison_signals(net, data, suspicious, target, cfg)
            if sig_path is not None:
                save_torch_atomic(sig_path, {"signals": signals})
        timings["signal"] = time.perf_counter() - t0
    plan = neutralization_plan(data.y, suspicious, target, base, cfg)
    loader = NeutralizationLoader(data, plan, signals, cfg.rho, cfg.batch_size, cfg.seed,
                                  device)
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer,
                       lr=cfg.lr, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                       seed=cfg.seed, drop_last=False)
    t0 = time.perf_counter()
    tr = fit(net, Standard(), loader, config=tcfg,
             out_dir=outp / "train" if outp is not None else None, resume=True,
             progress=progress, max_steps=max_steps)
    timings["retrain"] = time.perf_counter() - t0
    net.eval()
    t0 = time.perf_counter()
    after = backdoor_metrics(net, test=test, triggered=triggered, target=target, device=device)
    timings["measure_after"] = time.perf_counter() - t0
    train_info = {"epochs": cfg.epochs, "steps": getattr(tr, "steps", None),
                  "seconds": getattr(tr, "seconds", None)}
    res = NeutralizeResult(net, cfg, int(target), base, plan.counts, signals, before, after,
                           timings, train_info)
    if outp is not None:
        write_json_atomic(outp / "neutralize.json", {
            "target": res.target, "base": res.base, "config": asdict(cfg),
            "counts": res.counts, "before": before, "after": after, "timings": timings})
    return res


def save_neutralized(result: NeutralizeResult, out: str | Path, example: Tensor) -> dict[str, str]:
    """Write the neutralized model: ``out/model.pt`` (a plain state dict, loadable with
    ``torch.load(..., weights_only=True)``; an exported program's keys as it had them) and
    ``out/model.pt2`` (``torch.export`` of the model on ``example``, (B, C, H, W) in
    [0, 1], with the batch size free), each atomically. Returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net = result.model
    inner = net.inner if isinstance(net, _Trainable) else net
    was = [p.requires_grad for p in inner.parameters()]
    if not isinstance(net, _Trainable):  # an exported module is in eval mode for good
        inner.eval()
    paths = {"state_dict": str(out / "model.pt"), "export": str(out / "model.pt2")}
    save_torch_atomic(out / "model.pt", {k: v.detach().cpu() for k, v in
                                         inner.state_dict().items()})
    try:
        for p in inner.parameters():
            p.requires_grad_(False)
        dev = next(iter(inner.parameters())).device
        ex = example[:2] if example.shape[0] >= 2 else example.repeat(2, 1, 1, 1)
        # batch size free (an example of 2: export specialises dimensions of size 1)
        ep = torch.export.export(inner, (ex.to(dev).float(),),
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    finally:
        for p, w in zip(inner.parameters(), was, strict=True):
            p.requires_grad_(w)
    write_atomic(out / "model.pt2", lambda fh: torch.export.save(ep, fh))
    return paths


# ------------------------------------------------------------------ reports

SCHEMA_VERSION = 1


def check_scan_report(report: dict[str, Any], data: ScanData) -> None:
    """Refuse a scan report of other data: the sample count (the report's class counts)
    and the data's content digest (``report["data"]["digest"]``, written by
    :func:`~safedl_ext.poison.report.write_report`) must match ``data``.

    Raises:
        ValueError: not a gradient scan's report, another count, another digest.
    """
    if not isinstance(report, dict) or "suspicious_indices" not in report:
        raise ValueError("the scan report lacks suspicious_indices: not a report.json of "
                         "`safedl scan`")
    if report.get("method", "gradient") != "gradient":
        raise ValueError(f"the scan report is of method {report.get('method')!r}; "
                         "neutralization needs the gradient scan's target and base classes")
    n = report.get("n")
    if n is None and isinstance(report.get("classes"), list):
        n = sum(int(c.get("count", 0)) for c in report["classes"])
    if n is not None and int(n) != len(data):
        raise ValueError(f"the scan report counts {n} samples, the data holds {len(data)}: it "
                         "is not the data the scan saw")
    saw = (report.get("data") or {}).get("digest")
    if saw is not None and saw != data.digest():
        raise ValueError("the scan report's data digest differs from this data's: it is not "
                         "the data the scan saw")


def _signal_figure(signals: Tensor, target: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import _savefig

    k = signals.shape[0]
    fig, axes = plt.subplots(1, k, figsize=(1.3 * k, 1.6))
    for y, ax in enumerate(list(axes) if k > 1 else [axes]):
        v = signals[y]
        img = v.mean(0) if v.shape[0] != 3 else v.permute(1, 2, 0)
        lim = float(v.abs().max()) or 1.0
        if v.shape[0] == 3:
            ax.imshow(((img / lim) * 0.5 + 0.5).clamp(0, 1).numpy())
        else:
            ax.imshow(img.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title("target" if y == target else f"class {y}", fontsize=7)
        ax.axis("off")
    fig.suptitle("counter-poison signals (unit vectors; red: added brightness)", fontsize=8)
    _savefig(fig, path)


def _metrics_figure(before: dict[str, float], after: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import _savefig

    shown = [(k, name) for k, name in MEASURES if k in before and k in after]
    fig, ax = plt.subplots(figsize=(4.2, 2.4))
    xs = range(len(shown))
    ax.bar([x - 0.2 for x in xs], [100 * before[k] for k, _ in shown], 0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [100 * after[k] for k, _ in shown], 0.4, label="after")
    ax.set_xticks(list(xs), [name for _, name in shown], fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    _savefig(fig, path)


def write_neutralize_report(result: NeutralizeResult, out: str | Path,
                            extra: dict[str, Any] | None = None, figures: bool = True
                            ) -> dict[str, Any]:
    """``out/report.json``, ``out/report.md`` and the figures (``signals.png``: the
    counter-poison signals; ``metrics.png``: before/after), each written atomically.

    ``report.json`` keys (schema_version 1): ``schema_version``, ``remedy``,
    ``target_class``, ``base_class``, ``config``, ``counts``, ``before``, ``after``
    (the :data:`MEASURES` keys in [0, 1], those measured), ``timings`` (seconds),
    ``versions``; the command line adds ``data``, ``model``, ``scan`` and ``files``.
    """
    import platform

    from .. import __version__
    from ..report import markdown_table, write_text_atomic
    from .report import _plain

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "remedy": result.config.remedy,
        "target_class": result.target, "base_class": result.base,
        "config": asdict(result.config), "counts": result.counts, "before": result.before,
        "after": result.after, "train": result.train, "timings": result.timings,
        "versions": {"safedl_ext": __version__, "torch": torch.__version__,
                     "python": platform.python_version()}}
    if extra:
        rep.update(extra)
    names: list[str] = []
    if figures:
        if result.signals is not None:
            _signal_figure(result.signals, result.target, out / "signals.png")
            names.append("signals.png")
        if result.before and result.after:
            _metrics_figure(result.before, result.after, out / "metrics.png")
            names.append("metrics.png")
    write_json_atomic(out / "report.json", _plain(rep))
    rows = [[name, f"{100 * result.before[k]:.1f}%", f"{100 * result.after[k]:.1f}%"]
            for k, name in MEASURES if k in result.before and k in result.after]
    c = result.counts
    lines = [f"# Neutralization: remedy {result.config.remedy!r}", "",
             f"Target class {result.target}, base class {result.base}. Training set: "
             f"{c.get('total')} samples from {c.get('data')} ({c.get('filtered')} filtered, "
             f"{c.get('relabelled')} relabelled, {c.get('removed')} removed, "
             f"{c.get('counter_poisoned')} counter-poisoned copies at rho "
             f"{result.config.rho:g}); {result.config.epochs} epoch(s), "
             f"{result.config.optimizer} lr {result.config.lr:g} "
             f"({result.config.schedule}).", ""]
    if rows:
        lines += [markdown_table(["measure", "before", "after"], rows), ""]
    else:
        lines += ["No test sets were given: nothing measured before and after.", ""]
    lines += [f"![{f}]({f})" for f in names]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    return rep
