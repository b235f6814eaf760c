"""The backdoor scan (``safedl_ext.poison.scan``) and its activation baselines against plain
implementations, on a CIFAR-10 subset (issue 12's goals).

Data and model: the 20,000-image CIFAR-10 training subset of
``load_cifar10(train_per_class=2000, seed=0)`` and ``SmallCNN(3, 10, width=16)`` trained on
it for one epoch (``train_classifier``, batch 64, Adam 1e-3, seed 0; cached in
``$SAFEDL_BENCH_CACHE``). No backdoor is planted (a 3x3 or 5x5 patch on 10% of one class is
not learned in two epochs of this model: ASR 5-7%), so every scan runs with
``threshold=0.0``: the top class is always flagged and the base-class and final-filter
steps always run (the full cost). The model runs in eval mode with frozen parameters in
every benchmark. Batch 128 everywhere (the scan's default).

Groups (``benchmark.group``) and roles (``benchmark.extra_info["role"]``):

* ``scan-cifar20k``:
  ``native``: ``scan()`` (gradient method, its default exact mode for d = 3,072: one
  float16 row file per class, Krylov passes at the end; no checkpoints); each
  round's untimed set-up runs one pass of ``input_gradients(model, x, y)`` over the same
  data in the same batches, timed, and one more pass runs after the last round, so
  ``overhead_ratio`` (the median over rounds of scan / the mean of the passes right
  before and right after it) compares neighbours in time on this shared machine, a drift
  of its speed cancelled to first order. ``timings``: the
  scan's own per-step medians; ``profile``: where a cProfile'd warm-up scan spent its time
  (inclusive seconds per function, summed over the three streamed passes).
  ``baseline-plain``: the same decisions written plainly (:func:`plain_scan`): per-class
  gradient matrices in memory, ``torch.linalg.svd`` of each centred class matrix,
  scikit-learn ``GaussianMixture(2)`` per class, W2 ratio, smaller cluster; base class by
  the masked vote (the scan's default rule: the signal's strongest pixels masked, the most
  frequent label among predictions that left the target; the largest |mean projection| of
  all-label gradients on uncentred top vectors when it cannot decide); final filter of base-label
  gradients on the best of their top 3 vectors (the scan's ``final_vectors``). Each
  round's set-up runs one ``scan()``, timed (``speedup_paired``);
  ``same_decisions``/``jaccard`` compare the outcomes with ours.
* ``ac-cifar20k``, ``ss-cifar20k``: Activation Clustering and Spectral Signatures on the
  model's penultimate activations (computed once, ``penultimate(model)``, 20,000 x 128).
  ``native``: ours from the activations on (the package functions over a ScanData of the
  activations themselves, shifted and scaled into [0, 1], with a Flatten + Linear head
  as the model: see ``bench/scan_memory.py``); ``native-e2e``: ours on the images, model
  forward included; ``floor-forward`` (in ``ac-cifar20k``): the forward pass alone;
  ``baseline-art``: IBM ART 1.20 (``cluster_activations`` PCA-10 + KMeans and ART's
  relative-size rule, applied inline: ART 1.20.1's ``analyze_by_relative_size`` raises
  under numpy 2.x when a class has no small cluster; ``spectral_signature_scores`` per
  class and the 85% quantile cutoff, ``expected_pp_poison=0.1``). Peak memory of each
  from-activations run in its own subprocess (``VmHWM``; ``peak_increase_mb`` = peak -
  RSS before the work, measured on a second run in that process).
* ``scan-memory``: ``bench/scan_memory.py synthetic`` in two subprocesses, 5,000 and
  50,000 random uint8 (N, 3, 32, 32) images with random labels, a 1-conv + linear model:
  ``scan_peak_ratio`` = (VmHWM - images)(50,000) / (VmHWM - images)(5,000), the scan's
  own memory (the caller's uint8 images, 146 vs 15 MiB, are the data, not the scan's; with
  them: ``peak_ratio``); the same pair again with glibc's
  dynamic mmap threshold switched off (``MALLOC_MMAP_THRESHOLD_=131072``, information:
  it separates live data from freed temporaries that the heap keeps).

``SAFEDL_BENCH_SCAN_ROUNDS`` (default 5) sets the timed scan rounds (plus one profiled
warm-up); the plain implementation runs one round. About 3.5 minutes on 2 idle cores
(plus 1-2 minutes to train the model once); 20-25 minutes while another job kept both
cores busy (2026-12-01).
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, THREADS, cached_train, data_root, require_native
from scan_memory import activation_data, art_ac, art_ss, ours_ac, ours_ss
from torch import Tensor, nn

from safedl_ext.gradients import input_gradients
from safedl_ext.poison.baselines import activation_clustering, penultimate, spectral_signatures
from safedl_ext.poison.data import ScanData
from safedl_ext.poison.scan import ScanConfig, ScanResult, scan

PER_CLASS = int(os.environ.get("SAFEDL_BENCH_SCAN_PER_CLASS", "2000"))  # < 2000: smoke runs
SEED, EPOCHS, WIDTH = 0, 1, 16
BASE_SAMPLES = ScanConfig().base_samples
BATCH = 128
ROUNDS = int(os.environ.get("SAFEDL_BENCH_SCAN_ROUNDS", "5"))
CONFIG = ScanConfig(batch_size=BATCH, threshold=0.0, store_dtype="float16")  # mode "auto"
MEM_SIZES = (5000, 50000) if PER_CLASS == 2000 else (500, 5000)
MEM_THRESHOLD = 0.0
_CACHE: dict[str, object] = {}


# ---------------------------------------------------------------- data and model


@pytest.fixture(scope="module")
def cifar20k(cifar_archives) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from safedl_ext.data import load_cifar10

    s = load_cifar10(data_root() / "cifar10", train_per_class=PER_CLASS, test_per_class=100,
                     seed=SEED)
    return s.x_train, s.y_train, s.x_test, s.y_test


@pytest.fixture(scope="module")
def scan_model(cifar20k) -> tuple[nn.Module, dict]:
    """SmallCNN(3, 10, width=16), one epoch on the 20,000 images; cached. Eval mode,
    parameters frozen."""
    from safedl_ext.models import SmallCNN
    from safedl_ext.training import accuracy, train_classifier

    x, y, xt, yt = cifar20k
    torch.manual_seed(SEED)
    model = SmallCNN(3, 10, width=WIDTH)

    def train() -> dict:
        t0 = time.perf_counter()
        train_classifier(model, x, y, epochs=EPOCHS, batch_size=64, lr=1e-3, seed=SEED)
        return {"model": f"SmallCNN(3, 10, width={WIDTH})", "train_images": int(x.shape[0]),
                "epochs": EPOCHS, "train_seconds": round(time.perf_counter() - t0, 1),
                "clean_acc_test1000": accuracy(model, xt, yt), "torch": torch.__version__}

    meta = cached_train(model, f"smallcnn-w{WIDTH}_cifar10-pc{PER_CLASS}_e{EPOCHS}_b64_lr0.001"
                        f"_s{SEED}", train)
    model.eval().requires_grad_(False)
    return model, meta


def fwdbwd_pass(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """One forward + input-gradient backward pass over the data, batches of BATCH."""
    for s in range(0, x.shape[0], BATCH):
        input_gradients(model, x[s:s + BATCH], y[s:s + BATCH])


# ---------------------------------------------------------------- the plain implementation


def _unit(g: Tensor) -> Tensor:
    return F.normalize(g.flatten(1), dim=1)


def _gmm(values: Tensor) -> tuple[np.ndarray, float, np.ndarray]:
    """scikit-learn GaussianMixture(2) on 1-D values: (assignments, W2 of the two
    Gaussians, (n, 2) posteriors)."""
    from sklearn.mixture import GaussianMixture

    v = values.to(torch.float64).numpy().reshape(-1, 1)
    gm = GaussianMixture(n_components=2, random_state=0).fit(v)
    m = gm.means_[:, 0]
    sd = np.sqrt(gm.covariances_.reshape(2))
    return (gm.predict(v), float(np.sqrt((m[0] - m[1]) ** 2 + (sd[0] - sd[1]) ** 2)),
            gm.predict_proba(v))


def _smaller(assign: np.ndarray) -> np.ndarray:
    n1 = int(assign.sum())
    return assign == (0 if len(assign) - n1 < n1 else 1)


def _top_vector(m: Tensor) -> Tensor:
    return torch.linalg.svd(m, full_matrices=False)[2][0]


def plain_scan(model: nn.Module, x: Tensor, y: Tensor, k: int = 10) -> dict:
    """The scan's decisions, plainly: everything in memory, full SVDs, scikit-learn GMMs."""
    n, d = x.shape[0], x[0].numel()
    rows = torch.empty(n, d)
    for s in range(0, n, BATCH):
        xb = x[s:s + BATCH].clone().requires_grad_(True)
        loss = F.cross_entropy(model(xb), y[s:s + BATCH], reduction="sum")
        rows[s:s + BATCH] = _unit(torch.autograd.grad(loss, xb)[0])
    idx, w2, assign, post, vecs = [], [], [], [], []
    for c in range(k):
        i = torch.nonzero(y == c).flatten()
        xc = rows[i] - rows[i].mean(0)
        vecs.append(_top_vector(xc))
        a, w, pr = _gmm(xc @ vecs[-1])
        idx.append(i)
        w2.append(w)
        assign.append(a)
        post.append(pr)
    w2t = torch.tensor(w2, dtype=torch.float64)
    scores = w2t / ((w2t.sum() - w2t) / (k - 1))
    target = int(torch.argmax(scores))
    small = torch.from_numpy(_smaller(assign[target]))
    first = idx[target][small]
    del rows
    # base, on the first filter's BASE_SAMPLES most confident samples (the scan's
    # ScanConfig.base_samples): the masked rule (the scan's default) first: the pixels
    # holding half the signal's energy set to each image's mean, the most frequent label
    # among predictions that left the target
    comp = int(assign[target][small.numpy()][0])
    conf = torch.from_numpy(post[target][small.numpy(), comp])
    sub = first[torch.argsort(-conf, stable=True)[:BASE_SAMPLES]].sort().values
    e = vecs[target].reshape(x.shape[1], -1).square().sum(0)
    order = torch.argsort(e, descending=True)
    count = int((torch.cumsum(e[order], 0) / e.sum() < 0.5).sum()) + 1
    mask = torch.zeros(e.numel())
    mask[order[:count]] = 1.0
    mask = mask.reshape(1, 1, *x.shape[2:])
    with torch.no_grad():
        xs = x[sub]
        fill = xs.mean(dim=(2, 3), keepdim=True)
        pred = model(xs * (1 - mask) + fill * mask).argmax(1)
    left = pred != target
    if float(left.float().mean()) >= 0.1:
        base = int(torch.bincount(pred[left], minlength=k).argmax())
    else:  # the gradient rule: all-label gradients, uncentred top vector per label
        per_label: list[list[Tensor]] = [[] for _ in range(k)]
        for s in range(0, sub.numel(), BATCH):
            xb = x[sub[s:s + BATCH]].clone().requires_grad_(True)
            logits = model(xb)
            for j in range(k):
                if j == target:
                    continue
                lab = torch.full((xb.shape[0],), j, dtype=torch.int64)
                loss = F.cross_entropy(logits, lab, reduction="sum")
                per_label[j].append(_unit(torch.autograd.grad(loss, xb,
                                                              retain_graph=True)[0]))
        means = torch.full((k,), -1.0, dtype=torch.float64)
        for j in range(k):
            if j != target:
                m = torch.cat(per_label[j])
                means[j] = float((m @ _top_vector(m)).mean().abs())
        base = int(torch.argmax(means))
        del per_label
    # final filter: the target class's gradients with the base label, centred
    ti = idx[target]
    fin = torch.empty(ti.numel(), d)
    for s in range(0, ti.numel(), BATCH):
        xb = x[ti[s:s + BATCH]].clone().requires_grad_(True)
        lab = torch.full((xb.shape[0],), base, dtype=torch.int64)
        loss = F.cross_entropy(model(xb), lab, reduction="sum")
        fin[s:s + BATCH] = _unit(torch.autograd.grad(loss, xb)[0])
    fin -= fin.mean(0)
    best, w_final, a = -1.0, 0.0, None
    for vj in torch.linalg.svd(fin, full_matrices=False)[2][:3]:
        aj, wj, _ = _gmm(fin @ vj)
        ok = _smaller(aj).mean() <= ScanConfig().max_share
        if a is None or (ok and wj > best):
            a, w_final = aj, wj
            best = wj if ok else -1.0
    suspicious = ti[torch.from_numpy(_smaller(a))]
    return {"target": target, "base": base, "w2": w2, "scores": scores.tolist(),
            "first": sorted(first.tolist()), "suspicious": sorted(suspicious.tolist()),
            "final_w2": w_final}


