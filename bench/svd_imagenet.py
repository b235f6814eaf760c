"""ImageNet-shaped streamed decomposition, one process per measurement (for peak memory).

20 classes x 1,300 rows x d = 150,528 (3 x 224 x 224), 10% of each class's rows planted
(the hard regime of FIELD_NOTES.md), generated on the fly and streamed together in
batches: the materialized float32 matrices would take 15.6 GB.

    python bench/svd_imagenet.py sketch  --out RESULT.json   # StreamingSVD(mode="sketch")
    python bench/svd_imagenet.py project --out RESULT.json   # floor: rows @ v only
    python bench/svd_imagenet.py exact   --out RESULT.json   # float64 reference projections

``sketch`` records wall time, rows per second, peak RSS and the RSS after start-up (so
the streamed computation's own footprint is peak - start), and saves the projections;
``project`` streams the same rows and computes nothing but one projection per row (the
cost of touching the data); ``exact`` computes each class's exact top left singular vector
from its 1,300 x 1,300 Gram matrix accumulated in float64 (classes in groups, so at most
``--group`` classes' rows are held at once) and the exact projections.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from safedl_ext.linalg import StreamingSVD  # noqa: E402
from safedl_ext.linalg.synthetic import planted_stream  # noqa: E402

CLASSES, PER_CLASS, DIM, BATCH, SEED = 20, 1300, 3 * 224 * 224, 256, 0
SKETCH_DIM = 2048


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    """VmHWM: this process image's peak RSS. (getrusage's ru_maxrss is not usable here:
    Linux carries it across execve, so a subprocess reports its parent's peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _stream():
    return planted_stream(CLASSES, PER_CLASS, DIM, batch=BATCH, seed=SEED)


def run_sketch(out: Path) -> dict:
    start_rss = _rss_mb()
    t0 = time.perf_counter()
    svd = StreamingSVD(CLASSES, DIM, mode="sketch", sketch_dim=SKETCH_DIM, seed=1)
    rows = 0
    for x, cls, ids in _stream():
        svd.update(x, cls, ids)
        rows += x.shape[0]
        del x  # a consumer that keeps nothing: the next batch is generated without this one
    t_stream = time.perf_counter() - t0
    res = svd.finalize()
    t_total = time.perf_counter() - t0
    torch.save({c: (r.sample_ids, r.projections[:, 0]) for c, r in res.items()},
               out.with_suffix(".pt"))
    return {"rows": rows, "seconds": t_total, "stream_seconds": t_stream,
            "rows_per_second": rows / t_total, "peak_rss_mb": _peak_mb(),
            "start_rss_mb": start_rss, "sketch_dim": SKETCH_DIM,
            "store_mb": rows * SKETCH_DIM * 4 / 2**20,
            "materialized_mb": rows * DIM * 4 / 2**20,
            "converged": all(r.converged for r in res.values())}


def run_project(out: Path) -> dict:
    start_rss = _rss_mb()
    v = torch.randn(DIM, generator=torch.Generator().manual_seed(3))
    t0 = time.perf_counter()
    rows, acc = 0, 0.0
    for x, _, _ in _stream():
        acc += float((x @ v).sum())
        rows += x.shape[0]
        del x
    t = time.perf_counter() - t0
    return {"rows": rows, "seconds": t, "rows_per_second": rows / t,
            "peak_rss_mb": _peak_mb(), "start_rss_mb": start_rss, "checksum": acc}


def run_exact(out: Path, group: int) -> dict:
    t0 = time.perf_counter()
    result = {}
    for first in range(0, CLASSES, group):
        classes = list(range(first, min(first + group, CLASSES)))
        held: dict[int, list] = {c: [] for c in classes}
        for x, cls, ids in _stream():
            for c in classes:
                sel = cls == c
                held[c].append((ids[sel], x[sel]))
        for c in classes:
            ids = torch.cat([i for i, _ in held[c]])
            xc = torch.cat([r for _, r in held[c]])
            held[c] = []
            gram = torch.zeros((xc.shape[0],) * 2, dtype=torch.float64)
            for j in range(0, DIM, 8192):
                part = xc[:, j:j + 8192].to(torch.float64)
                gram += part @ part.T
            del xc
            evals, evecs = torch.linalg.eigh(gram)
            proj = evecs[:, -1] * evals[-1].clamp_min(0).sqrt()
            order = torch.argsort(ids)
            result[c] = (ids[order], proj[order])
    torch.save(result, out.with_suffix(".pt"))
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_mb()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["sketch", "project", "exact"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--group", type=int, default=4, help="exact: classes held at once")
    ap.add_argument("--threads", type=int, default=int(os.environ.get(
        "SAFEDL_BENCH_THREADS", "2")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "sketch":
        info = run_sketch(args.out)
    elif args.what == "project":
        info = run_project(args.out)
    else:
        info = run_exact(args.out, args.group)
    info["threads"] = args.threads
    args.out.write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
