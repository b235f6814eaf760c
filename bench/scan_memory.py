"""Peak memory of the backdoor scan and of the activation baselines, one process per
measurement (``bench/test_bench_scan.py`` runs these as subprocesses).

    python bench/scan_memory.py synthetic --n 50000 --out R.json
    python bench/scan_memory.py acts --method ac-ours --acts A.npz --out R.json

``synthetic``: ``--n`` random uint8 CIFAR-shaped images (N, 3, 32, 32) with random labels
(10 classes), held as a uint8 tensor, scanned (gradient method, default mode, float16 store)
with a tiny random-init model (one 3x3 conv, stride 2, ReLU, one linear layer).
``acts``: the activations in ``--acts`` (``a`` (N, D) float32, ``y`` (N,) int64), run
through one of ``ac-ours``, ``ac-art``, ``ss-ours``, ``ss-art`` (:func:`run_method`).

Both reset ``VmHWM`` (this process image's peak RSS; ``ru_maxrss`` is carried across
``execve``, so a subprocess would report its parent's peak) once the imports are done,
read it at the end, and record the RSS just before the measured work starts, so
``peak - start`` is the work's own footprint (``synthetic``: the images included).
``acts`` runs the method twice and measures the second run (the first one's increase,
which includes code and libraries loaded on first use, is ``first_run_increase_mb``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from safedl_ext.poison.baselines import activation_clustering, spectral_signatures  # noqa: E402
from safedl_ext.poison.data import ScanData  # noqa: E402
from safedl_ext.poison.scan import ScanConfig, scan  # noqa: E402

NUM_CLASSES = 10
SS_EPS = 0.1  # expected poison share; both SS implementations flag 1.5 x this per class
SS_MULTIPLIER = 1.5
AC_SIZE_THRESHOLD = 0.35  # ART's default relative-size threshold, ours' default too


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """VmHWM: this process image's peak RSS, in MiB."""
    return _status_mb("VmHWM")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (``clear_refs`` value 5, Linux >= 4.0), so that
    the peak of the imports does not count; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- activation baselines


def activation_data(a: torch.Tensor, y: torch.Tensor) -> tuple[nn.Module, ScanData]:
    """Our AC/SS from given activations on: a ScanData whose "images" are the activations
    (N, D, 1, 1), shifted and scaled into [0, 1] by two global constants, and a
    Flatten + Linear head as the model, so that :func:`penultimate` catches exactly those
    rows. Both methods centre each class and are invariant to one global shift and scale
    (AC: PCA + 2-means; SS: the ranking of squared centred projections)."""
    lo, hi = float(a.min()), float(a.max())
    x = ((a - lo) / (hi - lo if hi > lo else 1.0)).clamp_(0.0, 1.0)
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(a.shape[1], NUM_CLASSES)).eval()
    return head, ScanData(x.reshape(a.shape[0], a.shape[1], 1, 1), y)


def ours_ac(head: nn.Module, data: ScanData, batch: int) -> list[int]:
    r = activation_clustering(head, data, config=ScanConfig(batch_size=batch),
                              size_threshold=AC_SIZE_THRESHOLD, progress=False)
    return r.suspicious_indices


def ours_ss(head: nn.Module, data: ScanData, batch: int) -> list[int]:
    r = spectral_signatures(head, data, config=ScanConfig(batch_size=batch),
                            expected_fraction=SS_EPS, multiplier=SS_MULTIPLIER, progress=False)
    return r.suspicious_indices


def art_ac(a: np.ndarray, y: np.ndarray) -> list[int]:
    """ART 1.20: ``cluster_activations`` (PCA to 10 dims, KMeans(2)) on the activations
    separated by label, then ART's relative-size rule (a cluster is poison when its share
    of the class, rounded to 2 digits, is < 0.35). The rule is applied here, in ART's own
    arithmetic: ``ClusteringAnalyzer.analyze_by_relative_size`` of ART 1.20.1 raises under
    numpy 2.x whenever a class has no small cluster (its report evaluates ``cluster_id in
    poison_clusters`` with an empty array). KMeans is seeded through numpy's global state
    (ART creates it without a seed)."""
    from art.defences.detector.poison.activation_defence import cluster_activations

    np.random.seed(0)
    idx = [np.flatnonzero(y == c) for c in range(NUM_CLASSES)]
    separated = [a[i] for i in idx]
    clusters, _ = cluster_activations(separated, nb_clusters=2, nb_dims=10, reduce="PCA",
                                      clustering_method="KMeans")
    flagged = []
    for i, c in zip(idx, clusters, strict=True):
        sizes = np.bincount(c, minlength=2)
        share = np.round(sizes / float(sizes.sum()), 2)
        flagged.append(i[np.isin(c, np.flatnonzero(share < AC_SIZE_THRESHOLD))])
    return sorted(int(v) for v in np.concatenate(flagged))