def _jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


# ---------------------------------------------------------------- goal 1: scan overhead

_PROFILED = {
    "input_gradients (forward + input-gradient backward)": ("gradients.py", "input_gradients"),
    "unit_rows (normalisation)": ("poison/scan.py", "unit_rows"),
    "_gradients checks (finite logits and gradients)": ("poison/scan.py", "_gradients"),
    "ClassRows.add (per-class sums and row files)": ("poison/_rows.py", "add"),
    "RowStore.append (store writes)": ("poison/_store.py", "append"),
    "RowStore.read (store reads)": ("poison/_store.py", "read"),
    "ClassRows.finish (Krylov passes over the files, projections)": ("poison/_rows.py",
                                                                    "finish"),
    "StreamingSVD.update (gram/sketch modes)": ("linalg/svd.py", "update"),
    "gram_update_ (gram mode)": ("ops/sketch.py", "gram_update_"),
    "StreamingSVD.finalize (gram/sketch modes)": ("linalg/svd.py", "finalize"),
    "_fit (batched GMM)": ("poison/scan.py", "_fit"),
    "ScanData.images (batch reads)": ("poison/data.py", "images"),
    "_Streamed.fold (state flushes)": ("poison/scan.py", "fold"),
    "scan (total)": ("poison/scan.py", "scan"),
}


