"""Streamed per-class decomposition (``safedl_ext.linalg.StreamingSVD``) against
``torch.linalg.svd`` and ``torch.svd_lowrank`` of the materialized matrix.

Groups (``benchmark.group``) and roles (``benchmark.extra_info["role"]``):

* ``svd-cifar``: one class, N = 5,000 rows, d = 3,072, float32, the hard regime (10% of
  rows planted; sigma_1^2 ~ 134 against a tail of ~4,866), rows streamed in batches of 256.
  ``native``: gram mode, both passes (Gram update, decomposition, exact projections);
  ``baseline-svd``: ``torch.linalg.svd`` of the materialized matrix + projections;
  ``baseline-lowrank``: ``torch.svd_lowrank(q=6, niter=4)`` of it + projections;
  ``sketch``: sketch mode (k = 2,048), one pass (information).
  ``extra_info`` carries ``cos_vector`` and ``cos_projections`` against ``torch.linalg.svd``
  in float64 (computed once, outside the timing).
* ``svd-imagenet``: 20 classes x 1,300 rows x d = 150,528 generated on the fly and streamed
  together (``bench/svd_imagenet.py``, one subprocess each, one round: minutes).
  ``native``: sketch mode, with peak memory and projections' |cosine| against an exact
  float64 reference; ``floor-projection``: the same stream with nothing but one
  projection per row computed. Skipped unless ``SAFEDL_BENCH_IMAGENET=1`` or ``make bench``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, THREADS, require_native, warm

from safedl_ext.linalg import StreamingSVD
from safedl_ext.linalg.synthetic import planted_matrix

N, D, BATCH = 5000, 3072, 256
_CACHE: dict[str, object] = {}


def _cifar():
    if "x" not in _CACHE:
        x, _ = planted_matrix(N, D, fraction=0.1, strength=0.6, seed=0)
        xd = x.double()
        _, s, vh = torch.linalg.svd(xd, full_matrices=False)
        _CACHE.update(x=x, v=vh[0], p=xd @ vh[0], s=s)
    return _CACHE


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return abs(float(a @ b / (a.norm() * b.norm())))


def _tag(benchmark, role: str, variant: str, vec: torch.Tensor | None, proj: torch.Tensor,
         **extra) -> None:
    c = _cifar()
    benchmark.group = "svd-cifar"
    benchmark.extra_info.update(group="svd-cifar", role=role, variant=variant, rows=N, dim=D,
                                batch=BATCH, threads=THREADS, **extra)
    benchmark.extra_info["cos_projections"] = _cos(proj, c["p"])
    if vec is not None:
        benchmark.extra_info["cos_vector"] = _cos(vec, c["v"])


def _streamed(mode: str):
    x = _cifar()["x"]
    zeros = torch.zeros(BATCH, dtype=torch.int64)

    def run():
        svd = StreamingSVD(1, D, mode=mode, sketch_dim=2048)
        for i in range(0, N, BATCH):
            rows = x[i:i + BATCH]
            svd.update(rows, zeros[:rows.shape[0]], torch.arange(i, i + rows.shape[0]))
        svd.finalize()
        if mode == "gram":
            for i in range(0, N, BATCH):
                rows = x[i:i + BATCH]
                svd.project(rows, zeros[:rows.shape[0]], torch.arange(i, i + rows.shape[0]))
        return svd.results()[0]
    return run


def test_svd_cifar_gram(benchmark):
    require_native()
    run = _streamed("gram")
    warm(run, 1)
    res = benchmark.pedantic(run, rounds=7, iterations=1)
    _tag(benchmark, "native", "StreamingSVD(mode='gram'), 2 passes", res.vectors[0],
         res.projections[:, 0], converged=res.converged, eig_iterations=res.iterations)


def test_svd_cifar_sketch(benchmark):
    require_native()
    run = _streamed("sketch")
    warm(run, 1)
    res = benchmark.pedantic(run, rounds=5, iterations=1)
    _tag(benchmark, "sketch", "StreamingSVD(mode='sketch', k=2048), 1 pass", None,
         res.projections[:, 0])


def test_svd_cifar_torch_svd(benchmark):
    x = _cifar()["x"]

    def run():
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        return vh[0], x @ vh[0]

    vec, proj = benchmark.pedantic(run, rounds=3, iterations=1)
    _tag(benchmark, "baseline-svd", "torch.linalg.svd(X) + X @ v", vec, proj)


def test_svd_cifar_lowrank(benchmark):
    x = _cifar()["x"]

    def run():
        torch.manual_seed(0)
        _, _, v = torch.svd_lowrank(x, q=6, niter=4)
        return v[:, 0], x @ v[:, 0]

    warm(run, 1)
    vec, proj = benchmark.pedantic(run, rounds=7, iterations=1)
    _tag(benchmark, "baseline-lowrank", "torch.svd_lowrank(X, q=6, niter=4) + X @ v", vec,
         proj)


IMAGENET = os.environ.get("SAFEDL_BENCH_IMAGENET", "0") not in ("", "0")
RESULTS = REPO_ROOT / "bench" / "results"


def _subprocess(what: str, out: Path) -> dict:
    env = dict(os.environ, SAFEDL_BENCH_THREADS=str(THREADS))
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "svd_imagenet.py"), what,
                    "--out", str(out)], check=True, env=env)
    return json.loads(out.read_text())


@pytest.mark.skipif(not IMAGENET, reason="set SAFEDL_BENCH_IMAGENET=1 (minutes)")
def test_svd_imagenet_sketch(benchmark, tmp_path):
    require_native()
    out = tmp_path / "sketch.json"
    info = benchmark.pedantic(_subprocess, args=("sketch", out), rounds=1, iterations=1)
    exact_out = tmp_path / "exact.json"
    _subprocess("exact", exact_out)
    mine = torch.load(out.with_suffix(".pt"))
    ref = torch.load(exact_out.with_suffix(".pt"))
    cos = []
    for c, (ids, proj) in ref.items():
        m_ids, m_proj = mine[c]
        assert torch.equal(ids, m_ids)
        cos.append(_cos(m_proj, proj))
    benchmark.group = "svd-imagenet"
    benchmark.extra_info.update(
        group="svd-imagenet", role="native", variant="StreamingSVD(mode='sketch', k=2048)",
        threads=THREADS, cos_projections=min(cos), cos_projections_mean=sum(cos) / len(cos),
        peak_mem_fraction=(info["peak_rss_mb"] - info["start_rss_mb"])
        / info["materialized_mb"], peak_rss_fraction=info["peak_rss_mb"]
        / info["materialized_mb"], **{k: v for k, v in info.items() if k != "threads"})


@pytest.mark.skipif(not IMAGENET, reason="set SAFEDL_BENCH_IMAGENET=1 (minutes)")
def test_svd_imagenet_projection_floor(benchmark, tmp_path):
    out = tmp_path / "project.json"
    info = benchmark.pedantic(_subprocess, args=("project", out), rounds=1, iterations=1)
    benchmark.group = "svd-imagenet"
    benchmark.extra_info.update(group="svd-imagenet", role="floor-projection",
                                variant="same stream, rows @ v only", threads=THREADS,
                                **{k: v for k, v in info.items() if k != "threads"})
