"""A minimal seeded classifier trainer (standard training) used by the demo and tests.

The full trainer with defences (JARN, PGD-AT, ...), schedules, AMP and resumable
checkpoints belongs to :mod:`safedl_ext.defenses` (a later milestone); this one only fits
a model on in-memory tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_box, check_finite_logits, check_label_range, check_labels

__all__ = ["accuracy", "predict", "train_classifier"]


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Fit ``model`` on ``(x, y)`` with Adam and cross-entropy; returns it in eval mode.

    Args:
        x: (N, ...) float inputs in [0, 1]. y: (N,) int64 labels.
        epochs, batch_size, lr, weight_decay: optimisation settings.
        seed: seeds the shuffling and the model's own randomness (dropout).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs, batch_size and lr must be positive, got {epochs}, "
                         f"{batch_size}, {lr}")
    check_box(x, 0.0, 1.0, "x")
    check_labels(y, x)
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in tqdm(range(epochs), desc="train", disable=not progress, leave=False):
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            logits = model(x[idx])
            if i == 0:  # all labels in [0, K) for a model with K outputs
                check_label_range(logits.new_empty(y.shape[0], logits.shape[-1]), y)
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: Callable[[Tensor], Tensor], x: Tensor, *, batch_size: int = 512,
            device: torch.device | str | None = None, dtype: torch.dtype | None = None,
            what: str = "x") -> Tensor:
    """Top-1 predictions of ``model`` on ``x``, in batches, in eval mode (restored after).

    Args:
        x: (N, ...) inputs; each batch is moved to ``device``/``dtype`` when given.
        what: what ``x`` is, for the NaN-logit message.

    Returns:
        (N,) int64 labels on the CPU.

    Raises:
        NaNLogitsError: the model returned NaN logits (naming the samples).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    module = model if isinstance(model, nn.Module) else None
    was = module.training if module is not None else False
    if module is not None:
        module.eval()
    out = []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            if device is not None or dtype is not None:
                xb = xb.to(device=device, dtype=dtype)
            logits = model(xb)
            check_finite_logits(logits, torch.arange(i, i + logits.shape[0]), what)
            out.append(logits.argmax(1).cpu())
    finally:
        if module is not None:
            module.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``(x, y)``.

    Raises:
        NaNLogitsError: the model returned NaN logits (naming the samples).
    """
    pred = predict(model, x, batch_size=batch_size)
    return int((pred == y.cpu()).sum()) / max(1, x.shape[0])
