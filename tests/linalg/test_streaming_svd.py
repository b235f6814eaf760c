"""StreamingSVD on planted-signal matrices in the hard and the easy regime."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safedl_ext.linalg import StreamingSVD, streamed_svd
from safedl_ext.linalg.synthetic import planted_matrix, planted_stream
from tests.conftest import DEVICES


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return abs(float(a @ b / (a.norm() * b.norm())))


def _batches(x: torch.Tensor, bs: int, label: int = 0, order: torch.Tensor | None = None):
    n = x.shape[0]
    idx = torch.arange(n) if order is None else order

    def gen():
        for i in range(0, n, bs):
            sel = idx[i:i + bs]
            yield x[sel], torch.full((sel.numel(),), label), sel
    return gen


@pytest.fixture(scope="module")
def hard():
    """N = 5,000, d = 3,072, 10% planted rows: sigma_1^2 ~ 134 against a tail of ~4,866."""
    x, v = planted_matrix(5000, 3072, fraction=0.1, strength=0.6, seed=0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    assert 100 < float(s[0]) ** 2 < 170 and float((s ** 2).sum() - s[0] ** 2) > 30 * float(
        s[0] ** 2)
    return x, v, s, vh


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_gram_mode_hard_regime_matches_svd(hard, device):
    x, v, s, vh = hard
    res = streamed_svd(_batches(x.to(device), 256), 1, 3072, mode="gram", device=device)[0]
    assert res.converged and res.exact_projections
    assert _cos(res.vectors[0].cpu(), vh[0]) >= 0.999
    assert _cos(res.projections[:, 0].cpu(), x @ vh[0]) >= 0.999
    assert torch.equal(res.sample_ids.cpu(), torch.arange(5000))
    assert abs(float(res.singular_values[0]) - float(s[0])) < 1e-3 * float(s[0])
    assert _cos(res.vectors[0].cpu(), v) > 0.99  # and it is the planted direction


@pytest.mark.slow
def test_plain_single_pass_sketch_fails_in_the_hard_regime(hard):
    """The regime is real: Tropp et al.'s single-pass sketch (k=4, l=9) misses the vector."""
    x, _, _, vh = hard
    g = torch.Generator().manual_seed(0)
    omega = torch.randn(3072, 4, generator=g)
    psi = torch.randn(9, 5000, generator=g)
    q = torch.linalg.qr(x @ omega).Q
    b = torch.linalg.lstsq(psi @ q, psi @ x).solution
    top = torch.linalg.svd(b, full_matrices=False)[2][0]
    assert _cos(top, vh[0]) < 0.5


@pytest.mark.slow
def test_sketch_mode_hard_regime_projections_and_refine(hard):
    x, _, _, vh = hard
    exact = x.double() @ vh[0].double()
    svd = StreamingSVD(1, 3072, mode="sketch", sketch_dim=2048, seed=1)
    for rows, cls, ids in _batches(x, 256)():
        svd.update(rows, cls, ids)
    res = svd.finalize()[0]
    assert res.vectors is None and not res.exact_projections
    assert _cos(res.projections[:, 0], exact) >= 0.98
    svd.refine(_batches(x, 500), [0])
    res = svd.results()[0]
    assert res.exact_projections
    assert _cos(res.vectors[0], vh[0]) >= 0.999
    assert _cos(res.projections[:, 0], exact) >= 0.999


