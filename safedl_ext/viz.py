"""The thesis's pictures: input-gradient grids, loss surfaces and accuracy-against-ε curves.

Each function computes its numbers first and returns them (tensors on the CPU, so tests and
reports can check them); when ``path`` is given it also draws the figure and writes it as a
PNG, atomically (a reader never sees half a file).

- :func:`gradient_grid` — input gradients of several models side by side (thesis Fig. 3.4):
  robust models (JARN, adversarial training) have gradients that look like the digit;
  a standard model's look like noise.
- :func:`loss_surface` — the loss at ``x + a * sign(dL/dx) + b * r`` over a grid of
  ``(a, b)``, with ``r`` a random Rademacher (±1) direction (thesis Fig. 3.3). A standard
  model's loss rises steeply along the adversarial axis and hardly moves along the random one.
- :func:`accuracy_vs_eps` — robust accuracy against the radius ε, one curve per attack and
  model (thesis Fig. 3.2).

Drawing needs matplotlib (``pip install 'safedl_ext[viz]'``); it is imported only when a
figure is drawn, and only through its object-oriented API on the Agg canvas, so the global
pyplot backend and figure registry are never touched. Computing the numbers
(``path=None``) needs no matplotlib.

All models are run in eval mode with frozen parameters (restored afterwards), on [0, 1]
images: every model normalizes inside itself, so ε is in pixel units.
"""

from __future__ import annotations

import io
import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attacks as _attacks
from ._checks import check_model_input
from .gradients import input_gradients
from .report import write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "AccuracyCurves",
    "LossSurface",
    "accuracy_vs_eps",
    "gradient_grid",
    "gradient_image",
    "loss_surface",
]

Model = Callable[[Tensor], Tensor]
Models = Model | Mapping[str, Model]
Scaling = Literal["symmetric", "minmax", "abs"]
PathLike = str | os.PathLike[str]
AttackFn = Callable[[Model, Tensor, Tensor, Tensor, torch.Generator], _attacks.AttackResult]
_SCALINGS = ("symmetric", "minmax", "abs")
_BUILTIN_ATTACKS = ("fgsm", "pgd")

# ------------------------------------------------------------------------------- drawing


def _new_figure(width_in: float, height_in: float) -> Figure:
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global backend change)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("drawing figures with safedl_ext.viz needs matplotlib: "
                          "pip install 'safedl_ext[viz]' (or call with path=None for the "
                          "numbers only)") from exc
    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Figure, path: PathLike, dpi: int) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return write_bytes_atomic(path, buf.getvalue())


def _to_display(img: Tensor) -> tuple[Any, str | None]:
    """(C, H, W) in [0, 1] -> (array for imshow, colormap): RGB for 3 channels, otherwise
    grey (the mean over channels)."""
    img = img.detach().float().cpu()
    if img.shape[0] == 3:
        return img.permute(1, 2, 0).clamp(0, 1).numpy(), None
    return img.mean(0).clamp(0, 1).numpy(), "gray"


# ---------------------------------------------------------------------------- validation


def _as_models(models: Models) -> dict[str, Model]:
    if isinstance(models, Mapping):
        if not models:
            raise ValueError("models must hold at least one model, got an empty mapping")
        out: dict[str, Model] = {}
        for name, m in models.items():
            if not isinstance(name, str):
                raise TypeError(f"models must be keyed by str names, got {type(name).__name__}")
            if not callable(m):
                raise TypeError(f"models[{name!r}] must be an nn.Module or a callable, got "
                                f"{type(m).__name__}")
            out[name] = m
        return out
    if not callable(models):
        raise TypeError("models must be a model or a mapping of name -> model, got "
                        f"{type(models).__name__}")
    return {"model": models}


def _check_images(models: Mapping[str, Model], x: Tensor, y: Tensor, lo: float,
                  hi: float) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one image, got N=0")
    for m in models.values():
        check_model_input(m, x)
    _attacks._check_labels(y, x)
    _attacks._check_box(x, lo, hi)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_float(value: object, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got "
                         f"{value}")
    return v