def _profile_breakdown(prof: cProfile.Profile) -> dict[str, float]:
    """Inclusive seconds per function (they overlap: ClassRows.add includes the store's
    writes, finish its reads; "_gradients checks" is _gradients without
    input_gradients and unit_rows), and _gradients split by the pass that called it."""
    st = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out = {}
    for label, (path, func) in _PROFILED.items():
        ct = sum(v[3] for (file, _line, name), v in st.items()
                 if name == func and file.replace(os.sep, "/").endswith(path))
        out[label] = round(ct, 3)
    grads = out["input_gradients (forward + input-gradient backward)"]
    out["_gradients checks (finite logits and gradients)"] = round(
        out["_gradients checks (finite logits and gradients)"] - grads
        - out["unit_rows (normalisation)"], 3)
    # _gradients (input gradients + checks + normalisation) by the pass that called it
    passes = {"step": "main pass", "base_step": "base step", "final_step": "final filter"}
    for (file, _line, name), v in st.items():
        if name == "_gradients" and file.replace(os.sep, "/").endswith("poison/scan.py"):
            for (_cf, _cl, caller), cv in v[4].items():
                if caller in passes:
                    out[f"_gradients in the {passes[caller]}"] = round(cv[3], 3)
    return out


def _paired_rounds(benchmark, model: nn.Module, x: Tensor, y: Tensor, data: ScanData,
                   rounds: int) -> tuple[ScanResult, list[float], list[float], list[ScanResult]]:
    """``rounds`` timed scans, each between two timed forward+input-gradient passes (each
    round's setup runs one, and one more runs after the last round): (last result,
    ``rounds + 1`` pass seconds, ``rounds`` scan seconds, every round's result). Scan ``i``
    is compared with the mean of passes ``i`` and ``i + 1``, its neighbours in time on
    either side, so a drift of the shared machine's speed cancels to first order."""
    fb: list[float] = []
    sc: list[float] = []
    results: list[ScanResult] = []

    def setup():
        t0 = time.perf_counter()
        fwdbwd_pass(model, x, y)
        fb.append(time.perf_counter() - t0)

    def run() -> ScanResult:
        t0 = time.perf_counter()
        r = scan(model, data, config=CONFIG, progress=False)
        sc.append(time.perf_counter() - t0)
        results.append(r)
        return r

    r = benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    setup()  # the last scan's later neighbour
    return r, fb, sc, results


