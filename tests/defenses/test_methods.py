"""Training methods on real data (scikit-learn digits): what each one must achieve."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

from safedl_ext.attacks import PGD
from safedl_ext.defenses import (
    JARN,
    TRADES,
    DoubleBackprop,
    JARNConfig,
    StepContext,
    TrainConfig,
    craft_linf,
    fit,
    make_method,
)
from safedl_ext.models import DigitsCNN

EPS = 0.1
CFG = TrainConfig(epochs=8, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0,
                  schedule="constant", log_every=10)


def _train(digits, method, cfg=CFG, seed=0):
    torch.manual_seed(seed)
    model = DigitsCNN(width=16)
    return fit(model, method, (digits.x_train, digits.y_train), config=cfg,
               test=(digits.x_test, digits.y_test), progress=False)


def _pgd_acc(model, digits, steps=10):
    res = PGD(model, eps=EPS, alpha=EPS / 4, steps=steps, early_stop=True)(digits.x_test,
                                                                          digits.y_test)
    return float((~res.success).float().mean())


@pytest.fixture(scope="module")
def standard(digits):
    return _train(digits, make_method("standard"))


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, gain", [
    ("pgd-at", dict(steps=5), 0.15),
    ("fgsm-at", {}, 0.10),
    ("double-backprop", dict(lam=0.1), 0.05),
    ("trades", dict(steps=5, beta=3.0), 0.10),
])
def test_robust_training_beats_standard_under_pgd(digits, standard, name, kwargs, gain):
    """Each defence keeps clean accuracy high and raises PGD-10 accuracy at eps=0.1
    clearly above the standard model's (same data, seed, epochs)."""
    res = _train(digits, make_method(name, eps=EPS, **kwargs))
    assert res.test_accuracy > 0.9
    base, robust = _pgd_acc(standard.model, digits), _pgd_acc(res.model, digits)
    assert robust > base + gain, (name, base, robust)


def test_craft_linf_final_iterate_in_ball_and_raises_loss(digits, standard):
    model = standard.model.train()
    x, y = digits.x_test[:128], digits.y_test[:128]
    gen = torch.Generator().manual_seed(0)
    xa = craft_linf(model, x, y, eps=EPS, alpha=EPS / 4, steps=10, random_start=True,
                    generator=gen)
    assert model.training  # mode restored
    assert all(p.requires_grad for p in model.parameters())
    assert float((xa - x).abs().max()) <= EPS + 1e-6
    assert float(xa.min()) >= 0 and float(xa.max()) <= 1
    with torch.no_grad():
        model.eval()
        assert F.cross_entropy(model(xa), y) > 3 * F.cross_entropy(model(x), y)


def test_double_backprop_loss_and_gradient_match_explicit(digits):
    torch.manual_seed(0)
    model = DigitsCNN(width=8).double()
    x, y = digits.x_train[:32].double(), digits.y_train[:32]
    ctx = StepContext(0, 1, 0, None, torch.device("cpu"))
    loss, _, _ = DoubleBackprop(lam=0.5).loss(model, x, y, ctx)
    got = torch.autograd.grad(loss, list(model.parameters()))
    xr = x.clone().requires_grad_(True)
    logits = model(xr)
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xr,
                               create_graph=True)
    want_loss = F.cross_entropy(logits, y) + 0.5 * g.flatten(1).pow(2).sum(1).mean()
    want = torch.autograd.grad(want_loss, list(model.parameters()))
    assert float(loss.detach()) == pytest.approx(float(want_loss.detach()), rel=1e-10)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_trades_kl_term_nonnegative_and_finite(digits):
    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    ctx = StepContext(0, 1, 0, torch.Generator().manual_seed(0), torch.device("cpu"))
    loss, logits, logs = TRADES(eps=EPS, steps=3).loss(model, digits.x_train[:64],
                                                        digits.y_train[:64], ctx)
    assert torch.isfinite(loss) and logs["kl"] >= 0 and logits.shape == (64, 10)


