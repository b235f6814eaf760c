"""Training methods: the losses one training step minimises.

A method turns a batch ``(x, y)`` into a scalar loss for the model's optimiser
(:meth:`Method.loss`), may own extra modules and optimisers (JARN's adaptor and
discriminator), and may act after the model's optimiser step (:meth:`Method.after_step`).
The :mod:`trainer <safedl_ext.defenses.trainer>` does the rest: batching, optimiser,
schedule, AMP, checkpoints. All randomness comes from the :class:`StepContext`'s
generator, whose state the trainer saves with every checkpoint.

Methods here (the thesis's baselines, chapter 3): :class:`Standard`,
:class:`UniformNoise`, :class:`FGSMAT` (FGSM with a random start, step 1.25 eps),
:class:`PGDAT` (Madry et al.), :class:`DoubleBackprop` (lambda ||dL/dx||^2),
:class:`TRADES`; :class:`~safedl_ext.defenses.jarn.JARN` lives in its own module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..gradients import input_gradients

__all__ = [
    "FGSMAT",
    "PGDAT",
    "TRADES",
    "DoubleBackprop",
    "Method",
    "Standard",
    "StepContext",
    "UniformNoise",
    "craft_linf",
    "uniform_noise",
]


@dataclass
class StepContext:
    """What a method may know about the current step.

    Attributes:
        step: optimiser steps taken so far (0-based index of this step).
        total_steps: optimiser steps of the whole run.
        epoch: current epoch (0-based).
        generator: the trainer's random generator (on the training device).
        device: the training device.
    """

    step: int
    total_steps: int
    epoch: int
    generator: torch.Generator | None
    device: torch.device


def _check_eps(eps: float, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{name} must be a float >= 0, got {eps!r}")
    return float(eps)


def uniform_noise(x: Tensor, eps: float, generator: torch.Generator | None,
                  lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """``clamp(x + U(-eps, eps), lo, hi)``, a new tensor (noise drawn on ``x``'s device)."""
    if eps == 0:
        return x
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + (u * 2 - 1) * eps).clamp_(lo, hi)


