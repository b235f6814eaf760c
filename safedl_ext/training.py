"""A minimal seeded classifier trainer (standard training) used by the demo and tests.

The full trainer with defences (JARN, PGD-AT, ...), schedules, AMP and resumable
checkpoints belongs to :mod:`safedl_ext.defenses` (a later milestone); this one only fits
a model on in-memory tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_box, check_finite_logits, check_label_range, check_labels

__all__ = ["accuracy", "train_classifier"]


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
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``(x, y)``.

    Raises:
        NaNLogitsError: the model returned NaN logits (naming the samples).
    """
    was = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, x.shape[0], batch_size):
            logits = model(x[i:i + batch_size])
            check_finite_logits(logits, torch.arange(i, i + logits.shape[0]), "x")
            correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    finally:
        model.train(was)
    return correct / max(1, x.shape[0])