def test_jarn_switches_on_late_and_trains_adaptor_and_discriminator(digits):
    """JARN is off for the first (1 - jarn_fraction) of the steps; then the classifier's
    loss carries the adversarial term, the discriminator steps every disc_every steps and
    the adaptor (trained by the classifier's optimiser) moves."""

    class Recording(JARN):
        def setup(self, model, example):
            super().setup(model, example)
            self.initial = {k: v.clone() for k, v in self.state_dict()["adaptor"].items()}
            self.initial_disc = [p.detach().clone() for p in self.disc.parameters()]

    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 2})
    method = Recording(JARNConfig(eps=EPS, jarn_fraction=0.5, disc_every=3, disc_layers=2,
                                  disc_width=8))
    torch.manual_seed(0)
    res = fit(DigitsCNN(width=8), method, (digits.x_train, digits.y_train), config=cfg,
              progress=False)
    steps = 2 * (len(digits.y_train) // 64)
    assert res.steps == steps
    start = steps - round(0.5 * steps)
    assert method.disc_updates == sum(1 for s in range(start, steps) if s % 3 == 0)
    on = [h for h in res.history if h["step"] > start]
    off = [h for h in res.history if h["step"] <= start]
    assert off and all(h["jarn"] == 0.0 for h in off)
    assert on and all(h["jarn"] > 0 for h in on) and all("adv" in h for h in on)
    adaptor = method.state_dict()["adaptor"]
    assert any(not torch.equal(adaptor[k], v) for k, v in method.initial.items())
    assert any(not torch.equal(p, q) for p, q in
               zip(method.disc.parameters(), method.initial_disc, strict=True))


def test_jarn_adversarial_term_reaches_the_classifier(digits):
    """With lambda_adv > 0 the classifier's parameter gradient differs from the
    cross-entropy's alone by the gradient of the discriminator term (double backprop)."""
    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    x, y = digits.x_train[:64], digits.y_train[:64]
    ctx = StepContext(step=9, total_steps=10, epoch=0, generator=torch.Generator(),
                      device=torch.device("cpu"))
    grads = {}
    for lam in (0.0, 1.0):
        m = JARN(JARNConfig(eps=0.0, lambda_adv=lam, jarn_fraction=1.0, disc_layers=2,
                            disc_width=8))
        torch.manual_seed(1)
        m.setup(model, x[:2])
        loss, _, logs = m.loss(model, x, y, ctx)
        grads[lam] = torch.autograd.grad(loss, list(model.parameters()))
        assert logs["jarn"] == 1.0 and 0.0 <= logs["disc_fooled"] <= 1.0
    diff = sum(float((a - b).abs().sum()) for a, b in zip(grads[0.0], grads[1.0], strict=True))
    assert diff > 1e-6
    # the discriminator gets no gradient from the classifier's loss
    assert all(p.grad is None for p in m.disc.parameters())


def test_jarn_flags_saturated_jacobians(digits, digits_model):
    """A softmax pushed into saturation (logits x1000) underflows the probability
    Jacobian to exact zeros: JARN reports it and warns once; the logit Jacobian stays."""
    model = copy.deepcopy(digits_model).eval()
    head = model.net[-1]
    with torch.no_grad():
        head.weight.mul_(1000.0)
        head.bias.mul_(1000.0)
    x, y = digits.x_train[:128], digits.y_train[:128]
    ctx = StepContext(step=0, total_steps=1, epoch=0, generator=torch.Generator(),
                      device=torch.device("cpu"))
    seen, methods = {}, {}
    for wrt in ("prob", "logit"):
        m = JARN(JARNConfig(eps=0.0, jarn_fraction=1.0, disc_layers=2, disc_width=8, wrt=wrt))
        m.setup(model, x[:2])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, logits, logs = m.loss(model, x, y, ctx)
            m.loss(model, x, y, ctx)
        seen[wrt] = (logs["jacobian_zero"], [w for w in caught
                                             if "exactly zero" in str(w.message)])
        methods[wrt] = m
    correct = float((logits.argmax(1) == y).float().mean())
    assert correct > 0.9
    zero_prob, warned_prob = seen["prob"]
    assert zero_prob >= 0.8 * correct and len(warned_prob) == 1  # once, not per step
    assert seen["logit"][0] == 0.0 and not seen["logit"][1]
    # The running average and the warned flag travel with a checkpoint: a resumed run
    # does not warn a second time.
    buf = io.BytesIO()
    torch.save(methods["prob"].state_dict(), buf)
    buf.seek(0)
    resumed = JARN(methods["prob"].config)
    resumed.setup(model, x[:2])
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed._zero_ema == pytest.approx(methods["prob"]._zero_ema)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.loss(model, x, y, ctx)
    assert not [w for w in caught if "exactly zero" in str(w.message)]


def test_jarn_at1_uses_fgsm_examples(digits):
    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    m = make_method("jarn-at1", eps=EPS, disc_layers=2, disc_width=8)
    assert m.name == "jarn-at1"
    m.setup(model, digits.x_train[:2])
    ctx = StepContext(0, 10, 0, torch.Generator().manual_seed(0), torch.device("cpu"))
    x, y = digits.x_train[:64], digits.y_train[:64]
    xin = m._inputs(model, x, y, ctx)
    assert float((xin - x).abs().max()) <= EPS + 1e-6
    assert float((xin - x).abs().mean()) > EPS / 2  # an attack, not the clean input


def test_jarn_adaptor_starts_as_tanh_and_real_images_share_the_jacobians_scale(digits):
    """At the start the adaptor is tanh(J), and real images reach the discriminator with
    the Jacobian's normalisation (zero mean, unit L2 per sample), so the two sides differ
    in shape, not in offset or scale."""
    from safedl_ext.defenses.jarn import Adaptor, _real_view

    j = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(Adaptor(3)(j), torch.tanh(j))
    real = _real_view(digits.x_train[:16], "normalized", "zero_mean_l2").flatten(1)
    torch.testing.assert_close(real.mean(1), torch.zeros(16), atol=1e-6, rtol=0)
    torch.testing.assert_close(real.norm(dim=1), torch.ones(16), atol=1e-5, rtol=0)


def test_default_discriminator_halves_the_image_down_to_one_pixel(digits):
    """By default D gets as many stride-2 convolutions as take the image to 1 x 1 (the
    authors' 5 on CIFAR-10's 32 x 32, 4 on MNIST, 3 on digits); none sees a padded 1 x 1."""
    from safedl_ext.defenses.jarn import disc_depth

    assert [disc_depth(s, s) for s in (1, 8, 28, 32)] == [1, 3, 4, 5]
    assert disc_depth(28, 64) == 4
    for shape, convs in (((2, 1, 28, 28), 4), ((2, 3, 32, 32), 5), ((2, 1, 8, 8), 3)):
        m = JARN(JARNConfig(eps=0.1))
        m.setup(DigitsCNN(width=4), torch.zeros(shape))
        assert sum(isinstance(c, torch.nn.Conv2d) for c in m.disc.modules()) == convs
    m = JARN(JARNConfig(eps=0.1, disc_layers=2))
    m.setup(DigitsCNN(width=4), digits.x_train[:2])
    assert sum(isinstance(c, torch.nn.Conv2d) for c in m.disc.modules()) == 2
    with pytest.raises(ValueError, match="disc_layers"):
        JARNConfig(disc_layers=0)
