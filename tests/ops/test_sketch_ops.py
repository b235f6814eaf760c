"""safedl::srht_project and safedl::gram_update_ against their references, opcheck, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safedl_ext import ops
from safedl_ext.ops import reference, sketch
from tests.conftest import DEVICES

NATIVE = ops.backend() == "native"
needs_native = pytest.mark.skipif(not NATIVE, reason="native extension not built")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [1, 2, 3, 7, 64, 1000, 3072, 5000])
def test_srht_matches_reference(device, d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn((9, d), generator=g, dtype=torch.float64).to(device)
    n = 1 << reference.transform_bits(d)
    for k in sorted({1, min(5, n), n // 2 or 1, n}):
        got = sketch.srht_project(x, k, seed=11)
        want = reference.srht_project(x, k, 11)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * d ** 0.5)
        got32 = sketch.srht_project(x.float(), k, seed=11)
        torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_srht_full_size_is_an_isometry_and_subsample_keeps_norms_in_mean(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((200, 3000), generator=g, dtype=torch.float64).to(device)
    full = sketch.srht_project(x, 4096, seed=3)  # k = D: an orthogonal map
    torch.testing.assert_close(full.norm(dim=1), x.norm(dim=1))
    part = sketch.srht_project(x, 512, seed=3)
    ratio = (part.norm(dim=1) / x.norm(dim=1)) ** 2
    assert abs(float(ratio.mean()) - 1.0) < 0.02
    # inner products are preserved within the JL error ~ 1/sqrt(k)
    ip = (part @ part.T) / torch.outer(x.norm(dim=1), x.norm(dim=1))
    ip0 = (x @ x.T) / torch.outer(x.norm(dim=1), x.norm(dim=1))
    assert float((ip - ip0).abs().max()) < 6 / 512 ** 0.5


def test_srht_seed_and_strides():
    x = torch.randn(6, 300, dtype=torch.float64)
    a = sketch.srht_project(x, 64, seed=1)
    assert torch.equal(a, sketch.srht_project(x, 64, seed=1))
    assert not torch.allclose(a, sketch.srht_project(x, 64, seed=2))
    wide = torch.randn(300, 6, dtype=torch.float64)
    torch.testing.assert_close(sketch.srht_project(wide.T, 64, seed=1),
                               sketch.srht_project(wide.T.contiguous(), 64, seed=1))
    assert sketch.srht_project(x[:0], 8, seed=1).shape == (0, 8)


@pytest.mark.parametrize("bad, match", [
    (lambda: sketch.srht_project(torch.randn(3, 5), 9), "out_dim"),
    (lambda: sketch.srht_project(torch.randn(3, 5), 0), "out_dim"),
    (lambda: sketch.srht_project(torch.randn(5), 2), "rows"),
    (lambda: sketch.srht_project(torch.ones(3, 5, dtype=torch.int64), 2), "rows"),
    (lambda: sketch.srht_project(torch.randn(3, 5), 2, seed=-1), "seed"),
])
def test_srht_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


@needs_native
def test_srht_opcheck():
    x = torch.randn(4, 37, dtype=torch.float64)
    torch.library.opcheck(torch.ops.safedl.srht_project.default, (x, 16, 5))


def _gram_state(c, d, cap, dtype=torch.float64, device="cpu"):
    kw = {"dtype": dtype, "device": device}
    return (torch.zeros(c, d, d, **kw), torch.zeros(c, d, **kw),
            torch.zeros(c, dtype=torch.int64, device=device), torch.zeros(c, cap, d, **kw),
            torch.zeros(c, dtype=torch.int64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d, cap", [(5, 0), (40, 7), (1700, 16)])
def test_gram_update_matches_reference(device, d, cap):
    g = torch.Generator().manual_seed(d)
    c = 4
    native = _gram_state(c, d, cap, device=device)
    ref = _gram_state(c, d, 0, device=device)
    batches = []
    for b in (13, 0, 50, 1, 29):
        rows = torch.randn((b, d), generator=g, dtype=torch.float64).to(device)
        ids = torch.randint(0, c - 1, (b,), generator=g).to(device)  # class c-1 never seen
        batches.append((rows, ids))
    for i, (rows, ids) in enumerate(batches):
        sketch.gram_update_(*native, rows, ids, i == len(batches) - 1)
        reference.gram_update_(*ref, rows, ids, False)
    assert int(native[4].sum()) == 0  # flushed
    torch.testing.assert_close(native[0].triu(), ref[0].triu())
    torch.testing.assert_close(native[1], ref[1])
    assert torch.equal(native[2], ref[2])
    everything = torch.cat([r for r, _ in batches])
    labels = torch.cat([i for _, i in batches])
    for k in range(c):
        xk = everything[labels == k]
        torch.testing.assert_close(native[0][k].triu(), (xk.T @ xk).triu())


def test_gram_update_buffers_until_full():
    state = _gram_state(2, 6, 4)
    sketch.gram_update_(*state, torch.ones(3, 6, dtype=torch.float64),
                        torch.zeros(3, dtype=torch.int64), False)
    assert state[4].tolist() == [3, 0] and float(state[0].abs().sum()) == 0.0
    assert state[2].tolist() == [3, 0] and float(state[1][0, 0]) == 3.0
    sketch.gram_update_(*state, torch.ones(2, 6, dtype=torch.float64),
                        torch.zeros(2, dtype=torch.int64), False)
    assert state[4].tolist() == [1, 0] and float(state[0][0, 0, 0]) == 4.0


@pytest.mark.parametrize("bad, match", [
    (lambda s: sketch.gram_update_(*s, torch.ones(2, 6, dtype=torch.float64),
                                   torch.tensor([0, 2]), False), "class_ids"),
    (lambda s: sketch.gram_update_(*s, torch.ones(2, 5, dtype=torch.float64),
                                   torch.tensor([0, 1]), False), "columns|shape"),
    (lambda s: sketch.gram_update_(*s, torch.ones(2, 6, dtype=torch.float32),
                                   torch.tensor([0, 1]), False), "dtype"),
    (lambda s: sketch.gram_update_(*s, torch.ones(2, 6, dtype=torch.float64),
                                   torch.tensor([0.0, 1.0]), False), "class_ids"),
])
def test_gram_update_errors(bad, match):
    if not NATIVE and "dtype" in match:
        pytest.skip("the reference path relies on torch's own dtype errors")
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        bad(_gram_state(2, 6, 4))


@needs_native
def test_gram_update_opcheck():
    g, s, c, buf, fill = _gram_state(3, 8, 0)
    rows = torch.randn(10, 8, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2])
    torch.library.opcheck(torch.ops.safedl.gram_update_.default,
                          (g, s, c, buf, fill, rows, ids, True))


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 300), k=st.integers(1, 64), b=st.integers(0, 5),
       seed=st.integers(0, 2**40))
def test_srht_property_linear_and_shaped(d, k, b, seed):
    k = min(k, 1 << reference.transform_bits(d))
    g = torch.Generator().manual_seed(seed % 1000)
    x = torch.randn((b, d), generator=g, dtype=torch.float64)
    y = torch.randn((b, d), generator=g, dtype=torch.float64)
    px, py = sketch.srht_project(x, k, seed), sketch.srht_project(y, k, seed)
    assert px.shape == (b, k)
    torch.testing.assert_close(sketch.srht_project(2 * x - y, k, seed), 2 * px - py)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 63, 64, 65, 300])
def test_gram_symmetrize_matches_reference(device, dtype, d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(40, d, generator=g, dtype=torch.float64)
    state = _gram_state(1, d, 0, dtype=dtype, device=device)
    sketch.gram_update_(*state, x.to(device, dtype), torch.zeros(40, dtype=torch.int64,
                                                                  device=device), True)
    mean = x.mean(0).to(device)
    for center in (False, True):
        got = sketch.gram_symmetrize(state[0][0], mean, 40, center)
        assert got.dtype == dtype
        torch.testing.assert_close(got, reference.gram_symmetrize(state[0][0], mean, 40, center))
        xc = x - x.mean(0) if center else x
        torch.testing.assert_close(got.double().cpu(), xc.T @ xc,
                                   atol=1e-4 if dtype == torch.float32 else 1e-10, rtol=1e-5)


@needs_native
def test_gram_symmetrize_opcheck_and_errors():
    gram = torch.randn(6, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.safedl.gram_symmetrize.default,
                          (gram, torch.randn(6, dtype=torch.float64), 3, True))
    with pytest.raises(ValueError, match="mean must have shape"):
        sketch.gram_symmetrize(gram, torch.zeros(5, dtype=torch.float64), 3, True)
    with pytest.raises(TypeError, match="mean must be float64"):
        sketch.gram_symmetrize(gram, torch.zeros(6), 3, True)
