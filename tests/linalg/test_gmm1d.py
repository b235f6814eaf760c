"""linalg.gmm1d against scikit-learn's GaussianMixture(2), degenerate groups, properties."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safedl_ext import ops
from safedl_ext.linalg import GMM1DResult, gmm1d, wasserstein2_gaussian1d
from safedl_ext.linalg import gmm as lgmm
from safedl_ext.ops import gmm as gmm_ops
from safedl_ext.ops import reference
from tests.conftest import DEVICES

sklearn_mixture = pytest.importorskip("sklearn.mixture")

NATIVE = ops.backend() == "native"
TOL, MAX_ITER, REG = 1e-3, 100, 1e-6


def _mixture(kind: str, sizes: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (C, L) float64 groups drawn from 2-component mixtures."""
    rng = np.random.default_rng(seed)
    length = max(sizes)
    x = np.zeros((len(sizes), length))
    for c, n in enumerate(sizes):
        if kind == "separated":
            m0, m1, s0, s1, p = -4.0 + c, 6.0 + c, 1.0, 1.5, 0.35
        else:  # overlapping: means about 1.5 standard deviations apart
            m0, m1, s0, s1, p = 0.0, 1.6, 1.0, 0.8, 0.45
        comp = rng.random(n) < p
        x[c, :n] = np.where(comp, rng.normal(m0, s0, n), rng.normal(m1, s1, n))
    return torch.tensor(x), torch.tensor(sizes)


def _sklearn(x: np.ndarray, w, m, v, tol=TOL, max_iter=MAX_ITER, reg=REG):
    g = sklearn_mixture.GaussianMixture(
        n_components=2, covariance_type="full", tol=tol, max_iter=max_iter, reg_covar=reg,
        n_init=1, weights_init=w, means_init=m[:, None], precisions_init=(1.0 / v)[:, None, None],
        init_params="random_from_data", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = g.fit_predict(x[:, None])
    return g, labels


def _initial(x, lengths, init):
    xd = x.double().cpu()
    fn = lgmm._init_quantile if init == "quantile" else lgmm._init_kmeanspp
    return fn(xd, lengths.cpu(), REG)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["separated", "overlapping"])
@pytest.mark.parametrize("init", ["quantile", "kmeans++"])
def test_matches_sklearn(device, kind, init):
    x, lengths = _mixture(kind, [2000, 1500, 800, 3000], seed=3)
    res = gmm1d(x.to(device), lengths.to(device), init=init, tol=TOL, max_iter=MAX_ITER,
                reg_covar=REG)
    w0, m0, v0 = _initial(x, lengths, init)
    agree = total = 0
    for c, n in enumerate(lengths.tolist()):
        g, labels = _sklearn(x[c, :n].numpy(), w0[c].numpy(), m0[c].numpy(), v0[c].numpy())
        ours = res.assignments[c, :n].cpu().numpy()
        agree += int((ours == labels).sum())
        total += n
        np.testing.assert_allclose(res.weights[c].cpu().numpy(), g.weights_, rtol=1e-6,
                                   atol=1e-8)
        np.testing.assert_allclose(res.means[c].cpu().numpy(), g.means_.ravel(), rtol=1e-6,
                                   atol=1e-8)
        np.testing.assert_allclose(res.variances[c].cpu().numpy(), g.covariances_.ravel(),
                                   rtol=1e-6, atol=1e-8)
        assert int(res.n_iter[c]) == g.n_iter_
        assert bool(res.converged[c]) == g.converged_
        assert float(res.lower_bound[c]) == pytest.approx(g.lower_bound_, rel=1e-9, abs=1e-9)
        assert float(res.log_likelihood[c]) == pytest.approx(g.score(x[c, :n, None].numpy()),
                                                            rel=1e-9, abs=1e-9)
        resp = g.predict_proba(x[c, :n, None].numpy())
        np.testing.assert_allclose(res.responsibilities[c, :n].cpu().numpy(), resp, atol=1e-6)
    assert agree / total >= 0.995
    assert (res.status.cpu() == lgmm.STATUS_FITTED).all()


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_init_and_float32_match_sklearn(device):
    x, lengths = _mixture("overlapping", [700, 1200], seed=5)
    init = {"weights": torch.tensor([0.5, 0.5]), "means": torch.tensor([[-1.0, 2.0]]),
            "variances": torch.tensor([1.0, 1.0])}
    res = gmm1d(x.float().to(device), lengths.to(device), init=init, tol=1e-5)
    for c, n in enumerate(lengths.tolist()):
        xs = x[c, :n].float().double().numpy()  # the same float32 values, fitted in float64
        g, labels = _sklearn(xs, np.array([0.5, 0.5]), np.array([-1.0, 2.0]),
                             np.array([1.0, 1.0]), tol=1e-5)
        np.testing.assert_allclose(res.means[c].cpu().numpy(), g.means_.ravel(), rtol=1e-6)
        assert (res.assignments[c, :n].cpu().numpy() == labels).mean() >= 0.995


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_native_matches_reference_through_api(device, monkeypatch):
    x, lengths = _mixture("overlapping", [900, 400, 0, 1, 50], seed=7)
    x[4, :50] = 3.0
    native = gmm1d(x.to(device), lengths.to(device))
    monkeypatch.setattr(gmm_ops, "native_kernel_for", lambda device: False)
    ref = gmm1d(x.to(device), lengths.to(device))
    for name in ("weights", "means", "variances", "log_likelihood", "lower_bound",
                 "responsibilities"):
        torch.testing.assert_close(getattr(native, name), getattr(ref, name), rtol=1e-9,
                                   atol=1e-9)
    for name in ("assignments", "n_iter", "converged", "status"):
        assert torch.equal(getattr(native, name), getattr(ref, name)), name


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_groups(device):
    x = torch.zeros((4, 6), dtype=torch.float64)
    x[1, 0] = 7.0
    x[2, :] = -2.0
    x[3, :] = torch.tensor([1.0, 1.0, 5.0, 5.0, 1.0, 5.0])
    lengths = torch.tensor([0, 1, 6, 6])
    res = gmm1d(x.to(device), lengths.to(device))
    assert res.status.tolist() == [lgmm.STATUS_EMPTY, lgmm.STATUS_SINGLE, lgmm.STATUS_CONSTANT,
                                   lgmm.STATUS_FITTED]
    assert res.weights[:3].tolist() == [[1.0, 0.0]] * 3
    assert res.means[:3].tolist() == [[0.0, 0.0], [7.0, 7.0], [-2.0, -2.0]]
    assert res.variances[:3].tolist() == [[REG, REG]] * 3
    assert res.assignments[1, 0] == 0 and (res.assignments[2] == 0).all()
    assert (res.assignments[0] == -1).all() and (res.assignments[1, 1:] == -1).all()
    assert res.degenerate.tolist() == [True, True, True, False]
    assert res.wasserstein2()[:3].tolist() == [0.0, 0.0, 0.0]
    for t in (res.weights, res.means, res.variances, res.log_likelihood, res.lower_bound,
              res.responsibilities):
        assert torch.isfinite(t).all()
    # Two clusters of equal points: the fit separates them.
    assert sorted(res.means[3].tolist()) == pytest.approx([1.0, 5.0])


