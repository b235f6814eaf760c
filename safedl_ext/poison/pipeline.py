"""Scan, then neutralize, in one call (thesis Algorithm 6 after training): resumable as a
whole.

:func:`scan_and_neutralize` writes ``out/scan`` (the scan's checkpoints and report, see
:func:`~safedl_ext.poison.scan.scan`) and, when the scan finds a backdoor,
``out/neutralize`` (the retraining's checkpoints, the neutralized model as ``model.pt2``
and ``model.pt``, its report), then ``out/pipeline.json``. Rerun with the same ``out`` after
an interruption: a finished scan is read back from its checkpoint, a retraining resumes
from its last one, and the same report comes out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..report import write_json_atomic
from .data import ScanData
from .neutralize import (
    NeutralizeConfig,
    NeutralizeResult,
    neutralize,
    save_neutralized,
    write_neutralize_report,
)
from .report import write_report
from .scan import ScanConfig, ScanResult, scan

__all__ = ["PipelineResult", "scan_and_neutralize"]


@dataclass
class PipelineResult:
    """The scan's result and, when it found a backdoor, the neutralization's (else
    ``None``); ``files``: what was written."""

    scan: ScanResult
    neutralized: NeutralizeResult | None
    files: dict[str, str]
    seconds: float


def scan_and_neutralize(model: Any, data: ScanData, out: str | Path, *,
                        scan_config: ScanConfig | None = None,
                        config: NeutralizeConfig | None = None,
                        test: tuple[Tensor, Tensor] | None = None,
                        triggered: tuple[Tensor, Tensor] | None = None,
                        progress: bool = True, extra: dict[str, Any] | None = None
                        ) -> PipelineResult:
    """Scan ``data`` with ``model``; if a backdoor is found, neutralize the model.

    Args:
        model: the model trained on ``data`` (an ``nn.Module`` or an exported program).
        data: the training data.
        out: the folder (``scan/``, ``neutralize/``, ``pipeline.json``).
        scan_config, config: the two steps' settings.
        test, triggered: clean and triggered test sets (see :func:`neutralize`).
        progress: progress bars.
        extra: more keys for both reports (e.g. the model's and data's paths).

    Returns:
        :class:`PipelineResult`.
    """
    t0 = time.perf_counter()
    out = Path(out)
    extra = dict(extra or {})
    found = scan(model, data, out=out / "scan", config=scan_config, progress=progress)
    write_report(found, data, out / "scan", extra=extra)
    files = {"scan_report": str(out / "scan" / "report.json")}
    neutralized = None
    if found.poisoned and found.target_class is not None and found.suspicious_indices:
        neutralized = neutralize(model, data, found, config=config, out=out / "neutralize",
                                 test=test, triggered=triggered, progress=progress)
        files.update(save_neutralized(neutralized, out / "neutralize",
                                      data.images(slice(0, min(2, len(data))))))
        write_neutralize_report(neutralized, out / "neutralize",
                                extra={**extra, "files": dict(files)})
        files["neutralize_report"] = str(out / "neutralize" / "report.json")
    seconds = time.perf_counter() - t0
    write_json_atomic(out / "pipeline.json", {
        "poisoned": found.poisoned, "target_class": found.target_class,
        "base_class": found.base_class, "suspicious": len(found.suspicious_indices),
        "before": neutralized.before if neutralized else None,
        "after": neutralized.after if neutralized else None, "files": files,
        "seconds": round(seconds, 2)})
    return PipelineResult(found, neutralized, files, seconds)
