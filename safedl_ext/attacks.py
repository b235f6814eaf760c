"""Attack engine: FGSM and PGD (L-inf, L2) on the fused native step, robustness tables.

All attacks work on [0, 1] images (``lo``/``hi`` change the box), take gradients with
respect to the input only (the model's parameters are frozen for the duration and the
model is put in eval mode, then restored), and return an :class:`AttackResult`:
the adversarial examples and, per sample, whether the attack succeeded.

Success is tracked at every step: the first adversarial example found for a sample is
the one returned, so the robust accuracy of ``early_stop=True`` (which stops spending
forward/backward passes on samples already fooled) equals that of the plain loop under
the same seed. Restarts are stacked into one batch of ``restarts * N`` rows.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._checks import NaNLogitsError
from ._checks import check_box as _check_box
from ._checks import check_finite_logits as _check_finite_logits
from ._checks import check_label_range as _check_label_range
from ._checks import check_labels as _check_labels
from ._checks import check_model_input as _check_model_data
from .report import machine_info, markdown_table, write_json_atomic, write_text_atomic

__all__ = [
    "FGSM",
    "PGD",
    "Attack",
    "AttackResult",
    "NaNLogitsError",
    "RobustnessReport",
    "attack_loss",
    "attack_mode",
    "default_attacks",
    "evaluate",
    "fgsm",
    "is_success",
    "pgd",
    "sample_seeds",
    "transfer_evaluate",
]

NormName = Literal["linf", "l2"]
LossName = Literal["ce", "margin", "dlr"]
MemoryFormat = Literal["auto", "channels_last", "preserve"]
_NORMS = ("linf", "l2")
_LOSSES = ("ce", "margin", "dlr")


class AttackResult(NamedTuple):
    """What an attack returns.

    Attributes:
        x_adv: (N, ...) adversarial examples, inside the eps-ball around ``x`` and the box.
            For a sample the attack fooled, the first fooling iterate found; otherwise the
            final iterate of the restart with the highest loss.
        success: (N,) bool. Untargeted: ``x_adv`` is misclassified (a sample already
            misclassified clean counts as a success with ``x_adv == x``). Targeted:
            ``x_adv`` is classified as the target.
    """

    x_adv: Tensor
    success: Tensor


# ----------------------------------------------------------------------------- losses


def _other_max(logits: Tensor, y: Tensor) -> Tensor:
    """max_{j != y} logits[:, j], shape (N,)."""
    masked = logits.scatter(1, y[:, None], float("-inf"))
    return masked.amax(dim=1)


def attack_loss(logits: Tensor, y: Tensor, loss: LossName = "ce", targeted: bool = False) -> Tensor:
    """Per-sample objective the attack ascends, shape (N,).

    Args:
        logits: (N, K) model outputs.
        y: (N,) true labels (untargeted) or target labels (targeted).
        loss: ``"ce"`` cross-entropy; ``"margin"`` the Carlini-Wagner logit margin;
            ``"dlr"`` the difference-of-logits ratio of Croce & Hein (2020), untargeted
            only (needs K >= 3).
        targeted: ascend towards ``y`` instead of away from it.
    """
    z = logits.float()
    if loss == "ce":
        ce = F.cross_entropy(z, y, reduction="none")
        return -ce if targeted else ce
    if loss == "margin":
        z_y = z.gather(1, y[:, None]).squeeze(1)
        other = _other_max(z, y)
        return z_y - other if targeted else other - z_y
    if loss == "dlr":
        if targeted:
            raise ValueError("loss='dlr' is untargeted only; use loss='margin' or 'ce' "
                             "with targeted=True")
        if z.shape[1] < 3:
            raise ValueError(f"loss='dlr' needs at least 3 classes, got {z.shape[1]}")
        top = z.topk(3, dim=1).values
        z_y = z.gather(1, y[:, None]).squeeze(1)
        return -(z_y - _other_max(z, y)) / (top[:, 0] - top[:, 2] + 1e-12)
    raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")


def is_success(logits: Tensor, y: Tensor, targeted: bool = False) -> Tensor:
    """(N,) bool: misclassified (untargeted) or classified as the target (targeted)."""
    pred = logits.argmax(dim=1)
    return pred == y if targeted else pred != y


# ------------------------------------------------------------------------- validation


# ------------------------------------------------------------------------ attack loop


@contextlib.contextmanager
def attack_mode(model: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Eval mode and frozen parameters (``requires_grad=False``) for the duration of the
    ``with`` block, both restored afterwards: what an attack or a scan needs so that input
    gradients do not also build parameter gradients. A non-module callable is left as is."""
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def _first_per_owner(mask: Tensor, owner: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Rows where ``mask`` holds, reduced to the first such row of each owner.

    Returns (owners, rows), both 1-D, one entry per owner that has a masked row.
    """
    rows = mask.nonzero().squeeze(1)
    if rows.numel() == 0:
        return rows, rows
    first = torch.full((n,), mask.numel(), dtype=torch.long, device=mask.device)
    first.scatter_reduce_(0, owner[rows], rows, reduce="amin")
    owners = (first < mask.numel()).nonzero().squeeze(1)
    return owners, first[owners]


def _autocast_ctx(x: Tensor, autocast: torch.dtype | None) -> contextlib.AbstractContextManager:
    if autocast is None:
        return contextlib.nullcontext()
    if x.device.type != "cuda":
        raise ValueError(f"autocast is supported on CUDA only, got x on {x.device}")
    if autocast not in (torch.float16, torch.bfloat16):
        raise ValueError(f"autocast must be torch.float16 or torch.bfloat16, got {autocast}")
    return torch.autocast("cuda", dtype=autocast)


def pgd(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor = 8 / 255,
    alpha: float | Tensor | None = None,
    steps: int = 10,
    norm: NormName = "linf",
    random_start: bool = True,
    restarts: int = 1,
    targeted: bool = False,
    loss: LossName = "ce",
    early_stop: bool = False,
    lo: float = 0.0,
    hi: float = 1.0,
    generator: torch.Generator | None = None,
    autocast: torch.dtype | None = None,
    memory_format: MemoryFormat = "auto",
    start_seeds: Tensor | None = None,
) -> AttackResult:
    """Projected gradient descent (Madry et al. 2018), L-inf or L2, on the fused step.

    Args:
        model: maps (N, ...) inputs in [lo, hi] to (N, K) logits.
        x: (N, ...) clean inputs in [lo, hi].
        y: (N,) int labels: true labels, or target labels when ``targeted``.
        eps: radius of the ball (pixel units; L2 length for ``norm="l2"``), a float or an
            (N,) tensor so several radii share one batch.
        alpha: step size per iteration; default ``eps / 4`` (2/255 at eps = 8/255).
        steps: number of gradient steps (>= 1).
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a uniform random point of the ball (else from ``x``).
        restarts: independent random starts, stacked into one batch of restarts*N rows.
        targeted: move towards the label ``y`` instead of away from it.
        loss: ``"ce"``, ``"margin"`` (Carlini-Wagner) or ``"dlr"`` (untargeted only).
        early_stop: stop spending steps on samples already fooled. Robust accuracy is the
            same as without it; only wall time changes.
        lo, hi: the box of valid inputs.
        generator: source of the random start (a CPU generator reproduces on any device).
        start_seeds: (N,) int64 seeds, one per sample, instead of ``generator``: sample
            i's random start (all its restarts) is drawn from a CPU generator seeded with
            ``start_seeds[i]``, so it does not depend on which batch the sample is in or
            where (see :func:`sample_seeds`).
        autocast: ``torch.float16``/``torch.bfloat16`` to run the model under CUDA autocast.
        memory_format: layout of the iterates the model sees. ``"channels_last"`` (NHWC)
            makes oneDNN convolutions on CPU markedly faster (about 1.7x for a small CNN's
            forward+backward here); ``"auto"`` picks it for 4-D inputs on CPU and keeps the
            input's layout elsewhere; ``"preserve"`` never changes it. ``x_adv`` always comes
            back in ``x``'s layout. Results agree with ``"preserve"`` up to float rounding.

    Returns:
        :class:`AttackResult` with ``x_adv`` (N, ...) and ``success`` (N,) bool.

    Raises:
        NaNLogitsError: the model returned NaN logits for some samples (they would
            otherwise count as fooled).
    """
    _check_model_data(model, x)
    _check_labels(y, x)
    _check_box(x, lo, hi)
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    if loss == "dlr" and targeted:
        raise ValueError("loss='dlr' is untargeted only; use loss='margin' or 'ce' with "
                         "targeted=True")
    fmt = _resolve_memory_format(memory_format, x)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
    eps_t = ops.as_budget(eps, "eps", x)
    alpha_t = eps_t / 4 if alpha is None else ops.as_budget(alpha, "alpha", x, positive=True)
    if start_seeds is not None:
        if generator is not None:
            raise ValueError("give generator or start_seeds, not both")
        if not isinstance(start_seeds, Tensor) or start_seeds.dtype != torch.int64 or \
                start_seeds.shape != (x.shape[0],):
            raise ValueError(f"start_seeds must be an int64 tensor of shape ({x.shape[0]},), "
                             f"got {getattr(start_seeds, 'dtype', type(start_seeds).__name__)}"
                             f" {tuple(getattr(start_seeds, 'shape', ()))}")
    amp = _autocast_ctx(x, autocast)
    n = x.shape[0]
    if n == 0:
        return AttackResult(x.detach().clone(), torch.zeros(0, dtype=torch.bool, device=x.device))
    with attack_mode(model):
        return _pgd_loop(model, x.detach(), y, eps_t, alpha_t, steps, norm, random_start,
                         restarts, targeted, loss, early_stop, lo, hi, generator, amp, fmt,
                         start_seeds)


def _resolve_memory_format(memory_format: str, x: Tensor) -> torch.memory_format | None:
    """The layout to put the iterates in, or None to leave them as they come."""
    if memory_format not in ("auto", "channels_last", "preserve"):
        raise ValueError("memory_format must be 'auto', 'channels_last' or 'preserve', got "
                         f"{memory_format!r}")
    if memory_format == "channels_last" and x.dim() != 4:
        raise ValueError(f"memory_format='channels_last' needs 4-D (N, C, H, W) input, got "
                         f"{x.dim()}-D")
    if memory_format == "channels_last" or (
            memory_format == "auto" and x.dim() == 4 and x.device.type == "cpu"):
        return torch.channels_last
    return None


def _layout(t: Tensor, fmt: torch.memory_format | None) -> Tensor:
    return t if fmt is None else t.contiguous(memory_format=fmt)


def sample_seeds(seed: int, index: Tensor) -> Tensor:
    """(N,) int64 per-sample seeds from one seed and the samples' indices in a data set
    (SplitMix64 of ``seed`` and ``index``): a sample's random start then depends on the
    seed and its index alone, not on the batch it is evaluated in."""
    mask = (1 << 64) - 1
    out = []
    for i in index.tolist():
        z = (int(seed) * 0x9E3779B97F4A7C15 + int(i) + 1) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append((z ^ (z >> 31)) >> 1)  # < 2**63: a valid manual_seed and int64
    return torch.tensor(out, dtype=torch.int64)


def _per_sample_start(x0: Tensor, eps_t: Tensor, norm: str, lo: float, hi: float,
                      seeds: Tensor, restarts: int) -> Tensor:
    """Random starts, restart-major like ``x0.repeat(restarts, ...)``, sample i's noise
    drawn by :func:`ops.random_start` from a CPU generator seeded with ``seeds[i]``. The
    noise is drawn on the CPU (around zero, unclipped), moved to ``x0``'s device in one
    copy, then added and clamped as ``random_start`` does."""
    dt = ops.reference.opmath_dtype(x0.dtype)
    zero = torch.zeros((restarts, *x0.shape[1:]), dtype=dt)
    eps_cpu = eps_t.detach().to("cpu", dt)
    noise = []
    for i, s in enumerate(seeds.tolist()):
        e = eps_cpu[i:i + 1].expand(restarts) if eps_cpu.numel() > 1 else eps_cpu
        noise.append(ops.random_start(zero, e, norm, -math.inf, math.inf,
                                      torch.Generator().manual_seed(s)))
    delta = torch.stack(noise, 1).reshape(restarts * x0.shape[0], *x0.shape[1:])
    x0r = x0.repeat((restarts,) + (1,) * (x0.dim() - 1)) if restarts > 1 else x0
    return (x0r.to(dt) + delta.to(x0.device)).clamp_(lo, hi).to(x0.dtype)


def _pgd_loop(model, x, y, eps_t, alpha_t, steps, norm, random_start, restarts, targeted,
              loss, early_stop, lo, hi, generator, amp, fmt, start_seeds=None) -> AttackResult:
    n, r = x.shape[0], restarts
    rep = (r,) + (1,) * (x.dim() - 1)
    x0 = _layout(x.repeat(rep) if r > 1 else x, fmt)
    ys = y.long().repeat(r)
    owner = torch.arange(n, device=x.device).repeat(r)
    eps_s = eps_t.repeat(r) if eps_t.numel() > 1 else eps_t
    alpha_s = alpha_t.repeat(r) if alpha_t.numel() > 1 else alpha_t
    if random_start and start_seeds is not None:
        xa = _layout(_per_sample_start(x, eps_t, norm, lo, hi, start_seeds, r), fmt)
    elif random_start:
        xa = _layout(ops.random_start(x0, eps_s, norm, lo, hi, generator), fmt)
    else:
        xa = _layout(x0.clone(), fmt)
    best = x.clone()
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    checked_labels = False
    for t in range(steps + 1):
        last = t == steps
        with torch.set_grad_enabled(not last):
            xa.requires_grad_(not last)
            with amp:
                logits = model(xa)
            if not checked_labels:
                _check_label_range(logits, ys)
                checked_labels = True
            _check_finite_logits(logits, owner, "x")
            per = attack_loss(logits, ys, loss, targeted)
            if not last:
                (grad,) = torch.autograd.grad(per.sum(), xa)
            xa = xa.detach()
        with torch.no_grad():
            succ = is_success(logits, ys, targeted) & ~found[owner]
            owners, rows = _first_per_owner(succ, owner, n)
            if owners.numel():
                best[owners] = xa[rows]
                found[owners] = True
            if last:
                # Samples never fooled: the final iterate of the restart with highest loss.
                open_rows = ~found[owner]
                if bool(open_rows.any()):
                    score = torch.where(open_rows, per.detach(), float("-inf"))
                    top = torch.full((n,), float("-inf"), device=x.device)
                    top.scatter_reduce_(0, owner, score, reduce="amax")
                    pick = open_rows & (score >= top[owner])
                    owners, rows = _first_per_owner(pick, owner, n)
                    best[owners] = xa[rows]
                break
            if early_stop:
                keep = ~found[owner]
                if not bool(keep.all()):
                    if not bool(keep.any()):
                        break
                    idx = keep.nonzero().squeeze(1)
                    xa, x0, grad = (_layout(v[idx], fmt) for v in (xa, x0, grad))
                    ys, owner = ys[idx], owner[idx]
                    eps_s = eps_s[idx] if eps_s.numel() > 1 else eps_s
                    alpha_s = alpha_s[idx] if alpha_s.numel() > 1 else alpha_s
            ops.pgd_step_checked_(xa, x0, grad, alpha_s, eps_s, norm, lo, hi)
    return AttackResult(best, found)


def fgsm(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor = 8 / 255,
    norm: NormName = "linf",
    targeted: bool = False,
    loss: LossName = "ce",
    lo: float = 0.0,
    hi: float = 1.0,
    autocast: torch.dtype | None = None,
    memory_format: MemoryFormat = "auto",
) -> AttackResult:
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size ``eps`` from
    ``x`` (for ``norm="l2"``, the fast gradient method: one L2 step of length ``eps``).
    Arguments as in :func:`pgd`."""
    # The step is projected back onto the eps-ball, so where eps = 0 any positive step
    # leaves x unchanged (a zero step would be rejected as a step size).
    if isinstance(eps, Tensor):
        alpha: float | Tensor = torch.where(eps > 0, eps, torch.ones_like(eps))
    else:
        alpha = eps if not (isinstance(eps, (int, float)) and eps == 0) else 1.0
    return pgd(model, x, y, eps=eps, alpha=alpha, steps=1, norm=norm, random_start=False,
               targeted=targeted, loss=loss, lo=lo, hi=hi, autocast=autocast,
               memory_format=memory_format)


# ------------------------------------------------------------------------ class forms


class Attack:
    """An attack bound to a model and its settings; call it with ``(x, y)``."""

    name: str = "attack"

    def __init__(self, model: Callable[[Tensor], Tensor]) -> None:
        self.model = model

    def __call__(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> AttackResult:
        """Attack ``(x, y)``; ``index`` (N,) gives the samples' positions in the whole
        data set (0..N-1 if None), which seeded attacks use to draw each sample's
        randomness, so that results do not depend on the batching."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings()})"

    def settings(self) -> dict[str, Any]:
        """The attack's settings, for reports."""
        return {}


class PGD(Attack):
    """Class form of :func:`pgd`: ``PGD(model, eps=8/255, alpha=2/255, steps=10)(x, y)``.

    ``seed`` (default 0) makes every call reproducible: sample i's random start is drawn
    from a CPU generator seeded with ``sample_seeds(seed, index)[i]``, ``index`` being the
    samples' positions in the data set (``0..N-1`` unless the caller passes them, as
    :func:`evaluate` does), so a sample gets the same start in any batch. ``seed=None``
    uses the global generator.
    """

    name = "PGD"

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        norm: NormName = "linf",
        random_start: bool = True,
        restarts: int = 1,
        targeted: bool = False,
        loss: LossName = "ce",
        early_stop: bool = False,
        lo: float = 0.0,
        hi: float = 1.0,
        seed: int | None = 0,
        autocast: torch.dtype | None = None,
        memory_format: MemoryFormat = "auto",
    ) -> None:
        super().__init__(model)
        self.kwargs: dict[str, Any] = dict(
            eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start,
            restarts=restarts, targeted=targeted, loss=loss, early_stop=early_stop, lo=lo,
            hi=hi, autocast=autocast, memory_format=memory_format)
        self.seed = seed

    def __call__(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> AttackResult:
        seeds = None
        if self.seed is not None:
            if index is None:
                index = torch.arange(x.shape[0] if isinstance(x, Tensor) else 0)
            seeds = sample_seeds(self.seed, index)
        return pgd(self.model, x, y, start_seeds=seeds, **self.kwargs)

    def settings(self) -> dict[str, Any]:
        s = {k: v for k, v in self.kwargs.items() if k != "autocast"}
        s["alpha"] = s["eps"] / 4 if s["alpha"] is None else s["alpha"]
        return {**s, "seed": self.seed}


class FGSM(Attack):
    """Class form of :func:`fgsm`: ``FGSM(model, eps=8/255)(x, y)``."""

    name = "FGSM"

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        eps: float = 8 / 255,
        norm: NormName = "linf",
        targeted: bool = False,
        loss: LossName = "ce",
        lo: float = 0.0,
        hi: float = 1.0,
        autocast: torch.dtype | None = None,
        memory_format: MemoryFormat = "auto",
    ) -> None:
        super().__init__(model)
        self.kwargs: dict[str, Any] = dict(eps=eps, norm=norm, targeted=targeted, loss=loss,
                                           lo=lo, hi=hi, autocast=autocast,
                                           memory_format=memory_format)

    def __call__(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> AttackResult:
        return fgsm(self.model, x, y, **self.kwargs)  # deterministic: index unused

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.kwargs.items() if k != "autocast"}


def default_attacks(
    model: Callable[[Tensor], Tensor],
    eps: float = 8 / 255,
    *,
    pgd_steps: Iterable[int] = (5, 10, 20),
    alpha: float | None = None,
    norm: NormName = "linf",
    early_stop: bool = True,
    seed: int | None = 0,
) -> dict[str, Attack]:
    """The thesis's columns: FGSM and PGD-k for each k in ``pgd_steps`` (step ``eps/4``
    unless ``alpha`` is given, random start), at radius ``eps``."""
    attacks: dict[str, Attack] = {"FGSM": FGSM(model, eps=eps, norm=norm)}
    for k in pgd_steps:
        attacks[f"PGD{k}"] = PGD(model, eps=eps, alpha=alpha, steps=k, norm=norm,
                                 early_stop=early_stop, seed=seed)
    return attacks


# ------------------------------------------------------------------------- evaluation


@dataclass
class RobustnessReport:
    """Accuracy under each attack, as the thesis's tables give it.

    Attributes:
        accuracy: column name -> accuracy in percent (``"Clean"`` first).
        n: number of evaluated samples.
        seconds: column name -> wall seconds spent on it.
        settings: column name -> the attack's settings.
        kind: ``"white-box"`` or ``"transfer"``.
        meta: machine, torch version, backend, eps, ...
    """

    accuracy: dict[str, float]
    n: int
    seconds: dict[str, float]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    kind: str = "white-box"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON-serialisable)."""
        return {"kind": self.kind, "n": self.n, "accuracy": dict(self.accuracy),
                "seconds": dict(self.seconds), "settings": _jsonable(self.settings),
                "meta": _jsonable(self.meta)}

    def to_markdown(self, label: str = "model") -> str:
        """One-row Markdown table: ``| | Clean | FGSM | PGD5 | ... |`` in percent."""
        cols = list(self.accuracy)
        return markdown_table(["", *cols], [[label, *(self.accuracy[c] for c in cols)]])

    def to_json(self, path: str | None = None) -> str:
        """JSON text; also written atomically to ``path`` when given."""
        import json

        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_json_atomic(path, self.to_dict())
        return text

    def save(self, folder: str, stem: str = "robustness") -> None:
        """Write ``<stem>.json`` and ``<stem>.md`` into ``folder`` (atomically)."""
        write_json_atomic(f"{folder}/{stem}.json", self.to_dict())
        write_text_atomic(f"{folder}/{stem}.md", self.to_markdown() + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _batches(data: Any, batch_size: int) -> tuple[Iterable[tuple[Tensor, Tensor]], int | None]:
    """(iterable of (x, y) batches, number of batches if known)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor)
                                                                  for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data: x and y must have the same length, got {x.shape[0]} "
                             f"and {y.shape[0]}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = x.shape[0]
        return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)), \
            math.ceil(n / batch_size)
    if isinstance(data, Iterable):
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            total = None
        return data, total
    raise TypeError("data must be a (x, y) tuple of tensors or an iterable of (x, y) batches "
                    f"such as a DataLoader, got {type(data).__name__}")


