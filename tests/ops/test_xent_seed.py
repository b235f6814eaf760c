"""safedl::xent_seed and safedl::xent_seed_backward: native against the reference, strides,
opcheck, gradcheck/gradgradcheck, argument errors."""

from __future__ import annotations

import pytest
import torch

from safedl_ext import ops
from safedl_ext.ops import reference
from safedl_ext.ops import xent as xent_ops
from tests.conftest import DEVICES

NATIVE = ops.backend() == "native"
needs_native = pytest.mark.skipif(not NATIVE, reason="native extension not built")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _logits(n: int, k: int, *, device="cpu", dtype=torch.float64, scale: float = 4.0,
            seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn((n, k), generator=g, dtype=torch.float64)).to(device, dtype)


def _labels(n: int, k: int, device="cpu", seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (n,), generator=g).to(device)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (7, 2), (64, 10), (33, 17), (5, 1000), (3, 4099)])
def test_native_matches_reference(device, dtype, n, k):
    z, y = _logits(n, k, device=device, dtype=dtype), _labels(n, k, device)
    got = torch.ops.safedl.xent_seed(z, y)
    torch.testing.assert_close(got, reference.xent_seed(z, y), **TOL[dtype])
    assert got.is_contiguous() and got.dtype == dtype and got.device == z.device
    # Each row sums to 0 (softmax sums to 1, minus the one-hot).
    torch.testing.assert_close(got.sum(1), torch.zeros(n, dtype=dtype, device=device),
                               rtol=0, atol=10 * torch.finfo(dtype).eps * max(1, k) ** 0.5)
    v = _logits(n, k, device=device, dtype=dtype, scale=1.0, seed=3)
    torch.testing.assert_close(torch.ops.safedl.xent_seed_backward(v, z),
                               reference.xent_seed_backward(v, z), **TOL[dtype])


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits(device):
    """Large logits (no overflow: max-subtracted), probabilities far below float32's eps
    kept to relative precision, -inf entries (masked classes) give 0, NaN/+inf rows give
    NaN as torch.softmax does."""
    inf, nan = float("inf"), float("nan")
    z = torch.tensor([[1000.0, 0.0, -1000.0], [88.0, 70.0, 50.0], [0.0, -inf, 1.0],
                      [-inf, -inf, -inf], [nan, 0.0, 0.0], [inf, 0.0, 0.0]], device=device)
    y = torch.tensor([2, 1, 0, 0, 1, 2], device=device)
    got = torch.ops.safedl.xent_seed(z, y)
    want = reference.xent_seed(z.double(), y).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert float(got[1, 2]) == pytest.approx(float(want[1, 2]), rel=1e-5)  # p = 3.1e-17
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)).to(device)
    torch.testing.assert_close(torch.ops.safedl.xent_seed_backward(v, z),
                               reference.xent_seed_backward(v.double(), z.double()).float(),
                               rtol=1e-5, atol=1e-7, equal_nan=True)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous(device, dtype):
    base = _logits(40, 24, device=device, dtype=dtype)
    y = _labels(12, 20, device)
    for z in (base[::2, 1:21][:12], base.t()[:12, :20], base[:20, :24:2].t()[:, :12].t()[:12]):
        k = z.shape[1]
        yy = y % k
        assert not z.is_contiguous()
        torch.testing.assert_close(torch.ops.safedl.xent_seed(z, yy),
                                   reference.xent_seed(z.contiguous(), yy), **TOL[dtype])
        v = torch.randn_like(z.t().contiguous()).t()  # non-contiguous grad too
        torch.testing.assert_close(torch.ops.safedl.xent_seed_backward(v, z),
                                   reference.xent_seed_backward(v, z), **TOL[dtype])
    labels = torch.stack([y, y], 1)[:, 0]  # non-contiguous labels
    z = base[:12, :20]
    torch.testing.assert_close(torch.ops.safedl.xent_seed(z, labels),
                               reference.xent_seed(z, labels), **TOL[dtype])