@pytest.mark.parametrize("device", DEVICES)
def test_nan_raises_naming_group_or_is_omitted(device):
    x, lengths = _mixture("separated", [100, 80, 60], seed=1)
    x[2, 5] = float("nan")
    x[1, 90] = float("nan")  # padding: ignored
    x = x.to(device)
    with pytest.raises(ValueError, match=r"group\(s\) 2$"):
        gmm1d(x, lengths.to(device))
    res = gmm1d(x, lengths.to(device), nan_policy="omit")
    assert res.lengths.tolist() == [100, 80, 59]
    assert res.assignments[2, 5] == -1 and res.responsibilities[2, 5].tolist() == [0.0, 0.0]
    clean = gmm1d(torch.cat([x[2, :5], x[2, 6:60]])[None], init="quantile")
    torch.testing.assert_close(res.means[2], clean.means[0])
    x[0, :] = float("nan")
    res = gmm1d(x, lengths.to(device), nan_policy="omit")
    assert int(res.status[0]) == lgmm.STATUS_OMITTED_ALL


def test_group_ids_flat_input_equals_padded():
    x, lengths = _mixture("separated", [120, 90, 3], seed=2)
    flat = torch.cat([x[c, :n] for c, n in enumerate(lengths.tolist())])
    gid = torch.repeat_interleave(torch.arange(3), lengths)
    perm = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))
    res_flat = gmm1d(flat[perm], group_ids=gid[perm], num_groups=4)
    res_pad = gmm1d(x, lengths)
    torch.testing.assert_close(res_flat.means[:3], res_pad.means, rtol=1e-9, atol=1e-9)
    assert res_flat.status[3] == lgmm.STATUS_EMPTY
    assert res_flat.assignments.shape == (flat.numel(),)
    assert res_flat.responsibilities.shape == (flat.numel(), 2)
    for c, n in enumerate(lengths.tolist()):
        # the flat points of group c, in their original order, carry the padded labels
        sel = gid[perm] == c
        order = torch.argsort(perm[sel])
        assert torch.equal(res_flat.assignments[sel][order], res_pad.assignments[c, :n])


def test_wasserstein2_closed_form():
    got = wasserstein2_gaussian1d(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 4.0]),
                                  torch.tensor([3.0, 1.0]), torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(got, torch.tensor([10.0**0.5, 0.0]))
    with pytest.raises(ValueError, match="var1 must be >= 0"):
        wasserstein2_gaussian1d(0.0, -1.0, 0.0, 1.0)


