"""Training-time augmentation on batched image tensors (no torchvision)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_crop_flip"]


def random_crop_flip(
    x: Tensor,
    *,
    padding: int = 4,
    flip: bool = True,
    padding_mode: str = "zeros",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample random shift (pad, then crop back to size) and horizontal flip.

    The standard CIFAR augmentation (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``),
    done for a whole batch at once with one gather: sample i is padded by ``padding`` pixels
    on every side and cropped at a uniformly drawn offset (dy_i, dx_i) in
    {0, ..., 2 * padding}^2, then mirrored left-right with probability 1/2 when ``flip``.

    Args:
        x: (N, C, H, W) images (any float dtype, any device); left unchanged.
        padding: pixels added on each side, >= 0; 0 with ``flip=False`` returns a copy of x.
        flip: draw a horizontal flip per sample.
        padding_mode: "zeros" (black border, as torchvision's default) or "reflect"
            (mirror the image without repeating the edge pixel; needs padding < H and < W).
        generator: source of the random draws (CPU or on x's device); the global
            generator if None. The same generator state gives the same output.

    Returns:
        (N, C, H, W) tensor, same dtype and device as x; differentiable in x.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding_mode not in ("zeros", "reflect"):
        raise ValueError(f"padding_mode must be 'zeros' or 'reflect', got {padding_mode!r}")
    n, c, h, w = x.shape
    if padding_mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"padding must be < the image size {h}x{w} for reflect padding, "
                         f"got {padding}")
    dev = generator.device if generator is not None else torch.device("cpu")
    shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=dev)
    shifts = shifts.to(x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if flip:
        flips = torch.rand(n, generator=generator, device=dev).lt(0.5).to(x.device)
        cols = torch.where(flips[:, None], (w - 1) - cols, cols)
    elif padding == 0:
        return x.clone()
    p = padding
    xp = x
    if p > 0:
        xp = F.pad(x, (p, p, p, p), mode="constant" if padding_mode == "zeros" else "reflect")
    wp = w + 2 * p
    rows = shifts[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = shifts[1, :, None] + cols  # (N, W)
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return xp.reshape(n, c, -1).gather(2, index).reshape(n, c, h, w)
