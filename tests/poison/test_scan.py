"""The input-gradient backdoor scan: its decisions as functions of tensors, its streamed
math against a plain in-memory computation, end to end on real poisoned and clean MNIST
models, checkpoints and resume (SIGKILL), and bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from safedl_ext.gradients import input_gradients
from safedl_ext.linalg import gmm1d
from safedl_ext.models import DigitsCNN
from safedl_ext.poison.data import ScanData
from safedl_ext.poison.report import write_report
from safedl_ext.poison.scan import (
    ScanConfig,
    class_scores,
    filter_metrics,
    masked_vote,
    pick_base,
    pick_final_vector,
    pick_target,
    scan,
    signal_mask,
    smaller_cluster,
    unit_rows,
)
from safedl_ext.training import train_classifier

REPO = Path(__file__).resolve().parents[2]
CFG = ScanConfig()  # the calibrated defaults


# ------------------------------------------------------------------ decisions


def test_class_scores_are_w2_over_the_mean_of_the_other_valid_classes():
    w2 = torch.tensor([1.0, 2.0, 3.0, 10.0])
    valid = torch.tensor([True, True, False, True])
    s = class_scores(w2, valid)
    assert s[0].item() == pytest.approx(1.0 / 6.0)
    assert s[1].item() == pytest.approx(2.0 / 5.5)
    assert math.isnan(s[2].item())  # not valid: not scored, not averaged
    assert s[3].item() == pytest.approx(10.0 / 1.5)
    assert pick_target(s, 5.0) == 3
    assert pick_target(s, 7.0) is None
    # the others all 0: an infinite score; a single valid class: nothing to compare with
    assert class_scores(torch.tensor([0.0, 0.5]), torch.tensor([True, True]))[1].item() == \
        math.inf
    assert math.isnan(class_scores(torch.tensor([1.0, 0.0]),
                                   torch.tensor([True, False]))[0].item())
    assert pick_target(torch.tensor([float("nan")] * 3), 0.0) is None


def test_smaller_cluster_pick_base_and_filter_metrics():
    a = torch.tensor([0, 1, 1, 1, 0, 1])
    assert smaller_cluster(a).tolist() == [True, False, False, False, True, False]
    assert smaller_cluster(torch.tensor([0, 1])).tolist() == [False, True]  # tie: 1
    means = torch.tensor([0.1, -0.9, float("nan"), 0.5])
    assert pick_base(means, target=1) == 3  # the target and NaN are excluded
    m = filter_metrics([2, 3, 7], poisoned=[3, 7, 8], target_indices=[1, 2, 3, 7, 8, 9])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)  # clean 1, 2, 9: 2 is flagged


def test_the_final_filter_takes_the_widest_split_among_minority_splits():
    # vector 1 splits its class in halves (not poison-like) with the largest W2; vector 3
    # has a 10% cluster and a larger W2 than vector 2's 20% cluster
    a = torch.zeros(3, 10, dtype=torch.int64)
    a[0, :5] = 1
    a[1, :2] = 1
    a[2, :1] = 1
    j, shares = pick_final_vector(torch.tensor([0.9, 0.2, 0.3]), a, max_share=0.35)
    assert j == 2 and shares.tolist() == pytest.approx([0.5, 0.2, 0.1])
    # no minority split: the top vector (the thesis's choice)
    j, _ = pick_final_vector(torch.tensor([0.1, 0.9, 0.3]), a[[0, 0, 0]], max_share=0.35)
    assert j == 0
    # -1 (dropped) points do not count, NaN distances are never chosen
    b = torch.tensor([[0, 0, 0, 1, -1, -1], [0, 0, 0, 1, 1, 1]])
    j, shares = pick_final_vector(torch.tensor([float("nan"), 0.5]), b, max_share=0.35)
    assert shares.tolist() == pytest.approx([0.25, 0.5]) and j == 0


def test_signal_mask_and_the_masked_vote():
    sig = torch.zeros(2, 4, 4)
    sig[:, 3, 3] = 2.0  # 8 of the squared norm 8 + 4 + 1 + 1 = 14
    sig[0, 0, 0] = 2.0
    sig[1, 2, 1] = 1.0
    sig[1, 1, 1] = 1.0
    m = signal_mask(sig.flatten(), (2, 4, 4), energy=0.5)
    assert m.sum() == 1 and m[3, 3]
    m = signal_mask(sig.flatten(), (2, 4, 4), energy=0.8)  # 12 / 14 > 0.8
    assert m.sum() == 2 and m[3, 3] and m[0, 0]
    v = masked_vote(torch.tensor([5, 5, 3, 3, 1, 5]), target=5, num_classes=6)
    assert v["base"] == 3 and v["left"] == pytest.approx(0.5) and v["votes"][5] == 0
    assert masked_vote(torch.tensor([5] * 19 + [2]), 5, 6, min_left=0.1)["base"] is None
    assert masked_vote(torch.tensor([5] * 9 + [2]), 5, 6, min_left=0.1)["base"] == 2
    with pytest.raises(ValueError, match="base_rule"):
        ScanConfig(base_rule="logits")  # type: ignore[arg-type]


def test_unit_rows_survive_float32_underflow_and_keep_zero_rows():
    g = torch.zeros(3, 100)
    g[0] = 1e-30  # squares underflow to 0 in float32
    g[1, :10] = 3e37  # squares overflow
    u, zero = unit_rows(g)
    norms = torch.linalg.vector_norm(u.double(), dim=1)
    assert norms[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert zero.tolist() == [False, False, True]
    assert u[2].abs().sum() == 0
    # a row with a NaN or an inf comes back all NaN (the scan's finite check reads one
    # column), finite rows next to it are untouched
    h = torch.ones(4, 6)
    h[0, 2], h[1, 5], h[2, 0] = float("nan"), float("inf"), float("-inf")
    v, _ = unit_rows(h)
    assert torch.isnan(v[:3]).all() and bool(torch.isfinite(v[3]).all())
    # a batch whose norms are all far from underflow takes the plain division; it agrees
    # with the scaled one to float32 rounding, rows of 1e-9 entries included
    w = torch.randn(5, 3072, generator=torch.Generator().manual_seed(0))
    w[1] *= 1e-9
    fast, zero = unit_rows(w)
    scaled = w / w.abs().amax(dim=1, keepdim=True)
    slow = scaled / torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    assert not zero.any()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ the streamed math


@pytest.fixture(scope="module")
def digits_model():
    from safedl_ext.data import load_digits

    d = load_digits(seed=0)
    torch.manual_seed(0)
    m = DigitsCNN(width=8)
    train_classifier(m, d.x_train, d.y_train, epochs=6, seed=0)
    return m.eval(), d


def _plain_w2(model, x, y, k):
    """In memory: unit own-label gradients, centred torch.linalg.svd per class, gmm1d."""
    g = input_gradients(model, x, y).flatten(1).double()
    g = g / torch.linalg.vector_norm(g, dim=1, keepdim=True)
    groups = []
    for c in range(k):
        m = g[y == c]
        m = m - m.mean(0)
        v = torch.linalg.svd(m, full_matrices=False).Vh[0]
        groups.append(m @ v)
    length = max(t.numel() for t in groups)
    pad = torch.zeros(k, length, dtype=torch.float64)
    for c, t in enumerate(groups):
        pad[c, :t.numel()] = t
    fit = gmm1d(pad, torch.tensor([t.numel() for t in groups]), init="kmeans++")
    return fit.wasserstein2()


@pytest.mark.parametrize("mode", ["rows", "gram"])
@pytest.mark.parametrize("store", ["float16", "float32"])
def test_streamed_scan_matches_the_plain_in_memory_computation(digits_model, store, mode):
    model, d = digits_model
    r = scan(model, ScanData(d.x_train, d.y_train),
             config=ScanConfig(batch_size=50, store_dtype=store, threshold=1e9, mode=mode),
             progress=False)
    assert r.details["mode"] == mode
    want = _plain_w2(model, d.x_train, d.y_train, 10)
    got = torch.tensor([c.wasserstein for c in r.classes], dtype=torch.float64)
    tol = 2e-3 if store == "float16" else 1e-5
    assert torch.allclose(got, want, rtol=tol, atol=tol), (got, want)
    assert [c.count for c in r.classes] == torch.bincount(d.y_train, minlength=10).tolist()


@pytest.mark.parametrize("held", [True, False], ids=["class-in-memory", "file-chunks"])
def test_the_rows_mode_matches_the_plain_computation_at_mnist_size(mnist_backdoor, held,
                                                                    monkeypatch):
    """d = 784: the rows mode's Krylov (not the dense path of small d), on each class's
    rows read once into memory or streamed from its file in many chunks at every
    iteration, gives the per-class W2 of full in-memory SVDs."""
    import safedl_ext.poison._rows as rows_mod

    if not held:
        monkeypatch.setattr(rows_mod, "_IN_MEMORY_BYTES", 0)
        monkeypatch.setattr(rows_mod, "_CHUNK_BYTES", 100 * 1024)  # 32 rows a chunk
    b = mnist_backdoor
    x, y = b.poisoned.x[:3000], b.poisoned.y[:3000]
    r = scan(b.model, ScanData(x, y),
             config=ScanConfig(store_dtype="float32", threshold=1e9), progress=False)
    assert r.details["mode"] == "rows"
    want = _plain_w2(b.model, x, y, 10)
    got = torch.tensor([c.wasserstein for c in r.classes], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got, want)


def test_scan_does_not_depend_on_the_batch_size(digits_model):
    model, d = digits_model
    data = ScanData(d.x_train, d.y_train)
    a = scan(model, data, config=ScanConfig(batch_size=7, threshold=0.0), progress=False)
    b = scan(model, data, config=ScanConfig(batch_size=400, threshold=0.0), progress=False)
    assert a.target_class == b.target_class and a.base_class == b.base_class
    assert a.suspicious_indices == b.suspicious_indices
    for ca, cb in zip(a.classes, b.classes, strict=True):
        assert ca.wasserstein == pytest.approx(cb.wasserstein, rel=1e-3, abs=1e-5)


# ------------------------------------------------------------------ end to end on MNIST


@pytest.fixture(scope="module")
def mnist(mnist_backdoor):
    b = mnist_backdoor
    return b.split, b.poisoned, b.model, b.clean_model


def test_scan_finds_target_base_and_the_poisoned_samples_of_a_real_backdoor(mnist, tmp_path):
    _, p, poisoned, _ = mnist
    data = ScanData(p.x, p.y)
    r = scan(poisoned, data, config=CFG, progress=False)
    assert r.poisoned and r.target_class == 5 and r.base_class == 3
    tid = torch.nonzero(p.y == 5).flatten()
    m = filter_metrics(r.suspicious_indices, p.indices, tid)
    assert m["specificity"] >= 0.95 and m["sensitivity"] >= 0.85, m
    assert r.suspicious_indices == sorted(r.suspicious_indices)
    first = r.details["first_filter"]
    assert 0 < first["size"] < len(tid) / 2
    fin = r.details["final_filter"]
    assert len(fin["candidates"]) == CFG.final_vectors == 3
    chosen = fin["candidates"][fin["vector"] - 1]
    assert chosen["smaller_share"] <= CFG.max_share
    assert all(c["wasserstein"] <= chosen["wasserstein"] for c in fin["candidates"]
               if c["smaller_share"] <= CFG.max_share)
    # the base: the corner patch masked, the 3s are 3s again; the gradient rule (the
    # thesis's) is not run when the masked vote decides, unless asked for
    mk = r.details["base_masked"]
    assert mk["base"] == 3 and mk["left"] > 0.5, mk
    assert mk["votes"][3] >= 0.9 * sum(mk["votes"]), mk
    assert r.details["base_rule"] == "masked" and r.details["base_gradient"] is None
    assert "base_scores" not in r.details
    both = scan(poisoned, data, config=ScanConfig(base_compare=True), progress=False)
    assert both.details["base_gradient"] == 3 == both.base_class
    assert both.suspicious_indices == r.suspicious_indices
    # here the poison is the top vector: the thesis's choice gives the same filter
    top = scan(poisoned, data, config=ScanConfig(final_vectors=1), progress=False)
    assert fin["vector"] == 1 and top.suspicious_indices == r.suspicious_indices
    # the report: the keys the issue names, the figures, nothing else half-written
    rep = write_report(r, data, tmp_path)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    for key in ("schema_version", "method", "poisoned", "target_class", "base_class",
                "suspicious_indices", "threshold", "classes", "timings", "versions"):
        assert key in on_disk
    assert on_disk["suspicious_indices"] == rep["suspicious_indices"]
    assert set(on_disk["classes"][0]) >= {"label", "count", "wasserstein", "score"}
    for f in ("report.md", "scores.png", "projections.png", "signal.png", "suspicious.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_capped_base_step_names_the_same_base_in_memory_and_streamed(mnist, monkeypatch):
    """The base step on the first filter's most confident samples (``base_samples``) gives
    the same label means whether it holds the capped rows in memory or streams them
    through a per-label StreamingSVD; the cap keeps the highest-posterior samples."""
    import safedl_ext.poison.scan as scan_mod

    _, p, poisoned, _ = mnist
    data = ScanData(p.x, p.y)
    cfg = ScanConfig(threshold=1.35, base_samples=64, base_rule="gradient")
    mem = scan(poisoned, data, config=cfg, progress=False)
    monkeypatch.setattr(scan_mod, "_BASE_IN_MEMORY_BYTES", 0)
    streamed = scan(poisoned, data, config=cfg, progress=False)
    assert mem.details["base_samples"] == streamed.details["base_samples"] == 64
    assert mem.base_class == streamed.base_class == 3
    a, b = mem.details["base_scores"], streamed.details["base_scores"]
    assert a["5"] is None and b["5"] is None
    for c in a:
        if a[c] is not None:
            assert abs(a[c] - b[c]) <= 1e-4 * max(1.0, abs(b[c])), (c, a[c], b[c])
    full = scan(poisoned, data, config=ScanConfig(threshold=1.35, base_samples=0,
                                                  base_rule="gradient"), progress=False)
    assert full.details["base_samples"] == full.details["first_filter"]["size"] > 64
    assert full.base_class == 3 and full.suspicious_indices == mem.suspicious_indices
    with pytest.raises(ValueError, match="base_samples"):
        ScanConfig(base_samples=-1)


def test_the_final_filter_is_the_same_in_memory_and_streamed(mnist, monkeypatch):
    """The final filter holds the target class's base-label rows in memory when they fit
    (Krylov on the rows) and streams them through a StreamingSVD (Gram matrix, row store)
    when not: the same vectors' projections, the same suspicious samples."""
    import safedl_ext.poison.scan as scan_mod

    _, p, poisoned, _ = mnist
    data = ScanData(p.x, p.y)
    cfg = ScanConfig(store_dtype="float32")
    mem = scan(poisoned, data, config=cfg, progress=False)
    monkeypatch.setattr(scan_mod, "_FINAL_IN_MEMORY_BYTES", 0)
    streamed = scan(poisoned, data, config=cfg, progress=False)
    a, b = mem.details["final_filter"], streamed.details["final_filter"]
    assert a["vector"] == b["vector"] and mem.suspicious_indices == streamed.suspicious_indices
    for ca, cb in zip(a["candidates"], b["candidates"], strict=True):
        assert ca["wasserstein"] == pytest.approx(cb["wasserstein"], rel=1e-4, abs=1e-7)
        assert ca["smaller_share"] == cb["smaller_share"]