def _bracketed(sc: list[float], fb: list[float]) -> list[float]:
    """Each scan over the mean of the passes right before and right after it."""
    return [s / ((a + b) / 2) for s, a, b in zip(sc, fb, fb[1:], strict=False)]


def test_scan_overhead(benchmark, scan_model, cifar20k):
    require_native()
    model, meta = scan_model
    x, y, _, _ = cifar20k
    data = ScanData(x, y)
    prof = cProfile.Profile()
    prof.enable()  # warm-up round, profiled
    warm = scan(model, data, config=CONFIG, progress=False)
    prof.disable()
    _CACHE["scan"] = warm
    r, fb, sc, results = _paired_rounds(benchmark, model, x, y, data, ROUNDS)
    ratios = _bracketed(sc, fb)
    steps = {k: statistics.median(rr.timings[k] for rr in results) for k in r.timings}
    same = all(rr.target_class == warm.target_class and rr.base_class == warm.base_class
               and rr.suspicious_indices == warm.suspicious_indices for rr in results)
    benchmark.group = "scan-cifar20k"
    benchmark.extra_info.update(
        group="scan-cifar20k", role="native", threads=THREADS, rows=int(x.shape[0]),
        batch=BATCH, variant="scan(gradient, rows mode, float16 store, threshold=0)",
        overhead_ratio=statistics.median(ratios), overhead_ratios=ratios,
        overhead_ratio_of_medians=statistics.median(sc) / statistics.median(fb),
        fwdbwd_seconds=fb, scan_seconds=sc, timings=steps,
        profile=_profile_breakdown(prof), target=r.target_class, base=r.base_class,
        first_filter=r.details["first_filter"]["size"],
        suspicious=len(r.suspicious_indices), rounds_agree=same,
        scores=[c.score for c in r.classes], model_meta=meta)
    prof_total = benchmark.extra_info["profile"]["scan (total)"]
    benchmark.extra_info["note"] = (
        f"scan / forward+input-gradient pass: {statistics.median(ratios):.2f}x (median of "
        f"{len(ratios)} bracketed rounds; pass {statistics.median(fb):.1f} s, scan "
        f"{statistics.median(sc):.1f} s); scan steps (median s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
        + f"; target {r.target_class}, base {r.base_class}, first filter "
        f"{r.details['first_filter']['size']}, suspicious {len(r.suspicious_indices)}; "
        f"profiled warm-up ({prof_total:.1f} s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in benchmark.extra_info["profile"].items()
                    if k != "scan (total)"))
    assert r.target_class is not None and r.base_class is not None