@needs_native
def test_empty():
    for n, k in ((0, 5), (0, 0)):
        z = torch.zeros(n, k)
        assert torch.ops.safedl.xent_seed(z, torch.zeros(n, dtype=torch.int64)).shape == (n, k)
        assert torch.ops.safedl.xent_seed_backward(z, z).shape == (n, k)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    z, y = _logits(9, 6, device=device, dtype=dtype), _labels(9, 6, device)
    v = _logits(9, 6, device=device, dtype=dtype, seed=5)
    torch.library.opcheck(torch.ops.safedl.xent_seed.default, (z, y))
    torch.library.opcheck(torch.ops.safedl.xent_seed_backward.default, (v, z))
    zg = z.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.safedl.xent_seed.default, (zg, y))
    torch.library.opcheck(torch.ops.safedl.xent_seed_backward.default,
                          (v.clone().requires_grad_(True), zg))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(device):
    """First, second and third derivatives of the seed in float64 (native when built,
    reference otherwise, through the same wrapper)."""
    z = _logits(6, 5, device=device, scale=1.5).requires_grad_(True)
    y = _labels(6, 5, device)
    assert torch.autograd.gradcheck(lambda t: ops.xent_seed(t, y), (z,))
    assert torch.autograd.gradgradcheck(lambda t: ops.xent_seed(t, y), (z,))
    v = _logits(6, 5, device=device, scale=1.0, seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(ops.xent_seed_backward, (v, z))
    assert torch.autograd.gradgradcheck(ops.xent_seed_backward, (v, z))


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_derivatives_match_torch_composition(device):
    """The backward is (diag(p) - p p^T) v and the double backward matches what torch's
    own autograd gives for softmax(z) - onehot(y)."""
    z = _logits(8, 7, device=device, scale=2.0).requires_grad_(True)
    y = _labels(8, 7, device)
    v = _logits(8, 7, device=device, scale=1.0, seed=4)
    u = _logits(8, 7, device=device, scale=1.0, seed=5)
    res = []
    for fn in (torch.ops.safedl.xent_seed, reference.xent_seed):
        (gz,) = torch.autograd.grad(fn(z, y), z, v, create_graph=True)
        (ggz,) = torch.autograd.grad(gz, z, u)
        res.append((gz, ggz))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-12, atol=1e-14)
    p = torch.softmax(z.detach(), 1)
    jac = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(res[0][0], (jac @ v[:, :, None])[:, :, 0], rtol=1e-12, atol=1e-14)


@needs_native
def test_labels_get_no_gradient_and_autograd_is_registered():
    z = _logits(4, 3, dtype=torch.float32).requires_grad_(True)
    s = torch.ops.safedl.xent_seed(z, _labels(4, 3))
    assert s.requires_grad and s.grad_fn is not None
    (g,) = torch.autograd.grad(s.sum(), z)
    torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-6, rtol=0)  # rows sum to 0


def test_wrapper_falls_back_for_unsupported_dtype():
    """float16 on the CPU has no native kernel: the wrapper uses the reference."""
    z = _logits(4, 3, dtype=torch.float16)
    y = _labels(4, 3)
    assert not xent_ops.native_kernel_for(z)
    torch.testing.assert_close(ops.xent_seed(z, y), reference.xent_seed(z, y))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_types(dtype):
    z = _logits(64, 100, device="cuda", dtype=dtype)
    y = _labels(64, 100, "cuda")
    got = ops.xent_seed(z, y)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), reference.xent_seed(z.float(), y), **TOL[dtype])
    v = _logits(64, 100, device="cuda", dtype=dtype, scale=1.0, seed=7)
    torch.testing.assert_close(ops.xent_seed_backward(v, z).float(),
                               reference.xent_seed_backward(v.float(), z.float()), **TOL[dtype])


def _bad_cases():
    z, y = _logits(4, 3, dtype=torch.float32), _labels(4, 3)
    yield "logits must be 2-D", (z[0], y[:1])
    yield "logits must be float32 or float64", (z.long(), y)
    yield "labels must be int64", (z, y.int())
    yield r"labels must have shape \(4\)", (z, y[:3])
    yield r"labels must lie in \[0, 3\)", (z, torch.tensor([0, 1, 3, 2]))
    yield r"labels must lie in \[0, 3\).*\[-1, 2\]", (z, torch.tensor([0, -1, 1, 2]))
    yield r"labels must lie in \[0, 0\)", (torch.zeros(2, 0), torch.zeros(2, dtype=torch.int64))


@needs_native
@pytest.mark.parametrize(("message", "args"), list(_bad_cases()))
def test_native_argument_errors(message, args):
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.safedl.xent_seed(*args)


@pytest.mark.parametrize(("message", "args"), [
    c for c in _bad_cases() if "float32 or float64" not in c[0]])
def test_wrapper_argument_errors(message, args):
    """The wrapper raises the same errors with the extension or without it."""
    with pytest.raises((ValueError, TypeError), match=message):
        ops.xent_seed(*args)
    with pytest.raises((ValueError, TypeError), match=message):
        xent_ops._check_args(*args)


@needs_native
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_native_device_mismatch():
    z = _logits(4, 3, device="cuda", dtype=torch.float32)
    with pytest.raises(ValueError, match="labels must be on cuda"):
        torch.ops.safedl.xent_seed(z, _labels(4, 3))
    with pytest.raises(ValueError, match="must be on the same device"):
        torch.ops.safedl.xent_seed_backward(z.cpu(), z)


@needs_native
def test_native_backward_argument_errors():
    z = _logits(4, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="grad and logits must have the same shape"):
        torch.ops.safedl.xent_seed_backward(z[:2], z)
    with pytest.raises(TypeError, match="grad and logits must have the same dtype"):
        torch.ops.safedl.xent_seed_backward(z.double(), z)
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.safedl.xent_seed_backward(z.half(), z.half())