def test_the_poison_signal_is_the_trigger(mnist):
    """The flagged class's top singular vector puts its largest entries on the patch."""
    _, p, poisoned, _ = mnist
    r = scan(poisoned, ScanData(p.x, p.y), config=CFG, progress=False)
    v = r.figures["signal"].reshape(28, 28).abs()
    top = torch.topk(v.flatten(), 9).indices
    rows, cols = top // 28, top % 28
    assert int((rows >= 25).sum()) >= 6 and int((cols >= 25).sum()) >= 6


def test_a_clean_model_is_not_flagged(mnist):
    s, _, _, clean = mnist
    r = scan(clean, ScanData(s.x_train, s.y_train), config=CFG, progress=False)
    assert not r.poisoned and r.target_class is None and r.suspicious_indices == []
    # its top class scores high (class 1's gradients split in two halves), but no class
    # whose smaller cluster is a minority stands out
    assert all(c.score < CFG.threshold for c in r.classes if c.smaller / c.count <= 0.35)
    assert max((c.smaller / c.count for c in r.classes if c.score >= CFG.threshold),
               default=1.0) > 0.35


# ------------------------------------------------------------------ checkpoints and resume

_CHILD = r"""
import sys, torch
from safedl_ext.models import SmallCNN
from safedl_ext.poison.data import ScanData
from safedl_ext.poison.scan import ScanConfig, scan
blob = torch.load(sys.argv[1])
m = SmallCNN(in_channels=1, width=16); m.load_state_dict(blob["model"]); m.eval()
cfg = ScanConfig(batch_size=100, checkpoint_rows=500, checkpoint_seconds=0.0, threshold=1.5,
                 mode=sys.argv[3])
scan(m, ScanData(blob["x"], blob["y"]), out=sys.argv[2], config=cfg, progress=False)
print("done")
"""


