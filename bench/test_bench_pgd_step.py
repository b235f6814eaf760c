"""One PGD step on a (256, 3, 32, 32) float32 batch: the fused native op against pure PyTorch.

Groups (``benchmark.group``) and roles (``benchmark.extra_info["role"]``):

* ``pgd_step-linf``: ``native`` (the raw op ``torch.ops.safedl.pgd_step_`` with prepared
  0-d alpha/eps tensors), ``wrapper`` (``safedl_ext.ops.pgd_step_`` with Python floats,
  information only), ``reference`` (``safedl_ext.ops.reference.pgd_step_``, information),
  several ``baseline-inplace`` chains on preallocated buffers (the target uses the fastest
  of them), the torchattacks-style ``baseline-outofplace`` chain, and ``floor``: one
  single-pass kernel with the fused op's memory traffic (information).
* ``pgd_step-l2``: ``native``, ``wrapper``, ``reference`` and the torchattacks-style L2
  chain as ``baseline-outofplace`` (information only, no target).

Every benchmark starts from the same random point of the ball (a fresh copy per test) and
cycles through a small pool of random gradients, so the iterate keeps moving inside the
ball (bounded by the projections) instead of settling on a fixed point.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import ALLOCATOR_PRIMED, THREADS, require_native, warm

from safedl_ext import ops
from safedl_ext.ops import reference

SHAPE = (256, 3, 32, 32)
N_GRADS = 4
EPS_LINF, ALPHA_LINF = 8 / 255, 2 / 255
EPS_L2, ALPHA_L2 = 1.0, 0.2


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(SHAPE, generator=g)
    grads = [torch.randn(SHAPE, generator=g) for _ in range(N_GRADS)]
    start_linf = ops.random_start(x0, EPS_LINF, "linf", generator=g)
    start_l2 = ops.random_start(x0, EPS_L2, "l2", generator=g)
    return {"x0": x0, "grads": grads, "start_linf": start_linf, "start_l2": start_l2}


def _tag(benchmark, group: str, role: str, variant: str, **extra) -> None:
    benchmark.group = group
    benchmark.extra_info.update(group=group, role=role, variant=variant, shape=list(SHAPE),
                                dtype="float32", threads=THREADS,
                                allocator_primed=ALLOCATOR_PRIMED, **extra)


def _run(benchmark, step):
    """Warm up, then let pytest-benchmark calibrate and time ``step``."""
    warm(step, 5)
    benchmark(step)


# ----------------------------------------------------------------------------- L-inf

LINF = "pgd_step-linf"


def test_linf_inplace_sign_subclamp(benchmark, tensors):
    """sign into a buffer, add, then clamp the delta and the box in place (5 passes)."""
    _tag(benchmark, LINF, "baseline-inplace", "sign(out)+add_+sub_.clamp_.add_.clamp_")
    x, x0 = tensors["start_linf"].clone(), tensors["x0"]
    buf = torch.empty_like(x)
    grads = itertools.cycle(tensors["grads"])

    def step():
        torch.sign(next(grads), out=buf)
        x.add_(buf, alpha=ALPHA_LINF)
        x.sub_(x0).clamp_(-EPS_LINF, EPS_LINF).add_(x0).clamp_(0.0, 1.0)

    _run(benchmark, step)


def _linf_bounds(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """max(x0 - eps, 0) and min(x0 + eps, 1): computed once per attack by a careful loop."""
    return (x0 - EPS_LINF).clamp_(0.0, 1.0), (x0 + EPS_LINF).clamp_(0.0, 1.0)


def test_linf_inplace_maxmin_bounds(benchmark, tensors):
    """Bounds max(x0-eps, 0) and min(x0+eps, 1) precomputed once per attack; then
    sign, add, maximum, minimum, all into preallocated buffers (4 passes)."""
    _tag(benchmark, LINF, "baseline-inplace", "sign(out)+add_+maximum(out)+minimum(out)")
    x, x0 = tensors["start_linf"].clone(), tensors["x0"]
    lo_b, hi_b = _linf_bounds(x0)
    buf = torch.empty_like(x)
    grads = itertools.cycle(tensors["grads"])

    def step():
        torch.sign(next(grads), out=buf)
        x.add_(buf, alpha=ALPHA_LINF)
        torch.maximum(x, lo_b, out=x)
        torch.minimum(x, hi_b, out=x)

    _run(benchmark, step)


def test_linf_inplace_clamp_tensor_bounds(benchmark, tensors):
    """Precomputed bounds as above, one tensor-bound clamp_ (3 passes)."""
    _tag(benchmark, LINF, "baseline-inplace", "sign(out)+add_+clamp_(lo_t, hi_t)")
    x, x0 = tensors["start_linf"].clone(), tensors["x0"]
    lo_b, hi_b = _linf_bounds(x0)
    buf = torch.empty_like(x)
    grads = itertools.cycle(tensors["grads"])

    def step():
        torch.sign(next(grads), out=buf)
        x.add_(buf, alpha=ALPHA_LINF)
        x.clamp_(lo_b, hi_b)

    _run(benchmark, step)


def test_linf_inplace_sign_grad_inplace(benchmark, tensors):
    """The gradient is scratch in an attack loop: sign_ it in place, add, tensor-bound
    clamp_ (3 passes, no extra buffer)."""
    _tag(benchmark, LINF, "baseline-inplace", "grad.sign_()+add_+clamp_(lo_t, hi_t)")
    x, x0 = tensors["start_linf"].clone(), tensors["x0"]
    lo_b, hi_b = _linf_bounds(x0)
    grads = itertools.cycle([g.clone() for g in tensors["grads"]])  # clobbered by sign_

    def step():
        x.add_(next(grads).sign_(), alpha=ALPHA_LINF).clamp_(lo_b, hi_b)

    _run(benchmark, step)


def test_linf_torchattacks_outofplace(benchmark, tensors):
    """torchattacks' PGD update: sign, mul, add, sub, clamp, add, clamp, new tensors."""
    _tag(benchmark, LINF, "baseline-outofplace", "torchattacks-style chain")
    state = {"adv": tensors["start_linf"].clone()}
    x0 = tensors["x0"]
    grads = itertools.cycle(tensors["grads"])
    eps, alpha = EPS_LINF, ALPHA_LINF

    def step():
        adv = state["adv"] + alpha * next(grads).sign()
        delta = torch.clamp(adv - x0, min=-eps, max=eps)
        state["adv"] = torch.clamp(x0 + delta, min=0, max=1).detach()

    _run(benchmark, step)


