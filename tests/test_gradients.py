"""Input gradients (``safedl_ext.gradients``) of a CNN trained on scikit-learn's digits,
against hand-written autograd computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safedl_ext.gradients import input_gradients, normalize_per_sample
from safedl_ext.training import accuracy
from tests.conftest import DEVICES

K = 10


@pytest.fixture(scope="module")
def batch(digits):
    """64 test digits (a mix of all classes) and their labels."""
    return digits.x_test[:64].clone(), digits.y_test[:64].clone()


@pytest.fixture(scope="module")
def model64(digits_model):
    """A float64 copy of the trained model without .grad, for tight comparisons of
    derivatives."""
    m = copy.deepcopy(digits_model).double().eval()
    for p in m.parameters():
        p.grad = None
    return m


def _manual(model, x, labels, wrt):
    """The gradient of sum_i out_i(x_i, labels_i) w.r.t. x, written directly."""
    x = x.detach().requires_grad_(True)
    z = model(x)
    if wrt == "loss":
        out = F.cross_entropy(z, labels, reduction="sum")
    elif wrt == "prob":
        out = torch.softmax(z, 1).gather(1, labels[:, None]).sum()
    else:
        out = z.gather(1, labels[:, None]).sum()
    return torch.autograd.grad(out, x)[0]


def _params_have_no_grad(model) -> bool:
    return all(p.grad is None for p in model.parameters())


@pytest.fixture
def fresh(digits_model):
    """A copy of the trained model whose parameters hold no .grad (training left some)."""
    m = copy.deepcopy(digits_model)
    for p in m.parameters():
        p.grad = None
    return m


@pytest.mark.parametrize("wrt", ["loss", "prob", "logit"])
def test_true_labels_match_manual_autograd(fresh, batch, wrt):
    x, y = batch
    g = input_gradients(fresh, x, y, wrt=wrt)
    want = _manual(fresh, x, y, wrt)
    assert g.shape == x.shape and not g.requires_grad
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    assert float(g.abs().max()) > 0
    assert _params_have_no_grad(fresh)


@pytest.mark.parametrize("wrt", ["loss", "prob", "logit"])
def test_label_tensor_is_a_target(model64, batch, wrt):
    x, y = batch
    x = x.double()
    target = (y + 3) % K
    torch.testing.assert_close(input_gradients(model64, x, labels=target, wrt=wrt),
                               _manual(model64, x, target, wrt), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(input_gradients(model64, x, labels=target.int(), wrt=wrt),
                               _manual(model64, x, target, wrt), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("wrt", ["loss", "prob", "logit"])
@pytest.mark.parametrize("chunk_size", [1, 3, 10, 25])
def test_all_labels_equal_per_label_calls(model64, batch, wrt, chunk_size):
    x = batch[0].double()[:32]
    n = x.shape[0]
    g = input_gradients(model64, x, labels="all", wrt=wrt, chunk_size=chunk_size)
    assert g.shape == (n, K, *x.shape[1:]) and g.is_contiguous()
    for k in range(K):
        want = _manual(model64, x, torch.full((n,), k), wrt)
        torch.testing.assert_close(g[:, k], want, rtol=1e-10, atol=1e-13)


def test_all_labels_loss_is_shared_minus_logit_gradients(model64, batch):
    """grad_k(loss) = J^T p - J^T e_k: the loss gradients of two classes differ by the
    difference of their logit gradients."""
    x = batch[0].double()
    loss = input_gradients(model64, x, labels="all", wrt="loss")
    logit = input_gradients(model64, x, labels="all", wrt="logit")
    torch.testing.assert_close(loss[:, 3] - loss[:, 7], logit[:, 7] - logit[:, 3],
                               rtol=1e-9, atol=1e-12)


def test_return_logits(digits_model, batch):
    x, y = batch
    g, z = input_gradients(digits_model, x, y, return_logits=True)
    with torch.no_grad():
        torch.testing.assert_close(z, digits_model(x))
    assert g.shape == x.shape and not z.requires_grad


@pytest.mark.parametrize("labels", ["true", "all"])
def test_normalize(digits_model, batch, labels):
    x, y = batch
    raw = input_gradients(digits_model, x, y, labels=labels)
    bd = 2 if labels == "all" else 1
    flat_raw = raw.reshape(*raw.shape[:bd], -1)
    unit = input_gradients(digits_model, x, y, labels=labels, normalize="l2")
    flat = unit.reshape(*unit.shape[:bd], -1)
    torch.testing.assert_close(flat.norm(dim=-1), torch.ones(flat.shape[:bd]), rtol=1e-5,
                               atol=1e-5)
    cos = F.cosine_similarity(flat, flat_raw, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=1e-5, atol=1e-5)
    zm = input_gradients(digits_model, x, y, labels=labels, normalize="zero_mean_l2")
    flat_zm = zm.reshape(*zm.shape[:bd], -1)
    torch.testing.assert_close(flat_zm.mean(-1), torch.zeros(flat.shape[:bd]), rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(flat_zm.norm(dim=-1), torch.ones(flat.shape[:bd]), rtol=1e-5,
                               atol=1e-5)
    centred = flat_raw - flat_raw.mean(-1, keepdim=True)
    torch.testing.assert_close(zm, (centred / centred.norm(dim=-1, keepdim=True)).reshape(
        zm.shape), rtol=1e-4, atol=1e-6)
    # An all-zero gradient stays zero instead of becoming NaN.
    assert torch.equal(normalize_per_sample(torch.zeros(2, 3, 4), "l2"), torch.zeros(2, 3, 4))


def _double_backprop_reference(model, x, labels, wrt):
    """Parameter gradients of sum_i ||d out_i / d x_i||^2, written directly."""
    params = [p for p in model.parameters() if p.requires_grad]
    xr = x.detach().requires_grad_(True)
    z = model(xr)
    if wrt == "loss":
        out = F.cross_entropy(z, labels, reduction="sum")
    elif wrt == "prob":
        out = torch.softmax(z, 1).gather(1, labels[:, None]).sum()
    else:
        out = z.gather(1, labels[:, None]).sum()
    (g,) = torch.autograd.grad(out, xr, create_graph=True)
    grads = torch.autograd.grad(g.pow(2).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if d is None else d for p, d in zip(params, grads, strict=True)]


@pytest.mark.parametrize("wrt", ["loss", "prob", "logit"])
def test_create_graph_gives_double_backprop_parameter_gradients(model64, batch, wrt):
    x, y = batch
    x = x.double()[:32]
    y = y[:32]
    params = [p for p in model64.parameters()]
    g = input_gradients(model64, x, y, wrt=wrt, create_graph=True)
    assert g.requires_grad
    got = torch.autograd.grad(g.pow(2).sum(), params, allow_unused=wrt == "logit")
    want = _double_backprop_reference(model64, x, y, wrt)
    for a, b in zip(got, want, strict=True):
        if a is None:  # logit gradients do not depend on the last layer's bias
            assert float(b.abs().max()) == 0.0
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert _params_have_no_grad(model64)


def test_create_graph_matches_torch_func(model64, batch):
    """The same parameter gradient from torch.func (grad of grad), for the loss."""
    from torch.func import functional_call, grad

    x, y = batch
    x, y = x.double()[:16], y[:16]
    params = dict(model64.named_parameters())

    def input_grad(p, xx):
        def loss(xi):
            return F.cross_entropy(functional_call(model64, p, (xi,)), y, reduction="sum")
        return grad(loss)(xx)

    want = grad(lambda p: input_grad(p, x).pow(2).sum())(params)
    g = input_gradients(model64, x, y, create_graph=True)
    got = torch.autograd.grad(g.pow(2).sum(), list(params.values()))
    for (name, a), b in zip(want.items(), got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_create_graph_all_labels(model64, batch, chunk_size):
    x = batch[0].double()[:8]
    n = x.shape[0]
    params = list(model64.parameters())
    g = input_gradients(model64, x, labels="all", create_graph=True, chunk_size=chunk_size)
    got = torch.autograd.grad(g.pow(2).sum(), params)
    want = [torch.zeros_like(p) for p in params]
    for k in range(K):
        for w, d in zip(want, _double_backprop_reference(model64, x, torch.full((n,), k),
                                                         "loss"), strict=True):
            w += d
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_x_requiring_grad_flows_through_a_preceding_transform(model64, batch):
    """x is the output of a differentiable resize: gradients are taken w.r.t. that x as is,
    and with create_graph they flow on to the tensor before the resize."""
    x, y = batch
    big = F.interpolate(x.double(), size=(16, 16), mode="bilinear", align_corners=False)
    big = big.detach().requires_grad_(True)
    small = F.interpolate(big, size=(8, 8), mode="bilinear", align_corners=False)
    g = input_gradients(model64, small, y)
    torch.testing.assert_close(g, _manual(model64, small, y, "loss"), rtol=1e-10, atol=1e-13)
    assert big.grad is None and not g.requires_grad

    g = input_gradients(model64, small, y, create_graph=True)
    (got,) = torch.autograd.grad(g.pow(2).sum(), big)
    # Reference: the same objective built by hand through the resize.
    small2 = F.interpolate(big, size=(8, 8), mode="bilinear", align_corners=False)
    (g2,) = torch.autograd.grad(F.cross_entropy(model64(small2), y, reduction="sum"), small2,
                                create_graph=True)
    (want,) = torch.autograd.grad(g2.pow(2).sum(), big)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert float(got.abs().max()) > 0


def _bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, K)).double()


@pytest.mark.parametrize("labels", ["true", "all"])
def test_train_mode_batchnorm(batch, labels):
    """In train mode the batch statistics couple the samples: the gradients must still be
    those of one forward pass in train mode, the running statistics updated once, and
    the mode left as it was."""
    x, y = batch
    x = x.double()
    model = _bn_model().train()
    twin = copy.deepcopy(model)
    g = input_gradients(model, x, y, labels=labels, create_graph=labels == "all")
    assert model.training and model[1].training
    assert int(model[1].num_batches_tracked) == 1
    cls = range(K) if labels == "all" else [None]
    for i, k in enumerate(cls):
        ref = copy.deepcopy(twin)
        lab = y if k is None else torch.full_like(y, k)
        want = _manual(ref, x, lab, "loss")
        got = g if k is None else g[:, i]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    assert _params_have_no_grad(model)


def test_mode_is_left_alone(digits_model, batch):
    x, y = batch
    assert not digits_model.training
    input_gradients(digits_model, x, y, labels="all")
    assert not digits_model.training
    m = copy.deepcopy(digits_model).train()
    input_gradients(m, x, y)
    assert m.training


def test_fgsm_along_the_gradient_beats_random_signs(digits_model, digits):
    """The gradient of a trained model is informative: one signed step of 0.1 along it
    costs far more accuracy than a random-sign step of the same size."""
    x, y = digits.x_test, digits.y_test
    clean = accuracy(digits_model, x, y)
    g = input_gradients(digits_model, x, y)
    fgsm = accuracy(digits_model, (x + 0.1 * g.sign()).clamp(0, 1), y)
    gen = torch.Generator().manual_seed(0)
    rand_sign = torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1
    rand = accuracy(digits_model, (x + 0.1 * rand_sign).clamp(0, 1), y)
    assert clean > 0.95
    assert rand > clean - 0.05
    # Measured: clean 0.982, random signs 0.971, FGSM 0.576.
    assert fgsm < rand - 0.25, (clean, fgsm, rand)


def _error_cases(model, x, y):
    yield ValueError, r"labels must hold labels in \[0, 10\)", dict(labels=torch.full_like(y, 10))
    yield ValueError, r"y must hold labels in \[0, 10\).*\[-1,", dict(y=y - 1)
    yield ValueError, r"y must have shape \(64,\)", dict(y=y[:5])
    yield TypeError, "must hold integer class labels", dict(labels=y.float())
    yield ValueError, "labels='true' needs y", dict(y=None)
    yield ValueError, "labels must be 'true', 'all'", dict(labels="every")
    yield TypeError, "labels must be 'true', 'all' or an", dict(labels=[1, 2])
    yield ValueError, "wrt must be one of", dict(wrt="margin")
    yield ValueError, "normalize must be one of", dict(normalize="l1")
    yield ValueError, "chunk_size must be an int >= 1", dict(labels="all", chunk_size=0)
    yield TypeError, "x has dtype torch.float64 but the model's parameters have torch.float32", \
        dict(x=x.double())
    yield TypeError, "x must be a floating-point tensor", dict(x=(x * 16).long())
    yield ValueError, "x must have shape", dict(x=x[0, 0, 0])
    yield ValueError, r"model must return \(N, K\) logits", dict(model=lambda t: t.sum())


@pytest.mark.parametrize("case", range(14))
def test_errors(digits_model, batch, case):
    x, y = batch
    exc, msg, kw = list(_error_cases(digits_model, x, y))[case]
    args = dict(model=digits_model, x=x, y=y)
    args.update(kw)
    with pytest.raises(exc, match=msg):
        input_gradients(args.pop("model"), args.pop("x"), args.pop("y"), **args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_mismatch(digits_model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="x is on cuda"):
        input_gradients(digits_model, x.cuda(), y.cuda())
    m = copy.deepcopy(digits_model).cuda()
    with pytest.raises(ValueError, match="y is on cpu but x is on cuda"):
        input_gradients(m, x.cuda(), y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("labels", ["true", "all"])
def test_devices(digits_model, batch, device, labels):
    x, y = batch
    m = copy.deepcopy(digits_model).to(device)
    g = input_gradients(m, x.to(device), y.to(device), labels=labels)
    want = input_gradients(digits_model, x, y, labels=labels)
    torch.testing.assert_close(g.cpu(), want, rtol=1e-4, atol=1e-6)
