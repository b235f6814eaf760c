"""Backdoors: poisoning attacks (:mod:`.attacks`), the input-gradient scan ("Poison as a
Cure", thesis Algorithms 4 and 3: :mod:`.scan`), its baselines (:mod:`.baselines`), the
data it reads (:mod:`.data`), its report (:mod:`.report`), neutralization of a backdoored
model (thesis Algorithms 5-6: :mod:`.neutralize`), scan + neutralization in one call
(:mod:`.pipeline`) and the demo (:mod:`.demo`).
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
