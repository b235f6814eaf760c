"""Shared fixtures: devices, the digits data and a standard CNN trained on it."""

from __future__ import annotations

import pytest
import torch

from safedl_ext.data import TensorSplit, load_digits
from safedl_ext.models import DigitsCNN
from safedl_ext.training import train_classifier

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]),
]


@pytest.fixture(scope="session")
def digits() -> TensorSplit:
    return load_digits(test_fraction=0.25, seed=0)


@pytest.fixture(scope="session")
def digits_model(digits: TensorSplit) -> DigitsCNN:
    """A standard (non-robust) CNN, ~98% clean accuracy on the digits test split."""
    torch.manual_seed(0)
    model = DigitsCNN(width=16)
    train_classifier(model, digits.x_train, digits.y_train, epochs=12, batch_size=64,
                     lr=2e-3, seed=0)
    return model
