"""Backdoor (poisoning) attacks to scan against: triggers, poisoned training sets, ASR.

A trigger writes a pattern ``p`` into an image through a mask ``m`` (thesis eq. 5.1)::

    x' = (1 - m) * x + m * p

with ``m`` and ``p`` in [0, 1] and the same mask position for every poisoned image (the
thesis's reply to its examiner). The thesis's two triggers and the usual third one:

- :func:`blend_trigger` (its "overlay"): ``m = opacity`` everywhere, ``p`` an image; the
  thesis blends a random CIFAR-100 training image at 20%. CIFAR-100 is not in this
  project's data, so :func:`image_pattern` turns any image (an MNIST digit, a CIFAR-10
  image of another split, a photo) into a pattern of the right shape, and
  :func:`noise_pattern` gives a seeded uniform-noise pattern.
- :func:`dot_trigger`: one pixel (``m = 1`` there) of one colour at one position, both
  random per attack from a seed unless given.
- :func:`patch_trigger`: a k x k square (3 x 3 in the thesis's GDM baseline), a
  checkerboard or a solid colour, in a corner or at a given position.

:func:`poison_dataset` poisons a fraction of the base class (or, all-to-one, of every
non-target class), relabels those samples to the target and returns the ground-truth
indices; :func:`triggered_test_set` and :func:`attack_success_rate` measure the attack on
held-out data. Images are float (N, C, H, W) in [0, 1] throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_box, check_labels
from ..training import predict

__all__ = [
    "PoisonedData",
    "Trigger",
    "attack_success_rate",
    "blend_trigger",
    "dot_trigger",
    "image_pattern",
    "noise_pattern",
    "patch_trigger",
    "poison_dataset",
    "triggered_test_set",
]

Shape = Sequence[int]


def _shape(shape: Shape) -> tuple[int, int, int]:
    if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be (C, H, W) with positive ints, got {tuple(shape)}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _unit(name: str, t: Tensor) -> Tensor:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    check_box(t, 0.0, 1.0, name)
    return t


@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger: ``apply(x) = (1 - mask) * x + mask * pattern`` (thesis eq. 5.1).

    Attributes:
        mask: (1 or C, H, W) float in [0, 1]; 1 replaces the pixel by the pattern, 0 keeps it.
        pattern: (C, H, W) float in [0, 1].
        name: for reports (``"blend"``, ``"dot"``, ``"patch"``, ``"custom"``).
    """

    mask: Tensor
    pattern: Tensor
    name: str = "custom"

    def __post_init__(self) -> None:
        _unit("mask", self.mask)
        _unit("pattern", self.pattern)
        if self.pattern.dim() != 3:
            raise ValueError(f"pattern must be (C, H, W), got {tuple(self.pattern.shape)}")
        c, h, w = self.pattern.shape
        if self.mask.dim() != 3 or self.mask.shape[1:] != (h, w) or \
                self.mask.shape[0] not in (1, c):
            raise ValueError(f"mask must be (1, {h}, {w}) or ({c}, {h}, {w}) to match the "
                             f"pattern, got {tuple(self.mask.shape)}")
        if not bool((self.mask > 0).any()):
            raise ValueError("mask is zero everywhere: the trigger would change nothing")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it applies to."""
        c, h, w = self.pattern.shape
        return int(c), int(h), int(w)

    @property
    def area(self) -> float:
        """Share of pixels the mask touches (> 0), in [0, 1]."""
        return float((self.mask > 0).any(0).float().mean())

    def apply(self, x: Tensor) -> Tensor:
        """(N, C, H, W) in [0, 1] -> the triggered images (a new tensor, same dtype)."""
        check_box(x, 0.0, 1.0, "x")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must be (N, {', '.join(map(str, self.shape))}) for this "
                             f"trigger, got {tuple(x.shape)}")
        m = self.mask.to(x.device, x.dtype)
        p = self.pattern.to(x.device, x.dtype)
        return ((1 - m) * x + m * p).clamp_(0.0, 1.0)


def noise_pattern(shape: Shape, seed: int = 0) -> Tensor:
    """A seeded uniform-noise pattern, (C, H, W) in [0, 1]."""
    c, h, w = _shape(shape)
    return torch.rand((c, h, w), generator=torch.Generator().manual_seed(seed))


def image_pattern(image: Tensor, shape: Shape) -> Tensor:
    """An image (C', H', W') or (H', W') in [0, 1] as a pattern of ``shape`` (C, H, W):
    resized bilinearly (antialiased when shrinking), grey repeated to C channels, RGB
    averaged to one."""
    c, h, w = _shape(shape)
    img = _unit("image", image)
    if img.dim() == 2:
        img = img[None]
    if img.dim() != 3:
        raise ValueError(f"image must be (C, H, W) or (H, W), got {tuple(image.shape)}")
    img = img.float()
    if img.shape[1:] != (h, w):
        shrink = img.shape[1] > h or img.shape[2] > w
        img = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False,
                            antialias=shrink)[0]
    if img.shape[0] != c:
        if img.shape[0] == 1:
            img = img.expand(c, h, w)
        elif c == 1:
            img = img.mean(0, keepdim=True)
        else:
            raise ValueError(f"image has {img.shape[0]} channels; a {c}-channel pattern "
                             "needs 1 or the same number")
    return img.clamp(0.0, 1.0).contiguous()


def blend_trigger(pattern: Tensor, opacity: float = 0.2) -> Trigger:
    """The thesis's overlay trigger: ``pattern`` (C, H, W) blended at ``opacity`` over the
    whole image (0.2 in the thesis)."""
    if not 0.0 < opacity <= 1.0:
        raise ValueError(f"opacity must be in (0, 1], got {opacity}")
    p = _unit("pattern", pattern)
    if p.dim() != 3:
        raise ValueError(f"pattern must be (C, H, W), got {tuple(p.shape)}")
    return Trigger(torch.full((1, *p.shape[1:]), float(opacity)), p.float(), "blend")


def _position(where: str | tuple[int, int], size: int, h: int, w: int) -> tuple[int, int]:
    corners = {"bottom-right": (h - size, w - size), "bottom-left": (h - size, 0),
               "top-right": (0, w - size), "top-left": (0, 0)}
    if isinstance(where, str):
        if where not in corners:
            raise ValueError(f"position must be one of {sorted(corners)} or a (row, col) "
                             f"pair, got {where!r}")
        return corners[where]
    r, col = int(where[0]), int(where[1])
    if not (0 <= r <= h - size and 0 <= col <= w - size):
        raise ValueError(f"position {where} puts a {size}x{size} trigger outside a {h}x{w} "
                         "image")
    return r, col


def dot_trigger(shape: Shape, *, position: tuple[int, int] | None = None,
                colour: Sequence[float] | float | None = None, seed: int = 0) -> Trigger:
    """The thesis's dot trigger: one pixel set to one colour, at one position.

    Args:
        shape: (C, H, W) of the images.
        position: (row, col); random (from ``seed``) if None.
        colour: C values (or one) in [0, 1]; random (from ``seed``) if None.
        seed: the draw of the position and the colour, fixed per attack.
    """
    c, h, w = _shape(shape)
    g = torch.Generator().manual_seed(seed)
    if position is None:
        position = (int(torch.randint(h, (1,), generator=g)),
                    int(torch.randint(w, (1,), generator=g)))
    if colour is None:
        value = torch.rand(c, generator=g)
    else:
        value = torch.as_tensor(colour, dtype=torch.float32).reshape(-1)
        value = value.expand(c) if value.numel() == 1 else value
        if value.numel() != c:
            raise ValueError(f"colour must have 1 or {c} values, got {value.numel()}")
        _unit("colour", value)
    r, col = _position(position, 1, h, w)
    mask = torch.zeros(1, h, w)
    mask[0, r, col] = 1.0
    pattern = torch.zeros(c, h, w)
    pattern[:, r, col] = value
    return Trigger(mask, pattern, "dot")


def patch_trigger(shape: Shape, *, size: int = 3,
                  position: Literal["bottom-right", "bottom-left", "top-right", "top-left"]
                  | tuple[int, int] = "bottom-right",
                  fill: Literal["checkerboard", "white", "black"] | Tensor = "checkerboard"
                  ) -> Trigger:
    """A ``size`` x ``size`` patch (3 x 3 in the thesis's GDM baseline).

    Args:
        shape: (C, H, W) of the images.
        size: side of the square, in pixels.
        position: a corner or the (row, col) of its top-left pixel.
        fill: ``"checkerboard"`` (alternating 1 and 0, 1 in the top-left), a solid
            ``"white"``/``"black"``, or a (C, size, size) tensor in [0, 1].
    """
    c, h, w = _shape(shape)
    if not isinstance(size, int) or not 1 <= size <= min(h, w):
        raise ValueError(f"size must be an int in [1, {min(h, w)}], got {size!r}")
    r, col = _position(position, size, h, w)
    if isinstance(fill, Tensor):
        block = _unit("fill", fill).float()
        if block.shape != (c, size, size):
            raise ValueError(f"fill must be ({c}, {size}, {size}), got {tuple(block.shape)}")
    elif fill == "checkerboard":
        ij = torch.arange(size)
        block = ((ij[:, None] + ij[None, :]) % 2 == 0).float().expand(c, size, size)
    elif fill in ("white", "black"):
        block = torch.full((c, size, size), 1.0 if fill == "white" else 0.0)
    else:
        raise ValueError(f"fill must be 'checkerboard', 'white', 'black' or a tensor, got "
                         f"{fill!r}")
    mask = torch.zeros(1, h, w)
    mask[0, r:r + size, col:col + size] = 1.0
    pattern = torch.zeros(c, h, w)
    pattern[:, r:r + size, col:col + size] = block
    return Trigger(mask, pattern, "patch")


@dataclass(frozen=True)
class PoisonedData:
    """What :func:`poison_dataset` returns.

    Attributes:
        x: (N, C, H, W) the training images, the poisoned ones with the trigger.
        y: (N,) int64 labels after relabelling (poisoned samples carry ``target``).
        y_clean: (N,) int64 the original labels.
        indices: (P,) int64 sorted indices of the poisoned samples (the ground truth a
            scan is scored against).
        target: the label the backdoor maps to. base: the poisoned class (None: all-to-one).
        fraction: the share of the base class (all-to-one: of every non-target sample)
            that was poisoned, as asked.
        trigger: the trigger used.
    """

    x: Tensor
    y: Tensor
    y_clean: Tensor
    indices: Tensor
    target: int
    base: int | None
    fraction: float
    trigger: Trigger

    @property
    def is_poisoned(self) -> Tensor:
        """(N,) bool: the ground truth as a mask."""
        m = torch.zeros(self.y.shape[0], dtype=torch.bool)
        m[self.indices] = True
        return m


def _classes(y: Tensor, target: int, base: int | None) -> None:
    for name, v in (("target", target), ("base", base)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if base is not None and base == target:
        raise ValueError(f"base and target must differ, got {base} for both")
    present = set(torch.unique(y).tolist())
    if base is not None and base not in present:
        raise ValueError(f"base class {base} has no samples (labels present: "
                         f"{sorted(present)})")


def _sources(y: Tensor, target: int, base: int | None) -> Tensor:
    """Indices of the samples an attack may poison (the base class, or every non-target
    sample)."""
    keep = (y == base) if base is not None else (y != target)
    return keep.nonzero().squeeze(1)


def poison_dataset(x: Tensor, y: Tensor, trigger: Trigger, *, target: int,
                   base: int | None, fraction: float = 0.1, seed: int = 0) -> PoisonedData:
    """Poison a labelled data set (thesis §5.5.1: 10% of the base class, relabelled).

    Args:
        x: (N, C, H, W) in [0, 1]. y: (N,) integer labels.
        trigger: applied to the chosen samples.
        target: the label they are given.
        base: the class they are taken from; None for all-to-one (from every class but
            the target).
        fraction: share of those candidate samples to poison, in (0, 1]; rounded to the
            nearest count, at least 1.
        seed: the seeded choice of samples.

    Returns:
        :class:`PoisonedData` (new tensors; ``x`` and ``y`` are not modified).
    """
    check_box(x, 0.0, 1.0, "x")
    check_labels(y, x)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    _classes(y, target, base)
    cand = _sources(y.cpu(), target, base)
    if cand.numel() == 0:
        raise ValueError("no sample to poison: every sample already has the target label")
    k = max(1, round(fraction * cand.numel()))
    pick = torch.randperm(cand.numel(), generator=torch.Generator().manual_seed(seed))[:k]
    idx = cand[pick].sort().values
    xp, yp = x.clone(), y.clone().long()
    dev = idx.to(x.device)
    xp[dev] = trigger.apply(x[dev])
    yp[idx.to(y.device)] = target
    return PoisonedData(xp, yp, y.clone().long(), idx, target, base, float(fraction), trigger)


def triggered_test_set(x: Tensor, y: Tensor, trigger: Trigger, *, target: int,
                       base: int | None) -> tuple[Tensor, Tensor]:
    """The held-out samples the backdoor should flip, with the trigger applied.

    Returns:
        (x_triggered, y_true): the base class's samples (all-to-one: every non-target
        sample), triggered, with their true labels. Accuracy against ``y_true`` is the
        thesis's "Poisoned" column; the share classified as ``target`` is the ASR.
    """
    check_box(x, 0.0, 1.0, "x")
    check_labels(y, x)
    _classes(y, target, base)
    keep = _sources(y.cpu(), target, base)
    if keep.numel() == 0:
        raise ValueError("no test sample of the base class (or outside the target class)")
    dev = keep.to(x.device)
    return trigger.apply(x[dev]), y[keep.to(y.device)].long()


def attack_success_rate(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor,
                        trigger: Trigger, *, target: int, base: int | None,
                        batch_size: int = 512) -> float:
    """Share, in [0, 1], of triggered held-out base-class samples (all-to-one: non-target
    samples) that ``model`` classifies as ``target`` (the thesis's poison success rate).

    Args:
        model: maps (N, C, H, W) in [0, 1] to (N, K) logits (run in eval mode).
        x, y: held-out images and labels (not the poisoned training set).
    """
    xt, _ = triggered_test_set(x, y, trigger, target=target, base=base)
    pred = predict(model, xt, batch_size=batch_size, what="the triggered test set")
    return int((pred == target).sum()) / xt.shape[0]