@pytest.mark.slow
def test_sketch_mode_imagenet_sized_class_against_float64_reference():
    """N = 1,300, d = 150,528 (3 x 224 x 224), 10% planted: bounded-memory projections
    |cos| >= 0.98 against the exact float64 ones (from the 1,300 x 1,300 Gram matrix)."""
    d = 3 * 224 * 224
    stream = list(planted_stream(1, 1300, d, batch=130, seed=5))
    svd = StreamingSVD(1, d, mode="sketch", sketch_dim=2048, seed=2)
    for rows, cls, ids in stream:
        svd.update(rows, cls, ids)
    res = svd.finalize()[0]
    x = torch.cat([r for r, _, _ in stream])
    del stream
    gram = torch.zeros(1300, 1300, dtype=torch.float64)
    for j in range(0, d, 16384):
        part = x[:, j:j + 16384].double()
        gram += part @ part.T
    evals, evecs = torch.linalg.eigh(gram)
    exact = evecs[:, -1] * evals[-1].sqrt()
    # the hard regime: the tail carries > 30x the signal's energy (35 against ~1,265)
    assert float(evals[:-1].sum()) > 30 * float(evals[-1])
    assert _cos(res.projections[:, 0], exact) >= 0.98
    # and the refined class is exact
    svd.refine(lambda: iter([(x[i:i + 325], torch.zeros(325, dtype=torch.long),
                              torch.arange(i, i + 325)) for i in range(0, 1300, 325)]), [0])
    assert _cos(svd.results()[0].projections[:, 0], exact) >= 0.999


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("center", [False, True])
def test_easy_regime_rank3_matches_svd(center, device):
    g = torch.Generator().manual_seed(5)
    n, d = 1500, 400
    basis = torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=torch.float64)).Q
    coef = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([6.0, 4.0, 2.5])
    x = (coef @ basis.T + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5)
    x = x.float()
    xm = x.double() - x.double().mean(0) if center else x.double()
    _, s, vh = torch.linalg.svd(xm, full_matrices=False)
    for mode in ("gram", "sketch"):
        res = streamed_svd(_batches(x.to(device), 128), 1, d, mode=mode, rank=3, center=center,
                           sketch_dim=512, device=device, refine_classes=[0])[0]
        assert res.converged
        for j in range(3):
            assert _cos(res.vectors[j].cpu(), vh[j]) >= 0.999, (mode, j)
            assert _cos(res.projections[:, j].cpu(), xm @ vh[j]) >= 0.999, (mode, j)
        torch.testing.assert_close(res.singular_values.cpu(), s[:3], rtol=2e-3, atol=0)


def test_projections_of_many_classes_match_each_class_alone():
    """C * rank > 64 (here 24 classes x rank 3) projects class by class within a batch:
    the same projections as one class's own SVD, batches mixing every class."""
    g = torch.Generator().manual_seed(9)
    c, n, d = 24, 40, 30
    x = torch.randn(c * n, d, generator=g) + torch.arange(c * n)[:, None] % 7 * 0.1
    labels = torch.randperm(c * n, generator=g) % c

    def batches():
        for i in range(0, c * n, 50):
            yield x[i:i + 50], labels[i:i + 50], torch.arange(i, min(c * n, i + 50))

    res = streamed_svd(batches, c, d, mode="gram", rank=3, center=True)
    for k in (0, 7, 23):
        xk = x[labels == k].double()
        xm = xk - xk.mean(0)
        _, _, vh = torch.linalg.svd(xm, full_matrices=False)
        for j in range(3):
            assert _cos(res[k].projections[:, j], xm @ vh[j]) >= 0.9999, (k, j)


def test_invariant_to_batch_size_order_and_split():
    x, _ = planted_matrix(900, 120, fraction=0.1, strength=0.8, seed=3)
    labels = torch.arange(900) % 3
    perm = torch.randperm(900, generator=torch.Generator().manual_seed(1))

    def run(mode, parts):
        svds = []
        for part in parts:
            s = StreamingSVD(3, 120, mode=mode, rank=2, center=True, sketch_dim=64,
                             buffer_rows=17)
            for i in range(0, part.numel(), 37 if len(parts) > 1 else 100):
                sel = part[i:i + (37 if len(parts) > 1 else 100)]
                s.update(x[sel], labels[sel], sel)
            svds.append(s)
        for other in svds[1:]:
            svds[0].merge_(other)
        out = svds[0].finalize()
        if mode == "gram":
            for i in range(0, 900, 250):
                sel = perm[i:i + 250]
                svds[0].project(x[sel], labels[sel], sel)
            out = svds[0].results()
        return out

    for mode in ("gram", "sketch"):
        base = run(mode, [torch.arange(900)])
        for parts in ([perm], [perm[:400], perm[400:]], [perm[:100], perm[100:101],
                                                          perm[101:]]):
            other = run(mode, parts)
            for c in range(3):
                a, b = base[c], other[c]
                assert torch.equal(a.sample_ids, b.sample_ids)
                torch.testing.assert_close(a.projections, b.projections, atol=1e-5, rtol=0)
                torch.testing.assert_close(a.singular_values, b.singular_values, rtol=1e-6,
                                           atol=0)
                if mode == "gram":
                    torch.testing.assert_close(a.vectors, b.vectors, atol=1e-5, rtol=0)