def _takes_index(attack: Any) -> bool:
    """Whether ``attack(x, y, index)`` may be called (an :class:`Attack` of this package,
    or any callable with an ``index`` parameter); older ``(x, y)`` callables are not."""
    import inspect

    try:
        params = inspect.signature(attack).parameters
    except (TypeError, ValueError):
        return False
    return "index" in params or any(p.kind == p.VAR_KEYWORD or p.kind == p.VAR_POSITIONAL
                                    for p in params.values())


def _run_table(
    victim: Callable[[Tensor], Tensor],
    data: Any,
    attacks: Mapping[str, Attack | Callable[[Tensor, Tensor], AttackResult]],
    *,
    transfer: bool,
    device: torch.device | str | None,
    batch_size: int,
    progress: bool,
    desc: str,
) -> RobustnessReport:
    from tqdm.auto import tqdm

    batches, total = _batches(data, batch_size)
    correct = {"Clean": 0, **{name: 0 for name in attacks}}
    takes_index = {name: _takes_index(a) for name, a in attacks.items()}
    seconds = dict.fromkeys(correct, 0.0)
    n = 0
    for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError("each batch must be an (x, y) pair")
        xb, yb = batch[0], batch[1]
        if device is not None:
            xb, yb = xb.to(device), yb.to(device)
        _check_model_data(victim, xb)
        _check_labels(yb, xb)
        index = torch.arange(n, n + xb.shape[0])
        t0 = time.perf_counter()
        with attack_mode(victim), torch.no_grad():
            logits = victim(xb)
            _check_finite_logits(logits, index, "data")
            correct["Clean"] += int((logits.argmax(1) == yb).sum())
        seconds["Clean"] += time.perf_counter() - t0
        for name, attack in attacks.items():
            t0 = time.perf_counter()
            try:
                res = attack(xb, yb, index) if takes_index[name] else attack(xb, yb)
                if transfer:
                    with attack_mode(victim), torch.no_grad():
                        adv_logits = victim(res.x_adv)
                        _check_finite_logits(adv_logits, None, "x")
                        correct[name] += int((adv_logits.argmax(1) == yb).sum())
                else:
                    correct[name] += int((~res.success).sum())
            except NaNLogitsError as err:
                raise NaNLogitsError(index[err.rows], f"data under {name}") from None
            seconds[name] += time.perf_counter() - t0
        n += xb.shape[0]
    if n == 0:
        raise ValueError("data holds no samples")
    settings = {name: a.settings() for name, a in attacks.items() if isinstance(a, Attack)}
    return RobustnessReport(
        accuracy={k: 100.0 * v / n for k, v in correct.items()}, n=n,
        seconds={k: round(v, 4) for k, v in seconds.items()}, settings=settings,
        kind="transfer" if transfer else "white-box", meta=dict(machine_info()))