@contextlib.contextmanager
def _frozen(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Parameters frozen (no parameter gradients while crafting) and, optionally, eval
    mode; both restored afterwards."""
    was = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was)


def craft_linf(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, alpha: float, steps: int,
               random_start: bool, generator: torch.Generator | None,
               eval_mode: bool = True) -> Tensor:
    """Adversarial training examples: L-inf PGD on the cross-entropy, the final iterate.

    Unlike :func:`safedl_ext.attacks.pgd` (which returns the first example that fools the
    model, right for measuring robust accuracy), training uses the last iterate, as Madry
    et al. do. Each step is the fused native :func:`~safedl_ext.ops.pgd_step_`.

    Args:
        x: (N, ...) clean inputs in [0, 1]. y: (N,) labels.
        eps, alpha: radius and step size (pixel units). steps: >= 1.
        random_start: start uniformly in the eps-ball (else at ``x``).
        eval_mode: craft with the model in eval mode (BatchNorm running statistics are
            neither used from the batch nor updated); False crafts in the model's mode.

    Returns:
        (N, ...) detached adversarial examples inside the ball and [0, 1].
    """
    x0 = x.detach()
    xa = uniform_noise(x0, eps, generator) if random_start else x0.clone()
    if xa is x0:
        xa = x0.clone()
    a = ops.as_budget(alpha, "alpha", x0)
    e = ops.as_budget(eps, "eps", x0)
    with _frozen(model, eval_mode):
        for _ in range(steps):
            g = input_gradients(model, xa, y, wrt="loss")
            ops.pgd_step_checked_(xa, x0, g, a, e, "linf", 0.0, 1.0)
    return xa


class Method:
    """Base class: a training loss, optional extra modules, optional post-step work.

    Subclasses set ``name`` and implement :meth:`loss`.
    """

    name: str = "method"

    def setup(self, model: nn.Module, example: Tensor) -> None:
        """Called once before training with an example batch (N, ...) on the training
        device: build extra modules there."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the model's own optimiser besides the model's."""
        return []

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext
             ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """The step's loss.

        Args:
            model: in train mode. x: (N, ...) batch in [0, 1]. y: (N,) labels.

        Returns:
            ``(loss, logits, logs)``: the scalar to minimise, the (N, K) logits the
            training accuracy is read from, and floats to log.
        """
        raise NotImplementedError

    def after_step(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        """Work after the model's optimiser step (e.g. a discriminator update)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Extra state for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def settings(self) -> dict[str, Any]:
        """JSON-able description for reports."""
        return {"method": self.name}


class Standard(Method):
    """Plain empirical risk minimisation: cross-entropy on clean inputs."""

    name = "standard"

    def loss(self, model, x, y, ctx):
        logits = model(x)
        return F.cross_entropy(logits, y), logits, {}


class UniformNoise(Method):
    """Cross-entropy on inputs with uniform noise in [-eps, eps] (clamped to [0, 1])."""

    name = "uniform"

    def __init__(self, eps: float = 8 / 255) -> None:
        self.eps = _check_eps(eps)

    def loss(self, model, x, y, ctx):
        logits = model(uniform_noise(x, self.eps, ctx.generator))
        return F.cross_entropy(logits, y), logits, {}

    def settings(self):
        return {"method": self.name, "eps": self.eps}


class PGDAT(Method):
    """PGD adversarial training (Madry et al. 2018): cross-entropy on the final iterate of
    ``steps``-step L-inf PGD with a random start.

    Args:
        eps: radius (pixel units). alpha: step size (default 2.5 * eps / steps, Madry's
            choice). steps: PGD steps (PGD-AT-k). eval_mode: craft in eval mode.
    """

    name = "pgd-at"

    def __init__(self, eps: float = 8 / 255, steps: int = 7, alpha: float | None = None,
                 random_start: bool = True, eval_mode: bool = True) -> None:
        self.eps = _check_eps(eps)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.steps = steps
        self.alpha = _check_eps(alpha, "alpha") if alpha is not None else 2.5 * self.eps / steps
        self.random_start = random_start
        self.eval_mode = eval_mode

    def loss(self, model, x, y, ctx):
        xa = craft_linf(model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps,
                        random_start=self.random_start, generator=ctx.generator,
                        eval_mode=self.eval_mode)
        logits = model(xa)
        return F.cross_entropy(logits, y), logits, {}

    def settings(self):
        return {"method": self.name, "eps": self.eps, "alpha": self.alpha, "steps": self.steps,
                "random_start": self.random_start, "eval_mode": self.eval_mode}


class FGSMAT(PGDAT):
    """FGSM adversarial training with a random start (Wong et al. 2020, "fast is better
    than free"): one step of 1.25 eps from a uniform point of the ball."""

    name = "fgsm-at"

    def __init__(self, eps: float = 8 / 255, alpha: float | None = None,
                 eval_mode: bool = True) -> None:
        super().__init__(eps, steps=1, alpha=1.25 * _check_eps(eps) if alpha is None else alpha,
                         random_start=True, eval_mode=eval_mode)


class DoubleBackprop(Method):
    """Double backpropagation (Drucker & LeCun 1992; Ross & Doshi-Velez 2018):
    ``CE + lam * mean_i ||dL_i/dx_i||_2^2``, differentiated through the input gradient.

    Args:
        lam: weight of the gradient penalty.
    """

    name = "double-backprop"

    def __init__(self, lam: float = 1.0) -> None:
        self.lam = _check_eps(lam, "lam")

    def loss(self, model, x, y, ctx):
        g, logits = input_gradients(model, x, y, wrt="loss", create_graph=True,
                                    return_logits=True)
        penalty = g.flatten(1).pow(2).sum(1).mean()
        ce = F.cross_entropy(logits, y)
        return ce + self.lam * penalty, logits, {"grad_penalty": float(penalty.detach())}

    def settings(self):
        return {"method": self.name, "lam": self.lam}


class TRADES(Method):
    """TRADES (Zhang et al. 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` with ``x'``
    from ``steps`` L-inf steps maximising the KL term, started at ``x + 0.001 N(0, 1)``.

    Args:
        eps, alpha, steps: the inner maximisation. beta: weight of the KL term.
    """

    name = "trades"

    def __init__(self, eps: float = 8 / 255, beta: float = 6.0, steps: int = 10,
                 alpha: float | None = None) -> None:
        self.eps = _check_eps(eps)
        self.beta = _check_eps(beta, "beta")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.steps = steps
        self.alpha = _check_eps(alpha, "alpha") if alpha is not None else self.eps / 4

    def loss(self, model, x, y, ctx):
        x0 = x.detach()
        a = ops.as_budget(self.alpha, "alpha", x0)
        e = ops.as_budget(self.eps, "eps", x0)
        with _frozen(model, eval_mode=True):
            with torch.no_grad():
                p_clean = F.softmax(model(x0), dim=1)
            noise = torch.randn(x0.shape, generator=ctx.generator, device=x0.device,
                                dtype=x0.dtype)
            xa = (x0 + 0.001 * noise).clamp_(0, 1)
            for _ in range(self.steps):
                xa.requires_grad_(True)
                with torch.enable_grad():
                    kl = F.kl_div(F.log_softmax(model(xa), dim=1), p_clean, reduction="sum")
                    (g,) = torch.autograd.grad(kl, xa)
                xa = xa.detach()
                ops.pgd_step_checked_(xa, x0, g, a, e, "linf", 0.0, 1.0)
        logits = model(x0)
        kl = F.kl_div(F.log_softmax(model(xa), dim=1), F.softmax(logits, dim=1),
                      reduction="batchmean")
        ce = F.cross_entropy(logits, y)
        return ce + self.beta * kl, logits, {"kl": float(kl.detach())}

    def settings(self):
        return {"method": self.name, "eps": self.eps, "beta": self.beta, "steps": self.steps,
                "alpha": self.alpha}