WIDE = 48  # the information-only variant: a model ~9x the pass cost of width 16


def test_scan_overhead_wider_model(benchmark, cifar20k):
    """Information: the same scan and pass with SmallCNN(width=48) (random weights, seeded:
    the cost, not the decisions). The scan's own work (per-class Gram updates, the
    eigensolves, the row store, the GMMs) does not grow with the model, the final filter
    (1/K of a pass) and the base step (K x base_samples gradients) do."""
    require_native()
    from safedl_ext.models import SmallCNN

    x, y, _, _ = cifar20k
    torch.manual_seed(SEED)
    model = SmallCNN(3, 10, width=WIDE).eval().requires_grad_(False)
    r, fb, sc, _ = _paired_rounds(benchmark, model, x, y, ScanData(x, y), 1)
    ratio = _bracketed(sc, fb)[0]
    benchmark.group = "scan-cifar20k-wide"
    benchmark.extra_info.update(
        group="scan-cifar20k-wide", role="information", threads=THREADS,
        rows=int(x.shape[0]), variant=f"scan, SmallCNN(width={WIDE}) random weights",
        overhead_ratio=ratio, fwdbwd_seconds=fb, scan_seconds=sc,
        timings={k: round(v, 2) for k, v in r.timings.items()})
    benchmark.extra_info["note"] = (
        f"SmallCNN(width={WIDE}): scan / forward+input-gradient pass {ratio:.2f}x (one bracketed "
        f"round; passes {fb[0]:.1f} and {fb[1]:.1f} s, scan {sc[0]:.1f} s); scan steps (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in r.timings.items()))


# ---------------------------------------------------------------- goal 2: vs plain


def test_scan_plain(benchmark, scan_model, cifar20k):
    model, _ = scan_model
    x, y, _, _ = cifar20k
    data = ScanData(x, y)
    ours = _CACHE.get("scan")
    paired: list[float] = []
    plain_s: list[float] = []

    def setup():
        t0 = time.perf_counter()
        _CACHE["scan"] = scan(model, data, config=CONFIG, progress=False)
        paired.append(time.perf_counter() - t0)

    def run() -> dict:
        t0 = time.perf_counter()
        p = plain_scan(model, x, y)
        plain_s.append(time.perf_counter() - t0)
        return p

    p = benchmark.pedantic(run, setup=setup, rounds=1, iterations=1)
    ours = _CACHE["scan"]
    assert isinstance(ours, ScanResult)
    w2_ours = [c.wasserstein for c in ours.classes]
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(w2_ours, p["w2"], strict=True))
    same = ours.target_class == p["target"] and ours.base_class == p["base"]
    jac = _jaccard(ours.suspicious_indices, p["suspicious"])
    jac_first = _jaccard(ours.details["first_filter"]["indices"], p["first"])
    speed = statistics.median(plain_s) / statistics.median(paired)
    benchmark.group = "scan-cifar20k"
    benchmark.extra_info.update(
        group="scan-cifar20k", role="baseline-plain", threads=THREADS,
        variant="plain: matrices in memory, torch.linalg.svd, sklearn GaussianMixture(2)",
        speedup_paired=speed, scan_seconds_paired=paired, plain_seconds=plain_s,
        same_decisions=1.0 if same else 0.0, jaccard=jac, jaccard_first_filter=jac_first,
        target_plain=p["target"], base_plain=p["base"], target_ours=ours.target_class,
        base_ours=ours.base_class, suspicious_plain=len(p["suspicious"]),
        suspicious_ours=len(ours.suspicious_indices), first_plain=len(p["first"]),
        first_ours=len(ours.details["first_filter"]["indices"]), w2_max_rel_diff=rel,
        w2_plain=p["w2"], w2_ours=w2_ours)
    benchmark.extra_info["note"] = (
        f"plain / scan: {speed:.2f}x paired (plain {plain_s[0]:.1f} s, scan right before "
        f"{paired[0]:.1f} s); target/base ours {ours.target_class}/{ours.base_class}, plain "
        f"{p['target']}/{p['base']}; Jaccard of suspicious sets {jac:.3f} (ours "
        f"{len(ours.suspicious_indices)}, plain {len(p['suspicious'])}), of first filters "
        f"{jac_first:.3f}; per-class W2 max relative difference {rel:.2e}")


