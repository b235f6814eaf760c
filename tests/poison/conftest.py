"""A real backdoor to scan, trained once per session: 20% of MNIST's class 3 (the shared
data's 8,000 training images) with a white 3x3 corner patch, relabelled 5; a SmallCNN
(width 16) trained 4 epochs on it (attack success ~98%), and one trained on the clean
data."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from safedl_ext.models import SmallCNN
from safedl_ext.poison import patch_trigger, poison_dataset
from safedl_ext.training import train_classifier

MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def _train(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    m = SmallCNN(in_channels=1, width=16)
    train_classifier(m, x, y, epochs=4, seed=seed)
    return m.eval()


@pytest.fixture(scope="session")
def mnist_backdoor() -> SimpleNamespace:
    from safedl_ext.data import load_mnist_idx

    if not MNIST.is_dir():
        pytest.fail(f"the shared MNIST data is missing: {MNIST}")
    s = load_mnist_idx(MNIST, seed=0)
    trigger = patch_trigger((1, 28, 28), size=3, fill="white")
    p = poison_dataset(s.x_train, s.y_train, trigger, target=5, base=3, fraction=0.2, seed=0)
    return SimpleNamespace(split=s, poisoned=p, trigger=trigger, model=_train(p.x, p.y),
                           clean_model=_train(s.x_train, s.y_train))
