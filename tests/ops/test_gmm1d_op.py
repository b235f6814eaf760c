"""safedl::gmm1d_em: opcheck, native against the reference, argument errors."""

from __future__ import annotations

import pytest
import torch

from safedl_ext import ops
from safedl_ext.ops import gmm as gmm_ops
from safedl_ext.ops import reference
from tests.conftest import DEVICES

NATIVE = ops.backend() == "native"
needs_native = pytest.mark.skipif(not NATIVE, reason="native extension not built")


def _args(device="cpu", dtype=torch.float64, c=5, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((c, length), generator=g, dtype=torch.float64)
    x[:, ::2] += 4.0
    lengths = torch.tensor([length, length - 7, 0, 1, 12][:c])
    x[min(4, c - 1), :] = 2.5  # a constant group
    w = torch.full((c, 2), 0.5, dtype=torch.float64)
    m = torch.tensor([[-0.5, 4.5]], dtype=torch.float64).repeat(c, 1)
    v = torch.ones((c, 2), dtype=torch.float64)
    return [t.to(device) for t in (x.to(dtype), lengths, w, m, v)]


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    args = _args(device, dtype)
    torch.library.opcheck(torch.ops.safedl.gmm1d_em.default, (*args, 50, 1e-4, 1e-6))


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_matches_reference(device, dtype):
    args = _args(device, dtype, c=5, length=300, seed=1)
    got = torch.ops.safedl.gmm1d_em(*args, 100, 1e-6, 1e-6)
    want = reference.gmm1d_em(*args, 100, 1e-6, 1e-6)
    for a, b in zip(got[:4], want[:4], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert torch.equal(got[4], want[4])
    assert torch.equal(got[5], want[5])


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_results_documented(device):
    x, lengths, w, m, v = _args(device)
    out = gmm_ops.gmm1d_em(x, lengths, w, m, v, 100, 1e-3, 1e-6)
    weights, means, variances, ll, n_iter, conv = (t.cpu() for t in out)
    for g, centre in ((2, 0.0), (3, float(x[3, 0])), (4, 2.5)):
        assert weights[g].tolist() == [1.0, 0.0]
        assert means[g].tolist() == [centre, centre]
        assert variances[g].tolist() == [1e-6, 1e-6]
        assert n_iter[g] == 0 and conv[g]
    assert ll[2] == 0.0
    assert torch.isfinite(torch.cat([weights, means, variances], 1)).all()
    assert (n_iter[:2] >= 1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_error_names_group(device):
    x, lengths, w, m, v = _args(device)
    x[1, 3] = float("nan")
    x[0, 39] = float("inf")
    x[1, 39] = float("nan")  # padding of group 1: ignored
    with pytest.raises(ValueError, match=r"group\(s\) 0, 1"):
        gmm_ops.gmm1d_em(x, lengths, w, m, v, 100, 1e-3, 1e-6)


def _bad_cases():
    x, lengths, w, m, v = _args()
    ok = dict(values=x, lengths=lengths, weights=w, means=m, variances=v, max_iter=10, tol=1e-3,
              reg_covar=1e-6)
    yield "values must be 2-D", dict(ok, values=x[0])
    yield "values must be float32 or float64", dict(ok, values=x.to(torch.int64))
    yield "lengths must have shape", dict(ok, lengths=lengths[:2])
    yield "lengths must be int64", dict(ok, lengths=lengths.to(torch.int32))
    yield "lengths must lie in", dict(ok, lengths=lengths + 100)
    yield "weights must have shape", dict(ok, weights=w[:, :1])
    yield "means must be float64", dict(ok, means=m.float())
    yield "variances must be finite and > 0", dict(ok, variances=-v)
    yield "weights must be finite and >= 0", dict(ok, weights=-w)
    yield "max_iter must be >= 1", dict(ok, max_iter=0)
    yield "tol must be finite", dict(ok, tol=-1.0)
    yield "reg_covar must be finite and > 0", dict(ok, reg_covar=0.0)


@needs_native
@pytest.mark.parametrize(("message", "kwargs"), list(_bad_cases()))
def test_native_argument_errors(message, kwargs):
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.safedl.gmm1d_em(*kwargs.values())