# ------------------------------------------------------------------------ gradient grid


def gradient_image(g: Tensor, scaling: Scaling = "symmetric") -> Tensor:
    """Map gradients to displayable images in [0, 1], one scale per image.

    Args:
        g: (N, C, H, W) gradients.
        scaling: ``"symmetric"``: ``0.5 + 0.5 * g / max|g|`` (zero is mid-grey, the sign
            shows as darker/lighter; the default, as gradients are signed);
            ``"minmax"``: ``(g - min g) / (max g - min g)`` (uses the full range, but where
            zero lands varies per image); ``"abs"``: ``|g| / max|g|`` (magnitude only).
            Max and min run over all channels and pixels of an image, so colour balance is
            kept for RGB. An all-zero gradient maps to 0.5 (``"abs"``: 0).

    Returns:
        (N, C, H, W) float32 in [0, 1], on ``g``'s device.
    """
    if scaling not in _SCALINGS:
        raise ValueError(f"scaling must be one of {_SCALINGS}, got {scaling!r}")
    if not isinstance(g, Tensor) or g.dim() < 2:
        raise ValueError("g must be an (N, ...) tensor of gradients")
    g = g.detach().float()
    flat = g.reshape(g.shape[0], -1)
    view = (-1,) + (1,) * (g.dim() - 1)
    if scaling == "minmax":
        lo = flat.amin(1).view(view)
        span = flat.amax(1).view(view) - lo
        return torch.where(span > 0, (g - lo) / span.clamp_min(1e-30), torch.full_like(g, 0.5))
    peak = flat.abs().amax(1).view(view)
    ok = peak > 0
    if scaling == "abs":
        return torch.where(ok, g.abs() / peak.clamp_min(1e-30), torch.zeros_like(g))
    return torch.where(ok, 0.5 + 0.5 * g / peak.clamp_min(1e-30), torch.full_like(g, 0.5))


