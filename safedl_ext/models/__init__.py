"""Model zoo. Every model takes [0, 1] images and normalizes inside itself
(:class:`Normalized`), so attack budgets are always in pixel units."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["DigitsCNN", "Normalized", "SmallCNN", "model_device_dtype"]


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
