"""safedl_ext: fast, dependable PyTorch tools from *Defences and Threats in Safe Deep
Learning* (A. Chan, 2021) — attacks and robustness evaluation, JARN, IGAM, backdoor scans
and CARA — with native CPU/CUDA kernels behind the PyTorch dispatcher.

Submodules: :mod:`safedl_ext.ops` (native ops and their references),
:mod:`safedl_ext.attacks` (FGSM/PGD, evaluation tables), :mod:`safedl_ext.models`,
:mod:`safedl_ext.data`, :mod:`safedl_ext.report`.
"""

from __future__ import annotations

from . import ops
from .attacks import FGSM, PGD, AttackResult, evaluate, fgsm, pgd, transfer_evaluate

__version__ = "0.1.0"

__all__ = [
    "FGSM",
    "PGD",
    "AttackResult",
    "__version__",
    "evaluate",
    "fgsm",
    "ops",
    "pgd",
    "transfer_evaluate",
]