def art_ss(a: np.ndarray, y: np.ndarray) -> list[int]:
    """ART 1.20: ``SpectralSignatureDefense.spectral_signature_scores`` per class and its
    quantile cutoff (``expected_pp_poison=0.1``, ``eps_multiplier=1.5``: the top 15%)."""
    from art.defences.detector.poison.spectral_signature_defense import (
        SpectralSignatureDefense,
    )

    flagged = []
    for c in range(NUM_CLASSES):
        i = np.flatnonzero(y == c)
        if i.size == 0:
            continue
        score = SpectralSignatureDefense.spectral_signature_scores(a[i])
        cutoff = np.quantile(score, max(1 - SS_MULTIPLIER * SS_EPS, 0.0))
        flagged.append(i[score[:, 0] >= cutoff])
    return sorted(int(v) for v in np.concatenate(flagged))


def method_inputs(method: str, a: np.ndarray, y: np.ndarray) -> tuple:
    """What each implementation takes: ART the arrays, ours a ScanData of them and the
    head (:func:`activation_data`), prepared before anything is measured."""
    if method in ("ac-art", "ss-art"):
        return a, y
    return activation_data(torch.from_numpy(a), torch.from_numpy(y))


def run_method(method: str, inputs: tuple, batch: int = 128) -> list[int]:
    if method == "ac-art":
        return art_ac(*inputs)
    if method == "ss-art":
        return art_ss(*inputs)
    return (ours_ac if method == "ac-ours" else ours_ss)(*inputs, batch)


# ---------------------------------------------------------------- synthetic scan


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 16 * 16, NUM_CLASSES)).eval()


def synthetic(n: int, threshold: float, batch: int) -> dict:
    reset = reset_peak()
    start_rss = rss_mb()
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    data_rss = rss_mb()
    model = tiny_model()
    t0 = time.perf_counter()
    r = scan(model, ScanData(x, y), config=ScanConfig(batch_size=batch, threshold=threshold,
                                                      store_dtype="float16"),
             progress=False)
    return {"n": n, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_mb(),
            "start_rss_mb": start_rss, "data_rss_mb": data_rss,
            "images_mb": x.numel() / 2**20, "threshold": threshold, "batch": batch,
            "peak_reset": reset, "timings": r.timings, "target": r.target_class,
            "base": r.base_class,
            "suspicious": len(r.suspicious_indices), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("synthetic", "acts"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--threshold", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--method", choices=("ac-ours", "ac-art", "ss-ours", "ss-art"))
    ap.add_argument("--acts", help=".npz with a (N, D) float32 and y (N,) int64")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("SAFEDL_BENCH_THREADS", "2")))
    if args.what == "synthetic":
        info = synthetic(args.n, args.threshold, args.batch)
    else:
        if args.method is None or args.acts is None:
            ap.error("acts needs --method and --acts")
        if args.method in ("ac-art", "ss-art"):  # imported before the start RSS, like torch
            import importlib

            for mod in ("activation_defence", "spectral_signature_defense"):
                importlib.import_module(f"art.defences.detector.poison.{mod}")
        with np.load(args.acts, allow_pickle=False) as blob:
            a, y = blob["a"].astype(np.float32), blob["y"].astype(np.int64)
        # First run: lazily loaded code and libraries' first-use buffers come in (file
        # pages of libtorch and MKL count in RSS); the second run is the measured one.
        inputs = method_inputs(args.method, a, y)
        reset_peak()
        first_start = rss_mb()
        run_method(args.method, inputs, args.batch)
        first = peak_mb() - first_start
        reset = reset_peak()
        start = rss_mb()
        t0 = time.perf_counter()
        flagged = run_method(args.method, inputs, args.batch)
        info = {"method": args.method, "seconds": time.perf_counter() - t0,
                "peak_rss_mb": peak_mb(), "start_rss_mb": start, "peak_reset": reset,
                "first_run_increase_mb": first, "flagged": len(flagged),
                "activations_mb": a.nbytes / 2**20, "threads": torch.get_num_threads()}
    Path(args.out).write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
