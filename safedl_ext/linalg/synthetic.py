"""Planted-signal matrices that look like a backdoor scan's gradient matrices.

Each row is isotropic Gaussian noise; a ``fraction`` of a class's rows also carry
``strength * sqrt(d) * v_c`` for one unit direction ``v_c`` per class (the poison); every
row is then L2-normalised, as the scan normalises input gradients. With ``fraction=0.1``,
``strength=0.6`` and N = 5,000, d = 3,072, the top squared singular value is about 134
against a tail of about 4,866: the *hard regime* of FIELD_NOTES.md, where a single-pass
randomized sketch misses the direction.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["planted_direction", "planted_matrix", "planted_stream"]


def planted_direction(d: int, seed: int, label: int = 0) -> Tensor:
    """The unit (d,) float64 direction planted in class ``label``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + label)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    return v / torch.linalg.vector_norm(v)


def _planted_mask(index_in_class: Tensor, fraction: float) -> Tensor:
    """Spread the planted rows evenly: row j is planted when floor((j+1)f) > floor(jf)."""
    j = index_in_class.to(torch.float64)
    return torch.floor((j + 1) * fraction) > torch.floor(j * fraction)


def planted_matrix(n: int, d: int, *, fraction: float = 0.1, strength: float = 0.6,
                   seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """One class's (n, d) matrix with unit rows and the planted direction.

    Returns:
        (rows (n, d) of ``dtype``, direction (d,) float64).
    """
    v = planted_direction(d, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, d), generator=g, dtype=torch.float64)
    mask = _planted_mask(torch.arange(n), fraction)
    x[mask] += strength * d ** 0.5 * v
    x /= torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x.to(dtype), v


def planted_stream(num_classes: int, per_class: int, d: int, *, batch: int = 256,
                   fraction: float = 0.1, strength: float = 0.6, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Rows of ``num_classes`` planted classes generated on the fly, classes interleaved.

    Sample ``s`` belongs to class ``s % num_classes``; batch ``i`` holds samples
    ``[i * batch, (i + 1) * batch)`` and is generated from its own seed, so the same
    arguments give the same stream (re-streaming for a second pass) without holding it.

    Yields:
        (rows (B, d) of ``dtype``, class ids (B,) int64, sample ids (B,) int64).
    """
    total = num_classes * per_class
    dirs = torch.stack([planted_direction(d, seed, c) for c in range(num_classes)])
    for i, start in enumerate(range(0, total, batch)):
        ids = torch.arange(start, min(start + batch, total))
        cls = ids % num_classes
        g = torch.Generator().manual_seed(seed * 7_919 + i + 1)
        x = torch.randn((ids.numel(), d), generator=g, dtype=torch.float32)
        mask = _planted_mask(ids // num_classes, fraction)
        if bool(mask.any()):
            x[mask] += (strength * d ** 0.5) * dirs[cls[mask]].to(torch.float32)
        x /= torch.linalg.vector_norm(x, dim=1, keepdim=True)
        yield x.to(dtype), cls, ids
        del x  # do not hold this batch while the next one is generated