def test_classes_are_routed_like_separate_runs():
    stream = list(planted_stream(4, 300, 96, batch=50, fraction=0.1, strength=0.8, seed=2))
    together = streamed_svd(lambda: iter(stream), 4, 96, mode="gram")
    for c in range(4):
        rows = torch.cat([r[k == c] for r, k, _ in stream])
        alone = streamed_svd(lambda rows=rows: iter([(rows, torch.zeros(len(rows),
                                                                         dtype=torch.long),
                                                      torch.arange(len(rows)))]), 1, 96)[0]
        torch.testing.assert_close(together[c].vectors, alone.vectors, atol=1e-5, rtol=0)
        assert together[c].count == 300


def test_state_dict_round_trip_resumes_a_stream():
    x, _ = planted_matrix(400, 50, seed=4)
    cls = torch.zeros(400, dtype=torch.long)
    for mode in ("gram", "sketch"):
        full = StreamingSVD(1, 50, mode=mode, sketch_dim=32)
        full.update(x, cls, torch.arange(400))
        first = StreamingSVD(1, 50, mode=mode, sketch_dim=32)
        first.update(x[:150], cls[:150], torch.arange(150))
        state = {k: v.clone() for k, v in first.state_dict().items()}
        resumed = StreamingSVD(1, 50, mode=mode, sketch_dim=32)
        resumed.load_state_dict(state)
        resumed.update(x[150:], cls[150:], torch.arange(150, 400))
        a, b = full.finalize()[0], resumed.finalize()[0]
        torch.testing.assert_close(a.singular_values, b.singular_values, rtol=1e-6, atol=0)


def test_errors_name_the_argument():
    s = StreamingSVD(3, 8)
    with pytest.raises(ValueError, match="class_ids must be in"):
        s.update(torch.randn(2, 8), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"rows must have shape \(B, 8\)"):
        s.update(torch.randn(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="finite"):
        s.update(torch.full((1, 8), float("nan")), torch.tensor([0]))
    with pytest.raises(TypeError, match="class_ids"):
        s.update(torch.randn(2, 8), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="mode"):
        StreamingSVD(3, 8, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank"):
        StreamingSVD(3, 8, rank=9)
    with pytest.raises(ValueError, match="use mode='sketch'"):
        StreamingSVD(1000, 150528)
    with pytest.raises(RuntimeError, match="before finalize"):
        s.project(torch.randn(1, 8), torch.tensor([0]))
    s.update(torch.randn(4, 8), torch.tensor([0, 0, 1, 1]))
    res = s.finalize()
    assert sorted(res) == [0, 1]  # class 2 had no rows
    with pytest.raises(RuntimeError, match="after finalize"):
        s.update(torch.randn(1, 8), torch.tensor([0]))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(1, 40), r=st.integers(1, 3),
       mode=st.sampled_from(["gram", "sketch"]), center=st.booleans(), seed=st.integers(0, 99))
def test_property_shapes_orthonormal_and_permutation_invariant(n, d, r, mode, center, seed):
    r = min(r, d)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).float()
    perm = torch.randperm(n, generator=g)
    outs = []
    for order in (torch.arange(n), perm):
        res = streamed_svd(_batches(x, 7, order=order), 1, d, mode=mode, rank=r, center=center,
                           sketch_dim=16, refine_classes=[0])[0]
        # sketch mode returns at most n components (a class with fewer rows than rank)
        r_got = min(r, n) if mode == "sketch" else r
        assert res.vectors.shape == (r_got, d) and res.projections.shape == (n, r_got)
        assert res.singular_values.shape == (r_got,)
        assert bool(torch.isfinite(res.projections).all())
        outs.append(res)
    # singular values below ~sqrt(float32 eps) * sigma_1 are rounding noise of the float32
    # state (a rank-deficient class): compare on that scale
    top = float(outs[0].singular_values[0])
    torch.testing.assert_close(outs[0].singular_values, outs[1].singular_values, rtol=1e-5,
                               atol=1e-3 * top + 1e-6)