def gradient_grid(
    models: Models,
    x: Tensor,
    y: Tensor,
    path: PathLike | None = None,
    *,
    wrt: Literal["loss", "prob", "logit"] = "loss",
    labels: Literal["true"] | Tensor = "true",
    normalize: Literal["l2", "zero_mean_l2"] | None = None,
    scaling: Scaling = "symmetric",
    panel_size: float = 1.2,
    dpi: int = 100,
    title: str | None = None,
    classes: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Input gradients of several models, drawn as images side by side (thesis Fig. 3.4).

    The figure has one column per image and one row per model, under a first row with the
    clean images (titled with their labels). Each gradient is mapped to [0, 1] by
    :func:`gradient_image` with ``scaling``; 1-channel images are drawn in grey, 3-channel
    ones in RGB (others as the grey mean over channels).

    Args:
        models: a model, or an ordered mapping name -> model (row labels).
        x: (N, C, H, W) images in [0, 1]. Keep N small (one column each).
        y: (N,) int64 true labels.
        path: where to write the PNG; ``None`` computes the gradients only.
        wrt, labels, normalize: as in :func:`safedl_ext.gradients.input_gradients`
            (``labels`` may be ``"true"`` or an (N,) tensor, e.g. target classes).
        scaling: per-image display scaling, see :func:`gradient_image`.
        panel_size: inches per image panel; the figure is ``0.4 + panel_size * N`` inches
            wide and ``panel_size * (1 + len(models))`` high, so the PNG is that times
            ``dpi`` pixels.
        dpi: pixels per inch of the PNG.
        title: figure title (drawn inside the top margin).
        classes: class names, index = label, for the column titles (default the numbers).

    Returns:
        name -> (N, C, H, W) float gradients on the CPU, exactly those of
        ``input_gradients(model, x, y, labels=labels, wrt=wrt, normalize=normalize)`` with the
        model in eval mode.
    """
    ms = _as_models(models)
    _check_images(ms, x, y, 0.0, 1.0)
    if isinstance(labels, str) and labels != "true":
        raise ValueError(f"labels must be 'true' or an (N,) label tensor, got {labels!r} "
                         "('all' gives K gradients per image; pick one class to draw)")
    if scaling not in _SCALINGS:
        raise ValueError(f"scaling must be one of {_SCALINGS}, got {scaling!r}")
    _check_float(panel_size, "panel_size", positive=True)
    _check_int(dpi, "dpi", 1)
    grads: dict[str, Tensor] = {}
    for name, model in ms.items():
        with _attacks.attack_mode(model):
            g = input_gradients(model, x, y, labels=labels, wrt=wrt, normalize=normalize)
        grads[name] = g.detach().cpu()  # type: ignore[union-attr]
    if path is not None:
        names = [str(classes[int(c)]) if classes is not None else f"y={int(c)}" for c in y]
        _draw_gradient_grid(x, names, grads, path, scaling, panel_size, dpi, title)
    return grads


def _draw_gradient_grid(x: Tensor, col_titles: Sequence[str], grads: Mapping[str, Tensor],
                        path: PathLike,
                        scaling: Scaling, panel: float, dpi: int, title: str | None) -> None:
    n, rows = x.shape[0], 1 + len(grads)
    label_w = 0.4
    fig = _new_figure(label_w + panel * n, panel * rows)
    fig.subplots_adjust(left=label_w / (label_w + panel * n), right=0.99, bottom=0.01,
                        top=1 - 0.25 / (panel * rows), wspace=0.05, hspace=0.15)
    axes = fig.subplots(rows, n, squeeze=False)
    images = [("input", x.detach().float().cpu())]
    images += [(name, gradient_image(g, scaling)) for name, g in grads.items()]
    for r, (name, batch) in enumerate(images):
        for c in range(n):
            ax = axes[r][c]
            arr, cmap = _to_display(batch[c])
            ax.imshow(arr, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=8, pad=2)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0, va="top")
    _save_png(fig, path, dpi)


# ------------------------------------------------------------------------- loss surface


@dataclass(frozen=True)
class LossSurface:
    """Loss of each model over a grid around each image.

    Attributes:
        adv: (S,) float64 offsets ``a`` along the adversarial direction, pixel units.
        rand: (S_r,) float64 offsets ``b`` along the random direction, pixel units.
        losses: name -> (N, S, S_r) per-sample cross-entropy (nats) at
            ``x + adv[i] * d_adv + rand[j] * d_rand``.
        clean_loss: name -> (N,) cross-entropy at ``x`` itself.
        d_adv: name -> (N, C, H, W) ``sign(dL/dx)`` (the FGSM direction; 0 where the gradient is 0).
        d_rand: (N, C, H, W) the Rademacher (±1) direction, shared by all models.
    """

    adv: Tensor
    rand: Tensor
    losses: dict[str, Tensor]
    clean_loss: dict[str, Tensor]
    d_adv: dict[str, Tensor]
    d_rand: Tensor

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON-serialisable); directions are left out."""
        return {"adv": self.adv.tolist(), "rand": self.rand.tolist(),
                "losses": {k: v.tolist() for k, v in self.losses.items()},
                "clean_loss": {k: v.tolist() for k, v in self.clean_loss.items()}}


def _symmetric_grid(eps: float, steps: int) -> Tensor:
    """(steps,) float64 from -eps to eps; for odd ``steps`` the middle point is exactly 0."""
    k = torch.arange(steps, dtype=torch.float64)
    return eps * (2.0 * k / (steps - 1) - 1.0)


def loss_surface(
    models: Models,
    x: Tensor,
    y: Tensor,
    path: PathLike | None = None,
    *,
    eps: float,
    steps: int = 21,
    eps_rand: float | None = None,
    generator: torch.Generator | None = None,
    clip: bool = False,
    kind: Literal["surface", "contour"] = "surface",
    batch_size: int = 2048,
    panel_size: float = 3.0,
    dpi: int = 100,
    title: str | None = None,
) -> LossSurface:
    """The loss around an image along the adversarial and a random direction (Fig. 3.3).

    For each image ``x_i`` and model, the per-sample cross-entropy at
    ``x_i + a * d_adv + b * d_rand`` for ``a`` on ``steps`` points in ``[-eps, eps]`` and
    ``b`` on ``steps`` points in ``[-eps_rand, eps_rand]``. ``d_adv = sign(dL/dx)`` (the
    FGSM direction, so ``a = eps`` is the FGSM example) and ``d_rand`` is a random ±1
    (Rademacher) direction of the same L-inf size. All grid points go through the model in
    batches of ``batch_size`` rows.

    Args:
        models: a model, or an ordered mapping name -> model (one row of panels each).
        x: (N, C, H, W) images in [0, 1]; one column of panels each (keep N small).
        y: (N,) int64 true labels.
        path: where to write the PNG; ``None`` computes the numbers only.
        eps: half-width of the grid along the adversarial axis (pixel units, > 0).
        steps: grid points per axis (>= 2); odd numbers put the clean image on the grid
            (the middle point is exactly 0).
        eps_rand: half-width along the random axis; default ``eps``.
        generator: draws ``d_rand`` (on the CPU, then moved); default a fresh generator
            seeded with 0, so the same call gives the same surface.
        clip: clamp the grid points to [0, 1] (valid images). Default off: the surface of
            the model as a function, as the thesis draws it.
        kind: ``"surface"`` (3-D, as in the thesis) or ``"contour"`` (filled contours).
            Each column (image) has one loss scale shared by all models.
        batch_size: grid points per forward pass.
        panel_size: inches per panel; the figure is ``panel_size * N`` by
            ``panel_size * len(models)`` inches, the PNG that times ``dpi`` pixels.
        dpi: pixels per inch. title: figure title.

    Returns:
        :class:`LossSurface` with the (N, steps, steps) losses per model, on the CPU.
    """
    ms = _as_models(models)
    _check_images(ms, x, y, 0.0, 1.0)
    eps = _check_float(eps, "eps", positive=True)
    eps_r = eps if eps_rand is None else _check_float(eps_rand, "eps_rand", positive=True)
    steps = _check_int(steps, "steps", 2)
    batch_size = _check_int(batch_size, "batch_size", 1)
    if kind not in ("surface", "contour"):
        raise ValueError(f"kind must be 'surface' or 'contour', got {kind!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    _check_float(panel_size, "panel_size", positive=True)
    _check_int(dpi, "dpi", 1)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, tuple(x.shape), generator=gen, device=gen.device)
    d_rand = (signs * 2 - 1).to(device=x.device, dtype=x.dtype)
    a = _symmetric_grid(eps, steps)
    b = _symmetric_grid(eps_r, steps)
    losses, clean, d_adv = {}, {}, {}
    for name, model in ms.items():
        with _attacks.attack_mode(model):
            g, logits = input_gradients(model, x, y, wrt="loss", return_logits=True)
            _attacks._check_label_range(logits, y)
            d = torch.sign(g)
            clean[name] = F.cross_entropy(logits.float(), y.long(), reduction="none").cpu()
            with torch.no_grad():
                losses[name] = _grid_losses(model, x, y.long(), d, d_rand, a, b, clip,
                                            batch_size)
        d_adv[name] = d.cpu()
    result = LossSurface(adv=a, rand=b, losses=losses, clean_loss=clean,
                         d_adv=d_adv, d_rand=d_rand.cpu())
    if path is not None:
        _draw_loss_surface(result, y, path, kind, panel_size, dpi, title)
    return result


def _grid_losses(model: Model, x: Tensor, y: Tensor, d_adv: Tensor, d_rand: Tensor,
                 a: Tensor, b: Tensor, clip: bool, batch_size: int) -> Tensor:
    """(N, S, S_r) losses at x + a_i d_adv + b_j d_rand, every point through the model once."""
    n, s, sr = x.shape[0], a.numel(), b.numel()
    a_t = a.to(device=x.device, dtype=x.dtype)
    b_t = b.to(device=x.device, dtype=x.dtype)
    total = n * s * sr
    out = torch.empty(total, dtype=torch.float32)
    view = (-1,) + (1,) * (x.dim() - 1)
    for start in range(0, total, batch_size):
        k = torch.arange(start, min(start + batch_size, total), device=x.device)
        img, ia, ib = k // (s * sr), (k // sr) % s, k % sr
        pts = x[img] + a_t[ia].view(view) * d_adv[img] + b_t[ib].view(view) * d_rand[img]
        if clip:
            pts.clamp_(0.0, 1.0)
        loss = F.cross_entropy(model(pts).float(), y[img], reduction="none")
        out[start:start + k.numel()] = loss.cpu()
    return out.view(n, s, sr)


def _draw_loss_surface(res: LossSurface, y: Tensor, path: PathLike, kind: str, panel: float,
                       dpi: int, title: str | None) -> None:
    names = list(res.losses)
    n = next(iter(res.losses.values())).shape[0]
    fig = _new_figure(panel * n, panel * len(names))
    if kind == "surface":
        top = 1.0 - (0.45 if title else 0.25) / (panel * len(names))
        fig.subplots_adjust(left=0.0, right=0.97, bottom=0.07, top=top, wspace=0.05,
                            hspace=0.2)
    else:
        fig.set_layout_engine("constrained")
    grid_a, grid_b = (t.numpy() for t in torch.meshgrid(res.adv, res.rand, indexing="ij"))
    # One loss scale per image (column), shared by the models, so they compare at a glance.
    zmax = [max(float(v[c].max()) for v in res.losses.values()) or 1.0 for c in range(n)]
    for r, name in enumerate(names):
        for c in range(n):
            z = res.losses[name][c].numpy()  # (S, S_r): rows adv, columns rand
            k = r * n + c + 1
            if kind == "surface":
                ax = fig.add_subplot(len(names), n, k, projection="3d")
                ax.plot_surface(grid_a, grid_b, z, cmap="viridis", vmin=0.0, vmax=zmax[c],
                                linewidth=0, antialiased=True)
                ax.set_zlim(0.0, zmax[c])
            else:
                ax = fig.add_subplot(len(names), n, k)
                levels = torch.linspace(0.0, zmax[c], 21).tolist()
                cs = ax.contourf(grid_a, grid_b, z, levels=levels, cmap="viridis",
                                 extend="max")
                fig.colorbar(cs, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("ε adv (sign ∇x L)", fontsize=7)
            ax.set_ylabel("ε rand (±1)", fontsize=7)
            ax.set_title(f"{name}: loss, image {c} (y={int(y[c])})", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    _save_png(fig, path, dpi)


# ---------------------------------------------------------------------- accuracy vs eps


@dataclass(frozen=True)
class AccuracyCurves:
    """Robust accuracy against the attack radius.

    Attributes:
        eps: (E,) float64 radii in pixel units, increasing.
        accuracy: model name -> attack name -> (E,) float64 accuracy in percent.
        clean: model name -> clean accuracy in percent (``accuracy[...][...][0]`` when
            ``eps[0] == 0``).
        n: number of evaluated samples.
        cumulative: whether a sample counts as fooled at ε once it was fooled at any radius
            <= ε (see :func:`accuracy_vs_eps`).
        settings: attack name -> its settings.
    """

    eps: Tensor
    accuracy: dict[str, dict[str, Tensor]]
    clean: dict[str, float]
    n: int
    cumulative: bool
    settings: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON-serialisable)."""
        return {"eps": self.eps.tolist(), "n": self.n, "cumulative": self.cumulative,
                "clean": dict(self.clean),
                "accuracy": {m: {a: v.tolist() for a, v in curves.items()}
                             for m, curves in self.accuracy.items()},
                "settings": _attacks._jsonable(self.settings)}


def _builtin_attack(name: str, pgd_steps: int, pgd_alpha: float | None, norm: str
                    ) -> tuple[str, AttackFn, dict[str, Any]]:
    if name == "fgsm":
        def run_fgsm(model: Model, xb: Tensor, yb: Tensor, eps: Tensor,
                     gen: torch.Generator) -> _attacks.AttackResult:
            return _attacks.fgsm(model, xb, yb, eps=eps, norm=norm)  # type: ignore[arg-type]

        return "FGSM", run_fgsm, {"norm": norm}

    def run_pgd(model: Model, xb: Tensor, yb: Tensor, eps: Tensor,
                gen: torch.Generator) -> _attacks.AttackResult:
        alpha = eps / 4 if pgd_alpha is None else eps * pgd_alpha
        return _attacks.pgd(model, xb, yb, eps=eps, alpha=alpha, steps=pgd_steps,
                            norm=norm, random_start=True, early_stop=True,  # type: ignore[arg-type]
                            generator=gen)

    return f"PGD{pgd_steps}", run_pgd, {"norm": norm, "steps": pgd_steps,
                                        "alpha": "eps/4" if pgd_alpha is None
                                        else f"{pgd_alpha}*eps", "random_start": True}


def accuracy_vs_eps(
    models: Models,
    x: Tensor,
    y: Tensor,
    path: PathLike | None = None,
    *,
    eps_values: Sequence[float],
    attacks: Sequence[str] | Mapping[str, AttackFn] = ("fgsm", "pgd"),
    pgd_steps: int = 10,
    pgd_alpha: float | None = None,
    norm: Literal["linf", "l2"] = "linf",
    cumulative: bool = True,
    seed: int = 0,
    batch_size: int = 512,
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
    title: str | None = None,
) -> AccuracyCurves:
    """Robust accuracy against ε for each attack and model (thesis Fig. 3.2).

    All radii of one attack share batches: the (radius, sample) pairs are stacked into rows
    with a per-row ε (``batch_size`` rows per attack call). ε = 0 needs no attack: its
    accuracy is the clean accuracy.

    Args:
        models: a model, or a mapping name -> model (one colour each).
        x: (N, C, H, W) images in [0, 1]. y: (N,) int64 true labels.
        path: where to write the PNG; ``None`` computes the numbers only.
        eps_values: radii (pixel units for L-inf, L2 length for ``norm="l2"``), >= 0 and
            strictly increasing.
        attacks: names from ``("fgsm", "pgd")``, or a mapping name -> callable
            ``(model, x, y, eps, generator) -> AttackResult`` with ``eps`` an (rows,) tensor.
        pgd_steps: PGD iterations (random start, early stop, step ``eps / 4``).
        pgd_alpha: PGD step as a fraction of ε (default 1/4).
        norm: ``"linf"`` or ``"l2"`` for the built-in attacks.
        cumulative: count a sample as fooled at ε once any attack run of the same kind
            fooled it at a radius <= ε (an example found inside a smaller ball lies inside
            every larger one), so each curve is non-increasing by construction. ``False``:
            the plain accuracy of each radius's own run, which may wiggle upward when an
            attack is weaker at a larger radius.
        seed: seeds the PGD random starts (one CPU generator per model and attack).
        batch_size: rows per attack call.
        figsize: (width, height) inches; the PNG is that times ``dpi`` pixels.
        dpi: pixels per inch. title: axes title.

    Returns:
        :class:`AccuracyCurves`; ``accuracy[model][attack]`` is an (E,) tensor in percent.
    """
    ms = _as_models(models)
    _check_images(ms, x, y, 0.0, 1.0)
    if isinstance(eps_values, (str, bytes)) or not isinstance(eps_values, Sequence):
        raise TypeError(f"eps_values must be a sequence of floats, got "
                        f"{type(eps_values).__name__}")
    eps_list = [_check_float(e, "eps_values[i]", positive=False) for e in eps_values]
    if not eps_list:
        raise ValueError("eps_values must hold at least one radius, got none")
    if any(b <= a for a, b in itertools.pairwise(eps_list)):
        raise ValueError(f"eps_values must be strictly increasing, got {eps_list}")
    pgd_steps = _check_int(pgd_steps, "pgd_steps", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    if pgd_alpha is not None:
        _check_float(pgd_alpha, "pgd_alpha", positive=True)
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    runners: dict[str, AttackFn] = {}
    settings: dict[str, dict[str, Any]] = {}
    if isinstance(attacks, Mapping):
        for name, fn in attacks.items():
            if not callable(fn):
                raise TypeError(f"attacks[{name!r}] must be callable, got {type(fn).__name__}")
            runners[str(name)] = fn
            settings[str(name)] = {}
    else:
        if isinstance(attacks, str):
            attacks = (attacks,)
        if not attacks:
            raise ValueError("attacks must name at least one attack, got none")
        for a in attacks:
            if a not in _BUILTIN_ATTACKS:
                raise ValueError(f"attacks must be names from {_BUILTIN_ATTACKS} or a mapping "
                                 f"of name -> callable, got {a!r}")
            label, fn, s = _builtin_attack(a, pgd_steps, pgd_alpha, norm)
            runners[label], settings[label] = fn, s
    eps_t = torch.tensor(eps_list, dtype=torch.float64)
    n = x.shape[0]
    curves: dict[str, dict[str, Tensor]] = {}
    clean_acc: dict[str, float] = {}
    for mname, model in ms.items():
        with _attacks.attack_mode(model), torch.no_grad():
            logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, n, batch_size)])
        _attacks._check_label_range(logits, y)
        wrong = (logits.argmax(1) != y).cpu()
        clean_acc[mname] = 100.0 * float((~wrong).double().mean())
        curves[mname] = {}
        for aname, fn in runners.items():
            gen = torch.Generator().manual_seed(seed)
            fooled = _fooled_matrix(model, fn, x, y, eps_t, wrong, batch_size, gen)
            if cumulative:
                fooled = fooled.to(torch.uint8).cummax(dim=0).values.bool()
            curves[mname][aname] = 100.0 * (~fooled).double().mean(dim=1)
    result = AccuracyCurves(eps=eps_t, accuracy=curves, clean=clean_acc, n=n,
                            cumulative=cumulative, settings=settings)
    if path is not None:
        _draw_accuracy_curves(result, path, figsize, dpi, title, norm)
    return result


def _fooled_matrix(model: Model, fn: AttackFn, x: Tensor, y: Tensor, eps: Tensor,
                   wrong: Tensor, batch_size: int, gen: torch.Generator) -> Tensor:
    """(E, N) bool: the attack at radius eps[e] fooled sample i (clean errors count)."""
    e_count, n = eps.numel(), x.shape[0]
    fooled = wrong.unsqueeze(0).repeat(e_count, 1)
    pos = (eps > 0).nonzero().squeeze(1)
    if pos.numel() == 0:
        return fooled
    row_e = pos.repeat_interleave(n)
    row_i = torch.arange(n).repeat(pos.numel())
    eps_rows = eps[row_e]
    for start in range(0, row_e.numel(), batch_size):
        sl = slice(start, start + batch_size)
        ri = row_i[sl].to(x.device)
        res = fn(model, x[ri], y[ri], eps_rows[sl].to(device=x.device, dtype=x.dtype), gen)
        fooled[row_e[sl], row_i[sl]] = res.success.cpu()
    return fooled


def _draw_accuracy_curves(res: AccuracyCurves, path: PathLike, figsize: tuple[float, float],
                          dpi: int, title: str | None, norm: str) -> None:
    fig = _new_figure(*figsize)
    ax = fig.add_subplot(1, 1, 1)
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v"]
    eps = res.eps.numpy()
    many = len(res.accuracy) > 1
    for mi, (mname, curves) in enumerate(res.accuracy.items()):
        colour = f"C{mi % 10}"
        for ai, (aname, acc) in enumerate(curves.items()):
            label = f"{mname}: {aname}" if many else aname
            ax.plot(eps, acc.numpy(), linestyle=styles[ai % len(styles)],
                    marker=markers[ai % len(markers)], markersize=4,
                    color=colour if many else f"C{ai % 10}", label=label)
    ax.set_xlabel("ε (L∞, pixel units)" if norm == "linf" else "ε (L2)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save_png(fig, path, dpi)