# ---------------------------------------------------------------- goal 3: AC and SS vs ART


@pytest.fixture(scope="module")
def activations(scan_model, cifar20k, tmp_path_factory) -> dict:
    model, _ = scan_model
    x, y, _, _ = cifar20k
    feats = penultimate(model)
    parts = []
    with torch.no_grad():
        for s in range(0, x.shape[0], BATCH):
            parts.append(feats(x[s:s + BATCH])[1])
    a = torch.cat(parts).contiguous()
    path = tmp_path_factory.mktemp("acts") / "acts.npz"
    np.savez(path, a=a.numpy(), y=y.numpy())
    head, data = activation_data(a, y)
    return {"a": a, "y": y, "a_np": a.numpy(), "y_np": y.numpy(), "path": path,
            "head": head, "data": data}


def _memory(method: str, acts: Path, tmp: Path) -> dict:
    out = tmp / f"{method}.json"
    env = dict(os.environ, SAFEDL_BENCH_THREADS=str(THREADS))
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "scan_memory.py"), "acts",
                    "--method", method, "--acts", str(acts), "--out", str(out),
                    "--batch", str(BATCH)], check=True, env=env)
    info = json.loads(out.read_text())
    info["peak_increase_mb"] = info["peak_rss_mb"] - info["start_rss_mb"]
    return info