def test_linf_floor_addcmul(benchmark, tensors):
    """Not a PGD step: one single-pass kernel with the fused op's memory traffic (read x, x0,
    grad; write x), ``x.addcmul_(x0, grad)``. A floor for any step on this machine."""
    _tag(benchmark, LINF, "floor", "x.addcmul_(x0, grad) (3 reads, 1 write)")
    x, x0 = tensors["start_linf"].clone(), tensors["x0"]
    grads = itertools.cycle(tensors["grads"])

    def step():
        x.addcmul_(x0, next(grads), value=1e-12)

    _run(benchmark, step)


# -------------------------------------------------------------------------------- L2

L2 = "pgd_step-l2"


def test_l2_torchattacks_outofplace(benchmark, tensors):
    """torchattacks' PGDL2 update: normalise the gradient by its per-sample norm + 1e-10,
    step, rescale delta by min(1, eps / ||delta||), clamp to the box."""
    _tag(benchmark, L2, "baseline-outofplace", "torchattacks-style L2 chain")
    state = {"adv": tensors["start_l2"].clone()}
    x0 = tensors["x0"]
    n = x0.shape[0]
    grads = itertools.cycle(tensors["grads"])
    eps, alpha = EPS_L2, ALPHA_L2

    def step():
        grad = next(grads)
        grad_norms = torch.norm(grad.view(n, -1), p=2, dim=1) + 1e-10
        grad = grad / grad_norms.view(n, 1, 1, 1)
        adv = state["adv"].detach() + alpha * grad
        delta = adv - x0
        delta_norms = torch.norm(delta.view(n, -1), p=2, dim=1)
        factor = eps / delta_norms
        factor = torch.min(factor, torch.ones_like(delta_norms))
        delta = delta * factor.view(-1, 1, 1, 1)
        state["adv"] = torch.clamp(x0 + delta, min=0, max=1).detach()

    _run(benchmark, step)


