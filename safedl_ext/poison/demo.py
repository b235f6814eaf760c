"""The main job end to end, small: plant a patch backdoor, train a CNN on the poisoned
data, scan it, neutralize it, then scan a model trained on clean data (``make demo``,
``safedl demo``).

Data: MNIST's 10,000 test images from the shared data folder (8,000 to train on, 2,000 to
measure attack success), or scikit-learn's digits when that folder is absent. At the
digits' scale (135 images of 8 x 8 pixels per class) the thesis's detector does not see a
backdoor the model has learned (docs/poison-scan.md): every class's own-label gradients
split into as distinct clusters (by the runner-up class) as the poisoned class's do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .attacks import Trigger, attack_success_rate, patch_trigger, poison_dataset
from .data import ScanData
from .report import write_report
from .scan import ScanConfig, ScanResult, filter_metrics, scan

__all__ = ["DemoData", "PoisonRun", "demo_data", "poisoned_run", "run_demo"]


@dataclass(frozen=True)
class DemoData:
    """Train and test images (float (N, 1, H, W) in [0, 1]) and where they came from."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def demo_data(which: str = "auto", seed: int = 0) -> DemoData:
    """``"mnist"`` (shared data folder), ``"digits"`` (built in), or ``"auto"`` (MNIST when
    the shared folder has it, else digits)."""
    from ..data import load_digits, load_mnist_idx
    from ..data.datasets import default_data_root

    if which not in ("auto", "mnist", "digits"):
        raise ValueError(f"data must be 'auto', 'mnist' or 'digits', got {which!r}")
    if which in ("auto", "mnist"):
        try:
            root = default_data_root() / "mnist"
            if not root.is_dir():
                raise FileNotFoundError(f"{root} does not exist")
            s = load_mnist_idx(root, seed=seed)
            return DemoData("mnist", s.x_train, s.y_train, s.x_test, s.y_test)
        except FileNotFoundError:
            if which == "mnist":
                raise
    s = load_digits(seed=seed)
    return DemoData("digits", s.x_train, s.y_train, s.x_test, s.y_test)


@dataclass
class PoisonRun:
    """One trained model and its scan."""

    poisoned: bool
    target: int | None
    base: int | None
    fraction: float
    seed: int
    clean_accuracy: float
    attack_success: float | None
    result: ScanResult
    metrics: dict[str, float] | None
    train_seconds: float
    scan_seconds: float
    data: ScanData
    truth: Tensor | None
    model: Any = None
    trigger: Trigger | None = None

    def summary(self) -> dict[str, Any]:
        r = self.result
        return {"poisoned_data": self.poisoned, "target": self.target, "base": self.base,
                "fraction": self.fraction, "seed": self.seed,
                "clean_accuracy": round(self.clean_accuracy, 4),
                "attack_success": None if self.attack_success is None else
                round(self.attack_success, 4),
                "flagged": r.poisoned, "found_target": r.target_class,
                "found_base": r.base_class,
                "base_gradient": r.details.get("base_gradient"),
                "base_masked": (r.details.get("base_masked") or {}).get("base"),
                "suspicious": len(r.suspicious_indices),
                "scores": [None if c.score is None else round(c.score, 3) for c in r.classes],
                "smaller_share": [round(c.smaller / c.count, 3) if c.count else None
                                  for c in r.classes],
                "filter": self.metrics, "train_seconds": round(self.train_seconds, 1),
                "scan_seconds": round(self.scan_seconds, 2)}


def poisoned_run(d: DemoData, *, target: int | None = 5, base: int | None = 3,
                 fraction: float = 0.2, seed: int = 0, epochs: int | None = None,
                 config: ScanConfig | None = None, progress: bool = False,
                 out: Path | None = None) -> PoisonRun:
    """Train a small CNN on ``d`` (poisoned with a 3 x 3 white corner patch from ``base``
    to ``target``, unless ``target`` is None) and scan it; the report goes to ``out``."""
    from ..models import DigitsCNN, SmallCNN
    from ..training import accuracy, train_classifier

    x, y, truth = d.x_train, d.y_train, None
    base = base if target is not None else None
    shape = tuple(x.shape[1:])
    trigger = patch_trigger(shape, size=3 if shape[-1] >= 16 else 2, fill="white")
    if target is not None:
        p = poison_dataset(x, y, trigger, target=target, base=base, fraction=fraction,
                           seed=seed)
        x, y, truth = p.x, p.y, p.indices
    torch.manual_seed(seed)
    model = DigitsCNN(width=16) if d.name == "digits" else SmallCNN(in_channels=1, width=16)
    epochs = epochs or (20 if d.name == "digits" else 4)
    t0 = time.perf_counter()
    train_classifier(model, x, y, epochs=epochs, seed=seed, progress=progress)
    train_s = time.perf_counter() - t0
    model.eval()
    clean = accuracy(model, d.x_test, d.y_test)
    asr = attack_success_rate(model, d.x_test, d.y_test, trigger, target=target, base=base) \
        if target is not None else None
    data = ScanData(x, y, source=f"{d.name} train split" + (
        f", {fraction:.0%} of class {base} poisoned to {target}" if target is not None else ""))
    t0 = time.perf_counter()
    result = scan(model, data, config=config, progress=progress)
    scan_s = time.perf_counter() - t0
    metrics = None
    if truth is not None and result.target_class is not None:
        tid = torch.nonzero(y == result.target_class).flatten()
        metrics = {k: (round(v, 4) if isinstance(v, float) else v)
                   for k, v in filter_metrics(result.suspicious_indices, truth, tid).items()}
    if out is not None:
        write_report(result, data, out, extra={"demo": {
            "data": d.name, "target": target, "base": base, "fraction": fraction,
            "seed": seed, "epochs": epochs, "clean_accuracy": clean, "attack_success": asr,
            "filter": metrics}})
    return PoisonRun(target is not None, target, base, fraction, seed, clean, asr, result,
                     metrics, train_s, scan_s, data, truth, model,
                     trigger if target is not None else None)


