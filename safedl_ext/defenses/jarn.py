"""JARN: Jacobian Adversarially Regularized Networks (Chan et al., ICLR 2020; thesis ch. 3).

A classifier ``f`` is trained so that its input gradient ``J = dL/dx`` (per sample,
zero-mean and L2-normalised) looks like an image to a discriminator ``D``. An adaptor
``A`` (1x1 convolution + tanh) maps ``J`` into image space; ``D`` (4x4 stride-2
convolutions, batch norm, LeakyReLU 0.1) tells real images (label 1) from ``A(J)``
(label 0). Thesis Algorithm 1, per step:

1. ``x <- clamp(x + U(-eps, eps))`` (uniform input noise);
2. ``L_cls = CE(f(x), y)`` and ``J`` from the same forward pass (double backprop);
3. ``L_adv = log D(x) + log(1 - D(A(J)))`` (the discriminator's objective);
   ``f`` and ``A`` minimise ``L_cls + lambda_adv * L_adv``;
4. every ``disc_every`` steps, ``D`` takes one step maximising ``L_adv``.

JARN switches on for the last ``jarn_fraction`` of the optimiser steps (thesis text 25%;
the authors' code 12.5%); before that the step is a standard one. ``wrt="prob"`` (the
default, as in the authors' code) is the gradient of the true-class softmax probability;
``wrt="loss"`` is the thesis text's Jacobian of the loss. After the per-sample
normalisation the two differ only in sign (``dp_y/dx = -p_y dL/dx``), and the sign matters:
the discriminator learns real images as "real", and a robust model's probability gradient
looks like its input while its loss gradient looks like the negated input (measured on
MNIST: cosine with the normalised image -0.40 for a PGD-trained CNN's loss gradient). With
``"loss"`` the classifier is pushed towards the opposite of robust saliency.
``adversarial="fgsm"`` gives JARN-AT1: the classifier (and its Jacobian) see FGSM
examples with a random start (step 1.25 eps) instead of noisy clean ones.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gradients import input_gradients, normalize_per_sample
from .methods import Method, StepContext, craft_linf, uniform_noise

__all__ = ["JARN", "Adaptor", "Discriminator", "JARNConfig", "disc_depth"]


@dataclass(frozen=True)
class JARNConfig:
    """JARN's settings; defaults follow the thesis (CIFAR-10 unless said).

    Attributes:
        lambda_adv: weight of the adversarial term (thesis/authors: 1).
        eps: half-width of the uniform input noise, pixel units (8/255 on CIFAR-10; the
            attack radius of the data set).
        jarn_fraction: last fraction of the optimiser steps with JARN on (thesis 0.25,
            authors' code 0.125; 1.0 = from the start).
        disc_every: discriminator update every n classifier steps (authors' code: 20).
        disc_layers: stride-2 convolutions in D; ``None`` (default) halves the image down
            to 1 x 1: 5 on 32 x 32 (the authors' CIFAR-10 code), 4 on MNIST's 28 x 28, 3
            on digits' 8 x 8 (see :func:`disc_depth`).
        disc_width: channels of D's first convolution, doubled per layer (authors: 32).
        disc_lr: Adam learning rate of D (authors' code: 1e-3).
        wrt: ``"prob"`` (authors' code; default, see the module docstring for why),
            ``"loss"`` (thesis text) or ``"logit"`` (the true-class logit's gradient, which
            does not vanish when the softmax saturates) Jacobian.
        normalize: ``"zero_mean_l2"`` (thesis/authors) or ``"l2"``.
        real_images: how real images are shown to D: ``"normalized"`` gives them the
            Jacobian's own per-sample normalisation (``normalize``), so real and adapted
            gradients share one scale (the authors' code feeds D zero-mean, unit-L2 images);
            ``"signed"`` maps [0, 1] to [-1, 1]; ``"standardize"`` is per-image
            standardisation (zero mean, unit standard deviation). With ``"signed"`` or
            ``"standardize"`` the adaptor must first learn to scale unit-norm gradients up
            by ~sqrt(D), which a few hundred steps do not achieve.
        gan_loss: ``"minimax"`` (f minimises ``log(1 - D(A(J)))``, as in the thesis) or
            ``"non_saturating"`` (f maximises ``log D(A(J))``).
        adversarial: ``None`` (JARN) or ``"fgsm"`` (JARN-AT1).
    """

    lambda_adv: float = 1.0
    eps: float = 8 / 255
    jarn_fraction: float = 0.25
    disc_every: int = 20
    disc_layers: int | None = None
    disc_width: int = 32
    disc_lr: float = 1e-3
    wrt: Literal["loss", "prob", "logit"] = "prob"
    normalize: Literal["zero_mean_l2", "l2"] = "zero_mean_l2"
    real_images: Literal["normalized", "signed", "standardize"] = "normalized"
    gan_loss: Literal["minimax", "non_saturating"] = "minimax"
    adversarial: Literal["fgsm"] | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.lambda_adv >= 0, f"lambda_adv must be >= 0, got {self.lambda_adv}")
        need(self.eps >= 0, f"eps must be >= 0, got {self.eps}")
        need(0 < self.jarn_fraction <= 1,
             f"jarn_fraction must be in (0, 1], got {self.jarn_fraction}")
        need(isinstance(self.disc_every, int) and self.disc_every >= 1,
             f"disc_every must be an int >= 1, got {self.disc_every!r}")
        need(self.disc_layers is None
             or (isinstance(self.disc_layers, int) and self.disc_layers >= 1),
             f"disc_layers must be None or an int >= 1, got {self.disc_layers!r}")
        need(isinstance(self.disc_width, int) and self.disc_width >= 1,
             f"disc_width must be an int >= 1, got {self.disc_width!r}")
        need(self.disc_lr > 0, f"disc_lr must be > 0, got {self.disc_lr}")
        need(self.wrt in ("loss", "prob", "logit"),
             f"wrt must be 'loss', 'prob' or 'logit', got {self.wrt!r}")
        need(self.normalize in ("zero_mean_l2", "l2"),
             f"normalize must be 'zero_mean_l2' or 'l2', got {self.normalize!r}")
        need(self.real_images in ("normalized", "signed", "standardize"),
             "real_images must be 'normalized', 'signed' or 'standardize', got "
             f"{self.real_images!r}")
        need(self.gan_loss in ("minimax", "non_saturating"),
             f"gan_loss must be 'minimax' or 'non_saturating', got {self.gan_loss!r}")
        need(self.adversarial in (None, "fgsm"),
             f"adversarial must be None or 'fgsm', got {self.adversarial!r}")


class Adaptor(nn.Module):
    """``tanh(conv1x1(J))``: maps an input gradient (N, C, H, W) into image space.

    Starts as ``tanh(J)`` (identity weights, zero bias): a default-initialised bias shifts
    every pixel by up to tanh(1), an offset a discriminator spots at once while the
    normalised real images have zero mean, and the adaptor needs hundreds of steps to undo.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            self.conv.bias.zero_()

    def forward(self, j: Tensor) -> Tensor:
        """j: (N, C, H, W) -> (N, C, H, W) in (-1, 1)."""
        return torch.tanh(self.conv(j))


def disc_depth(height: int, width: int) -> int:
    """Stride-2 4x4 convolutions (padding 1) that take an ``height x width`` map to 1 x 1
    on its smaller side: side -> floor(side / 2) per layer, at least one layer.

    32 -> 16 -> 8 -> 4 -> 2 -> 1 is 5 layers; 28 -> 14 -> 7 -> 3 -> 1 is 4. A deeper stack
    only adds layers that see a zero-padded 1 x 1 map.
    """
    side, layers = min(height, width), 0
    while side > 1:
        side //= 2
        layers += 1
    return max(layers, 1)


class Discriminator(nn.Module):
    """Real-vs-gradient critic: ``layers`` 4x4 stride-2 convolutions (padding 1), batch
    norm after all but the first, LeakyReLU 0.1; then global average pooling and a linear
    layer to one logit (any input size; spatial size stops halving at 1).

    Args:
        channels: C of the images. layers: number of convolutions. width: channels of
            the first, doubled per layer (capped at 8x).
    """

    def __init__(self, channels: int, layers: int = 5, width: int = 32) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        c_in = channels
        for i in range(layers):
            c_out = width * min(2 ** i, 8)
            mods.append(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=i == 0))
            if i > 0:
                mods.append(nn.BatchNorm2d(c_out))
            mods.append(nn.LeakyReLU(0.1))
            c_in = c_out
        self.features = nn.Sequential(*mods)
        self.head = nn.Linear(c_in, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W), any H, W >= 1 -> (N,) logits."""
        h = x
        for m in self.features:
            if isinstance(m, nn.Conv2d) and min(h.shape[-2:]) < 2:
                h = F.pad(h, (0, 1, 0, 1))  # keep tiny maps alive instead of failing
            h = m(h)
        return self.head(h.mean(dim=(2, 3))).squeeze(1)


def _real_view(x: Tensor, how: str, normalize: str) -> Tensor:
    if how == "normalized":
        return normalize_per_sample(x, normalize)  # type: ignore[arg-type]
    if how == "signed":
        return x * 2 - 1
    flat = x.flatten(1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, keepdim=True).clamp_min(1.0 / flat.shape[1] ** 0.5)
    return ((flat - mean) / std).view_as(x)


class JARN(Method):
    """JARN (and JARN-AT1 with ``JARNConfig(adversarial="fgsm")``) as a training method.

    The adaptor trains with the classifier's optimiser; the discriminator has its own
    Adam. Before JARN switches on, a step is a standard (or FGSM-AT) step without the
    double-backprop cost.
    """

    name = "jarn"

    def __init__(self, config: JARNConfig | None = None, **overrides: Any) -> None:
        cfg = config or JARNConfig()
        if overrides:
            cfg = JARNConfig(**{**asdict(cfg), **overrides})
        self.config = cfg
        self.name = "jarn-at1" if cfg.adversarial == "fgsm" else "jarn"
        self.adaptor: Adaptor | None = None
        self.disc: Discriminator | None = None
        self.disc_opt: torch.optim.Optimizer | None = None
        self._fake: Tensor | None = None
        self._real: Tensor | None = None
        self.disc_updates = 0
        self._zero_ema: float | None = None
        self._warned_zero = False

    # -------------------------------------------------------------- set-up and state
    def setup(self, model: nn.Module, example: Tensor) -> None:
        if example.dim() != 4:
            raise ValueError(f"JARN needs (N, C, H, W) images, got {tuple(example.shape)}")
        cfg, channels, device = self.config, example.shape[1], example.device
        self.adaptor = Adaptor(channels).to(device)
        layers = cfg.disc_layers or disc_depth(*example.shape[-2:])
        self.disc = Discriminator(channels, layers, cfg.disc_width).to(device)
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.disc_lr,
                                         betas=(0.5, 0.999))

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.adaptor.parameters()) if self.adaptor is not None else []

    def state_dict(self) -> dict[str, Any]:
        assert self.adaptor is not None and self.disc is not None and self.disc_opt is not None
        return {"adaptor": self.adaptor.state_dict(), "disc": self.disc.state_dict(),
                "disc_opt": self.disc_opt.state_dict(), "disc_updates": self.disc_updates,
                "zero_ema": self._zero_ema, "warned_zero": self._warned_zero}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.adaptor is not None and self.disc is not None and self.disc_opt is not None
        self.adaptor.load_state_dict(state["adaptor"])
        self.disc.load_state_dict(state["disc"])
        self.disc_opt.load_state_dict(state["disc_opt"])
        self.disc_updates = int(state["disc_updates"])
        # Checkpoints written before these keys existed resume with a fresh average.
        self._zero_ema = state.get("zero_ema")
        self._warned_zero = bool(state.get("warned_zero", False))

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self.config)}

    # ------------------------------------------------------------------- the step
    def active(self, ctx: StepContext) -> bool:
        """Whether JARN's adversarial term is on at this step."""
        start = ctx.total_steps - round(self.config.jarn_fraction * ctx.total_steps)
        return ctx.step >= start

    def _inputs(self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext) -> Tensor:
        cfg = self.config
        if cfg.adversarial == "fgsm":
            return craft_linf(model, x, y, eps=cfg.eps, alpha=1.25 * cfg.eps, steps=1,
                              random_start=True, generator=ctx.generator)
        return uniform_noise(x, cfg.eps, ctx.generator)

    def loss(self, model, x, y, ctx):
        assert self.adaptor is not None and self.disc is not None
        cfg = self.config
        xin = self._inputs(model, x, y, ctx)
        self._fake = self._real = None
        if not self.active(ctx):
            logits = model(xin)
            return F.cross_entropy(logits, y), logits, {"jarn": 0.0}
        if x.dim() != 4:
            raise ValueError(f"JARN needs (N, C, H, W) images, got {tuple(x.shape)}")
        g, logits = input_gradients(model, xin, y, wrt=cfg.wrt, normalize=cfg.normalize,
                                    create_graph=True, return_logits=True)
        ce = F.cross_entropy(logits, y)
        fake = self.adaptor(g)
        real = _real_view(xin.detach(), cfg.real_images, cfg.normalize)
        for p in self.disc.parameters():
            p.requires_grad_(False)
        try:
            # Real and fake in one batch, as in D's own update: batch-norm statistics of
            # a fake-only batch would show D a different input distribution.
            d_fake = self.disc(torch.cat([real, fake]))[real.shape[0]:]
        finally:
            for p in self.disc.parameters():
                p.requires_grad_(True)
        if cfg.gan_loss == "minimax":
            # log(1 - D(A(J))) = -BCE(d_fake, 0); the log D(x) term has no f-gradient.
            adv = -F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        else:
            adv = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
        self._fake, self._real = fake.detach(), real
        fooled = float((d_fake > 0).float().mean())
        # Samples whose Jacobian is exactly zero: with wrt="prob" (or "loss") a saturated
        # softmax underflows the gradient in float32; such samples give the adversarial
        # term nothing to work with and are the sign of gradient masking.
        zero = float((g.detach().flatten(1).abs().amax(1) == 0).float().mean())
        self._zero_ema = zero if self._zero_ema is None else 0.9 * self._zero_ema + 0.1 * zero
        if self._zero_ema > 0.5 and not self._warned_zero:
            self._warned_zero = True
            warnings.warn(
                f"JARN: about {self._zero_ema:.0%} of the input Jacobians (wrt={cfg.wrt!r}) "
                "are exactly zero: the softmax saturates and the gradient underflows in "
                "float32. Cross-entropy attacks will overstate this model's robustness "
                "(gradient masking); evaluate with loss='margin', or train with wrt='logit'.",
                RuntimeWarning, stacklevel=2)
        return ce + cfg.lambda_adv * adv, logits, {
            "jarn": 1.0, "ce": float(ce.detach()), "adv": float(adv.detach()),
            "disc_fooled": fooled, "jacobian_zero": zero}

    def after_step(self, model, ctx):
        if self._fake is None or self._real is None:
            return {}
        assert self.disc is not None and self.disc_opt is not None
        fake, real = self._fake, self._real
        self._fake = self._real = None
        if ctx.step % self.config.disc_every != 0:
            return {}
        logits = self.disc(torch.cat([real, fake]))
        target = torch.cat([torch.ones(real.shape[0], device=real.device),
                            torch.zeros(fake.shape[0], device=fake.device)]).to(logits.dtype)
        d_loss = F.binary_cross_entropy_with_logits(logits, target)
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_opt.step()
        self.disc_updates += 1
        acc = float(((logits > 0).to(target.dtype) == target).float().mean())
        return {"disc_loss": float(d_loss.detach()), "disc_acc": acc}