def _strip(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "timings"}


@pytest.mark.parametrize("mode", ["rows", "gram"])
def test_a_scan_killed_with_sigkill_resumes_and_writes_the_same_report(mnist, tmp_path, mode):
    _, p, poisoned, _ = mnist
    keep = torch.cat([torch.nonzero(p.y == c).flatten()[:300] for c in range(10)]).sort().values
    x, y = p.x[keep], p.y[keep]
    blob = tmp_path / "blob.pt"
    torch.save({"model": poisoned.state_dict(), "x": x, "y": y}, blob)
    cfg = ScanConfig(batch_size=100, checkpoint_rows=500, checkpoint_seconds=0.0,
                     threshold=1.5, mode=mode)
    whole = scan(poisoned, ScanData(x, y), out=tmp_path / "whole", config=cfg,
                 progress=False)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    kills = 0
    for wait_for in ("main:stream", "classes"):  # mid-pass, then after the first step
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(blob), str(out), mode],
                                env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        state = out / ".scan" / "state.pt"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if state.exists():
                try:
                    st = torch.load(state, weights_only=True)
                except Exception:  # being replaced right now
                    st = {}
                if wait_for in st:
                    break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    resumed = scan(poisoned, ScanData(x, y), out=out, config=cfg, progress=False)
    assert resumed.target_class == whole.target_class
    assert _strip(resumed.to_dict()) == _strip(whole.to_dict())
    assert not list((out / ".scan").glob("*.rows"))  # the stores are gone when it ends