def run_demo(out: str | Path = "runs/scan-demo", data: str = "auto",
             progress: bool = True) -> list[PoisonRun]:
    """The demo: a poisoned model (20% of class 3 relabelled 5 with a white 3 x 3 corner
    patch) and a clean one, each scanned; the poisoned one, once flagged, neutralized
    (relabel + counter-poison, one epoch); reports in ``out/poisoned`` (and
    ``out/poisoned/neutralize``) and ``out/clean``. Prints what was found."""
    out = Path(out)
    d = demo_data(data)
    print(f"data: {d.name} ({d.x_train.shape[0]} training images"
          + (", MNIST test set from the shared data folder)" if d.name == "mnist" else
             ", built in; no MNIST in the shared data folder)"), flush=True)
    runs = []
    for name, target in (("poisoned", 5), ("clean", None)):
        run = poisoned_run(d, target=target, base=3 if target is not None else None,
                           out=out / name, progress=progress)
        r = run.result
        print(f"\n[{name} model] clean test accuracy {100 * run.clean_accuracy:.1f}%"
              + (f", attack success {100 * run.attack_success:.1f}% (class 3 + patch -> 5)"
                 if run.attack_success is not None else "")
              + f"; trained {run.train_seconds:.0f} s, scanned {run.scan_seconds:.1f} s")
        scores = ", ".join(f"{c.label}:{c.score:.2f}" if c.score is not None else
                           f"{c.label}:-" for c in r.classes)
        print(f"  scores (W2 / mean of others; threshold {r.threshold:g}): {scores}")
        if r.poisoned:
            print(f"  BACKDOOR FOUND: target class {r.target_class}, base class "
                  f"{r.base_class}, {len(r.suspicious_indices)} suspicious samples")
            if run.metrics:
                print(f"  filter vs ground truth: specificity "
                      f"{100 * run.metrics['specificity']:.1f}%, sensitivity "
                      f"{100 * run.metrics['sensitivity']:.1f}% "
                      f"({run.metrics['poisoned']} poisoned samples)")
        else:
            print("  nothing flagged")
        print(f"  report: {out / name / 'report.md'}")
        if r.poisoned and run.trigger is not None and r.suspicious_indices:
            _demo_neutralize(run, d, out / name / "neutralize", progress)
        runs.append(run)
    return runs


def _demo_neutralize(run: PoisonRun, d: DemoData, out: Path, progress: bool) -> None:
    """The thesis's remedy on the demo's poisoned model: relabel the filtered samples,
    counter-poison the other classes, one epoch; the before/after table."""
    import shutil

    from .attacks import triggered_test_set
    from .neutralize import MEASURES, neutralize, save_neutralized, write_neutralize_report

    r = run.result
    assert run.trigger is not None and r.target_class is not None
    shutil.rmtree(out, ignore_errors=True)  # the demo's models are trained afresh each run
    trig = triggered_test_set(d.x_test, d.y_test, run.trigger, target=run.target or 0,
                              base=run.base)
    t0 = time.perf_counter()
    res = neutralize(run.model, run.data, r, out=out, test=(d.x_test, d.y_test),
                     triggered=trig, progress=progress)
    files = save_neutralized(res, out, d.x_test[:2])
    write_neutralize_report(res, out, extra={"files": files})
    c = res.counts
    print(f"\n[neutralized] the filtered {c['relabelled']} samples relabelled {res.base}, "
          f"{c['counter_poisoned']} counter-poisoned copies of the other classes, "
          f"{res.config.epochs} epoch ({time.perf_counter() - t0:.0f} s)")
    print(f"  {'':24s}{'before':>8s}{'after':>8s}")
    for key, label in MEASURES:
        print(f"  {label:24s}{100 * res.before[key]:7.1f}%{100 * res.after[key]:7.1f}%")
    print(f"  model: {files['export']}; report: {out / 'report.md'}")
