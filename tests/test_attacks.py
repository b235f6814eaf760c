"""Attack engine on a real trained model (a CNN on scikit-learn's digits)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from safedl_ext import attacks as A
from safedl_ext import ops
from safedl_ext.models import DigitsCNN
from safedl_ext.training import accuracy, train_classifier

EPS = 0.2  # digits are 8x8 with 17 grey levels: 8/255 barely moves them


@pytest.fixture(scope="module")
def test_set(digits):
    return digits.x_test, digits.y_test


def test_model_is_a_real_classifier(digits_model, test_set):
    assert accuracy(digits_model, *test_set) > 0.95


def test_clean_ge_fgsm_ge_pgd(digits_model, test_set):
    report = A.evaluate(digits_model, test_set, A.default_attacks(digits_model, 0.1),
                        progress=False)
    acc = report.accuracy
    assert acc["Clean"] > 95
    assert acc["Clean"] > acc["FGSM"] >= acc["PGD20"]
    assert acc["PGD5"] >= acc["PGD10"] >= acc["PGD20"]


def test_pgd20_breaks_a_standard_model(digits_model, test_set):
    res = A.PGD(digits_model, eps=EPS, alpha=EPS / 8, steps=20)(*test_set)
    robust = 1 - res.success.float().mean().item()
    assert robust < 0.10
    # The examples live in the ball and the box, and really fool the model.
    delta = (res.x_adv - test_set[0]).abs().amax(dim=(1, 2, 3))
    assert float(delta.max()) <= EPS + 1e-6
    assert float(res.x_adv.min()) >= 0 and float(res.x_adv.max()) <= 1
    with torch.no_grad():
        fooled = digits_model(res.x_adv).argmax(1) != test_set[1]
    assert torch.equal(fooled, res.success)


def test_l2_pgd(digits_model, test_set):
    x, y = test_set
    res = A.pgd(digits_model, x, y, eps=2.0, alpha=0.25, steps=20, norm="l2",
                generator=torch.Generator().manual_seed(0))
    assert float((res.x_adv - x).flatten(1).norm(dim=1).max()) <= 2.0 + 1e-5
    assert res.success.float().mean() > 0.9


def test_targeted_reaches_target(digits_model, test_set):
    x, y = test_set
    target = (y + 1) % 10
    res = A.pgd(digits_model, x, target, eps=0.3, alpha=0.03, steps=40, targeted=True,
                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = digits_model(res.x_adv).argmax(1)
    assert torch.equal(pred == target, res.success)
    assert res.success.float().mean() > 0.9
    res_m = A.pgd(digits_model, x, target, eps=0.3, alpha=0.03, steps=40, targeted=True,
                  loss="margin", generator=torch.Generator().manual_seed(0))
    assert res_m.success.float().mean() > 0.9


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_early_stop_same_robust_accuracy(digits_model, test_set, norm, loss):
    x, y = test_set
    eps = 0.1 if norm == "linf" else 0.5
    kw = dict(eps=eps, alpha=eps / 4, steps=10, norm=norm, loss=loss, restarts=2)
    plain = A.pgd(digits_model, x, y, generator=torch.Generator().manual_seed(3), **kw)
    fast = A.pgd(digits_model, x, y, early_stop=True,
                 generator=torch.Generator().manual_seed(3), **kw)
    assert 0.05 < plain.success.float().mean() < 0.95  # a regime where it matters
    assert torch.equal(plain.success, fast.success)
    # Fooled samples: the same first adversarial example.
    assert torch.allclose(plain.x_adv[plain.success], fast.x_adv[fast.success], atol=1e-6)


def test_memory_formats_agree(digits_model, test_set):
    x, y = test_set
    runs = {fmt: A.pgd(digits_model, x, y, eps=0.1, steps=10, memory_format=fmt,
                       generator=torch.Generator().manual_seed(0))
            for fmt in ("preserve", "channels_last", "auto")}
    rates = [r.success.float().mean().item() for r in runs.values()]
    assert max(rates) - min(rates) <= 0.01  # only float rounding differs
    assert torch.equal(runs["auto"].success, runs["channels_last"].success)
    for r in runs.values():
        assert r.x_adv.is_contiguous()  # back in x's layout
    with pytest.raises(ValueError, match="needs 4-D"):
        A.pgd(digits_model.net[0:0], x.flatten(1), y, memory_format="channels_last")


def test_restarts_never_hurt(digits_model, test_set):
    x, y = test_set
    one = A.pgd(digits_model, x, y, eps=0.1, steps=5, restarts=1,
                generator=torch.Generator().manual_seed(0))
    four = A.pgd(digits_model, x, y, eps=0.1, steps=5, restarts=4,
                 generator=torch.Generator().manual_seed(0))
    # Restart 0 of the stacked batch is the single-restart run (same generator stream
    # prefix is not guaranteed), so compare rates: more restarts find at least as many.
    assert four.success.float().mean() >= one.success.float().mean() - 0.01


def test_per_sample_eps(digits_model, test_set):
    x, y = test_set[0][:200], test_set[1][:200]
    eps = torch.cat([torch.zeros(100), torch.full((100,), 0.3)])
    res = A.pgd(digits_model, x, y, eps=eps, alpha=0.03, steps=20)
    assert torch.equal(res.x_adv[:100], x[:100])
    with torch.no_grad():
        clean_wrong = digits_model(x[:100]).argmax(1) != y[:100]
    assert torch.equal(res.success[:100], clean_wrong)
    assert res.success[100:].float().mean() > 0.95


def test_seeded_attacks_are_reproducible(digits_model, test_set):
    x, y = test_set[0][:100], test_set[1][:100]
    a = A.PGD(digits_model, eps=0.1, steps=3, seed=5)(x, y)
    b = A.PGD(digits_model, eps=0.1, steps=3, seed=5)(x, y)
    assert torch.equal(a.x_adv, b.x_adv)


def test_model_state_is_restored_and_no_param_grads(test_set):
    model = DigitsCNN(width=4)
    model.train()
    x, y = test_set[0][:32], test_set[1][:32]
    A.pgd(model, x, y, eps=0.1, steps=2)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_fgsm_is_one_signed_step(digits_model, test_set):
    x, y = test_set[0][:64], test_set[1][:64]
    res = A.fgsm(digits_model, x, y, eps=0.1)
    xr = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(digits_model(xr), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, xr)
    manual = (x + 0.1 * g.sign()).clamp(0, 1)
    with torch.no_grad():
        clean_wrong = digits_model(x).argmax(1) != y
    keep = ~clean_wrong
    assert torch.allclose(res.x_adv[keep], manual[keep], atol=1e-6)


def test_reference_backend_gives_the_same_attack(digits_model, test_set, monkeypatch):
    x, y = test_set[0][:128], test_set[1][:128]
    native = A.pgd(digits_model, x, y, eps=0.1, steps=5,
                   generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(ops, "_NATIVE", False)
    ref = A.pgd(digits_model, x, y, eps=0.1, steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(native.success, ref.success)
    assert torch.equal(native.x_adv, ref.x_adv)


def test_evaluate_outputs_and_dataloader(digits_model, test_set, tmp_path):
    x, y = test_set
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    rep_loader = A.evaluate(digits_model, loader, eps=0.1, progress=False)
    rep_tensor = A.evaluate(digits_model, (x, y), eps=0.1, batch_size=100, progress=False)
    assert rep_loader.accuracy == rep_tensor.accuracy
    assert list(rep_loader.accuracy) == ["Clean", "FGSM", "PGD5", "PGD10", "PGD20"]
    md = rep_loader.to_markdown("standard")
    assert md.splitlines()[0] == "|  | Clean | FGSM | PGD5 | PGD10 | PGD20 |"
    assert md.splitlines()[2].startswith("| standard | ")
    rep_loader.save(str(tmp_path))
    data = json.loads((tmp_path / "robustness.json").read_text())
    assert data["n"] == x.shape[0] and data["accuracy"]["Clean"] > 95
    assert data["settings"]["PGD20"]["steps"] == 20


def test_transfer_evaluation(digits_model, digits, test_set):
    torch.manual_seed(1)
    other = train_classifier(DigitsCNN(width=8), digits.x_train, digits.y_train, epochs=8,
                             lr=2e-3, seed=1)
    x, y = test_set
    white = A.evaluate(other, (x, y), A.default_attacks(other, EPS, pgd_steps=(10,)),
                       progress=False)
    black = A.transfer_evaluate(digits_model, other, (x, y), eps=EPS, progress=False)
    assert black.kind == "transfer"
    assert black.accuracy["Clean"] == white.accuracy["Clean"]
    # Transferred examples hurt the target, but less than a white-box attack on it.
    assert black.accuracy["PGD10"] < black.accuracy["Clean"] - 10
    assert black.accuracy["PGD10"] > white.accuracy["PGD10"]


def _bad(digits_model, test_set, **kw):
    x, y = test_set[0][:8], test_set[1][:8]
    args = dict(x=x, y=y)
    args.update({k: v for k, v in kw.items() if k in ("x", "y")})
    rest = {k: v for k, v in kw.items() if k not in ("x", "y")}
    A.pgd(digits_model, args["x"], args["y"], steps=1, **rest)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"eps": -0.1}, ValueError, "eps must be >= 0"),
        ({"eps": float("inf")}, ValueError, "eps must be finite"),
        ({"alpha": 0.0}, ValueError, "alpha must be > 0"),
        ({"y": torch.full((8,), 12)}, ValueError, r"labels in \[0, 10\)"),
        ({"y": torch.zeros(7, dtype=torch.long)}, ValueError, r"y must have shape \(8,\)"),
        ({"y": torch.zeros(8)}, TypeError, "integer class labels"),
        ({"x": torch.full((8, 1, 8, 8), float("nan"))}, ValueError, "NaN or Inf"),
        ({"x": torch.full((8, 1, 8, 8), 3.0)}, ValueError, r"must lie in \[lo, hi\]"),
        ({"x": torch.rand(8, 1, 8, 8, dtype=torch.float64)}, TypeError, "dtype"),
        ({"x": torch.zeros(8, 1, 8, 8, dtype=torch.long)}, TypeError, "floating-point"),
        ({"norm": "l1"}, ValueError, "norm must be one of"),
        ({"loss": "hinge"}, ValueError, "loss must be one of"),
        ({"loss": "dlr", "targeted": True}, ValueError, "untargeted only"),
        ({"eps": torch.rand(3)}, ValueError, r"eps must be .* shape \(8,\)"),
        ({"restarts": 0}, ValueError, "restarts must be"),
        ({"autocast": torch.float16}, ValueError, "CUDA only"),
    ],
)
def test_bad_input_is_named(digits_model, test_set, kw, exc, match):
    with pytest.raises(exc, match=match):
        _bad(digits_model, test_set, **kw)


def test_device_mismatch_is_named(test_set):
    model = DigitsCNN(width=4).to("meta")  # parameters on another device than the data
    with pytest.raises(ValueError, match="x is on cpu but the model's parameters are on meta"):
        A.pgd(model, test_set[0][:4], test_set[1][:4])


def test_steps_must_be_positive(digits_model, test_set):
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        A.pgd(digits_model, test_set[0][:4], test_set[1][:4], steps=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_mismatch_and_cuda_attack(digits_model, test_set):
    x, y = test_set
    with pytest.raises(ValueError, match="model's parameters are on"):
        A.pgd(digits_model, x.cuda(), y.cuda())
    model = DigitsCNN(width=16).cuda()
    model.load_state_dict(digits_model.state_dict())
    res_gpu = A.pgd(model, x.cuda(), y.cuda(), eps=EPS, steps=20,
                    generator=torch.Generator().manual_seed(0))
    res_cpu = A.pgd(digits_model, x, y, eps=EPS, steps=20,
                    generator=torch.Generator().manual_seed(0))
    assert abs(res_gpu.success.float().mean().item() - res_cpu.success.float().mean().item()) < 0.02
    res_amp = A.pgd(model, x.cuda(), y.cuda(), eps=EPS, steps=20, autocast=torch.bfloat16)
    assert res_amp.success.float().mean() > 0.9


def test_fgsm_at_zero_eps_is_the_clean_prediction(digits, digits_model):
    """eps = 0 is a valid radius (the first point of an accuracy-vs-eps curve): the input
    comes back unchanged and success is the clean misclassification."""
    x, y = digits.x_test[:64], digits.y_test[:64]
    res = A.fgsm(digits_model, x, y, eps=0.0)
    assert torch.equal(res.x_adv, x)
    with torch.no_grad():
        assert torch.equal(res.success, digits_model(x).argmax(1) != y)
    mixed = A.fgsm(digits_model, x, y, eps=torch.tensor([0.0, 0.2]).repeat(32))
    assert torch.equal(mixed.x_adv[0::2], x[0::2])


# ------------------------------------------------- batching independence, NaN logits


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_evaluate_does_not_depend_on_the_batch_size(digits_model, test_set, norm, eps):
    """Each sample's random start comes from the seed and its index in the data set, so
    robust accuracy is the same for any batching (it used to move by 1.5 points)."""
    attacks = {"PGD5": A.PGD(digits_model, eps=eps, steps=5, norm=norm, early_stop=True)}
    accs = {bs: A.evaluate(digits_model, test_set, attacks, batch_size=bs,
                           progress=False).accuracy["PGD5"] for bs in (7, 64, 450)}
    assert len(set(accs.values())) == 1, accs
    # The same holds sample by sample: halves with their indices equal the whole.
    x, y = test_set
    pgd = A.PGD(digits_model, eps=eps, steps=5, norm=norm)
    whole = pgd(x, y)
    half = x.shape[0] // 2
    a = pgd(x[:half], y[:half], torch.arange(half))
    b = pgd(x[half:], y[half:], torch.arange(half, x.shape[0]))
    assert torch.equal(torch.cat([a.success, b.success]), whole.success)
    assert torch.equal(torch.cat([a.x_adv, b.x_adv]), whole.x_adv)


def test_sample_seeds_are_distinct_and_stable():
    s = A.sample_seeds(0, torch.arange(1000))
    assert s.dtype == torch.int64 and len(set(s.tolist())) == 1000 and int(s.min()) >= 0
    assert torch.equal(s[10:20], A.sample_seeds(0, torch.arange(10, 20)))
    assert not torch.equal(s[:10], A.sample_seeds(1, torch.arange(10)))


class _NaNWhere(torch.nn.Module):
    """The digits CNN, but NaN logits for inputs whose top-left pixel exceeds ``t``."""

    def __init__(self, net: torch.nn.Module, t: float) -> None:
        super().__init__()
        self.net, self.t = net, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        bad = (x[:, 0, 0, 0] > self.t)[:, None]
        return torch.where(bad, torch.full_like(z, float("nan")), z)


def test_nan_logits_are_refused_naming_the_samples(digits_model, test_set):
    x, y = test_set
    assert float(x[:, 0, 0, 0].max()) == 0.0  # the digits' corner pixel is always blank
    x = x.clone()
    x[[5, 300], 0, 0, 0] = 1.0
    model = _NaNWhere(digits_model, 0.5).eval()  # eval: restoring it leaves the CNN in eval
    with pytest.raises(A.NaNLogitsError, match=r"2 sample\(s\) of data \(indices 5, 300\)"):
        A.evaluate(model, (x, y), {}, batch_size=450, progress=False)
    with pytest.raises(A.NaNLogitsError, match=r"1 sample\(s\) of data \(indices 5\)"):
        A.evaluate(model, (x, y), {}, batch_size=64, progress=False)  # the first batch
    # NaN only once the attack moves a marked pixel: the attack refuses too, and
    # evaluate names the samples by their index in the data set, not in the batch.
    x, y = test_set
    x = x.clone()
    x[:, 0, 0, 7] = 0.0
    x[[150, 160], 0, 0, 7] = 0.5
    model = _Moved(digits_model).eval()
    assert A.evaluate(model, (x, y), {}, progress=False).accuracy["Clean"] > 90
    with pytest.raises(A.NaNLogitsError, match=r"2 sample\(s\) of x \(indices 0, 10\)"):
        A.pgd(model, x[150:170], y[150:170], eps=0.1, steps=3)
    with pytest.raises(A.NaNLogitsError, match=r"of data under PGD3 \(indices 150, 160\)"):
        A.evaluate(model, (x, y), {"PGD3": A.PGD(model, eps=0.1, steps=3)}, batch_size=100,
                   progress=False)


class _Moved(torch.nn.Module):
    """NaN logits once pixel (0, 7), which is 0.5 in marked clean images, has moved."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        d = (x[:, 0, 0, 7] - 0.5).abs()
        bad = ((d > 1e-6) & (d < 0.2))[:, None]
        return torch.where(bad, torch.full_like(z, float("nan")), z)


def test_evaluate_still_calls_two_argument_attacks(digits_model, test_set):
    """Attack subclasses and callables written for ``(x, y)`` keep working."""

    class Old(A.Attack):
        def __call__(self, x, y):  # the signature before per-sample seeds
            return A.fgsm(self.model, x, y, eps=0.1)

    rep = A.evaluate(digits_model, test_set, {"old": Old(digits_model),
                                              "fn": lambda x, y: A.fgsm(digits_model, x, y,
                                                                        eps=0.1)},
                     progress=False)
    assert rep.accuracy["old"] == rep.accuracy["fn"] < rep.accuracy["Clean"]
