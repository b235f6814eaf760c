"""Activation-space baselines of the scan, streamed on the same per-class machinery:
Activation Clustering (Chen et al. 2018) and Spectral Signatures (Tran et al. 2018).

Both read the model's penultimate-layer activations (the input of its last linear layer,
:func:`penultimate`), one streamed pass, routed by label into a centred per-class
:class:`~safedl_ext.linalg.StreamingSVD`; the rows go to a float32 store on disk for the
projections. Neither holds all activations in memory (IBM ART's implementations do).

- **Activation Clustering** (:func:`activation_clustering`): per class, the activations'
  top 10 principal components (PCA, as ART's ``reduce="PCA"``), 2-means on them
  (:func:`two_means`, a deterministic start), and the smaller cluster. ``analysis=
  "relative-size"`` (default) flags a class's smaller cluster only when it holds less
  than ``size_threshold`` (0.35, ART's default) of the class; ``"smaller"`` flags every
  class's smaller cluster (ART's default, which flags a third or more of clean data). The
  flagged class with the smallest share is reported as the target.
- **Spectral Signatures** (:func:`spectral_signatures`): per class, the centred
  activations' top singular vector, each sample's squared centred projection as its
  score, and the top ``1.5 x expected_fraction`` of the class flagged (Tran et al.'s rule).
  It flags that share of *every* class and does not decide whether the data is poisoned:
  ``poisoned`` is true whenever it flags anything, ``target_class`` is null. Its
  per-class ``score`` is the activations' variance along the top vector (sigma_1^2 / n).

Differences from ART 1.20 (checked on the same activations in ``tests/poison``): ART's SS
default (``expected_pp_poison=0.33``) flags 49.5% of every class, and it scores the
*uncentred* activations' projections (the vector comes from centred ones), so a class
whose mean lies along the vector gets another ranking; ART's AC clusters with randomly
started k-means (``KMeans()`` without a seed), so its flagged set changes from run to run
where two starts disagree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._checks import check_finite_logits
from ..attacks import attack_mode
from ..linalg import StreamingSVD
from ._store import RowStore
from .data import ScanData
from .scan import ClassScore, ScanConfig, ScanResult, _num_classes, _Progress, _ranges

__all__ = ["activation_clustering", "penultimate", "spectral_signatures", "two_means"]


class _Features:
    """Callable x -> (logits, features) for an nn.Module: a forward pre-hook on its last
    ``nn.Linear`` catches that layer's input."""

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        self.model, self.layer = model, layer

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        caught: list[Tensor] = []
        handle = self.layer.register_forward_pre_hook(lambda _m, a: caught.append(a[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return logits, caught[-1].flatten(1)


class _GraphFeatures:
    """The same for a ``torch.export`` graph: the graph copied with the last linear
    call's input added to its outputs."""

    def __init__(self, gm: Any) -> None:
        import torch.fx as fx

        # a node-by-node copy (Graph.graph_copy), not copy.deepcopy: deep-copying the
        # graph's pytree specs trips torch's LeafSpec deprecation warning
        graph = fx.Graph(owning_module=gm)
        env: dict[Any, Any] = {}
        logits = graph.graph_copy(gm.graph, env)  # the output node's value
        linears = [n for n in graph.nodes if n.op == "call_function" and n.target in (
            torch.ops.aten.linear.default, torch.ops.aten.addmm.default)]
        if not linears:
            raise ValueError("the exported model has no linear layer: Activation Clustering "
                             "and Spectral Signatures need penultimate activations")
        last = linears[-1]
        feat = last.args[1] if last.target == torch.ops.aten.addmm.default else last.args[0]
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        graph.output((logits, feat))
        codegen = gm.graph._codegen
        if isinstance(codegen, fx.graph._PyTreeCodeGen):  # outputs now two leaves, not one
            from torch.utils import _pytree

            graph._codegen = fx.graph._PyTreeCodeGen(codegen.pytree_info._replace(
                out_spec=_pytree.tree_structure((0, 0))))
        graph.lint()
        self.gm = fx.GraphModule(gm, graph)

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, feat = self.gm(x)
        return logits, feat.flatten(1)


def penultimate(model: Callable[[Tensor], Tensor]) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """A callable ``x -> (logits (B, K), features (B, D))``: the features are the input of
    the model's last linear layer (an ``nn.Linear`` module, or for a ``torch.export``
    graph the last ``aten.linear``/``aten.addmm`` call).

    Raises:
        ValueError: the model has no linear layer.
    """
    gm = getattr(model, "graph_module", None)
    if gm is not None:
        return _GraphFeatures(gm)
    if isinstance(model, nn.Module):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{type(model).__name__} has no nn.Linear layer: Activation "
                             "Clustering and Spectral Signatures need penultimate activations")
        return _Features(model, linears[-1])
    raise TypeError("penultimate activations need an nn.Module or an exported model, got "
                    f"{type(model).__name__}")


def two_means(points: Tensor, max_iter: int = 300) -> Tensor:
    """2-means (Lloyd) on (L, q) points, from a deterministic start: the point farthest
    from the mean, and the point farthest from that one.

    Returns:
        (L,) int64 cluster of each point, 0 or 1 (all 0 for fewer than 2 distinct points).
    """
    n = points.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=torch.int64)
    p = points.to(torch.float64)
    a = p[torch.argmax(((p - p.mean(0)) ** 2).sum(1))]
    b = p[torch.argmax(((p - a) ** 2).sum(1))]
    centres = torch.stack([a, b])
    assign = torch.zeros(n, dtype=torch.int64)
    for it in range(max_iter):
        new = torch.argmin(torch.cdist(p, centres), dim=1)
        if it and bool((new == assign).all()):
            break
        assign = new
        for j in range(2):
            sel = assign == j
            if bool(sel.any()):
                centres[j] = p[sel].mean(0)
    return assign


def _activations_pass(model: Callable[[Tensor], Tensor], data: ScanData, rank: int,
                      config: ScanConfig, work_dir: Any, bar: _Progress
                      ) -> tuple[int, dict[int, Any]]:
    """Stream the penultimate activations into a centred per-class SVD of ``rank`` and a
    store; return (K, {class: ClassSVD with projections})."""
    device = torch.device(config.device)
    n, b = len(data), config.batch_size
    k = _num_classes(model, data, device, b)
    feats = penultimate(model)
    svd = store = None
    labels = []
    with torch.no_grad(), bar(n, "scan: activations") as pbar:
        for s, e in _ranges(n, b):
            logits, f = feats(data.images(slice(s, e), device))
            ids = torch.arange(s, e)
            check_finite_logits(logits, ids, what="the data")
            if not bool(torch.isfinite(f).all()):
                raise ValueError(f"the model's penultimate activations are not finite for "
                                 f"samples in [{s}, {e})")
            if svd is None:
                dim = f.shape[1]
                svd = StreamingSVD(k, dim, mode="gram" if dim <= config.gram_max_dim else
                                   "sketch", center=True, rank=min(rank, dim),
                                   seed=config.seed, device=device)
                store = RowStore(work_dir / "activations.rows", dim, "float32")
            yb = data.y[s:e]
            svd.update(f, yb.to(device), ids)
            if svd.mode == "gram":
                store.append(f)
            labels.append(yb)
            pbar.update(e - s)
    assert svd is not None and store is not None
    svd.finalize()
    if svd.mode == "gram":
        y = torch.cat(labels)
        for start, rows in store.chunks(max(1, (64 * 2**20) // (4 * store.dim))):
            stop = start + rows.shape[0]
            svd.project(rows, y[start:stop], torch.arange(start, stop))
    store.close(delete=True)
    return k, svd.results()


def _per_class(res: dict[int, Any], y: Tensor, k: int) -> Any:
    """(class, count, its ClassSVD or None when degenerate: < 2 samples, no projections)."""
    counts = torch.bincount(y, minlength=k).tolist()
    for c in range(k):
        r = res.get(c)
        ok = r is not None and r.projections is not None and counts[c] >= 2
        yield c, counts[c], r if ok else None


def _degenerate(label: int, count: int) -> ClassScore:
    return ClassScore(label, count, 0.0, None, True, (1.0, 0.0), (0.0, 0.0), (0.0, 0.0), 0, 0)


def activation_clustering(
    model: Callable[[Tensor], Tensor], data: ScanData, *, config: ScanConfig | None = None,
    dims: int = 10, analysis: Literal["relative-size", "smaller"] = "relative-size",
    size_threshold: float = 0.35, progress: bool = True,
) -> ScanResult:
    """Activation Clustering (Chen et al. 2018), streamed (module docstring).

    Args:
        model, data, config, progress: as :func:`~safedl_ext.poison.scan.scan` (``config``
            gives batch size, device, seed and ``gram_max_dim``).
        dims: principal components per class (10 in the paper and in ART).
        analysis: ``"relative-size"`` or ``"smaller"``.
        size_threshold: the share below which a smaller cluster is poison.

    Returns:
        :class:`~safedl_ext.poison.scan.ScanResult` with ``method="ac"``; each class's
        ``score`` is its smaller cluster's share (``wasserstein`` is 0).
    """
    import tempfile
    from pathlib import Path

    config = config or ScanConfig()
    if analysis not in ("relative-size", "smaller"):
        raise ValueError(f"analysis must be 'relative-size' or 'smaller', got {analysis!r}")
    if not 0 < size_threshold < 1:
        raise ValueError(f"size_threshold must be in (0, 1), got {size_threshold}")
    if len(data) == 0:
        raise ValueError("data is empty: nothing to scan")
    t0 = time.perf_counter()
    bar = _Progress(progress)
    with attack_mode(model), tempfile.TemporaryDirectory(prefix="safedl-ac-") as tmp:
        k, res = _activations_pass(model, data, dims, config, Path(tmp), bar)
    t1 = time.perf_counter()
    classes, suspicious, shares = [], [], {}
    for c, count, r in _per_class(res, data.y, k):
        if r is None:
            classes.append(_degenerate(c, count))
            continue
        assign = two_means(r.projections)
        n1 = int(assign.sum())
        small = 1 if n1 <= count - n1 else 0
        size = n1 if small == 1 else count - n1
        share = size / count
        shares[c] = share
        flagged = analysis == "smaller" or share < size_threshold
        if flagged and size:
            suspicious.extend(r.sample_ids[assign == small].tolist())
        classes.append(ClassScore(c, count, 0.0, share, False, (1 - share, share),
                                  (0.0, 0.0), (0.0, 0.0), size, 0))
    flagged_classes = sorted(c for c, s in shares.items()
                             if analysis == "smaller" or s < size_threshold)
    target = min(flagged_classes, key=lambda c: shares[c]) if flagged_classes else None
    return ScanResult("ac", bool(suspicious), target, None, sorted(suspicious),
                      size_threshold, classes, len(data), k,
                      {"analysis": analysis, "dims": dims, "flagged_classes": flagged_classes},
                      {"activations": t1 - t0, "cluster": time.perf_counter() - t1})


def spectral_signatures(
    model: Callable[[Tensor], Tensor], data: ScanData, *, config: ScanConfig | None = None,
    expected_fraction: float = 0.1, multiplier: float = 1.5, progress: bool = True,
) -> ScanResult:
    """Spectral Signatures (Tran et al. 2018), streamed (module docstring).

    Args:
        model, data, config, progress: as :func:`~safedl_ext.poison.scan.scan`.
        expected_fraction: the poison share expected in a class (epsilon).
        multiplier: flag the top ``multiplier * expected_fraction`` of every class (1.5).

    Returns:
        :class:`~safedl_ext.poison.scan.ScanResult` with ``method="ss"``;
        ``details["scores"]`` maps each sample index to its squared centred projection.
    """
    import tempfile
    from pathlib import Path

    config = config or ScanConfig()
    if not 0 < expected_fraction < 1 or not math.isfinite(multiplier) or multiplier <= 0:
        raise ValueError(f"expected_fraction must be in (0, 1) and multiplier > 0, got "
                         f"{expected_fraction}, {multiplier}")
    if len(data) == 0:
        raise ValueError("data is empty: nothing to scan")
    t0 = time.perf_counter()
    bar = _Progress(progress)
    with attack_mode(model), tempfile.TemporaryDirectory(prefix="safedl-ss-") as tmp:
        k, res = _activations_pass(model, data, 1, config, Path(tmp), bar)
    t1 = time.perf_counter()
    share = min(1.0, multiplier * expected_fraction)
    classes, suspicious = [], []
    for c, count, r in _per_class(res, data.y, k):
        if r is None:
            classes.append(_degenerate(c, count))
            continue
        score = r.projections[:, 0].to(torch.float64) ** 2
        m = math.floor(share * count)
        if m:
            top = torch.argsort(score, descending=True, stable=True)[:m]
            suspicious.extend(r.sample_ids[top].tolist())
        var = float(r.singular_values[0]) ** 2 / count
        classes.append(ClassScore(c, count, 0.0, var, False, (1.0, 0.0), (0.0, 0.0),
                                  (0.0, 0.0), m, 0))
    return ScanResult("ss", bool(suspicious), None, None, sorted(suspicious), share, classes,
                      len(data), k, {"expected_fraction": expected_fraction,
                                     "multiplier": multiplier},
                      {"activations": t1 - t0, "score": time.perf_counter() - t1})
