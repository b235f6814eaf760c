"""Backdoors: poisoning attacks to scan against (:mod:`.attacks`).

The input-gradient scan ("Poison as a Cure", thesis Algorithms 3-4), its baselines and the
neutralization are the next milestones; this package holds what they are tested against.
"""

from __future__ import annotations

from .attacks import (
    PoisonedData,
    Trigger,
    attack_success_rate,
    blend_trigger,
    dot_trigger,
    image_pattern,
    noise_pattern,
    patch_trigger,
    poison_dataset,
    triggered_test_set,
)

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
