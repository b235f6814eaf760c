"""The trainer: seeded, resumable after an interruption, atomic outputs, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from safedl_ext.defenses import (
    JARN,
    JARNConfig,
    Standard,
    TrainConfig,
    fit,
    load_checkpoint,
    make_method,
)
from safedl_ext.defenses.trainer import _lr_factor
from safedl_ext.models import DigitsCNN

CFG = TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0,
                  schedule="cosine", log_every=5)


def _model(seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    return DigitsCNN(width=8)


def _weights(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.state_dict().values()]


def test_standard_training_learns_digits(digits):
    res = fit(_model(), Standard(), (digits.x_train, digits.y_train), config=CFG,
              test=(digits.x_test, digits.y_test), progress=False)
    assert res.test_accuracy is not None and res.test_accuracy > 0.85
    assert res.steps == 3 * (len(digits.y_train) // 64)
    assert not res.model.training
    assert [h["epoch"] for h in res.history if "test_acc" in h] == [1.0, 2.0, 3.0]


def test_same_seed_same_weights_other_seed_differs(digits):
    data = (digits.x_train, digits.y_train)
    cfg1 = TrainConfig(**{**CFG.__dict__, "epochs": 1})
    a = fit(_model(), make_method("uniform", eps=0.1), data, config=cfg1, progress=False)
    b = fit(_model(), make_method("uniform", eps=0.1), data, config=cfg1, progress=False)
    c = fit(_model(), make_method("uniform", eps=0.1), data,
            config=TrainConfig(**{**cfg1.__dict__, "seed": 1}), progress=False)
    for p, q in zip(_weights(a.model), _weights(b.model), strict=True):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q)
               for p, q in zip(_weights(a.model), _weights(c.model), strict=True))


@pytest.mark.parametrize("method", ["uniform", "jarn"])
def test_interrupted_run_resumes_to_the_same_weights(digits, tmp_path, method):
    """A run stopped mid-epoch and resumed from its checkpoint ends exactly where an
    uninterrupted run ends (shuffles, noise, optimiser, schedule, JARN's discriminator)."""
    data = (digits.x_train, digits.y_train)
    kw = dict(jarn_fraction=0.5, disc_every=2, disc_layers=2, disc_width=8) \
        if method == "jarn" else {}
    full = fit(_model(), make_method(method, eps=0.1, **kw), data, config=CFG, progress=False)
    out = tmp_path / "run"
    part = fit(_model(), make_method(method, eps=0.1, **kw), data, config=CFG, out_dir=out,
               progress=False, max_steps=27)  # 27 is mid-epoch (20 batches per epoch)
    assert part.steps == 27 and (out / "checkpoint.pt").exists()
    assert not (out / "model.pt").exists()  # not finished
    done = fit(_model(seed=5), make_method(method, eps=0.1, **kw), data, config=CFG,
               out_dir=out, progress=False)
    assert done.resumed_from == 27 and done.steps == full.steps
    for p, q in zip(_weights(full.model), _weights(done.model), strict=True):
        assert torch.equal(p, q)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [rec["step"] for rec in lines]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert (out / "model.pt").exists() and (out / "train.json").exists()
    state = torch.load(out / "model.pt", weights_only=True)
    assert set(state) == set(full.model.state_dict())


def test_resume_refuses_other_settings(digits, tmp_path):
    data = (digits.x_train, digits.y_train)
    fit(_model(), Standard(), data, config=CFG, out_dir=tmp_path, progress=False, max_steps=3)
    other = TrainConfig(**{**CFG.__dict__, "lr": 1e-3})
    with pytest.raises(ValueError, match=r"other settings \(train.lr: 0.002 -> 0.001\)"):
        fit(_model(), Standard(), data, config=other, out_dir=tmp_path, progress=False)
    # resume=False starts afresh
    res = fit(_model(), Standard(), data, config=other, out_dir=tmp_path, progress=False,
              resume=False, max_steps=2)
    assert res.resumed_from is None
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_dataloader_input(digits):
    ds = torch.utils.data.TensorDataset(digits.x_train, digits.y_train)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    res = fit(_model(), Standard(), loader, config=CFG, test=(digits.x_test, digits.y_test),
              progress=False)
    assert res.steps == 3 * len(loader) and res.test_accuracy > 0.8


def test_schedules():
    step = _lr_factor(TrainConfig(schedule="step", milestones=(0.5, 0.75), gamma=0.1), 100)
    assert [step(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = _lr_factor(TrainConfig(schedule="cosine", warmup_steps=10), 110)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"), (dict(optimizer="lbfgs"), "optimizer"),
    (dict(schedule="poly"), "schedule"), (dict(milestones=(1.5,)), "milestones"),
    (dict(amp="int8"), "amp"), (dict(batch_size=0), "batch_size"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_fit_errors(digits):
    data = (digits.x_train, digits.y_train)
    with pytest.raises(TypeError, match="Method"):
        fit(_model(), "standard", data, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same length"):
        fit(_model(), Standard(), (digits.x_train, digits.y_train[:-1]), progress=False)
    with pytest.raises(ValueError, match="CUDA only"):
        fit(_model(), Standard(), data, config=TrainConfig(amp="bf16"), progress=False)
    with pytest.raises(ValueError, match="exceeds"):
        fit(_model(), Standard(), (digits.x_train[:10], digits.y_train[:10]),
            config=TrainConfig(batch_size=64), progress=False)
    with pytest.raises(TypeError, match="labels"):
        fit(_model(), Standard(), (digits.x_train, digits.y_train.float()), progress=False)
    with pytest.raises(ValueError, match="jarn_fraction"):
        JARN(JARNConfig(jarn_fraction=0.0))
    with pytest.raises(ValueError, match="method must be one of"):
        make_method("adversarial")


# ------------------------------------------- resume: other data, other model, every form


def test_resume_refuses_other_data_and_another_architecture(digits, tmp_path):
    """A run folder belongs to one data set and one architecture: resuming it with
    fewer samples, other content or another model is refused in one line (it used to
    resume, skip training and write model.pt, or die in load_state_dict)."""
    data = (digits.x_train, digits.y_train)
    fit(_model(), Standard(), data, config=CFG, out_dir=tmp_path, progress=False, max_steps=3)
    n = digits.x_train.shape[0]
    with pytest.raises(ValueError, match=rf"other training data \({n} samples of \(1, 8, 8\)"
                       r".*now 700 samples") as err:
        fit(_model(), Standard(), (digits.x_train[:700], digits.y_train[:700]), config=CFG,
            out_dir=tmp_path, progress=False)
    assert "\n" not in str(err.value) and "resume=False" in str(err.value)
    flipped = digits.x_train.flip(-1)  # same count and shapes, other content
    with pytest.raises(ValueError, match="other training data"):
        fit(_model(), Standard(), (flipped, digits.y_train), config=CFG, out_dir=tmp_path,
            progress=False)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"another architecture \(DigitsCNN, \d+ parameters"):
        fit(DigitsCNN(width=16), Standard(), data, config=CFG, out_dir=tmp_path,
            progress=False)
    assert not (tmp_path / "model.pt").exists()
    # The same data and model resume.
    res = fit(_model(), Standard(), data, config=CFG, out_dir=tmp_path, progress=False)
    assert res.resumed_from == 3 and (tmp_path / "model.pt").exists()


def test_checkpoint_without_digests_resumes_with_a_warning(digits, tmp_path):
    data = (digits.x_train, digits.y_train)
    fit(_model(), Standard(), data, config=CFG, out_dir=tmp_path, progress=False, max_steps=3)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for k in ("data", "arch", "loader_rng", "epoch_rng"):
        del state[k]
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.warns(UserWarning, match="predates data and architecture digests"):
        res = fit(_model(), Standard(), data, config=CFG, out_dir=tmp_path, progress=False)
    assert res.resumed_from == 3


def _forms(digits):
    """Every data form fit accepts, each built afresh (as a rerun of a script would)."""
    from safedl_ext.data import TensorLoader, random_crop_flip

    x, y = digits.x_train, digits.y_train
    ds = torch.utils.data.TensorDataset(x, y)
    return {
        "tensors": lambda: (x, y),
        "tensor-loader": lambda: TensorLoader(
            x, y, 64, drop_last=True, seed=3,
            transform=lambda xb, g: random_crop_flip(xb, padding=1, generator=g)),
        "dataloader-generator": lambda: torch.utils.data.DataLoader(
            ds, batch_size=64, shuffle=True, drop_last=True,
            generator=torch.Generator().manual_seed(7)),
        "dataloader-global-rng": lambda: torch.utils.data.DataLoader(
            ds, batch_size=64, shuffle=True, drop_last=True),
    }


@pytest.mark.parametrize("form", ["tensors", "tensor-loader", "dataloader-generator",
                                  "dataloader-global-rng"])
@pytest.mark.parametrize("stop", [27, 42])  # mid-epoch, and at an epoch end (21 per epoch)
def test_every_data_form_resumes_to_the_same_weights(digits, tmp_path, form, stop):
    make = _forms(digits)[form]
    method = lambda: make_method("uniform", eps=0.1)  # noqa: E731 (noise from the generator)
    full = fit(_model(), method(), make(), config=CFG, progress=False)
    out = tmp_path / "run"
    fit(_model(), method(), make(), config=CFG, out_dir=out, progress=False, max_steps=stop)
    done = fit(_model(seed=5), method(), make(), config=CFG, out_dir=out, progress=False)
    assert done.resumed_from == stop and done.steps == full.steps
    diff = max(float((p - q).abs().max())
               for p, q in zip(_weights(full.model), _weights(done.model), strict=True))
    assert diff == 0.0, f"{form}: resumed weights differ by {diff:.3g}"


def test_tensor_loader_epochs_differ_and_follow_set_epoch(digits):
    """fit calls set_epoch before every pass: epoch e's order is the loader's epoch e, not
    shifted by the setup's look at the first batch."""
    from safedl_ext.data import TensorLoader

    x, y = digits.x_train, digits.y_train
    seen: list[torch.Tensor] = []

    class Spy(TensorLoader):
        def __iter__(self):
            e = self.epoch
            for xb, yb in super().__iter__():
                seen.append(torch.tensor([e, int(yb[0])]))
                yield xb, yb

    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 2})
    fit(_model(), Standard(), Spy(x, y, 64, drop_last=True, seed=1), config=cfg, progress=False)
    per = len(y) // 64
    epochs = [int(t[0]) for t in seen]
    assert epochs == [0] + [0] * per + [1] * per  # the setup's look, then epochs 0 and 1


@pytest.mark.parametrize("bad, match", [
    ("x255", r"training inputs must lie in \[lo, hi\] = \[0.0, 1.0\].*\[0, 16"),
    ("nan", "training inputs contains NaN"),
    ("label", r"training labels must be in \[0, 10\) for a model with 10 outputs, got 10"),
    ("negative", "training labels must be >= 0"),
])
@pytest.mark.parametrize("form", ["tensors", "dataloader"])
def test_fit_checks_its_inputs_as_the_attacks_do(digits, bad, match, form):
    x, y = digits.x_train.clone(), digits.y_train.clone()
    if bad == "x255":
        x = x * 16  # the digits' 0..16 grey levels, unscaled
    elif bad == "nan":
        x[-1, 0, 3, 3] = float("nan")
    elif bad == "label":
        y[-1] = 10
    else:
        y[-1] = -1
    data = (x, y) if form == "tensors" else torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=len(y))
    with pytest.raises(ValueError, match=match):
        fit(_model(), Standard(), data, config=CFG, progress=False)


def test_fit_checks_the_test_split(digits):
    with pytest.raises(ValueError, match=r"test inputs must lie in"):
        fit(_model(), Standard(), (digits.x_train, digits.y_train), config=CFG,
            test=(digits.x_test * 255, digits.y_test), progress=False)


# ------------------------------------------- Ctrl-C, augmenting datasets, epoch ends


class _NoisyDigits(torch.utils.data.Dataset):
    """Digits with per-sample noise from torch's global RNG (as torchvision transforms)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return (self.x[i] + 0.05 * torch.rand(self.x[i].shape)).clamp(0, 1), self.y[i]


def _sigint_at(model: torch.nn.Module, when):
    """A forward hook that sends this process SIGINT once ``when(model, calls)`` holds."""
    import os
    import signal

    calls = {"n": 0, "sent": False}

    def hook(module, inputs, output):
        calls["n"] += 1
        if not calls["sent"] and when(module, calls["n"]):
            calls["sent"] = True
            os.kill(os.getpid(), signal.SIGINT)

    return model.register_forward_hook(hook)


@pytest.mark.parametrize("case", ["mid-step", "augmenting-dataset", "during-test-eval"])
def test_ctrl_c_anywhere_resumes_to_the_same_weights(digits, tmp_path, case):
    """Ctrl-C takes effect at the next step boundary with a consistent checkpoint: mid
    forward pass (the step's noise already drawn), between batches of a dataset that
    augments with the global RNG (with checkpoint_every), and during the end-of-epoch test
    evaluation (before the sampler's last draw)."""
    x, y = digits.x_train, digits.y_train
    cfg = TrainConfig(**{**CFG.__dict__, "checkpoint_every": 5})
    test = (digits.x_test, digits.y_test) if case == "during-test-eval" else None

    def data():
        if case == "augmenting-dataset":
            return torch.utils.data.DataLoader(_NoisyDigits(x, y), batch_size=64,
                                               shuffle=True, drop_last=True)
        if case == "during-test-eval":
            return torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                drop_last=True, generator=torch.Generator().manual_seed(7))
        return (x, y)

    method = lambda: make_method("uniform", eps=0.1)  # noqa: E731
    full = fit(_model(), method(), data(), config=cfg, test=test, progress=False)
    out = tmp_path / "run"
    model = _model()
    if case == "during-test-eval":  # eval mode after the setup's look: the test split's
        handle = _sigint_at(model, lambda m, n: not m.training and n > 5)
    else:  # a training forward pass mid-epoch, mid-step
        handle = _sigint_at(model, lambda m, n: m.training and n == 29)
    with pytest.raises(KeyboardInterrupt):
        fit(model, method(), data(), config=cfg, test=test, out_dir=out, progress=False)
    handle.remove()
    stopped = load_checkpoint(out / "checkpoint.pt")["step"]
    if case == "during-test-eval":
        assert stopped == 21  # the epoch's end, once the evaluation is done
    else:
        assert 21 < stopped < 42  # mid-epoch: the step boundary after the SIGINT
    done = fit(_model(seed=5), method(), data(), config=cfg, test=test, out_dir=out,
               progress=False)
    assert done.resumed_from == stopped and done.steps == full.steps
    diff = max(float((p - q).abs().max())
               for p, q in zip(_weights(full.model), _weights(done.model), strict=True))
    assert diff == 0.0, f"{case}: resumed weights differ by {diff:.3g}"


def test_a_second_ctrl_c_stops_at_once_without_a_half_step_checkpoint(digits, tmp_path):
    import os
    import signal

    model = _model()
    sent = {"n": 0}

    def hook(module, inputs, output):
        sent["n"] += 1
        if sent["n"] == 30:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    model.register_forward_hook(hook)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job, else Python's
    with pytest.raises(KeyboardInterrupt):
        fit(model, Standard(), (digits.x_train, digits.y_train), config=CFG, out_dir=tmp_path,
            progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 21  # the epoch end before
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_resume_refuses_a_loader_with_another_batch_size(digits, tmp_path):
    from safedl_ext.data import TensorLoader

    x, y = digits.x_train, digits.y_train
    fit(_model(), Standard(), TensorLoader(x, y, 64, drop_last=True), config=CFG,
        out_dir=tmp_path, progress=False, max_steps=3)
    with pytest.raises(ValueError, match=r"21 batches per epoch.*now.*42 batches per epoch"):
        fit(_model(), Standard(), TensorLoader(x, y, 32, drop_last=True), config=CFG,
            out_dir=tmp_path, progress=False)


def test_train_classifier_checks_its_data(digits):
    from safedl_ext.training import train_classifier

    with pytest.raises(ValueError, match=r"x must lie in \[lo, hi\]"):
        train_classifier(_model(), digits.x_train * 16, digits.y_train, epochs=1)
    y = digits.y_train.clone()
    y[-1] = 10
    with pytest.raises(ValueError, match=r"labels in \[0, 10\) for a model with 10 outputs"):
        train_classifier(_model(), digits.x_train, y, epochs=1)