def test_a_scan_folder_refuses_other_data_or_settings(mnist, tmp_path):
    _, p, poisoned, _ = mnist
    x, y = p.x[:400], p.y[:400]
    cfg = ScanConfig(batch_size=100, checkpoint_seconds=0.0)
    scan(poisoned, ScanData(x, y), out=tmp_path, config=cfg, progress=False)
    with pytest.raises(ValueError, match="other data"):
        scan(poisoned, ScanData(p.x[:401], p.y[:401]), out=tmp_path, config=cfg,
             progress=False)
    with pytest.raises(ValueError, match="other config"):
        scan(poisoned, ScanData(x, y), out=tmp_path, progress=False,
             config=ScanConfig(batch_size=50, checkpoint_seconds=0.0))


# ------------------------------------------------------------------ bad input


class _NaNAt(torch.nn.Module):
    def __init__(self, inner, bad):
        super().__init__()
        self.inner, self.bad = inner, bad

    def forward(self, x):
        out = self.inner(x)
        hit = (x.flatten(1)[:, 0] == self.bad).unsqueeze(1)
        return torch.where(hit, torch.full_like(out, float("nan")), out)


def test_bad_input_is_a_clear_error(digits_model):
    model, d = digits_model
    x, y = d.x_train.clone(), d.y_train
    with pytest.raises(ValueError, match="empty"):
        scan(model, ScanData(x[:0], y[:0]), progress=False)
    with pytest.raises(ValueError, match="labels out of range: sample 3 has label 12"):
        bad = y.clone()
        bad[3] = 12
        scan(model, ScanData(x, bad), progress=False)
    with pytest.raises(ValueError, match="rejects the data's images of shape"):
        scan(model, ScanData(torch.rand(20, 3, 8, 8), y[:20]), progress=False)
    x[17, 0, 0, 0] = 0.123
    x[40, 0, 0, 0] = 0.123
    with pytest.raises(ValueError, match=r"NaN logits for 2 sample\(s\).*17, 40"):
        scan(_NaNAt(model, 0.123), ScanData(x, y), progress=False)

    # finite logits, infinite input gradients (d sqrt(u)/du at u = 0) for two samples
    x2 = d.x_train.clone().clamp_min(0.01)
    x2[5, 0, 3, 3] = 0.0
    x2[33, 0, 1, 2] = 0.0

    def sqrt_first(xb: torch.Tensor) -> torch.Tensor:
        return model(xb.sqrt())

    with pytest.raises(ValueError, match=r"input gradients are not finite for samples \[5, 33\]"):
        scan(sqrt_first, ScanData(x2, y), progress=False)


def test_classes_with_zero_or_one_sample_are_reported_as_degenerate(digits_model):
    model, d = digits_model
    keep = (d.y_train != 7) & (d.y_train != 8)
    keep[torch.nonzero(d.y_train == 7)[0]] = True  # one sample of class 7, none of 8
    r = scan(model, ScanData(d.x_train[keep], d.y_train[keep]), config=ScanConfig(
        threshold=0.0), progress=False)
    by = {c.label: c for c in r.classes}
    assert by[7].count == 1 and by[7].degenerate and by[7].score is None
    assert by[8].count == 0 and by[8].degenerate and by[8].score is None
    assert r.target_class not in (7, 8)
