"""Backdoor scan from input gradients ("Poison as a Cure", thesis Algorithms 4 and 3).

Given labelled images and a model trained on them, say whether the data is backdoored,
name the target and the base class and list the poisoned samples, without knowing the
trigger, the poison ratio or the classes, and without clean validation data.

The thesis's Algorithm 4 (find target and base) needs the filtered set that Algorithm 3
(filter) makes, and Algorithm 3 needs the base class: circular as printed. The scan runs:

1. **One streamed pass** over the data: each sample's input gradient of the cross-entropy
   with its own label, L2-normalised (scaled first, so tiny float32 gradients do not
   underflow to a zero norm), routed by label into a centred per-class
   decomposition (the thesis's text centres; its listings do not). The N x d gradient
   matrix is never held: the rows mode (the default for d <= 4,096) appends each class's
   rows to its own float16 file and keeps only per-class sums and ids, then finds each
   class's top vector by block Krylov passes over its file (a re-read of the rows, not a
   second gradient pass); gram mode (a :class:`~safedl_ext.linalg.StreamingSVD`) keeps C
   d x d matrices updated per row and one row file for the projections; sketch mode
   (large d) keeps k numbers per row.
2. **Per class**: the top right singular vector, each sample's projection on it, a batched
   2-component :func:`~safedl_ext.linalg.gmm1d` fit, and the 2-Wasserstein distance W2
   between the two Gaussians.
3. **Target**: each class's score is its W2 over the mean W2 of the other classes (the
   thesis's ratio); the largest score names the target when it exceeds ``threshold``
   (the thesis gives no value) among the classes whose smaller GMM cluster holds at most
   ``max_share`` of the class (poison is a minority: a clean class that splits into two
   halves is not a backdoor, however far apart its halves are). Both were calibrated on
   clean and poisoned models (``docs/poison-scan.md``).
4. **First filter**: the flagged class's smaller GMM cluster.
5. **Base**, on the first filter's most confident samples, two ways, both reported:
   *gradient* (thesis §5.4.3.2): the input gradients for every label (one forward pass,
   one VJP per label), a top vector per label (not centred: the thesis reads the mean
   projection), and the label whose projections have the largest |mean|; *masked*: the
   pixels that hold half the energy of the poison signal (the flagged class's top vector)
   are set to each image's mean colour, and the base is the label the model gives most
   often to the samples that no longer get the target (the trigger removed, the base
   class's content speaks). ``base_rule="masked"`` (the default) uses the masked vote
   when at least 10% of the samples leave the target, else the gradient rule; on CIFAR-10
   at this machine's scale it named 6 of 7 bases right, the gradient rule 3
   (docs/poison-scan.md).
6. **Final filter**: the flagged class's gradients with the *base* label, their top
   ``final_vectors`` singular vectors (centred), a GMM on each vector's projections, and
   the vector with the largest W2 among those whose smaller cluster holds at most
   ``max_share`` of the class (the top vector when none does); its smaller cluster is the
   suspicious set (thesis Table 5.1: base-class labels filter far better than the target
   class's own). The thesis takes the top vector (``final_vectors=1``); on CIFAR-10 at this
   machine's scale the poison of a blend sat in the 2nd or 3rd vector of the base-label
   gradients (docs/poison-scan.md), which the default of 3 finds.

The decisions are functions of tensors (:func:`class_scores`, :func:`pick_target`,
:func:`smaller_cluster`, :func:`pick_base`); :func:`scan` moves data, checkpoints and
shows progress around them.

Checkpoints and resume: with ``out`` given, the scan keeps its state in ``out/.scan/``:
the per-class state and the row store every ``checkpoint_rows`` samples (written at most
every ``checkpoint_seconds``), and each later step's results when it ends. A scan killed
at any point and run again with the same folder, data, model and settings continues from
its last checkpoint and writes the same report (timings aside): the state is folded at
the same sample counts either way, so the sums are the same sums. Other data, another
model or other settings in the same folder are refused. The store is deleted when the
scan ends.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._checks import check_finite_logits
from ..attacks import attack_mode
from ..gradients import input_gradients
from ..linalg import StreamingSVD, gmm1d
from ..linalg.gmm import STATUS_FITTED
from ..report import load_torch_safe, save_torch_atomic, tensor_digest
from ._rows import MAX_CLASSES as MAX_ROW_CLASSES
from ._rows import ClassRows, top_vectors
from ._store import RowStore
from .data import ScanData

__all__ = [
    "DEFAULT_THRESHOLD",
    "ClassScore",
    "ScanConfig",
    "ScanResult",
    "class_scores",
    "filter_metrics",
    "pick_base",
    "pick_target",
    "scan",
    "smaller_cluster",
    "unit_rows",
]

#: Score (a class's W2 over the mean W2 of the others) above which the top class is
#: flagged. Calibrated on clean and poisoned MNIST models (docs/poison-scan.md).
DEFAULT_THRESHOLD = 1.35
#: The largest share of its class that a flagged class's smaller GMM cluster may hold.
DEFAULT_MAX_SHARE = 0.35
SCHEMA_VERSION = 1
_STATE_VERSION = 3
_BASE_IN_MEMORY_BYTES = 256 * 2**20
#: The final filter holds its rows in memory up to this size (a 2,000-image CIFAR-10
#: class: 24.6 MB); larger classes are streamed through the main pass's machinery, so the
#: scan's peak memory does not grow with the class size.
_FINAL_IN_MEMORY_BYTES = 32 * 2**20
#: unit_rows divides by the plain L2 norm when every row's norm exceeds this.
_SAFE_NORM = 1e-10
#: Block Krylov stop of the exact modes' per-class top vectors: residual <= tol * the top
#: eigenvalue. On 20,000 CIFAR-10 gradients 1e-4 took 41 iterations for the 10 classes
#: against 52 at 1e-6, and the top vectors agreed to |cos| 1 - 6e-8 (float32 rounding).
_KRYLOV_TOL = 1e-4


@dataclass(frozen=True)
class ScanConfig:
    """Settings of :func:`scan` (all but ``device`` and ``progress`` are part of the
    checkpoint's identity: a resume must use the same ones).

    Attributes:
        batch_size: samples per forward/backward pass (memory only; results do not depend
            on it beyond float rounding, and a resume must keep it).
        threshold: flag the top class when its score exceeds this.
        max_share: ... and when its smaller GMM cluster holds at most this share of the
            class (poison is a minority of its class; clean classes that split in two
            halves are not flagged, however far apart the halves are).
        device: where the model runs and the per-class state lives.
        mode: ``"rows"`` (exact: a row file per class on disk, Krylov passes over it at
            the end; at most 256 classes), ``"gram"`` (exact, C d^2 floats updated per
            row, one row file), ``"sketch"`` (bounded memory, approximate projections) or
            ``"auto"`` (rows when d <= ``gram_max_dim`` and C <= 256, else gram when d <=
            ``gram_max_dim``, else sketch).
        gram_max_dim: the largest d that ``"auto"`` keeps exact.
        sketch_dim: k of sketch mode.
        store_dtype: ``"float16"`` or ``"float32"``, the on-disk rows of the exact modes.
        checkpoint_rows: the per-class state is folded every this many samples (rounded
            to whole batches) and may be checkpointed there.
        checkpoint_seconds: write a checkpoint at a fold point once this long has passed
            since the last one.
        gmm_init, gmm_max_iter, gmm_tol: :func:`~safedl_ext.linalg.gmm1d` settings.
        base_samples: the base step (every label's gradients) runs on at most this many
            samples of the first filter, those the GMM puts in the smaller cluster with
            the highest posterior; 0 takes them all. The base is an argmax of label means,
            which a few hundred of the most confident samples settle.
        base_rule: ``"masked"`` or ``"gradient"`` (the thesis's), see step 5 above.
        base_compare: with ``base_rule="masked"``, also run the gradient rule when the
            masked vote decides (its base and per-label scores go into the report; it
            costs K - 1 input-gradient VJPs per base sample). Without it the gradient rule
            runs only when the masked vote cannot decide.
        final_vectors: how many of the top singular vectors of the base-label gradients
            the final filter considers (the one with the largest W2 whose smaller cluster
            is a minority is used); 1 is the thesis's top vector.
        seed: the eigensolver's start and the sketch.
    """

    batch_size: int = 128
    threshold: float = DEFAULT_THRESHOLD
    max_share: float = DEFAULT_MAX_SHARE
    device: str = "cpu"
    mode: Literal["auto", "rows", "gram", "sketch"] = "auto"
    gram_max_dim: int = 4096
    sketch_dim: int = 2048
    store_dtype: Literal["float16", "float32"] = "float16"
    checkpoint_rows: int = 8192
    checkpoint_seconds: float = 30.0
    wrt: Literal["loss", "logit", "prob"] = "loss"
    gmm_init: str = "kmeans++"
    gmm_max_iter: int = 100
    gmm_tol: float = 1e-3
    base_samples: int = 256
    base_rule: Literal["masked", "gradient"] = "masked"
    base_compare: bool = False
    final_vectors: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "gram_max_dim", "sketch_dim", "checkpoint_rows",
                     "gmm_max_iter", "final_vectors"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("seed", "base_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if isinstance(self.max_share, bool) or not isinstance(self.max_share, (int, float)) \
                or not 0 < self.max_share <= 0.5:
            raise ValueError(f"max_share must be in (0, 0.5], got {self.max_share!r}")
        for name in ("threshold", "checkpoint_seconds", "gmm_tol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.mode not in ("auto", "rows", "gram", "sketch"):
            raise ValueError(f"mode must be 'auto', 'rows', 'gram' or 'sketch', got "
                             f"{self.mode!r}")
        if self.store_dtype not in ("float16", "float32"):
            raise ValueError(f"store_dtype must be 'float16' or 'float32', got "
                             f"{self.store_dtype!r}")
        if self.wrt not in ("loss", "logit", "prob"):
            raise ValueError(f"wrt must be 'loss', 'logit' or 'prob', got {self.wrt!r}")
        if not isinstance(self.base_compare, bool):
            raise ValueError(f"base_compare must be a bool, got {self.base_compare!r}")
        if self.base_rule not in ("masked", "gradient"):
            raise ValueError(f"base_rule must be 'masked' or 'gradient', got {self.base_rule!r}")
        if self.gmm_init not in ("quantile", "kmeans++"):
            raise ValueError(f"gmm_init must be 'quantile' or 'kmeans++', got {self.gmm_init!r}")

    def identity(self) -> dict[str, Any]:
        """The settings a resume must share."""
        d = asdict(self)
        d.pop("device")
        d.pop("checkpoint_seconds")
        return d


@dataclass(frozen=True)
class ClassScore:
    """One class of a scan.

    Attributes:
        label: the class.
        count: its samples.
        wasserstein: W2 between its two GMM components (units of the projections of unit
            gradients); 0 when degenerate.
        score: W2 over the mean W2 of the other non-degenerate classes; ``None`` when
            degenerate (inf when the others are all 0).
        degenerate: fewer than 2 samples, or all projections equal: not fitted, not scored.
        weights, means, variances: the two GMM components.
        smaller: samples in the smaller cluster.
        zero_gradients: samples whose input gradient is exactly zero (a saturated softmax).
    """

    label: int
    count: int
    wasserstein: float
    score: float | None
    degenerate: bool
    weights: tuple[float, float]
    means: tuple[float, float]
    variances: tuple[float, float]
    smaller: int
    zero_gradients: int


@dataclass
class ScanResult:
    """What a scan found (``to_dict`` is ``report.json``; ``figures`` feeds the PNGs).

    Attributes:
        method: ``"gradient"``, ``"ac"`` or ``"ss"``.
        poisoned: whether a class was flagged.
        target_class, base_class: the flagged class and its base (``None`` when not found).
        suspicious_indices: sorted indices into the data as given.
        threshold: the decision threshold used.
        classes: per-class scores.
        n, num_classes: samples scanned, the model's outputs.
        details: method-specific results (first filter, base scores, final GMM, ...).
        timings: seconds per step.
        figures: tensors for the figures (not written to JSON).
    """

    method: str
    poisoned: bool
    target_class: int | None
    base_class: int | None
    suspicious_indices: list[int]
    threshold: float
    classes: list[ClassScore]
    n: int
    num_classes: int
    details: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        import platform

        from .. import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "method": self.method,
            "poisoned": self.poisoned,
            "target_class": self.target_class,
            "base_class": self.base_class,
            "suspicious_indices": list(self.suspicious_indices),
            "threshold": self.threshold,
            "classes": [asdict(c) for c in self.classes],
            "n": self.n,
            "num_classes": self.num_classes,
            "details": self.details,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "versions": {"safedl_ext": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
        }


# ------------------------------------------------------------------ decisions (tensors)


def unit_rows(g: Tensor) -> tuple[Tensor, Tensor]:
    """Rows scaled to unit L2 norm, robustly: each row is divided by its largest |entry|
    first, so a float32 row of entries ~1e-25 (whose squares underflow) still gets norm 1.

    Args:
        g: (B, d) float rows.

    Returns:
        (unit rows (B, d), (B,) bool mask of rows that were exactly zero and stay zero).
        A row with a NaN or an infinite entry comes back all NaN (its largest |entry| is
        NaN or inf), so one column tells which rows were not finite.
    """
    norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)
    lo, hi = torch.aminmax(norm)
    if float(lo) > _SAFE_NORM and float(hi) < float("inf"):  # NaN fails both tests
        # every row's norm is far from underflow: squares below the smallest normal float
        # add under 1e-14 of the squared norm; no overflow (the norm is finite)
        return g / norm, torch.zeros(g.shape[0], dtype=torch.bool, device=g.device)
    amax = g.abs().amax(dim=1, keepdim=True)  # NaN and inf propagate
    zero = amax.squeeze(1) == 0
    # only exact zeros are replaced: a NaN or inf divisor turns the whole row NaN
    scaled = g / torch.where(amax == 0, torch.ones_like(amax), amax)
    norm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    return scaled.div_(torch.where(norm == 0, torch.ones_like(norm), norm)), zero


def class_scores(w2: Tensor, valid: Tensor) -> Tensor:
    """Each class's W2 over the mean W2 of the other valid classes.

    Args:
        w2: (C,) distances.
        valid: (C,) bool, classes that were fitted (others get NaN and are not averaged).

    Returns:
        (C,) float64 scores; NaN where not valid; inf where the others' mean is 0 and the
        class's W2 is not; NaN where there are no other valid classes.
    """
    w = w2.to(torch.float64)
    v = valid.to(torch.bool)
    total, count = (w * v).sum(), v.sum()
    others = (count - v.to(torch.int64)).to(torch.float64)
    mean_others = torch.where(others > 0, (total - w * v) / others.clamp_min(1),
                              torch.full_like(w, float("nan")))
    ratio = torch.where(mean_others > 0, w / mean_others.clamp_min(1e-300),
                        torch.where(w > 0, torch.full_like(w, float("inf")),
                                    torch.full_like(w, float("nan"))))
    ratio = torch.where(mean_others.isnan(), torch.full_like(w, float("nan")), ratio)
    return torch.where(v, ratio, torch.full_like(w, float("nan")))


def pick_target(scores: Tensor, threshold: float, eligible: Tensor | None = None
                ) -> int | None:
    """The class with the largest score when it exceeds ``threshold``, else ``None``.

    Args:
        scores: (C,) per-class scores (NaN: not scored).
        threshold: the score to exceed.
        eligible: (C,) bool, the classes that may be flagged (default all), e.g. those
            whose smaller cluster is a minority of the class.
    """
    finite = torch.nan_to_num(scores, nan=-math.inf)
    if eligible is not None:
        finite = torch.where(eligible.to(torch.bool), finite, torch.full_like(finite, -math.inf))
    if not bool((finite > -math.inf).any()):
        return None
    c = int(torch.argmax(finite))
    return c if float(finite[c]) > threshold else None


def smaller_cluster(assignments: Tensor) -> Tensor:
    """(L,) bool: the points of the component with fewer points (ties: component 1).

    Args:
        assignments: (L,) component of each point, 0 or 1 (-1 entries are ignored).
    """
    n0 = int((assignments == 0).sum())
    n1 = int((assignments == 1).sum())
    return assignments == (0 if n0 < n1 else 1)


def pick_base(mean_projections: Tensor, target: int) -> int:
    """The label whose projections have the largest |mean|, the target excluded.

    Args:
        mean_projections: (K,) mean projection per label (NaN where not computed).
        target: the flagged class.
    """
    m = mean_projections.abs().to(torch.float64).clone()
    m[target] = -1.0
    m = torch.nan_to_num(m, nan=-1.0)
    return int(torch.argmax(m))


def pick_final_vector(w2: Tensor, assignments: Tensor, max_share: float
                      ) -> tuple[int, Tensor]:
    """The final filter's vector: the largest W2 among the candidate vectors whose smaller
    GMM cluster holds at most ``max_share`` of the points; the first (top) vector when
    none does.

    Args:
        w2: (r,) W2 of the GMM fitted to each vector's projections.
        assignments: (r, L) component of each point under each vector's GMM.
        max_share: as :class:`ScanConfig`.

    Returns:
        (index of the chosen vector, (r,) float64 smaller-cluster shares).
    """
    shares = torch.tensor([float(smaller_cluster(a).sum()) / max(1, int((a >= 0).sum()))
                           for a in assignments], dtype=torch.float64)
    w = torch.nan_to_num(w2.to(torch.float64), nan=-math.inf)
    w = torch.where(shares <= max_share, w, torch.full_like(w, -math.inf))
    if not bool((w > -math.inf).any()):
        return 0, shares
    return int(torch.argmax(w)), shares


def signal_mask(signal: Tensor, shape: tuple[int, int, int], energy: float = 0.5) -> Tensor:
    """The fewest pixels that hold ``energy`` of a signal's squared norm (channels summed):
    where a trigger sits, read off the poison signal.

    Args:
        signal: (C * H * W,) the flagged class's top singular vector.
        shape: (C, H, W).
        energy: the share of the squared norm to cover, in (0, 1].

    Returns:
        (H, W) bool mask.
    """
    c, h, w = shape
    e = signal.to(torch.float64).reshape(c, h * w).square().sum(dim=0)
    order = torch.argsort(e, descending=True, stable=True)
    cum = torch.cumsum(e[order], 0) / e.sum().clamp_min(torch.finfo(torch.float64).tiny)
    count = min(h * w, int((cum < energy).sum()) + 1)
    mask = torch.zeros(h * w, dtype=torch.bool)
    mask[order[:count]] = True
    return mask.reshape(h, w)


def masked_vote(predictions: Tensor, target: int, num_classes: int, min_left: float = 0.1
                ) -> dict[str, Any]:
    """The masked base rule: the label most often predicted among the samples that left
    the target once the signal's pixels were masked (ties: the smaller label).

    Args:
        predictions: (n,) the model's labels for the masked samples.
        target: the flagged class.
        num_classes: K.
        min_left: the share of samples that must leave the target for a vote.

    Returns:
        ``{"base": label or None (too few left), "left": share that left, "votes": (K,)
        counts}``.
    """
    left = predictions != target
    votes = torch.bincount(predictions[left].to(torch.int64), minlength=num_classes)
    share = float(left.to(torch.float64).mean()) if predictions.numel() else 0.0
    base = int(torch.argmax(votes)) if share >= min_left and int(votes.sum()) else None
    return {"base": base, "left": share, "votes": votes.tolist()}


def filter_metrics(suspicious: Tensor | list[int], poisoned: Tensor | list[int],
                   target_indices: Tensor | list[int]) -> dict[str, float]:
    """Specificity and sensitivity of a filter over the target class's samples (the
    thesis's Spec./Sens.): the share of clean samples left out, of poisoned ones caught.

    Args:
        suspicious: indices the filter flagged.
        poisoned: ground-truth poisoned indices.
        target_indices: every index labelled with the target class.

    Returns:
        ``{"specificity", "sensitivity", "flagged", "poisoned", "clean"}`` (shares in [0, 1];
        NaN when there is nothing to measure).
    """
    s = {int(i) for i in torch.as_tensor(suspicious).tolist()}
    p = {int(i) for i in torch.as_tensor(poisoned).tolist()}
    t = {int(i) for i in torch.as_tensor(target_indices).tolist()}
    clean = t - p
    spec = len(clean - s) / len(clean) if clean else float("nan")
    sens = len(p & s) / len(p) if p else float("nan")
    return {"specificity": spec, "sensitivity": sens, "flagged": len(s),
            "poisoned": len(p), "clean": len(clean)}


# ------------------------------------------------------------------ the flow


def _num_classes(model: Callable[[Tensor], Tensor], data: ScanData, device: torch.device,
                 batch_size: int) -> int:
    xb = data.images(slice(0, min(len(data), batch_size)), device)
    try:
        with torch.no_grad():
            logits = model(xb)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        # AssertionError: a torch.export program's shape guard ("Guard failed: ...")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"the model rejects the data's images of shape "
                         f"{tuple(xb.shape[1:])}: {first[:300]}") from None
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != xb.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model must return (N, K) logits, got {got} for "
                         f"{xb.shape[0]} images")
    k = int(logits.shape[1])
    if k < 2:
        raise ValueError(f"the model has {k} output; a scan needs at least 2 classes")
    top = int(data.y.max())
    if top >= k:
        bad = int(torch.nonzero(data.y >= k)[0])
        raise ValueError(f"labels out of range: sample {bad} has label {int(data.y[bad])}, but "
                         f"the model has {k} outputs (labels 0..{k - 1})")
    return k


def _model_digest(model: Callable[[Tensor], Tensor]) -> str:
    if isinstance(model, nn.Module) or callable(getattr(model, "state_dict", None)):
        sd = model.state_dict()  # type: ignore[attr-defined]
        parts = [f"{k}:{tensor_digest(v)}" for k, v in sd.items()]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return type(model).__qualname__


def _gradients(model: Callable[[Tensor], Tensor], xb: Tensor, labels: Tensor | str,
               yb: Tensor | None, ids: Tensor, wrt: str = "loss") -> tuple[Tensor, Tensor]:
    """(B, d) unit gradients (or (B, K, d) for labels="all") and (B,) zero-row mask."""
    if isinstance(labels, str):
        g, logits = input_gradients(model, xb, yb, labels="all", wrt=wrt,  # type: ignore[arg-type]
                                    return_logits=True)
    else:
        g, logits = input_gradients(model, xb, labels=labels, wrt=wrt,  # type: ignore[arg-type]
                                    return_logits=True)
    check_finite_logits(logits, ids, what="the data")
    b = xb.shape[0]
    flat = g.reshape(b * (g.shape[1] if isinstance(labels, str) else 1), -1)
    u, zero = unit_rows(flat)
    bad = ~torch.isfinite(u[:, 0])  # a non-finite gradient row is all NaN in u
    if bool(bad.any()):
        rows = sorted({int(ids[int(r) // (flat.shape[0] // b)])
                       for r in torch.nonzero(bad).flatten()[:10]})
        raise ValueError(f"the model's input gradients are not finite for samples {rows} "
                         "(check the model's weights and inputs)")
    if isinstance(labels, str):
        return u.reshape(b, g.shape[1], -1), zero.reshape(b, -1).all(dim=1)
    return u, zero


def _fit(values: list[Tensor], config: ScanConfig) -> Any:
    """A batched 2-component GMM over the given groups of 1-D values."""
    lengths = torch.tensor([v.numel() for v in values], dtype=torch.int64)
    width = max(1, int(lengths.max()) if len(values) else 1)
    padded = torch.zeros((len(values), width), dtype=torch.float64)
    for i, v in enumerate(values):
        padded[i, :v.numel()] = v.to(torch.float64)
    return gmm1d(padded, lengths, init=config.gmm_init, max_iter=config.gmm_max_iter,
                 tol=config.gmm_tol)


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, total: int, desc: str, initial: int = 0) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, initial=initial, disable=not self.enabled,
                    unit="img", leave=False, dynamic_ncols=True)


class _Work:
    """The scan's folder ``out/.scan``: the state file and the row stores (or a temporary
    folder when there is no ``out``)."""

    def __init__(self, out: Path | None, identity: dict[str, Any]) -> None:
        import tempfile

        self._tmp = None
        if out is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="safedl-scan-")
            self.dir = Path(self._tmp.name)
        else:
            self.dir = out / ".scan"
            self.dir.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.state_path = self.dir / "state.pt"
        self.persist = out is not None
        self.state: dict[str, Any] = {}
        if self.persist and self.state_path.exists():
            state = load_torch_safe(self.state_path, what="scan checkpoint")
            if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
                raise ValueError(f"{self.state_path} is not a scan checkpoint of this version; "
                                 "delete the folder (or use another --out) to scan afresh")
            was = json.loads(state["identity"])
            if was != identity:
                diff = sorted(k for k in set(was) | set(identity) if was.get(k) != identity.get(k))
                raise ValueError(f"{out} holds a scan of other {', '.join(diff)}; use another "
                                 f"output folder or delete {self.dir} to scan afresh")
            self.state = state

    def save(self, **parts: Any) -> None:
        self.state.update(parts)
        if self.persist:
            save_torch_atomic(self.state_path, {**self.state, "version": _STATE_VERSION,
                                                "identity": json.dumps(self.identity)})

    def path(self, name: str) -> Path:
        return self.dir / name

    def close(self) -> None:
        for p in self.dir.glob("*.rows"):
            p.unlink()
        if self._tmp is not None:
            self._tmp.cleanup()
        elif not self.state_path.exists() and not any(self.dir.iterdir()):
            self.dir.rmdir()  # a scan that failed before its first checkpoint leaves nothing


def _ranges(n: int, b: int, start: int = 0) -> Iterator[tuple[int, int]]:
    for s in range(start, n, b):
        yield s, min(n, s + b)


class _Streamed:
    """One streamed per-class decomposition (update -> fold points -> finalize ->
    projections), checkpointable at fold points. Used for the main pass and for the two
    smaller passes over the flagged class."""

    def __init__(self, name: str, work: _Work, num_classes: int, dim: int, center: bool,
                 config: ScanConfig, device: torch.device, total: int, rank: int = 1) -> None:
        self.name, self.work, self.config = name, work, config
        small_d = dim <= config.gram_max_dim
        rows_mode = config.mode == "rows" or (config.mode == "auto" and small_d
                                              and num_classes <= MAX_ROW_CLASSES)
        gram = not rows_mode and (config.mode == "gram" or (config.mode == "auto" and small_d))
        if gram and num_classes * dim * dim * 4 > 16 * 2**30:
            gram = False  # too many classes for C d^2 floats
        self.mode = "rows" if rows_mode else "gram" if gram else "sketch"
        saved = work.state.get(f"{name}:stream")
        self.svd: StreamingSVD | None = None
        self.rows: ClassRows | None = None
        self.store = None
        if rows_mode:
            self.rows = ClassRows(work.dir, name, num_classes, dim, center, rank,
                                  config.store_dtype,
                                  saved["rows"] if saved is not None else None)
        else:
            self.svd = StreamingSVD(num_classes, dim, mode=self.mode, center=center,
                                    rank=rank, sketch_dim=config.sketch_dim,
                                    seed=config.seed, device=device)
            rows = 0
            if saved is not None:
                self.svd.load_state_dict(saved["svd"])
                rows = int(saved["rows"])
            if self.mode == "gram":
                self.store = RowStore(work.path(f"{name}.rows"), dim, config.store_dtype,
                                      rows)
        self.done = int(saved["done"]) if saved is not None else 0
        # Each row's label and sample id, in arrival order, in tensors allocated once for
        # the whole stream: small per-batch tensors kept alive between each batch's large
        # temporaries would pin heap pages, and the heap would grow with N (measured).
        n_ids = 0 if rows_mode else total
        self.labels = torch.zeros(n_ids, dtype=torch.int64)
        self.ids = torch.zeros(n_ids, dtype=torch.int64)
        self.filled = 0
        if saved is not None and not rows_mode:
            self.filled = int(saved["filled"])
            self.labels[:self.filled] = saved["labels"]
            self.ids[:self.filled] = saved["ids"]
        self.zero = saved["zero"] if saved is not None else torch.zeros(num_classes,
                                                                        dtype=torch.int64)
        self._last_save = time.monotonic()

    def add(self, rows: Tensor, labels: Tensor, ids: Tensor, zero: Tensor) -> None:
        self.zero.index_add_(0, labels.cpu(), zero.cpu().to(torch.int64))
        if self.rows is not None:
            self.rows.add(rows, labels, ids)
            return
        assert self.svd is not None
        self.svd.update(rows, labels, ids)
        if self.store is not None:
            self.store.append(rows)
        n = labels.shape[0]
        self.labels[self.filled:self.filled + n] = labels.cpu()
        self.ids[self.filled:self.filled + n] = ids.cpu()
        self.filled += n

    def fold(self, done: int, last: bool) -> None:
        """A fold point: the state's buffers are flushed (the same sums whether or not a
        checkpoint is written here); checkpointed when due."""
        state = self.svd.state_dict() if self.svd is not None else None
        self.done = done
        due = time.monotonic() - self._last_save >= self.config.checkpoint_seconds
        if self.work.persist and (due or last):
            if self.rows is not None:
                self.rows.sync()
                part = {"rows": self.rows.state(), "done": done, "zero": self.zero}
            else:
                if self.store is not None:
                    self.store.sync()
                part = {"svd": state, "done": done,
                        "rows": self.store.rows if self.store is not None else 0,
                        "filled": self.filled, "labels": self.labels[:self.filled].clone(),
                        "ids": self.ids[:self.filled].clone(), "zero": self.zero}
            self.work.save(**{f"{self.name}:stream": part})
            self._last_save = time.monotonic()

    def finish(self) -> dict[int, Any]:
        """Finalize and project; ``{class: ClassSVD}``."""
        if self.rows is not None:
            res = self.rows.finish(self.config.seed, tol=_KRYLOV_TOL)
            self.rows.close(delete=True)
            return res
        assert self.svd is not None
        self.svd.finalize()
        if self.store is not None:
            labels, ids = self.labels[:self.filled], self.ids[:self.filled]
            chunk = max(1, (64 * 2**20) // (4 * self.svd.dim))
            for start, rows in self.store.chunks(chunk):
                stop = start + rows.shape[0]
                self.svd.project(rows, labels[start:stop], ids[start:stop])
            self.store.close(delete=True)
        return self.svd.results()

    def drop(self) -> None:
        self.work.state.pop(f"{self.name}:stream", None)


def _stream(stream: _Streamed, total: int, batch: int, step: Callable[[int, int], None],
            progress: _Progress, desc: str) -> None:
    """Run ``step(start, stop)`` over [stream.done, total) in batches, folding every
    ``checkpoint_rows`` samples (whole batches) and at the end."""
    every = max(1, stream.config.checkpoint_rows // batch) * batch
    with progress(total, desc, initial=stream.done) as bar:
        for s, e in _ranges(total, batch, stream.done):
            step(s, e)
            bar.update(e - s)
            if e % every == 0 or e == total:
                stream.fold(e, e == total)


def scan(
    model: Callable[[Tensor], Tensor],
    data: ScanData,
    *,
    out: str | Path | None = None,
    config: ScanConfig | None = None,
    progress: bool = True,
) -> ScanResult:
    """Scan labelled images for a backdoor with the model trained on them (module
    docstring: the steps, checkpoints and resume).

    Args:
        model: maps float (B, C, H, W) images in [0, 1] to (B, K) logits; an ``nn.Module``
            runs in eval mode with its parameters frozen (both restored afterwards).
        data: the images and labels (:class:`~safedl_ext.poison.data.ScanData`).
        out: a folder for checkpoints (``out/.scan``); ``None``: no checkpoints.
        config: :class:`ScanConfig`.
        progress: tqdm progress bars.

    Returns:
        :class:`ScanResult`; ``suspicious_indices`` index ``data`` as given.

    Raises:
        ValueError: empty data, labels outside the model's outputs, images the model
            rejects, NaN logits or non-finite gradients (naming the first samples), a
            checkpoint of another scan in ``out``.
    """
    config = config or ScanConfig()
    if not isinstance(data, ScanData):
        raise TypeError(f"data must be a ScanData, got {type(data).__name__}")
    n = len(data)
    if n == 0:
        raise ValueError("data is empty: nothing to scan")
    device = torch.device(config.device)
    bar = _Progress(progress)
    with attack_mode(model):
        k = _num_classes(model, data, device, config.batch_size)
        # the checkpoint's identity (the data's and model's digests: two passes over the
        # images) only where there is a checkpoint to check it against
        identity = {} if out is None else {
            "method": "gradient", "config": config.identity(), "data": data.digest(),
            "model": _model_digest(model), "n": n, "num_classes": k}
        work = _Work(Path(out) if out is not None else None, identity)
        try:
            return _scan(model, data, work, k, config, device, bar)
        finally:
            work.close()


def _scan(model: Callable[[Tensor], Tensor], data: ScanData, work: _Work, k: int,
          config: ScanConfig, device: torch.device, bar: _Progress) -> ScanResult:
    n, d, b = len(data), data.dim, config.batch_size
    y = data.y
    timings: dict[str, float] = dict(work.state.get("timings", {}))

    # 1-2: own-label gradients of every sample -> per-class top vector, projections, GMM
    if "classes" not in work.state:
        t0 = time.perf_counter()
        main = _Streamed("main", work, k, d, True, config, device, n)

        def step(s: int, e: int) -> None:
            ids = torch.arange(s, e)
            yb = y[s:e].to(device)
            g, zero = _gradients(model, data.images(slice(s, e), device), yb, yb, ids,
                                 config.wrt)
            main.add(g, yb, ids, zero)

        _stream(main, n, b, step, bar, "scan: input gradients")
        timings["gradients"] = timings.get("gradients", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        res = main.finish()
        counts = torch.bincount(y, minlength=k)
        groups, ids_by = [], []
        for c in range(k):
            r = res.get(c)
            if r is None or r.projections is None:
                groups.append(torch.zeros(0))
                ids_by.append(torch.zeros(0, dtype=torch.int64))
            else:
                groups.append(r.projections[:, 0].cpu())
                ids_by.append(r.sample_ids.cpu())
        fit = _fit(groups, config)
        vectors = {c: r.vectors[0].cpu() for c, r in res.items() if r.vectors is not None}
        timings["decompose"] = time.perf_counter() - t0
        main.drop()
        work.save(classes={"counts": counts, "groups": groups, "ids": ids_by,
                           "fit": _fit_dict(fit), "zero": main.zero, "vectors": vectors,
                           "mode": main.mode}, timings=timings)
    cls = work.state["classes"]
    fit = cls["fit"]
    valid = (fit["status"] == STATUS_FITTED) & (cls["counts"] >= 2)
    w2 = torch.where(valid, fit["w2"], torch.zeros_like(fit["w2"]))
    scores = class_scores(w2, valid)
    smaller = torch.zeros(k, dtype=torch.int64)
    for c in range(k):
        if bool(valid[c]):
            smaller[c] = smaller_cluster(fit["assignments"][c, :int(cls["counts"][c])]).sum()
    share = smaller.to(torch.float64) / cls["counts"].clamp_min(1).to(torch.float64)
    target = pick_target(scores, config.threshold, eligible=share <= config.max_share)
    classes = []
    for c in range(k):
        classes.append(ClassScore(
            label=c, count=int(cls["counts"][c]), wasserstein=float(w2[c]),
            score=None if not bool(valid[c]) else float(scores[c]),
            degenerate=not bool(valid[c]),
            weights=tuple(float(v) for v in fit["weights"][c]),  # type: ignore[arg-type]
            means=tuple(float(v) for v in fit["means"][c]),  # type: ignore[arg-type]
            variances=tuple(float(v) for v in fit["variances"][c]),  # type: ignore[arg-type]
            smaller=int(smaller[c]),
            zero_gradients=int(cls["zero"][c])))
    details: dict[str, Any] = {"mode": cls["mode"], "store_dtype": config.store_dtype}
    figures: dict[str, Any] = {"scores": scores}
    result = ScanResult("gradient", target is not None, target, None, [], config.threshold,
                        classes, n, k, details, timings, figures)
    if target is None:
        return result

    # 4: first filter
    t_len = int(cls["counts"][target])
    assign_t = fit["assignments"][target, :t_len]
    small = smaller_cluster(assign_t)
    first = cls["ids"][target][small]
    details["first_filter"] = {"size": int(first.numel()),
                               "indices": sorted(int(i) for i in first)}
    figures["target_projections"] = cls["groups"][target]
    figures["target_gmm"] = {key: fit[key][target] for key in ("weights", "means", "variances")}
    figures["signal"] = cls["vectors"].get(target)

    # 5: base class from every label's gradients on the first filter
    if "base" not in work.state:
        t0 = time.perf_counter()
        means = torch.full((k,), float("nan"), dtype=torch.float64)
        sub = _base_subset(first, assign_t, small, fit["responsibilities"][target, :t_len],
                           config.base_samples)
        masked = None
        if sub.numel() and target in cls["vectors"]:
            mask = signal_mask(cls["vectors"][target], data.shape)
            preds = _masked_predictions(model, data, sub, mask, config, device)
            masked = {"pixels": int(mask.sum()), **masked_vote(preds, target, k)}
        decided = config.base_rule == "masked" and masked is not None \
            and masked["base"] is not None
        need_gradient = not decided or config.base_compare
        if need_gradient and sub.numel() and sub.numel() * (k - 1) * d * 8 <= \
                _BASE_IN_MEMORY_BYTES:
            means = _base_means_in_memory(model, data, sub, target, k, config, device, bar)
        elif need_gradient and sub.numel():
            base_stream = _Streamed("base", work, k, d, False, config, device,
                                    sub.numel() * (k - 1))
            keep = torch.arange(k) != target

            def base_step(s: int, e: int) -> None:
                idx = sub[s:e]
                g, _ = _gradients(model, data.images(idx, device), "all", None, idx, config.wrt)
                rows = g[:, keep.to(device)].reshape(-1, d)
                labels = torch.arange(k)[keep].repeat(idx.numel()).to(device)
                ids = idx.repeat_interleave(int(keep.sum()))
                base_stream.add(rows, labels, ids, torch.zeros_like(labels))

            _stream(base_stream, sub.numel(), max(1, b // 2), base_step, bar,
                    "scan: base class")
            res_b = base_stream.finish()
            for c, r in res_b.items():
                if r.projections is not None and r.projections.numel():
                    means[c] = r.projections[:, 0].to(torch.float64).mean()
            base_stream.drop()
        grad_base = pick_base(means, target) if need_gradient and first.numel() else None
        base = masked["base"] if decided else grad_base  # type: ignore[index]
        timings["base"] = time.perf_counter() - t0
        work.save(base={"base": base, "means": means, "samples": int(sub.numel()),
                        "gradient": grad_base, "masked": masked,
                        "gradient_computed": need_gradient}, timings=timings)
    base = work.state["base"]["base"]
    means = work.state["base"]["means"]
    result.base_class = base
    details["base_samples"] = work.state["base"]["samples"]
    details["base_rule"] = config.base_rule
    details["base_gradient"] = work.state["base"]["gradient"]
    details["base_masked"] = work.state["base"]["masked"]
    if work.state["base"]["gradient_computed"]:
        details["base_scores"] = {str(c): (None if math.isnan(float(m)) else abs(float(m)))
                                  for c, m in enumerate(means)}

    # 6: final filter with the base class as the cross-entropy label
    if base is None:
        result.suspicious_indices = details["first_filter"]["indices"]
        details["final_filter"] = {"label": None, "note": "first filter was empty"}
        return result
    if "final" not in work.state:
        t0 = time.perf_counter()
        tidx = torch.nonzero(y == target).flatten()
        rank = min(config.final_vectors, int(tidx.numel()), d)
        if tidx.numel() * d * 4 <= _FINAL_IN_MEMORY_BYTES:
            final_ids, projs = _final_in_memory(model, data, tidx, base, rank, config, device,
                                                bar)
        else:
            fin = _Streamed("final", work, 1, d, True, config, device, int(tidx.numel()),
                            rank=rank)

            def final_step(s: int, e: int) -> None:
                idx = tidx[s:e]
                lab = torch.full((idx.numel(),), base, dtype=torch.int64, device=device)
                g, zero = _gradients(model, data.images(idx, device), lab, None, idx,
                                     config.wrt)
                fin.add(g, torch.zeros(idx.numel(), dtype=torch.int64, device=device), idx,
                        zero)

            _stream(fin, tidx.numel(), b, final_step, bar, "scan: final filter")
            r = fin.finish()[0]
            final_ids, projs = r.sample_ids.cpu(), r.projections.cpu()
            fin.drop()
        m = int(projs.shape[0])
        ffit = _fit([projs[:, j] for j in range(projs.shape[1])], config)
        j, shares = pick_final_vector(ffit.wasserstein2(), ffit.assignments[:, :m],
                                      config.max_share)
        a = ffit.assignments[j, :m]
        sel = smaller_cluster(a)
        post = ffit.responsibilities[j, :m]
        small_comp = int(a[sel][0]) if bool(sel.any()) else 1
        timings["final"] = time.perf_counter() - t0
        work.save(final={"ids": final_ids, "proj": projs[:, j].clone(), "suspicious":
                         final_ids[sel], "posterior": post[:, small_comp],
                         "fit": _fit_dict(ffit), "vector": j, "shares": shares},
                  timings=timings)
    f = work.state["final"]
    result.suspicious_indices = sorted(int(i) for i in f["suspicious"])
    ff, j = f["fit"], int(f["vector"])
    details["final_filter"] = {
        "label": base, "size": len(result.suspicious_indices), "vector": j + 1,
        "weights": [float(v) for v in ff["weights"][j]],
        "means": [float(v) for v in ff["means"][j]],
        "variances": [float(v) for v in ff["variances"][j]],
        "wasserstein": float(ff["w2"][j]),
        "candidates": [{"vector": i + 1, "wasserstein": float(ff["w2"][i]),
                        "smaller_share": float(f["shares"][i])}
                       for i in range(int(ff["w2"].numel()))]}
    order = torch.argsort(f["posterior"], descending=True)
    figures["most_suspicious"] = f["ids"][order[:16]].tolist()
    figures["final_projections"] = f["proj"]
    figures["final_gmm"] = {key: ff[key][j] for key in ("weights", "means", "variances")}
    result.timings = timings
    return result


def _base_subset(first: Tensor, assign: Tensor, small: Tensor, resp: Tensor, cap: int
                 ) -> Tensor:
    """The first filter's ``cap`` samples with the highest posterior of the smaller
    cluster (all when ``cap`` is 0 or larger), sorted by index."""
    if cap == 0 or first.numel() <= cap:
        return first.sort().values
    comp = int(assign[small][0])
    conf = resp[small, comp].to(torch.float64)
    order = torch.argsort(-conf, stable=True)[:cap]
    return first[order].sort().values


def _base_means_in_memory(model: Callable[[Tensor], Tensor], data: ScanData, sub: Tensor,
                          target: int, k: int, config: ScanConfig, device: torch.device,
                          bar: _Progress) -> Tensor:
    """Mean projection on the uncentred top right singular vector of each label's unit
    gradients over ``sub`` (n, capped), from the n x n Gram matrices: for M = U S V^T,
    M v_1 = s_1 u_1, so the mean projection is s_1 * mean(u_1) (its sign is arbitrary,
    as the vector's; the base step takes |mean|)."""
    keep = torch.arange(k) != target
    parts = []
    b = max(1, config.batch_size // 2)
    with bar(sub.numel(), "scan: base class") as pbar:
        for s in range(0, sub.numel(), b):
            idx = sub[s:s + b]
            g, _ = _gradients(model, data.images(idx, device), "all", None, idx, config.wrt)
            parts.append(g[:, keep.to(device)].transpose(0, 1).to(torch.float64))
            pbar.update(idx.numel())
    m = torch.cat(parts, dim=1)  # (k - 1, n, d)
    evals, evecs = torch.linalg.eigh(m @ m.transpose(1, 2))
    top = evals[:, -1].clamp_min(0.0).sqrt() * evecs[:, :, -1].mean(dim=1)
    means = torch.full((k,), float("nan"), dtype=torch.float64)
    means[keep] = top.cpu()
    return means


def _masked_predictions(model: Callable[[Tensor], Tensor], data: ScanData, sub: Tensor,
                        mask: Tensor, config: ScanConfig, device: torch.device) -> Tensor:
    """(n,) the model's labels for ``sub``'s images with ``mask``'s pixels set to each
    image's mean colour."""
    m = mask.to(device=device, dtype=torch.float32)[None, None]
    out = []
    with torch.no_grad():
        for s in range(0, sub.numel(), config.batch_size):
            x = data.images(sub[s:s + config.batch_size], device)
            fill = x.mean(dim=(2, 3), keepdim=True)
            logits = model(x * (1 - m) + fill * m)
            out.append(torch.as_tensor(logits).argmax(dim=1).cpu())
    return torch.cat(out)


def _final_in_memory(model: Callable[[Tensor], Tensor], data: ScanData, tidx: Tensor,
                     base: int, rank: int, config: ScanConfig, device: torch.device,
                     bar: _Progress) -> tuple[Tensor, Tensor]:
    """The final filter's rows held in memory (float32, n x d within 32 MiB): the target
    class's unit gradients with the base label, centred, their top ``rank`` right singular
    vectors by block Krylov on the rows (no d x d Gram matrix, no row store), and the
    (n, rank) projections, in the order of ``tidx``."""
    n, d = int(tidx.numel()), data.dim
    rows = torch.empty((n, d), dtype=torch.float32, device=device)
    with bar(n, "scan: final filter") as pbar:
        for s in range(0, n, config.batch_size):
            idx = tidx[s:s + config.batch_size]
            lab = torch.full((idx.numel(),), base, dtype=torch.int64, device=device)
            g, _ = _gradients(model, data.images(idx, device), lab, None, idx, config.wrt)
            rows[s:s + idx.numel()] = g
            pbar.update(idx.numel())
    total = torch.zeros(d, dtype=torch.float64, device=device)
    for s in range(0, n, 1024):  # the mean in float64 without a float64 copy of the rows
        total += rows[s:s + 1024].sum(dim=0, dtype=torch.float64)
    rows -= (total / n).to(torch.float32)
    gen = torch.Generator().manual_seed(config.seed)
    _, v, _, _ = top_vectors(lambda b: rows.T @ (rows @ b), d, rank, gen, device,
                             tol=_KRYLOV_TOL, dtype=torch.float32)
    return tidx.clone(), (rows @ v.T).cpu()


def _fit_dict(fit: Any) -> dict[str, Tensor]:
    return {"weights": fit.weights.cpu(), "means": fit.means.cpu(),
            "variances": fit.variances.cpu(), "assignments": fit.assignments.cpu(),
            "responsibilities": fit.responsibilities.cpu(), "status": fit.status.cpu(),
            "w2": fit.wasserstein2().cpu()}