def evaluate(
    model: Callable[[Tensor], Tensor],
    data: Any,
    attacks: Mapping[str, Attack | Callable[[Tensor, Tensor], AttackResult]] | None = None,
    *,
    eps: float = 8 / 255,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> RobustnessReport:
    """Robust accuracy of ``model`` under each attack (white-box), like the thesis's tables.

    Args:
        model: maps [0, 1] images to logits.
        data: an ``(x, y)`` pair of tensors (batched by ``batch_size``) or any iterable of
            ``(x, y)`` batches, e.g. a ``DataLoader``.
        attacks: column name -> attack (callable ``(x, y) -> AttackResult``); default
            :func:`default_attacks` (FGSM, PGD5, PGD10, PGD20 at ``eps``, early stop on).
        eps: radius for the default attacks (pixel units).
        device: move each batch there first (default: leave it where it is).
        progress: show a tqdm progress bar.

    Returns:
        :class:`RobustnessReport`; ``accuracy["Clean"]`` and one column per attack, in %.
    """
    if attacks is None:
        attacks = default_attacks(model, eps)
    report = _run_table(model, data, attacks, transfer=False, device=device,
                        batch_size=batch_size, progress=progress, desc="evaluate")
    report.meta["eps"] = eps
    return report


def transfer_evaluate(
    surrogate: Callable[[Tensor], Tensor],
    target: Callable[[Tensor], Tensor],
    data: Any,
    attacks: Mapping[str, Attack | Callable[[Tensor, Tensor], AttackResult]] | None = None,
    *,
    eps: float = 8 / 255,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> RobustnessReport:
    """Black-box transfer: craft on ``surrogate``, measure the accuracy of ``target``
    (the thesis's Table 3.5 setting). Default attacks are :func:`default_attacks` on the
    surrogate with early stop off (stopping at the surrogate's first fooling iterate would
    weaken the transfer). ``accuracy["Clean"]`` is the target's clean accuracy."""
    if attacks is None:
        attacks = default_attacks(surrogate, eps, early_stop=False)
    report = _run_table(target, data, attacks, transfer=True, device=device,
                        batch_size=batch_size, progress=progress, desc="transfer")
    report.meta["eps"] = eps
    return report