@pytest.mark.parametrize(("kwargs", "exc", "message"), [
    (dict(max_iter=0), ValueError, "max_iter must be >= 1, got 0"),
    (dict(max_iter=2.5), TypeError, "max_iter must be an int, got float"),
    (dict(tol=-1.0), ValueError, "tol must be finite and >= 0, got -1.0"),
    (dict(reg_covar=0.0), ValueError, "reg_covar must be finite and > 0, got 0.0"),
    (dict(nan_policy="ignore"), ValueError, "nan_policy must be 'raise' or 'omit'"),
    (dict(init="random"), ValueError, "init must be 'quantile', 'kmeans"),
    (dict(init=([0.5, 0.5], [0.0, 1.0])), ValueError, "init must be \\(weights, means"),
    (dict(init=([0.9, 0.5], [0.0, 1.0], [1.0, 1.0])), ValueError, "sum to 1"),
    (dict(init=([0.5, 0.5], [0.0, 1.0], [1.0, 0.0])), ValueError, "variances must be > 0"),
    (dict(lengths=torch.tensor([5, 99])), ValueError, "lengths must lie in \\[0, 10\\]"),
    (dict(lengths=torch.tensor([5.0, 6.0])), TypeError, "lengths must be an integer tensor"),
])
def test_argument_errors(kwargs, exc, message):
    x = torch.randn(2, 10)
    lengths = kwargs.pop("lengths", None)
    with pytest.raises(exc, match=message):
        gmm1d(x, lengths, **kwargs)


def test_result_is_frozen():
    res = gmm1d(torch.randn(2, 30))
    assert isinstance(res, GMM1DResult)
    with pytest.raises(AttributeError):
        res.means = None  # type: ignore[misc]


# ----------------------------------------------------------------------- properties

@st.composite
def _groups(draw):
    c = draw(st.integers(1, 6))
    length = draw(st.integers(0, 40))
    lengths = draw(st.lists(st.integers(0, length), min_size=c, max_size=c))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((c, length), generator=g, dtype=torch.float64) * 3
    x = torch.round(x * 2) / 2  # repeated values make constant groups likely
    for i in draw(st.lists(st.integers(0, c - 1), max_size=2)):
        x[i] = float(draw(st.integers(-3, 3)))  # an all-equal group
    return x, torch.tensor(lengths, dtype=torch.int64)


@settings(max_examples=40, deadline=None)
@given(_groups(), st.sampled_from(["quantile", "kmeans++"]))
def test_property_shapes_and_degenerates(data, init):
    x, lengths = data
    c, length = x.shape
    res = gmm1d(x, lengths, init=init, max_iter=30)
    assert res.weights.shape == res.means.shape == res.variances.shape == (c, 2)
    assert res.responsibilities.shape == (c, length, 2)
    assert res.assignments.shape == (c, length)
    for t in (res.log_likelihood, res.lower_bound, res.n_iter, res.converged, res.status):
        assert t.shape == (c,)
    for t in (res.weights, res.means, res.variances, res.log_likelihood, res.lower_bound,
              res.responsibilities):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(res.weights.sum(1), torch.ones(c, dtype=torch.float64))
    assert (res.variances >= 1e-6).all()
    valid = torch.arange(length)[None, :] < lengths[:, None]
    assert ((res.assignments >= 0) == valid).all()
    torch.testing.assert_close(res.responsibilities.sum(-1), valid.double())
    for i in range(c):
        n = int(lengths[i])
        vals = x[i, :n]
        if n == 0:
            assert res.status[i] == lgmm.STATUS_EMPTY
        elif n == 1:
            assert res.status[i] == lgmm.STATUS_SINGLE
        elif bool((vals == vals[0]).all()):
            assert res.status[i] == lgmm.STATUS_CONSTANT
            assert res.means[i].tolist() == [float(vals[0])] * 2
        else:
            assert res.status[i] == lgmm.STATUS_FITTED and res.n_iter[i] >= 1


@settings(max_examples=30, deadline=None)
@given(_groups(), st.randoms(use_true_random=False))
def test_property_row_permutation_invariance(data, rnd):
    x, lengths = data
    c = x.shape[0]
    perm = list(range(c))
    rnd.shuffle(perm)
    p = torch.tensor(perm)
    a = gmm1d(x, lengths)
    b = gmm1d(x[p], lengths[p])
    for name in ("weights", "means", "variances", "log_likelihood", "responsibilities"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name)[p], rtol=1e-12,
                                   atol=1e-12)
    for name in ("assignments", "n_iter", "converged", "status"):
        assert torch.equal(getattr(b, name), getattr(a, name)[p]), name


@settings(max_examples=20, deadline=None)
@given(_groups())
def test_property_reference_matches_dispatch(data):
    x, lengths = data
    w, m, v = lgmm._init_quantile(x, lengths, REG)
    got = gmm_ops.gmm1d_em(x, lengths, w, m, v, 30, 1e-3, REG)
    want = reference.gmm1d_em(x, lengths, w, m, v, 30, 1e-3, REG)
    for a, b in zip(got[:4], want[:4], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    assert torch.equal(got[4], want[4]) and torch.equal(got[5], want[5])
