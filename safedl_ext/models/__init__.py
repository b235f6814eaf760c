"""Model zoo. Every model takes [0, 1] images and normalizes inside itself
(:class:`Normalized`), so attack budgets are always in pixel units.

:func:`build_model` makes any network of the zoo by name (:data:`MODEL_NAMES`), wrapped in
:class:`Normalized` when the data set's statistics are given
(``safedl_ext.data.DATASET_STATS``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .zoo import VGG, VGG_CONFIGS, MnistCNN, PreActResNet18, ResNet18, WideResNet

__all__ = ["MODEL_NAMES", "VGG", "VGG_CONFIGS", "DigitsCNN", "MnistCNN", "Normalized",
           "PreActResNet18", "ResNet18", "SmallCNN", "WideResNet", "build_model",
           "model_device_dtype"]


class Normalized(nn.Module):
    """Wraps ``model`` so it takes [0, 1] inputs: ``model((x - mean) / std)``.

    Args:
        model: the network that expects normalized input.
        mean, std: per-channel statistics, length C.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and "
                             f"{len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {list(std)}")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) in [0, 1] -> logits (N, K)."""
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


class SmallCNN(nn.Module):
    """A small VGG-style CNN for 32x32 (or any size) images: two conv blocks + MLP head.

    Args:
        in_channels: C of the input.
        num_classes: K.
        width: channels of the first block (the second has twice as many).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * w * 16, 128),
            nn.ReLU(inplace=True), nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> logits (N, K)."""
        return self.head(self.features(x))


class DigitsCNN(nn.Module):
    """A CNN for scikit-learn's 8x8 grey digits (1 channel, 10 classes)."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * width * 16, 128),
            nn.ReLU(inplace=True), nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 1, 8, 8) in [0, 1] -> logits (N, 10)."""
        return self.net(x)


def model_device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and floating dtype of a model's first floating parameter or buffer
    (``(None, None)`` for a model without any)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


MODEL_NAMES: tuple[str, ...] = ("digits-cnn", "small-cnn", "mnist-cnn", "resnet18",
                                "preact-resnet18", "wrn", "vgg11", "vgg13", "vgg16", "vgg19")
"""Names :func:`build_model` knows; ``"wrn-<depth>-<k>"`` (e.g. ``"wrn-34-10"``) also works."""

_WRN_NAME = re.compile(r"wrn-(\d+)-(\d+)")


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A zoo network by name, for [0, 1] inputs.

    Args:
        name: one of :data:`MODEL_NAMES`, or ``"wrn-<depth>-<k>"``.
        in_channels: C of the input images. num_classes: K.
        mean, std: per-channel statistics (length C) of the training data, e.g.
            ``safedl_ext.data.DATASET_STATS["cifar10"]``; when given, the network is wrapped
            in :class:`Normalized`, otherwise it gets the [0, 1] pixels as they are.
        **kwargs: passed to the network's constructor: ``width`` (small-cnn, digits-cnn),
            ``hidden`` (mnist-cnn), ``depth``, ``widen_factor``, ``dropout`` (wrn),
            ``batch_norm`` (vgg*).

    Returns:
        A module mapping (N, C, H, W) in [0, 1] to logits (N, K).

    Raises:
        ValueError: unknown name, inconsistent statistics, or a network's own checks.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together, got "
                         f"mean={mean!r} and std={std!r}")
    if mean is not None and len(mean) != in_channels:
        raise ValueError(f"mean and std must have in_channels={in_channels} entries, got "
                         f"{len(mean)}")
    key = name.lower()
    wrn = _WRN_NAME.fullmatch(key)
    if wrn is not None:
        if "depth" in kwargs or "widen_factor" in kwargs:
            raise ValueError(f"name {name!r} fixes depth and widen_factor; pass them as "
                             "keyword arguments with name='wrn' instead")
        key = "wrn"
        kwargs = {**kwargs, "depth": int(wrn.group(1)), "widen_factor": int(wrn.group(2))}
    net: nn.Module
    if key == "digits-cnn":
        if in_channels != 1:
            raise ValueError(f"digits-cnn takes 1-channel 8x8 images, got in_channels="
                             f"{in_channels}")
        net = DigitsCNN(num_classes=num_classes, **kwargs)
    elif key == "small-cnn":
        net = SmallCNN(in_channels, num_classes, **kwargs)
    elif key == "mnist-cnn":
        net = MnistCNN(in_channels, num_classes, **kwargs)
    elif key == "resnet18":
        net = ResNet18(in_channels, num_classes, **kwargs)
    elif key == "preact-resnet18":
        net = PreActResNet18(in_channels, num_classes, **kwargs)
    elif key == "wrn":
        net = WideResNet(in_channels=in_channels, num_classes=num_classes, **kwargs)
    elif key in VGG_CONFIGS:
        net = VGG(key, in_channels=in_channels, num_classes=num_classes, **kwargs)
    else:
        raise ValueError(f"name must be one of {', '.join(MODEL_NAMES)} or 'wrn-<depth>-<k>', "
                         f"got {name!r}")
    if mean is not None and std is not None:
        return Normalized(net, mean, std)
    return net
