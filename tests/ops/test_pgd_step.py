"""safedl::pgd_step_ against its pure-PyTorch reference, opcheck, properties, errors."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safedl_ext import ops
from safedl_ext.ops import reference
from tests.conftest import DEVICES

NATIVE = ops.backend() == "native"
needs_native = pytest.mark.skipif(not NATIVE, reason="native extension not built")


def _case(n=8, shape=(3, 5, 7), dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((n, *shape), generator=g, dtype=torch.float64).to(device, dtype)
    grad = torch.randn((n, *shape), generator=g, dtype=torch.float64).to(device, dtype)
    grad[0].zero_()  # a sample with zero gradient
    grad.view(n, -1)[1, ::3] = 0  # some zero entries
    start = (x0 + 0.05 * torch.randn((n, *shape), generator=g, dtype=torch.float64)
             .to(device, dtype)).clamp(0, 1)
    return x0, grad, start


def _params(kind, n, device, dtype):
    if kind == "scalar":
        return torch.tensor(0.01, device=device, dtype=dtype), torch.tensor(0.03, device=device,
                                                                           dtype=dtype)
    alpha = torch.linspace(0.0, 0.05, n, device=device, dtype=dtype)
    eps = torch.linspace(0.0, 0.3, n, device=device, dtype=dtype)
    return alpha, eps


def test_backend_is_native_when_required():
    if os.environ.get("SAFEDL_REQUIRE_NATIVE", "0") not in ("", "0"):
        assert ops.backend() == "native"
    assert ops.backend() in ("native", "reference")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["scalar", "per_sample"])
def test_linf_equals_reference(device, dtype, kind):
    x0, grad, start = _case(dtype=dtype, device=device)
    alpha, eps = _params(kind, x0.shape[0], device, dtype)
    got, want = start.clone(), start.clone()
    torch.ops.safedl.pgd_step_(got, x0, grad, alpha, eps, "linf", 0.0, 1.0)
    reference.pgd_step_(want, x0, grad, alpha, eps, "linf", 0.0, 1.0)
    assert torch.equal(got, want)
    assert not torch.equal(got, start)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["scalar", "per_sample"])
def test_l2_matches_reference(device, dtype, kind):
    x0, grad, start = _case(dtype=dtype, device=device)
    alpha, eps = _params(kind, x0.shape[0], device, dtype)
    alpha, eps = alpha * 20, eps * 5  # L2 lengths
    got, want = start.clone(), start.clone()
    torch.ops.safedl.pgd_step_(got, x0, grad, alpha, eps, "l2", 0.0, 1.0)
    reference.pgd_step_(want, x0, grad, alpha, eps, "l2", 0.0, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_non_contiguous_inputs(device, norm):
    x0, grad, start = _case(n=6, shape=(4, 9, 9), device=device)
    # Channels-last views and a transposed gradient: none of the three is contiguous.
    xa_nc = start.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    x0_nc = x0.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    g_nc = grad.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xa_nc.is_contiguous() and not x0_nc.is_contiguous()
    want = start.clone()
    a, e = torch.tensor(0.02, device=device), torch.tensor(0.5 if norm == "l2" else 0.05,
                                                          device=device)
    reference.pgd_step_(want, x0, grad, a, e, norm, 0.0, 1.0)
    torch.ops.safedl.pgd_step_(xa_nc, x0_nc, g_nc, a, e, norm, 0.0, 1.0)
    torch.testing.assert_close(xa_nc, want, rtol=1e-6, atol=1e-7)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_channels_last_inputs(device, norm):
    x0, grad, start = _case(n=5, shape=(3, 6, 7), device=device)
    cl = torch.channels_last
    xa, x0c, gc = (t.contiguous(memory_format=cl) for t in (start, x0, grad))
    ptr = xa.data_ptr()
    a = torch.full((5,), 0.02, device=device)
    e = torch.tensor(0.5 if norm == "l2" else 0.05, device=device)
    want = start.clone()
    reference.pgd_step_(want, x0, grad, a, e, norm, 0.0, 1.0)
    torch.ops.safedl.pgd_step_(xa, x0c, gc, a, e, norm, 0.0, 1.0)
    assert xa.data_ptr() == ptr and xa.is_contiguous(memory_format=cl)
    if norm == "linf":
        assert torch.equal(xa, want)
    else:
        torch.testing.assert_close(xa, want, rtol=1e-6, atol=1e-7)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_opcheck(norm, dtype):
    x0, grad, start = _case(n=4, shape=(3, 4, 4), dtype=dtype)
    args = (start.clone(), x0, grad, torch.tensor(0.01), torch.full((4,), 0.1), norm, 0.0, 1.0)
    torch.library.opcheck(torch.ops.safedl.pgd_step_.default, args)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("kind", ["scalar", "per_sample"])
def test_half_precision(device, dtype, norm, kind):
    # Stored in half or bfloat16, computed in float32 (alpha and eps come in float32, as
    # ops.as_budget passes them), rounded once on the way out: as the reference does.
    x0, grad, start = _case(dtype=dtype, device=device)
    a, e = _params(kind, x0.shape[0], device, torch.float32)
    if norm == "l2":
        a, e = a * 20, e * 5
    got, want = start.clone(), start.clone()
    torch.ops.safedl.pgd_step_(got, x0, grad, a, e, norm, 0.0, 1.0)
    reference.pgd_step_(want, x0, grad, a, e, norm, 0.0, 1.0)
    assert got.dtype == dtype and not torch.equal(got, start)
    if norm == "linf":
        assert torch.equal(got, want)  # the same float32 arithmetic, the same rounding
    else:
        # At most one rounding step of the storage type apart.
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=ulp)
    if device == "cuda":  # (on the CPU, test_torch_compile_sees_the_op covers compile)
        assert torch.compile(lambda *a: ops.pgd_step_(*a))(start.clone(), x0, grad, 0.01,
                                                           0.03, norm) is not None


@needs_native
def test_torch_compile_sees_the_op():
    x0, grad, start = _case(n=4)

    @torch.compile(backend="eager", fullgraph=True)
    def step(xa, x0, g, a, e):
        torch.ops.safedl.pgd_step_(xa, x0, g, a, e, "linf", 0.0, 1.0)
        return xa * 1

    a, e = torch.tensor(0.01), torch.tensor(0.02)
    want = start.clone()
    reference.pgd_step_(want, x0, grad, a, e, "linf", 0.0, 1.0)
    assert torch.equal(step(start.clone(), x0, grad, a, e), want)


finite = st.floats(-4.0, 4.0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5),
    d=st.integers(1, 40),
    norm=st.sampled_from(["linf", "l2"]),
    eps=st.floats(0.0, 2.0),
    alpha=st.floats(0.0, 2.0),
    scale=finite,
    seed=st.integers(0, 2**16),
    box=st.sampled_from([(0.0, 1.0), (-1.0, 1.0), (0.2, 0.4)]),
)
def test_result_inside_ball_and_box(n, d, norm, eps, alpha, scale, seed, box):
    lo, hi = box
    g = torch.Generator().manual_seed(seed)
    x0 = lo + (hi - lo) * torch.rand(n, d, generator=g)
    xa = (x0 + 3 * torch.randn(n, d, generator=g)).clamp(lo - 1, hi + 1)  # may start outside
    grad = scale * torch.randn(n, d, generator=g)
    ops.pgd_step_(xa, x0, grad, alpha, eps, norm, lo, hi)
    assert bool(torch.isfinite(xa).all())
    # The box in float32, as the op sees it (0.4 rounds up to 0.4000000059604645).
    lo32, hi32 = float(torch.tensor(lo)), float(torch.tensor(hi))
    assert float(xa.min()) >= lo32 and float(xa.max()) <= hi32
    delta = (xa - x0).double()
    tol = 1e-5 * (1 + eps)
    if norm == "linf":
        assert float(delta.abs().max()) <= eps + tol
    else:
        assert float(delta.norm(dim=1).max()) <= eps + tol


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_gradient_does_not_move(norm):
    x0 = torch.rand(3, 10)
    xa = x0.clone()
    ops.pgd_step_(xa, x0, torch.zeros_like(x0), 0.1, 0.1, norm)
    assert torch.equal(xa, x0)


def test_l2_denormal_gradient_with_zero_eps_stays_at_x0():
    # Found by the property test: ||g|| is a denormal, alpha / ||g|| overflowed to inf.
    # The step now has length alpha; eps = 0 projects it back onto x0.
    x0 = torch.full((1, 1), 0.5)
    xa = x0.clone()
    ops.pgd_step_(xa, x0, torch.tensor([[4.28e-41]]), 1.0, 0.0, "l2")
    assert torch.equal(xa, x0)


def _step_impls():
    impls = [pytest.param(reference.pgd_step_, id="reference")]
    if NATIVE:
        impls.append(pytest.param(torch.ops.safedl.pgd_step_, id="native"))
    return impls


# Gradient magnitudes whose squares underflow (to zero or denormals) or overflow in the
# dtype: a norm computed without scaling is 0 or inf and the sample did not move.
EXTREME_SCALES = [
    pytest.param(torch.float32, 1e-30, id="f32-1e-30"),
    pytest.param(torch.float32, 1e-40, id="f32-denormal"),
    pytest.param(torch.float32, 1e30, id="f32-1e30"),
    pytest.param(torch.float32, 3e37, id="f32-3e37"),
    pytest.param(torch.float64, 1e-200, id="f64-1e-200"),
    pytest.param(torch.float64, 1e200, id="f64-1e200"),
]


@pytest.mark.parametrize("impl", _step_impls())
@pytest.mark.parametrize(("dtype", "scale"), EXTREME_SCALES)
def test_l2_extreme_gradient_steps_alpha_and_projects(impl, dtype, scale):
    g = torch.Generator().manual_seed(3)
    n, d = 4, 300
    x0 = torch.full((n, d), 0.5, dtype=dtype)
    grad = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    grad[:, ::7] = 0
    assert bool((grad != 0).any(1).all()) and bool(torch.isfinite(grad).all())
    # Inside the ball: a step of L2 length alpha.
    alpha = torch.tensor([0.05, 0.1, 0.2, 0.3], dtype=dtype)
    xa = x0.clone()
    impl(xa, x0, grad, alpha, torch.tensor(10.0, dtype=dtype), "l2", -1.0, 2.0)
    torch.testing.assert_close((xa - x0).double().norm(dim=1), alpha.double(), rtol=1e-5,
                               atol=0)
    # ... along g: the direction of the step is g's.
    cos = torch.nn.functional.cosine_similarity((xa - x0).double(), grad.double() / scale)
    assert float(cos.min()) > 1 - 1e-5
    # A longer step is projected back onto the ball.
    eps = torch.tensor(0.15, dtype=dtype)
    xb = x0.clone()
    impl(xb, x0, grad, torch.tensor(1.0, dtype=dtype), eps, "l2", -1.0, 2.0)
    norms = (xb - x0).double().norm(dim=1)
    assert float(norms.max()) <= 0.15 * (1 + 1e-5) and float(norms.min()) >= 0.15 * (1 - 1e-5)


@pytest.mark.parametrize("impl", _step_impls())
@pytest.mark.parametrize(("dtype", "scale"), EXTREME_SCALES)
def test_l2_projection_of_extreme_perturbations(impl, dtype, scale):
    # delta = x - x0 itself tiny or huge: ||delta|| must not read 0 or inf.
    g = torch.Generator().manual_seed(4)
    n, d = 3, 200
    big = float(torch.finfo(dtype).max)
    x0 = torch.zeros(n, d, dtype=dtype)
    xa = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    eps = torch.tensor(scale, dtype=torch.float64).to(dtype)  # ||delta|| ~ 14 scale

    def norms(t):  # in units of scale: the test's own norm must not underflow either
        return (t.double() / scale).norm(dim=1)

    assert bool((norms(xa) > 10).all())
    impl(xa, x0, torch.zeros_like(xa), torch.tensor(0.0, dtype=dtype), eps, "l2", -big, big)
    torch.testing.assert_close(norms(xa), torch.full((n,), float(eps) / scale,
                                                     dtype=torch.float64), rtol=1e-5, atol=0)


@needs_native
@pytest.mark.parametrize(("dtype", "scale"), EXTREME_SCALES)
def test_l2_extreme_scales_native_matches_reference(dtype, scale):
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(6, 40, generator=g, dtype=torch.float64).to(dtype)
    grad = (torch.randn(6, 40, generator=g, dtype=torch.float64) * scale).to(dtype)
    start = (x0 + 0.1 * torch.randn(6, 40, generator=g, dtype=torch.float64).to(dtype))
    alpha = torch.linspace(0.0, 0.5, 6, dtype=dtype)
    eps = torch.tensor(0.3, dtype=dtype)
    got, want = start.clone(), start.clone()
    torch.ops.safedl.pgd_step_(got, x0, grad, alpha, eps, "l2", 0.0, 1.0)
    reference.pgd_step_(want, x0, grad, alpha, eps, "l2", 0.0, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(got[1:], start[1:].clamp(0, 1))


def test_linf_step_direction():
    x0 = torch.full((1, 4), 0.5)
    xa = x0.clone()
    ops.pgd_step_(xa, x0, torch.tensor([[1.0, -2.0, 0.0, 3.0]]), 0.25, 0.1)
    assert torch.allclose(xa, torch.tensor([[0.6, 0.4, 0.5, 0.6]]))


def test_l2_step_length_and_projection():
    x0 = torch.full((1, 4), 0.5)
    xa = x0.clone()
    ops.pgd_step_(xa, x0, torch.tensor([[3.0, 4.0, 0.0, 0.0]]), 0.1, 1.0, "l2")
    assert torch.allclose(xa, torch.tensor([[0.56, 0.58, 0.5, 0.5]]))
    ops.pgd_step_(xa, x0, torch.tensor([[3.0, 4.0, 0.0, 0.0]]), 1.0, 0.2, "l2")
    assert torch.allclose((xa - x0).norm(), torch.tensor(0.2))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"x0": torch.rand(2, 3)}, ValueError, "same shape"),
        ({"grad": torch.rand(4, 5, dtype=torch.float64)}, TypeError, "dtype"),
        ({"alpha": torch.rand(3)}, ValueError, r"alpha must be .* shape \(4,\)"),
        ({"norm": "l1"}, ValueError, "norm must be"),
        ({"lo": 1.0, "hi": 0.0}, ValueError, "lo must be <= hi"),
        ({"eps": -0.1}, ValueError, "eps must be >= 0"),
        ({"alpha": float("nan")}, ValueError, "alpha must be finite"),
        ({"alpha": "big"}, TypeError, "alpha must be a float"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = {"x_adv": torch.rand(4, 5), "x0": torch.rand(4, 5), "grad": torch.rand(4, 5),
            "alpha": 0.1, "eps": 0.1, "norm": "linf", "lo": 0.0, "hi": 1.0}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.pgd_step_(**args)


@needs_native
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("eps", -0.1), ("eps", float("nan")), ("eps", float("inf")),
        ("eps", [0.1, float("nan"), 0.1, 0.1]), ("eps", [0.1, 0.1, -1e-9, 0.1]),
        ("alpha", -0.01), ("alpha", float("nan")), ("alpha", float("-inf")),
        ("alpha", [0.1, 0.1, 0.1, float("inf")]),
    ],
)
def test_raw_op_rejects_bad_budgets(norm, name, value):
    # The raw op is documented (README) and must check what the wrapper checks.
    x0 = torch.rand(4, 5)
    budgets = {"alpha": torch.tensor(0.1), "eps": torch.tensor(0.1)}
    budgets[name] = torch.tensor(value)
    xa = x0.clone()
    with pytest.raises(ValueError, match=f"{name} must be >= 0 and finite, got"):
        torch.ops.safedl.pgd_step_(xa, x0, torch.randn(4, 5), budgets["alpha"],
                                   budgets["eps"], norm, 0.0, 1.0)
    assert torch.equal(xa, x0)  # nothing written


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("where", ["x0", "x_adv"])
def test_raw_op_nan_input_gives_nan_as_reference(dtype, norm, where):
    x0, grad, start = _case(n=4, shape=(10,), dtype=dtype)
    bad = {"x0": x0, "x_adv": start}[where]
    bad[2, 3] = float("nan")
    alpha, eps = torch.tensor(0.5 if norm == "l2" else 0.01), torch.tensor(0.2)
    got, want = start.clone(), start.clone()
    torch.ops.safedl.pgd_step_(got, x0, grad, alpha, eps, norm, 0.0, 1.0)
    reference.pgd_step_(want, x0, grad, alpha, eps, norm, 0.0, 1.0)
    assert bool(torch.isnan(want[2, 3])) and bool(torch.isnan(got[2, 3]))
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=1e-7)
    assert bool(torch.isfinite(got[[0, 1, 3]]).all())


@needs_native
def test_overlapping_memory_is_refused():
    x = torch.rand(4, 5)
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.safedl.pgd_step_(x, x, torch.rand(4, 5), torch.tensor(0.1),
                                   torch.tensor(0.1), "l2", 0.0, 1.0)


def test_empty_batch():
    xa = torch.rand(0, 3)
    ops.pgd_step_(xa, torch.rand(0, 3), torch.rand(0, 3), 0.1, 0.1, "l2")
    assert xa.shape == (0, 3)
