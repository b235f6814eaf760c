"""The whole scan-and-neutralize pipeline against one training epoch on the same data
(issue 13's benchmark: the ratio, reported; no target).

Data and model: the 20,000-image CIFAR-10 training subset of
``load_cifar10(train_per_class=2000, seed=0)`` with a 3x3 checkerboard patch on 10% of
class 3 (cat, 200 images) relabelled 5 (dog), and ``SmallCNN(3, 10, width=16)`` trained on
it for one epoch (``train_classifier``, batch 64, Adam 1e-3, seed 0; cached in
``$SAFEDL_BENCH_CACHE``). The backdoor is not learned in one epoch, so the scan runs with
``threshold=0.0`` (as in ``bench/test_bench_scan.py``): a class is always flagged and every
step after it runs, the full cost.

Group ``neutralize-cifar20k``:

* ``native``: :func:`~safedl_ext.poison.pipeline.scan_and_neutralize` into a fresh folder
  with the default :class:`~safedl_ext.poison.neutralize.NeutralizeConfig` (``both``:
  relabel + counter-poisoned copies of every non-target image, so the retraining epoch
  covers about twice the images of a training epoch): the scan with its checkpoints and
  report (JSON, Markdown, PNGs), the counter-poison signals, one retraining epoch with the
  trainer's checkpoints, the ``torch.export`` archive and state dict, the neutralization
  report. No test sets (no before/after measurements: they are the caller's choice).
* ``baseline-train-epoch``: one plain training epoch of a copy of the same model on the same
  (poisoned) 20,000 images: shuffled, batch 128, Adam 1e-3, ``model.train()``, cross-entropy.
  Each pipeline round's untimed set-up runs one, timed, and one more runs after the last
  round: ``pipeline_ratio`` is the median over rounds of pipeline / the mean of the epochs
  right before and after it (a drift of the shared machine's speed cancels to first order).
  ``remedy_ratios`` (information): the same bracketed ratio with each other remedy, one
  round each.

``SAFEDL_BENCH_NEU_ROUNDS`` (default 3) sets the rounds. About 4 minutes on 2 idle cores
(plus about a minute to train the model once).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS, cached_train, data_root, require_native
from torch import Tensor, nn

from safedl_ext.poison import patch_trigger, poison_dataset
from safedl_ext.poison.data import ScanData
from safedl_ext.poison.neutralize import NeutralizeConfig
from safedl_ext.poison.pipeline import scan_and_neutralize
from safedl_ext.poison.scan import ScanConfig

PER_CLASS = int(os.environ.get("SAFEDL_BENCH_SCAN_PER_CLASS", "2000"))  # < 2000: smoke runs
ROUNDS = int(os.environ.get("SAFEDL_BENCH_NEU_ROUNDS", "3"))
SEED, WIDTH, BATCH, TARGET, BASE = 0, 16, 128, 5, 3
SCAN = ScanConfig(batch_size=BATCH, threshold=0.0)


@pytest.fixture(scope="module")
def poisoned(cifar_archives) -> tuple[Tensor, Tensor]:
    from safedl_ext.data import load_cifar10

    s = load_cifar10(data_root() / "cifar10", train_per_class=PER_CLASS, test_per_class=10,
                     seed=SEED)
    p = poison_dataset(s.x_train, s.y_train, patch_trigger((3, 32, 32), size=3,
                                                           fill="checkerboard"),
                       target=TARGET, base=BASE, fraction=0.1, seed=SEED)
    return p.x, p.y


@pytest.fixture(scope="module")
def neu_model(poisoned) -> tuple[nn.Module, dict]:
    """SmallCNN(3, 10, width=16), one epoch on the poisoned images; cached; eval mode."""
    from safedl_ext.models import SmallCNN
    from safedl_ext.training import train_classifier

    x, y = poisoned
    torch.manual_seed(SEED)
    model = SmallCNN(3, 10, width=WIDTH)

    def train() -> dict:
        t0 = time.perf_counter()
        train_classifier(model, x, y, epochs=1, batch_size=64, lr=1e-3, seed=SEED)
        return {"model": f"SmallCNN(3, 10, width={WIDTH})", "train_images": int(x.shape[0]),
                "epochs": 1, "train_seconds": round(time.perf_counter() - t0, 1),
                "torch": torch.__version__}

    meta = cached_train(model, f"smallcnn-w{WIDTH}_cifar10-pc{PER_CLASS}-patch{TARGET}{BASE}"
                        f"_e1_b64_lr0.001_s{SEED}", train)
    return model.eval(), meta


def train_epoch(model: nn.Module, x: Tensor, y: Tensor, seed: int) -> float:
    """One plain training epoch of a copy of ``model`` (the copy untimed): seconds."""
    net = copy.deepcopy(model).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], BATCH):
        idx = perm[i:i + BATCH]
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def _bracketed(work: list[float], epochs: list[float]) -> list[float]:
    return [w / ((a + b) / 2) for w, a, b in zip(work, epochs, epochs[1:], strict=False)]


def test_pipeline_vs_train_epoch(benchmark, neu_model, poisoned, tmp_path: Path):
    require_native()
    model, meta = neu_model
    x, y = poisoned
    data = ScanData(x, y, source="CIFAR-10 20k, patch 5<-3")
    epochs: list[float] = []
    work: list[float] = []
    results = []

    def setup() -> None:
        epochs.append(train_epoch(model, x, y, seed=len(epochs)))

    def run():
        out = tmp_path / f"round{len(work)}"
        t0 = time.perf_counter()
        r = scan_and_neutralize(model, data, out, scan_config=SCAN,
                                config=NeutralizeConfig(), progress=False)
        work.append(time.perf_counter() - t0)
        results.append(r)
        return r

    r = benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
    setup()
    ratios = _bracketed(work, epochs)
    assert r.neutralized is not None, "the forced scan must flag a class"
    n = r.neutralized
    steps = {f"scan: {k}": statistics.median(rr.scan.timings[k] for rr in results)
             for k in r.scan.timings}
    steps.update({f"neutralize: {k}": statistics.median(rr.neutralized.timings[k]
                                                        for rr in results)
                  for k in n.timings})
    steps["files, reports, export (the rest)"] = statistics.median(
        rr.seconds - sum(rr.scan.timings.values()) - sum(rr.neutralized.timings.values())
        for rr in results)
    # the other remedies, one bracketed round each (information)
    remedy_ratios = {}
    for remedy in ("relabel", "counter", "remove"):
        a = train_epoch(model, x, y, seed=100)
        t0 = time.perf_counter()
        scan_and_neutralize(model, data, tmp_path / f"remedy-{remedy}", scan_config=SCAN,
                            config=NeutralizeConfig(remedy=remedy), progress=False)
        w = time.perf_counter() - t0
        b = train_epoch(model, x, y, seed=101)
        remedy_ratios[remedy] = round(w / ((a + b) / 2), 3)
    benchmark.group = "neutralize-cifar20k"
    benchmark.extra_info.update(
        group="neutralize-cifar20k", role="native", threads=THREADS, rows=int(x.shape[0]),
        batch=BATCH, variant="scan_and_neutralize (scan threshold 0, remedy both, 1 epoch)",
        pipeline_ratio=statistics.median(ratios), pipeline_ratios=ratios,
        pipeline_seconds=work, train_epoch_seconds=epochs, steps=steps,
        counts=n.counts, target=r.scan.target_class, base=r.scan.base_class,
        suspicious=len(r.scan.suspicious_indices), remedy_ratios=remedy_ratios,
        model_meta=meta)
    benchmark.extra_info["note"] = (
        f"pipeline / one training epoch: {statistics.median(ratios):.2f}x (median of "
        f"{len(ratios)} bracketed rounds; epoch {statistics.median(epochs):.1f} s, pipeline "
        f"{statistics.median(work):.1f} s); set {n.counts}; steps (median s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in steps.items())
        + "; other remedies (one round each): "
        + ", ".join(f"{k} {v:.2f}x" for k, v in remedy_ratios.items()))


def test_train_epoch_anchor(benchmark, neu_model, poisoned):
    """The anchor alone, timed by pytest-benchmark (for the group's table)."""
    model, _ = neu_model
    x, y = poisoned
    secs: list[float] = []

    def run() -> None:
        secs.append(train_epoch(model, x, y, seed=len(secs)))

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    benchmark.group = "neutralize-cifar20k"
    benchmark.extra_info.update(group="neutralize-cifar20k", role="baseline-train-epoch",
                                threads=THREADS, rows=int(x.shape[0]), batch=BATCH,
                                variant="one plain training epoch (Adam, batch 128)")