# ------------------------------------------- native op, wrapper, reference (both norms)

STEP = {"linf": (LINF, ALPHA_LINF, EPS_LINF), "l2": (L2, ALPHA_L2, EPS_L2)}


@pytest.mark.parametrize("norm", list(STEP))
def test_native_op(benchmark, tensors, norm):
    require_native()
    group, alpha, eps = STEP[norm]
    _tag(benchmark, group, "native", "torch.ops.safedl.pgd_step_")
    x, x0 = tensors[f"start_{norm}"].clone(), tensors["x0"]
    a, e = torch.tensor(alpha), torch.tensor(eps)
    grads = itertools.cycle(tensors["grads"])
    op = torch.ops.safedl.pgd_step_

    def step():
        op(x, x0, next(grads), a, e, norm, 0.0, 1.0)

    _run(benchmark, step)


@pytest.mark.parametrize("norm", list(STEP))
def test_wrapper(benchmark, tensors, norm):
    require_native()
    group, alpha, eps = STEP[norm]
    _tag(benchmark, group, "wrapper", "safedl_ext.ops.pgd_step_(floats)")
    x, x0 = tensors[f"start_{norm}"].clone(), tensors["x0"]
    grads = itertools.cycle(tensors["grads"])

    def step():
        ops.pgd_step_(x, x0, next(grads), alpha, eps, norm, 0.0, 1.0)

    _run(benchmark, step)


@pytest.mark.parametrize("norm", list(STEP))
def test_reference(benchmark, tensors, norm):
    group, alpha, eps = STEP[norm]
    _tag(benchmark, group, "reference", "safedl_ext.ops.reference.pgd_step_")
    x, x0 = tensors[f"start_{norm}"].clone(), tensors["x0"]
    a, e = torch.tensor(alpha), torch.tensor(eps)
    grads = itertools.cycle(tensors["grads"])

    def step():
        with torch.no_grad():
            reference.pgd_step_(x, x0, next(grads), a, e, norm, 0.0, 1.0)

    _run(benchmark, step)


# ------------------------------------------------------------------- sanity (not timed)


def test_linf_variants_agree(tensors):
    """The raced chains compute the same step as the native op (to float rounding)."""
    require_native()
    x0, g = tensors["x0"], tensors["grads"][0]
    start = tensors["start_linf"]
    want = start.clone()
    torch.ops.safedl.pgd_step_(want, x0, g, torch.tensor(ALPHA_LINF), torch.tensor(EPS_LINF),
                               "linf", 0.0, 1.0)
    lo_b, hi_b = _linf_bounds(x0)
    a = start.clone()
    a.add_(g.sign(), alpha=ALPHA_LINF).sub_(x0).clamp_(-EPS_LINF, EPS_LINF).add_(x0)
    a.clamp_(0.0, 1.0)
    b = start.clone().add_(g.sign(), alpha=ALPHA_LINF).clamp_(lo_b, hi_b)
    c = torch.clamp(x0 + torch.clamp(start + ALPHA_LINF * g.sign() - x0, -EPS_LINF, EPS_LINF),
                    0, 1)
    for got in (a, b, c):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_l2_variants_agree(tensors):
    require_native()
    x0, g = tensors["x0"], tensors["grads"][0]
    want = tensors["start_l2"].clone()
    torch.ops.safedl.pgd_step_(want, x0, g, torch.tensor(ALPHA_L2), torch.tensor(EPS_L2),
                               "l2", 0.0, 1.0)
    ref = tensors["start_l2"].clone()
    reference.pgd_step_(ref, x0, g, torch.tensor(ALPHA_L2), torch.tensor(EPS_L2), "l2",
                        0.0, 1.0)
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-5)