ACTS = {
    ("ac", "native"): ("ours from activations: activation_clustering (streamed, 2-means)",
                       lambda A: ours_ac(A["head"], A["data"], BATCH), 5),
    ("ac", "baseline-art"): ("ART cluster_activations(PCA, KMeans) + relative-size rule",
                             lambda A: art_ac(A["a_np"], A["y_np"]), 5),
    ("ss", "native"): ("ours from activations: spectral_signatures (streamed)",
                       lambda A: ours_ss(A["head"], A["data"], BATCH), 5),
    ("ss", "baseline-art"): ("ART spectral_signature_scores + quantile cutoff",
                             lambda A: art_ss(A["a_np"], A["y_np"]), 5),
}


@pytest.mark.parametrize(("method", "role"), list(ACTS))
def test_activation_baseline(benchmark, activations, tmp_path, method, role):
    if role == "baseline-art":
        pytest.importorskip("art", reason="IBM ART (adversarial-robustness-toolbox) not "
                            "installed")
    variant, fn, rounds = ACTS[(method, role)]
    flagged = fn(activations)  # warm-up
    _CACHE[f"{method}-{role}"] = flagged
    benchmark.pedantic(fn, args=(activations,), rounds=rounds, iterations=1)
    name = f"{method}-{'ours' if role == 'native' else 'art'}"
    mem = _memory(name, activations["path"], tmp_path)
    group = f"{method}-cifar20k"
    benchmark.group = group
    benchmark.extra_info.update(group=group, role=role, variant=variant, threads=THREADS,
                                flagged=len(flagged), peak_rss_mb=mem["peak_rss_mb"],
                                peak_increase_mb=mem["peak_increase_mb"], memory=mem)
    note = (f"{name}: flagged {len(flagged)}, peak RSS {mem['peak_rss_mb']:.0f} MiB "
            f"(+{mem['peak_increase_mb']:.1f} MiB over the {mem['start_rss_mb']:.0f} MiB "
            f"before a second run in the process; the first run: "
            f"+{mem['first_run_increase_mb']:.1f} MiB)")
    other = _CACHE.get(f"{method}-native")
    if role == "baseline-art" and isinstance(other, list):
        jac = _jaccard(other, flagged)
        benchmark.extra_info["jaccard_vs_ours"] = jac
        note += f"; Jaccard with ours {jac:.3f}"
    benchmark.extra_info["note"] = note


@pytest.mark.parametrize("method", ["ac", "ss"])
def test_activation_baseline_e2e(benchmark, scan_model, cifar20k, method):
    model, _ = scan_model
    x, y, _, _ = cifar20k
    data = ScanData(x, y)
    cfg = ScanConfig(batch_size=BATCH)
    if method == "ac":
        def fn():
            return activation_clustering(model, data, config=cfg, progress=False)
    else:
        def fn():
            return spectral_signatures(model, data, config=cfg, expected_fraction=0.1,
                                       progress=False)
    r = benchmark.pedantic(fn, rounds=2, iterations=1)
    group = f"{method}-cifar20k"
    name = "activation_clustering" if method == "ac" else "spectral_signatures"
    benchmark.group = group
    benchmark.extra_info.update(
        group=group, role="native-e2e", threads=THREADS, flagged=len(r.suspicious_indices),
        variant=f"ours end to end: {name}(model, images)", timings=r.timings)
    ref = _CACHE.get(f"{method}-native")
    if isinstance(ref, list):
        benchmark.extra_info["jaccard_vs_from_activations"] = _jaccard(ref,
                                                                       r.suspicious_indices)


