"""The model zoo: shapes on MNIST- and CIFAR-sized inputs, input gradients, parameter counts
against the published ones, the factory's errors, and one trained outcome on real MNIST."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from safedl_ext.data import DATASET_STATS, default_data_root, load_mnist_idx
from safedl_ext.models import (
    MODEL_NAMES,
    VGG,
    MnistCNN,
    Normalized,
    WideResNet,
    build_model,
)
from safedl_ext.training import accuracy, train_classifier

# Small settings where the full model would only slow the test down; the full-size
# networks are checked by their parameter counts below.
_SMALL = {"wrn": {"depth": 10, "widen_factor": 2}}
_ANY_SIZE = [n for n in MODEL_NAMES if n != "digits-cnn"]  # digits-cnn is 8x8-only


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", _ANY_SIZE)
def test_mnist_and_cifar_shapes_and_input_gradient(name):
    torch.manual_seed(0)
    kw = _SMALL.get(name, {})
    mnist = build_model(name, in_channels=1, num_classes=7, **kw).eval()
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    logits = mnist(x)
    assert logits.shape == (2, 7) and logits.dtype == torch.float32
    logits[:, 3].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert bool((x.grad.flatten(1).abs().sum(1) > 0).all())  # every sample gets a gradient
    cifar = build_model(name, in_channels=3, num_classes=7, **kw).eval()
    with torch.no_grad():
        assert cifar(torch.rand(2, 3, 32, 32)).shape == (2, 7)
        assert cifar(torch.rand(1, 3, 8, 8)).shape == (1, 7)  # the smallest size supported


def test_eval_mode_input_gradients_are_per_sample():
    # With batch norm in eval mode, sample 0's input gradient ignores sample 1.
    torch.manual_seed(0)
    model = build_model("preact-resnet18", in_channels=1, num_classes=10).eval()
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    model(x)[:, 3].sum().backward()
    x0 = x.detach()[:1].clone().requires_grad_(True)
    model(x0)[:, 3].sum().backward()
    assert x.grad is not None and x0.grad is not None
    torch.testing.assert_close(x0.grad, x.grad[:1], rtol=1e-4, atol=1e-5)


def test_digits_cnn_by_name():
    model = build_model("digits-cnn", in_channels=1, num_classes=10,
                        mean=DATASET_STATS["digits"][0], std=DATASET_STATS["digits"][1])
    assert isinstance(model, Normalized)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


# Published sizes (3 input channels, 10 classes): ResNet-18 and PreAct-ResNet-18 for
# CIFAR-10 11.2M (as reported across the adversarial-training literature), WRN-28-10 36.5M
# (Zagoruyko & Komodakis 2016, Table 2), WRN-34-10 46.2M (the Madry et al. / TRADES
# CIFAR-10 model), VGG-16 with batch norm, CIFAR head, 14.7M.
@pytest.mark.parametrize(("name", "kwargs", "published"), [
    ("resnet18", {}, 11.2e6),
    ("preact-resnet18", {}, 11.2e6),
    ("wrn", {"depth": 28, "widen_factor": 10}, 36.5e6),
    ("wrn-34-10", {}, 46.2e6),
    ("vgg16", {}, 14.7e6),
])
def test_parameter_counts_match_published(name, kwargs, published):
    with torch.device("meta"):  # no memory, no init: counting only
        model = build_model(name, in_channels=3, num_classes=10, **kwargs)
    assert abs(_count(model) - published) / published < 0.01


def test_exact_parameter_counts():
    with torch.device("meta"):
        counts = {n: _count(build_model(n, in_channels=3, num_classes=10))
                  for n in ("resnet18", "preact-resnet18", "wrn-28-10", "vgg11", "vgg19")}
    assert counts == {"resnet18": 11_173_962, "preact-resnet18": 11_172_170,
                      "wrn-28-10": 36_479_194, "vgg11": 9_228_362, "vgg19": 20_035_018}
    # MnistCNN: 3 convs (640 + 73,856 + 295,168) + linear 4,096 -> 10.
    assert _count(MnistCNN(1, 10)) == 640 + 73_856 + 295_168 + 40_970
    assert _count(MnistCNN(1, 10, hidden=1024)) == (640 + 73_856 + 295_168 + 4_195_328
                                                    + 10_250)


def test_wrn_depth_and_dropout():
    net = build_model("wrn-16-4", in_channels=3, num_classes=10)
    assert isinstance(net, WideResNet) and (net.depth, net.widen_factor) == (16, 4)
    blocks = [m for m in net.stages.modules() if type(m).__name__ == "_PreActBlock"]
    assert len(blocks) == 6  # (16 - 4) / 6 = 2 blocks per stage
    drop = WideResNet(depth=10, widen_factor=1, dropout=0.3).train()
    x = torch.rand(4, 3, 16, 16)
    assert not torch.equal(drop(x), drop(x))  # dropout is active in training
    drop.eval()
    assert torch.equal(drop(x), drop(x))


def test_build_model_wraps_in_normalized():
    mean, std = DATASET_STATS["cifar10"]
    model = build_model("resnet18", in_channels=3, num_classes=10, mean=mean, std=std)
    assert isinstance(model, Normalized)
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(mean))
    bare = build_model("vgg11", in_channels=3, num_classes=10, batch_norm=False)
    assert isinstance(bare, VGG) and not any(
        isinstance(m, torch.nn.BatchNorm2d) for m in bare.modules())


@pytest.mark.parametrize(("call", "match"), [
    (lambda: build_model("resnet50", in_channels=3, num_classes=10),
     "name must be one of digits-cnn, small-cnn, mnist-cnn, resnet18, .*got 'resnet50'"),
    (lambda: build_model("vgg16", in_channels=3, num_classes=10, mean=(0.5,) * 3),
     "mean and std must be given together"),
    (lambda: build_model("vgg16", in_channels=3, num_classes=10, mean=(0.5,), std=(0.2,)),
     "in_channels=3 entries, got 1"),
    (lambda: build_model("wrn", in_channels=3, num_classes=10, depth=30),
     r"depth must be 6n \+ 4 .*got 30"),
    (lambda: build_model("wrn-28-10", in_channels=3, num_classes=10, depth=16),
     "fixes depth and widen_factor"),
    (lambda: build_model("wrn", in_channels=3, num_classes=10, dropout=1.0),
     r"dropout must be in \[0, 1\), got 1.0"),
    (lambda: build_model("digits-cnn", in_channels=3, num_classes=10),
     "digits-cnn takes 1-channel"),
    (lambda: build_model("mnist-cnn", in_channels=0, num_classes=10),
     "in_channels must be >= 1, got 0"),
    (lambda: build_model("vgg16", in_channels=3, num_classes=0),
     "num_classes must be >= 1, got 0"),
    (lambda: VGG("vgg15"), "config must be one of .*got 'vgg15'"),
    (lambda: MnistCNN(hidden=-1), "hidden must be >= 0, got -1"),
])
def test_build_model_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_constructor_argument_is_a_type_error():
    with pytest.raises(TypeError):
        build_model("resnet18", in_channels=3, num_classes=10, widen_factor=2)


@pytest.fixture(scope="module")
def mnist_root() -> Path:
    try:
        root = default_data_root()
    except FileNotFoundError as err:
        pytest.skip(f"shared data folder absent: {err}")
    if not (root / "mnist").is_dir():
        pytest.skip(f"{root / 'mnist'} absent")
    return root / "mnist"


@pytest.mark.slow
def test_mnist_cnn_learns_real_mnist(mnist_root):
    """One epoch on 3,000 real MNIST digits (about 10 s on 2 idle cores) -> > 90% test accuracy."""
    data = load_mnist_idx(mnist_root, test_fraction=0.2, seed=0, limit=3750)
    assert data.x_train.shape == (3000, 1, 28, 28) and data.x_test.shape[0] == 750
    torch.manual_seed(0)
    model = build_model("mnist-cnn", in_channels=1, num_classes=10,
                        mean=DATASET_STATS["mnist"][0], std=DATASET_STATS["mnist"][1])
    before = accuracy(model, data.x_test, data.y_test)
    train_classifier(model, data.x_train, data.y_train, epochs=1, batch_size=32, lr=1e-3, seed=0)
    after = accuracy(model, data.x_test, data.y_test)
    assert before < 0.3 and after > 0.90, (before, after)
