"""A scan's report: ``report.json`` (schema below), ``report.md`` and PNG figures, every
file written atomically through :func:`safedl_ext.report.write_atomic`.

``report.json`` keys (schema_version 1; more may follow): ``schema_version``, ``method``,
``poisoned`` (bool), ``target_class`` and ``base_class`` (int or null),
``suspicious_indices`` (sorted ints, indices into the data as given), ``threshold``,
``classes`` (per class: ``label``, ``count``, ``wasserstein``, ``score`` and the GMM's
parameters), ``n``, ``num_classes``, ``details`` (method-specific), ``timings`` (seconds)
and ``versions``; the command line adds ``data`` and ``model``.

Figures: ``scores.png`` (per-class scores against the threshold), ``projections.png`` (the
flagged class's projections with the two fitted Gaussians), ``signal.png`` (the flagged
class's top singular vector, the extracted poison signal, as an image) and
``suspicious.png`` (the most suspicious samples).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..report import markdown_table, write_atomic, write_json_atomic, write_text_atomic
from .data import ScanData
from .scan import ScanResult

__all__ = ["write_report"]


def _savefig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def _figures(result: ScanResult, data: ScanData, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [c.label for c in result.classes]
    scores = [c.score if c.score is not None and math.isfinite(c.score) else 0.0
              for c in result.classes]
    colours = ["tab:red" if c.label == result.target_class else "tab:blue"
               for c in result.classes]
    ax.bar(labels, scores, color=colours)
    if result.method == "gradient":
        ax.axhline(result.threshold, color="k", linestyle="--", linewidth=1,
                   label=f"threshold {result.threshold:g}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("class")
    ax.set_ylabel({"gradient": "W2 / mean W2 of others", "ac": "smaller cluster share",
                   "ss": "variance along the top vector"}.get(result.method, "score"))
    ax.set_xticks(labels)
    ax.set_title(f"{result.method} scan: per-class scores")
    _savefig(fig, out / "scores.png")
    written.append("scores.png")

    proj = result.figures.get("target_projections")
    gmm = result.figures.get("target_gmm")
    if proj is not None and gmm is not None and proj.numel():
        fig, ax = plt.subplots(figsize=(6, 3))
        p = proj.double()
        ax.hist(p.numpy(), bins=min(80, max(10, p.numel() // 10)), density=True,
                color="0.7", label="projections")
        xs = torch.linspace(float(p.min()), float(p.max()), 400, dtype=torch.float64)
        for j in range(2):
            w, m, v = (float(gmm[k][j]) for k in ("weights", "means", "variances"))
            pdf = w * torch.exp(-(xs - m) ** 2 / (2 * v)) / math.sqrt(2 * math.pi * v)
            ax.plot(xs.numpy(), pdf.numpy(), label=f"w={w:.2f} mean={m:.3g}")
        ax.set_xlabel(f"projection on class {result.target_class}'s top singular vector")
        ax.legend(fontsize=8)
        ax.set_title(f"class {result.target_class}: own-label gradients")
        _savefig(fig, out / "projections.png")
        written.append("projections.png")

    signal = result.figures.get("signal")
    if signal is not None:
        c, h, w = data.shape
        v = signal.reshape(c, h, w).float()
        v = v / v.abs().max().clamp_min(1e-12)
        fig, ax = plt.subplots(figsize=(3, 3))
        if c == 1:
            ax.imshow(v[0].numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        else:
            ax.imshow(((v.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
        ax.set_axis_off()
        ax.set_title("top singular vector", fontsize=9)
        _savefig(fig, out / "signal.png")
        written.append("signal.png")

    top = result.figures.get("most_suspicious")
    if top:
        k = len(top)
        cols = min(8, k)
        rows = (k + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows), squeeze=False)
        imgs = data.images(torch.tensor(top))
        for i, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if i < k:
                im = imgs[i]
                ax.imshow(im[0].numpy() if im.shape[0] == 1 else im.permute(1, 2, 0).numpy(),
                          cmap="gray" if im.shape[0] == 1 else None, vmin=0, vmax=1)
                ax.set_title(str(top[i]), fontsize=7)
        fig.suptitle("most suspicious samples (index)", fontsize=9)
        _savefig(fig, out / "suspicious.png")
        written.append("suspicious.png")
    return written


def _markdown(report: dict[str, Any], figures: list[str]) -> str:
    lines = [f"# Backdoor scan ({report['method']})", ""]
    if report["poisoned"]:
        lines.append(f"**Backdoor found**: target class {report['target_class']}, base class "
                     f"{report['base_class']}, {len(report['suspicious_indices'])} suspicious "
                     "samples.")
    else:
        lines.append("**No class stands out**: nothing flagged.")
    data = report.get("data", {})
    lines += ["", f"{report['n']} samples, {report['num_classes']} classes"
              + (f", from `{data.get('source')}`" if data.get("source") else "") + "."]
    if report["method"] == "gradient":
        lines.append(f"Threshold on the score (W2 / mean W2 of the other classes): "
                     f"{report['threshold']:g}.")
    lines += ["", markdown_table(
        ["class", "count", "W2" if report["method"] == "gradient" else "statistic", "score",
         "smaller cluster"],
        [[c["label"], c["count"], f"{c['wasserstein']:.4g}",
          "degenerate" if c["score"] is None else f"{c['score']:.3f}", c["smaller"]]
         for c in report["classes"]]), ""]
    det = report.get("details", {})
    if "base_scores" in det:
        lines += ["Base class: |mean projection| per label on the first filter "
                  f"({det['first_filter']['size']} samples):", "",
                  markdown_table(["label", "|mean|"],
                                 [[k, "—" if v is None else f"{v:.4f}"]
                                  for k, v in det["base_scores"].items()]), ""]
    mk = det.get("base_masked")
    if mk is not None:
        lines += [f"Base class, masked rule: with the signal's {mk['pixels']} strongest pixels "
                  f"masked, {mk['left']:.0%} of those samples leave the target; their votes "
                  f"per label {mk['votes']} name "
                  f"{'no base (too few left)' if mk['base'] is None else mk['base']}. "
                  "Gradient rule: " + (
                      "not run (the masked vote decided; `base_compare=True` runs it)"
                      if det.get("base_gradient") is None else str(det["base_gradient"]))
                  + f". Used: the {det['base_rule']} "
                  "rule" + (" (fallback: gradient)" if det["base_rule"] == "masked"
                            and mk["base"] is None else "") + ".", ""]
    fin = det.get("final_filter", {})
    if fin.get("candidates"):
        lines += [f"Final filter: label {fin['label']}, vector {fin['vector']} of the top "
                  f"{len(fin['candidates'])} (the largest W2 whose smaller cluster is a "
                  "minority), " f"{fin['size']} suspicious samples:", "",
                  markdown_table(["vector", "W2", "smaller cluster share"],
                                 [[c["vector"], f"{c['wasserstein']:.4g}",
                                   f"{c['smaller_share']:.1%}"] for c in fin["candidates"]]),
                  ""]
    if report.get("timings"):
        lines.append("Timings (s): " + ", ".join(f"{k} {v:.2f}"
                                                  for k, v in report["timings"].items()) + ".")
    lines += [""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write_report(result: ScanResult, data: ScanData, out: str | Path,
                 extra: dict[str, Any] | None = None, figures: bool = True) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the figures into ``out``.

    Args:
        result: the scan's result.
        data: the data scanned (for the sample images and the signal's shape).
        out: the folder (created).
        extra: more top-level keys for ``report.json`` (e.g. ``data``, ``model``).
        figures: also draw the PNGs (matplotlib).

    Returns:
        The dict written as ``report.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = result.to_dict()
    report["data"] = {"source": data.source, "shape": list(data.shape), "digest": data.digest()}
    if extra:
        report.update(extra)
    names = _figures(result, data, out) if figures else []
    write_json_atomic(out / "report.json", _plain(report))
    write_text_atomic(out / "report.md", _markdown(report, names))
    return report


def _plain(obj: Any) -> Any:
    """JSON-safe: tensors to lists, NaN to null, infinities to "inf" / "-inf"."""
    if isinstance(obj, Tensor):
        return _plain(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else str(obj)
    return obj
