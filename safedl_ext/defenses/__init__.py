"""Training defences: JARN and the thesis's baselines on one trainer.

    from safedl_ext.defenses import JARN, JARNConfig, TrainConfig, fit, make_method
    method = JARN(JARNConfig(eps=8 / 255, jarn_fraction=0.25))
    result = fit(model, method, (x_train, y_train), config=TrainConfig(epochs=30),
                 test=(x_test, y_test), out_dir="runs/jarn")

Methods: ``standard``, ``uniform`` (noise), ``fgsm-at``, ``pgd-at`` (PGD-AT-k),
``double-backprop``, ``trades``, ``jarn``, ``jarn-at1``; :func:`make_method` builds one
by name.
"""

from __future__ import annotations

from typing import Any

from .jarn import JARN, Adaptor, Discriminator, JARNConfig
from .methods import (
    FGSMAT,
    PGDAT,
    TRADES,
    DoubleBackprop,
    Method,
    Standard,
    StepContext,
    UniformNoise,
    craft_linf,
    uniform_noise,
)
from .trainer import TrainConfig, TrainResult, fit, load_checkpoint, save_checkpoint

__all__ = [
    "FGSMAT",
    "JARN",
    "METHOD_NAMES",
    "PGDAT",
    "TRADES",
    "Adaptor",
    "Discriminator",
    "DoubleBackprop",
    "JARNConfig",
    "Method",
    "Standard",
    "StepContext",
    "TrainConfig",
    "TrainResult",
    "UniformNoise",
    "craft_linf",
    "fit",
    "load_checkpoint",
    "make_method",
    "save_checkpoint",
    "uniform_noise",
]

METHOD_NAMES = ("standard", "uniform", "fgsm-at", "pgd-at", "double-backprop", "trades", "jarn",
                "jarn-at1")


def make_method(name: str, *, eps: float = 8 / 255, **kwargs: Any) -> Method:
    """A training method by name.

    Args:
        name: one of :data:`METHOD_NAMES`.
        eps: the data set's radius (pixel units): noise half-width for ``uniform`` and
            JARN, attack radius for the adversarial-training methods; unused by
            ``standard`` and ``double-backprop``.
        kwargs: the method's own settings (``steps`` for ``pgd-at``, ``lam`` for
            ``double-backprop``, :class:`JARNConfig` fields for JARN, ...).
    """
    if name == "standard":
        return Standard(**kwargs)
    if name == "uniform":
        return UniformNoise(eps=eps, **kwargs)
    if name == "fgsm-at":
        return FGSMAT(eps=eps, **kwargs)
    if name == "pgd-at":
        return PGDAT(eps=eps, **kwargs)
    if name == "double-backprop":
        return DoubleBackprop(**kwargs)
    if name == "trades":
        return TRADES(eps=eps, **kwargs)
    if name == "jarn":
        return JARN(JARNConfig(eps=eps, **kwargs))
    if name == "jarn-at1":
        return JARN(JARNConfig(eps=eps, adversarial="fgsm", **kwargs))
    raise ValueError(f"method must be one of {METHOD_NAMES}, got {name!r}")
