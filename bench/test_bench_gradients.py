"""Input gradients for every label and the native cross-entropy seed op, each against its
pure-PyTorch counterpart.

Groups (``benchmark.group``) and roles (``benchmark.extra_info["role"]``):

* ``xgrad-all-cifar128``: the bench CNN (``Normalized(SmallCNN(3, 10, width=32))``, trained
  on CIFAR-10 when its cached weights exist, see ``conftest.py``; untrained otherwise,
  recorded in ``extra_info["trained"]``) in eval mode on 128 CIFAR-10 test images
  (3x32x32; uniform noise without the archive). ``xgrad-all-digits``: ``DigitsCNN(16)``
  trained on scikit-learn's digits (as in the tests) on its 450 test images (1x8x8).
  Roles: ``native`` is ``input_gradients(model, x, labels="all")`` with its default
  strategy (one forward pass and a loop of 10 VJPs); ``baseline-k-passes`` is
  10 separate forward+backward passes (``cross_entropy(model(x), k)`` summed, then
  ``autograd.grad`` w.r.t. x), the way the gradients are computed without the engine.
  Information only: ``batched`` (``chunk_size=10``: one VJP batched over the ten classes
  with ``is_grads_batched``), ``batched-5`` (two of five) and, for CIFAR,
  ``native-channels-last`` (the same call on a channels-last copy of the batch).
  ``extra_info["max_abs_diff"]`` is the largest difference from the baseline's gradients,
  ``max_rel_diff`` the same divided by the largest baseline gradient element.
* ``xent-256x10`` and ``xent-4096x1000`` (float32 logits): the seed ``softmax(z) -
  onehot(y)``, its backward (a VJP w.r.t. z with ``create_graph``) and its double backward
  (a VJP of that w.r.t. z): ``native`` (``torch.ops.safedl.xent_seed``, autograd through
  ``safedl::xent_seed_backward``) against ``baseline-torch`` (``softmax - onehot`` with
  torch's autograd); the forward alone (``native-fwd``, ``torch-fwd``) and forward +
  backward (``native-fwdbwd``, ``torch-fwdbwd``) are information.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS, _build_model, _model_key, cache_dir, data_root, require_native, warm

from safedl_ext.gradients import input_gradients
from safedl_ext.ops import reference

K = 10
CIFAR_BATCH = 128


def _k_passes(model, x: torch.Tensor) -> torch.Tensor:
    """(N, K, ...) input gradients of the per-class cross-entropy, one forward+backward
    pass per class."""
    n = x.shape[0]
    out = []
    for k in range(K):
        xi = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xi), torch.full((n,), k), reduction="sum")
        out.append(torch.autograd.grad(loss, xi)[0])
    return torch.stack(out, dim=1)


@pytest.fixture(scope="module")
def cifar_case() -> dict:
    """The bench CNN (trained weights when cached) and 128 CIFAR-10 test images."""
    from safedl_ext.data import load_cifar10_jpeg
    from safedl_ext.report import load_torch_safe

    model = _build_model()
    weights = cache_dir() / f"{_model_key()}.pt"
    trained = weights.exists()
    if trained:
        model.load_state_dict(load_torch_safe(weights, what="bench model"))
    model.eval()
    archive = data_root() / "cifar10" / "cifar10-test-jpeg.tar.gz"
    if archive.exists():
        x, _ = load_cifar10_jpeg(str(archive), per_class=CIFAR_BATCH // K + 1, seed=3)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        x = x[perm[:CIFAR_BATCH]].contiguous()
    else:
        x = torch.rand((CIFAR_BATCH, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    return {"model": model, "x": x, "trained": trained, "real_images": archive.exists(),
            "model_name": "Normalized(SmallCNN(3, 10, width=32))"}


@pytest.fixture(scope="module")
def digits_case() -> dict:
    from safedl_ext.data import load_digits
    from safedl_ext.models import DigitsCNN
    from safedl_ext.training import train_classifier

    data = load_digits(test_fraction=0.25, seed=0)
    torch.manual_seed(0)
    model = DigitsCNN(width=16)
    train_classifier(model, data.x_train, data.y_train, epochs=12, batch_size=64, lr=2e-3,
                     seed=0)
    return {"model": model.eval(), "x": data.x_test.contiguous(), "trained": True,
            "real_images": True, "model_name": "DigitsCNN(width=16)"}


CASES = {"xgrad-all-cifar128": "cifar_case", "xgrad-all-digits": "digits_case"}
_BASELINE: dict[str, torch.Tensor] = {}


def _xgrad_tag(benchmark, group: str, case: dict, role: str, variant: str) -> None:
    benchmark.group = group
    benchmark.extra_info.update(
        group=group, role=role, variant=variant, model=case["model_name"],
        trained=case["trained"], real_images=case["real_images"],
        batch=list(case["x"].shape), classes=K, dtype="float32", threads=THREADS)


def _baseline_grads(group: str, case: dict) -> torch.Tensor:
    if group not in _BASELINE:
        _BASELINE[group] = _k_passes(case["model"], case["x"])
    return _BASELINE[group]


def _record_diff(benchmark, group: str, case: dict, got: torch.Tensor) -> None:
    want = _baseline_grads(group, case)
    diff, scale = float((got - want).abs().max()), float(want.abs().max())
    benchmark.extra_info.update(max_abs_diff=diff, max_abs_grad=scale,
                                max_rel_diff=diff / scale if scale else diff)


ROUNDS = {"xgrad-all-cifar128": 5, "xgrad-all-digits": 10}


@pytest.mark.parametrize("group", list(CASES))
def test_xgrad_k_passes(benchmark, group, request):
    case = request.getfixturevalue(CASES[group])
    _xgrad_tag(benchmark, group, case, "baseline-k-passes",
               f"{K} x (forward + cross-entropy + autograd.grad w.r.t. x)")

    def run():
        return _k_passes(case["model"], case["x"])

    warm(run, 1)
    g = benchmark.pedantic(run, rounds=ROUNDS[group], iterations=1)
    _record_diff(benchmark, group, case, g)


VARIANTS = {
    "native": ("input_gradients(labels='all') [default: 1 forward, loop of 10 VJPs]", {}),
    "batched": ("input_gradients(labels='all', chunk_size=10) [1 batched VJP]",
                {"chunk_size": 10}),
    "batched-5": ("input_gradients(labels='all', chunk_size=5) [2 batched VJPs]",
                  {"chunk_size": 5}),
}


@pytest.mark.parametrize("role", list(VARIANTS))
@pytest.mark.parametrize("group", list(CASES))
def test_xgrad_all(benchmark, group, role, request):
    case = request.getfixturevalue(CASES[group])
    variant, kwargs = VARIANTS[role]
    _xgrad_tag(benchmark, group, case, role, variant)

    def run():
        return input_gradients(case["model"], case["x"], labels="all", **kwargs)

    warm(run, 1)
    g = benchmark.pedantic(run, rounds=ROUNDS[group], iterations=1)
    _record_diff(benchmark, group, case, g)


def test_xgrad_all_channels_last(benchmark, cifar_case):
    group = "xgrad-all-cifar128"
    _xgrad_tag(benchmark, group, cifar_case, "native-channels-last",
               "input_gradients(labels='all') on a channels-last copy of x")
    x = cifar_case["x"].contiguous(memory_format=torch.channels_last)

    def run():
        return input_gradients(cifar_case["model"], x, labels="all")

    warm(run, 1)
    g = benchmark.pedantic(run, rounds=ROUNDS[group], iterations=1)
    # Other convolution algorithms: differences at ReLU/max-pool ties are expected.
    _record_diff(benchmark, group, cifar_case, g)


# ------------------------------------------------------------------ the seed op itself

SEED_SHAPES = {"xent-256x10": (256, 10), "xent-4096x1000": (4096, 1000)}


def _seed_inputs(group: str):
    n, k = SEED_SHAPES[group]
    g = torch.Generator().manual_seed(0)
    z = (3 * torch.randn((n, k), generator=g)).requires_grad_(True)
    y = torch.randint(0, k, (n,), generator=g)
    v = torch.randn((n, k), generator=g)
    u = torch.randn((n, k), generator=g)
    return z, y, v, u


def _chain(fn, z, y, v, u, depth: int):
    s = fn(z, y)
    if depth == 0:
        return s
    (gz,) = torch.autograd.grad(s, z, v, create_graph=depth > 1)
    if depth == 1:
        return gz
    (ggz,) = torch.autograd.grad(gz, z, u)
    return ggz


SEED_ROLES = {
    "native": (2, True, "xent_seed + backward + double backward [native op]"),
    "baseline-torch": (2, False, "softmax - onehot + backward + double backward [torch]"),
    "native-fwdbwd": (1, True, "xent_seed + backward [native op]"),
    "torch-fwdbwd": (1, False, "softmax - onehot + backward [torch]"),
    "native-fwd": (0, True, "xent_seed forward [native op]"),
    "torch-fwd": (0, False, "softmax - onehot forward [torch]"),
}


@pytest.mark.parametrize("role", list(SEED_ROLES))
@pytest.mark.parametrize("group", list(SEED_SHAPES))
def test_xent_seed(benchmark, group, role):
    depth, native, variant = SEED_ROLES[role]
    if native:
        require_native()
    fn = torch.ops.safedl.xent_seed if native else reference.xent_seed
    z, y, v, u = _seed_inputs(group)
    benchmark.group = group
    benchmark.extra_info.update(group=group, role=role, variant=variant,
                                shape=list(SEED_SHAPES[group]), dtype="float32",
                                threads=THREADS)
    want = _chain(reference.xent_seed, z, y, v, u, depth)
    got = _chain(fn, z, y, v, u, depth)
    benchmark.extra_info["max_abs_diff"] = float((got - want).abs().max())

    def run():
        return _chain(fn, z, y, v, u, depth)

    warm(run, 3)
    benchmark(run)