def test_activation_forward_floor(benchmark, scan_model, cifar20k):
    model, _ = scan_model
    x, _, _, _ = cifar20k
    feats = penultimate(model)

    def run():
        with torch.no_grad():
            for s in range(0, x.shape[0], BATCH):
                feats(x[s:s + BATCH])

    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.group = "ac-cifar20k"
    benchmark.extra_info.update(group="ac-cifar20k", role="floor-forward", threads=THREADS,
                                variant="penultimate(model) forward pass alone")


# ---------------------------------------------------------------- goal 4: peak memory


# glibc's dynamic mmap threshold switched off: blocks above 128 KiB are mmapped and
# returned on free, so freed temporaries cannot stay in the heap (information).
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _synthetic(n: int, tmp: Path, extra_env: dict[str, str] | None = None) -> dict:
    tag = "-fixed" if extra_env else ""
    out = tmp / f"synthetic-{n}{tag}.json"
    env = dict(os.environ, SAFEDL_BENCH_THREADS=str(THREADS), **(extra_env or {}))
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "scan_memory.py"), "synthetic",
                    "--n", str(n), "--threshold", str(MEM_THRESHOLD), "--batch", str(BATCH),
                    "--out", str(out)], check=True, env=env)
    return json.loads(out.read_text())


def test_scan_peak_memory(benchmark, tmp_path):
    require_native()
    small = _synthetic(MEM_SIZES[0], tmp_path)
    big = benchmark.pedantic(_synthetic, args=(MEM_SIZES[1], tmp_path), rounds=1,
                             iterations=1)
    ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    # the scan's own peak: VmHWM less the caller's uint8 images (held before the scan)
    own = [r["peak_rss_mb"] - r["images_mb"] for r in (small, big)]
    inc = [(r["peak_rss_mb"] - r["start_rss_mb"]) for r in (small, big)]
    fixed = [_synthetic(n, tmp_path, FIXED_MMAP) for n in MEM_SIZES]
    fixed_ratio = fixed[1]["peak_rss_mb"] / fixed[0]["peak_rss_mb"]
    benchmark.group = "scan-memory"
    benchmark.extra_info.update(
        group="scan-memory", role="native", threads=THREADS,
        variant=f"scan of {MEM_SIZES[1]:,} synthetic uint8 images (subprocess)",
        peak_ratio=ratio, scan_peak_ratio=own[1] / own[0], peak_increase_ratio=inc[1] / inc[0],
        peak_small_mb=small["peak_rss_mb"], peak_big_mb=big["peak_rss_mb"],
        peak_ratio_fixed_mmap_threshold=fixed_ratio, small=small, big=big,
        small_fixed_mmap_threshold=fixed[0], big_fixed_mmap_threshold=fixed[1])
    benchmark.extra_info["note"] = (
        f"peak RSS (VmHWM) less the images {own[1]:.0f} MiB at {MEM_SIZES[1]:,} images vs "
        f"{own[0]:.0f} MiB at {MEM_SIZES[0]:,}: {own[1] / own[0]:.2f}x; with the images "
        f"{big['peak_rss_mb']:.0f} vs {small['peak_rss_mb']:.0f} MiB: {ratio:.2f}x (increase over "
        f"the RSS after imports: {inc[1]:.0f} vs {inc[0]:.0f} MiB, {inc[1] / inc[0]:.2f}x; "
        f"uint8 images {big['images_mb']:.0f} vs {small['images_mb']:.0f} MiB); wall "
        f"{big['seconds']:.0f} s vs {small['seconds']:.0f} s; threshold {MEM_THRESHOLD:g}; "
        f"with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_): "
        f"{fixed[1]['peak_rss_mb']:.0f} vs {fixed[0]['peak_rss_mb']:.0f} MiB, "
        f"{fixed_ratio:.2f}x")
