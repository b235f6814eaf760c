"""Neutralization (thesis Algorithms 5-6) on the session's real MNIST backdoor
(tests/poison/conftest.py: 20% of class 3 with a white 3x3 corner patch relabelled 5, a
SmallCNN trained 4 epochs, attack success ~98%), scanned once here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from safedl_ext.poison import triggered_test_set
from safedl_ext.poison.data import ScanData
from safedl_ext.poison.neutralize import (
    NeutralizationLoader,
    NeutralizeConfig,
    counter_poison_signals,
    neutralization_plan,
    neutralize,
    save_neutralized,
)
from safedl_ext.poison.scan import scan


@pytest.fixture(scope="module")
def scanned(mnist_backdoor) -> SimpleNamespace:
    b = mnist_backdoor
    data = ScanData(b.poisoned.x, b.poisoned.y)
    r = scan(b.model, data, progress=False)
    assert r.poisoned and r.target_class == 5 and r.base_class == 3
    trig = triggered_test_set(b.split.x_test, b.split.y_test, b.trigger, target=5, base=3)
    return SimpleNamespace(b=b, data=data, result=r, test=(b.split.x_test, b.split.y_test),
                           trig=trig)


def test_config_refuses_bad_settings():
    for kw, msg in ((dict(rho=0.0), "rho"), (dict(rho=-1.0), "rho"),
                    (dict(rho=float("nan")), "rho"), (dict(remedy="prune"), "remedy"),
                    (dict(sign="up"), "sign"), (dict(mode="swap"), "mode"),
                    (dict(fraction=0.0), "fraction"), (dict(epochs=0), "epochs"),
                    (dict(lr=0.0), "lr")):
        with pytest.raises(ValueError, match=msg):
            NeutralizeConfig(**kw)


def test_plan_of_each_remedy(scanned):
    y, sus = scanned.data.y, scanned.result.suspicious_indices
    n, f = int(y.numel()), len(sus)
    others = int((y != 5).sum())
    both = neutralization_plan(y, sus, 5, 3, NeutralizeConfig(remedy="both"))
    assert both.counts["relabelled"] == f and both.counts["counter_poisoned"] == others
    assert len(both) == n + others
    # the filtered samples carry the base label, their copies do not exist (class 5)
    flagged = both.signal < 0
    src_labels = both.label[flagged & torch.isin(both.source, torch.tensor(sus))]
    assert bool((src_labels == 3).all()) and src_labels.numel() == f
    # every copy keeps its class's label and carries that class's signal
    cp = both.signal >= 0
    assert bool((both.label[cp] == y[both.source[cp]]).all())
    assert bool((both.signal[cp] == y[both.source[cp]]).all())
    assert not bool((both.label[cp] == 5).any())
    rel = neutralization_plan(y, sus, 5, 3, NeutralizeConfig(remedy="relabel"))
    assert len(rel) == n and int((rel.label != y[rel.source]).sum()) == f
    rem = neutralization_plan(y, sus, 5, 3, NeutralizeConfig(remedy="remove"))
    assert len(rem) == n - f and not bool(torch.isin(rem.source, torch.tensor(sus)).any())
    cnt = neutralization_plan(y, sus, 5, None, NeutralizeConfig(remedy="counter"))
    assert cnt.counts["relabelled"] == 0 and len(cnt) == n + others
    rep = neutralization_plan(y, sus, 5, 3, NeutralizeConfig(mode="replace", fraction=0.5))
    assert len(rep) == n and 0.45 * others < rep.counts["counter_poisoned"] < 0.55 * others
    with pytest.raises(ValueError, match="base class"):
        neutralization_plan(y, sus, 5, None, NeutralizeConfig(remedy="both"))
    with pytest.raises(ValueError, match="indices"):
        neutralization_plan(y, [n], 5, 3)


def test_signal_sits_on_the_trigger(scanned):
    """The signal of every class is the patch, brightened: most of its energy in the 3x3
    corner patch and a 1-pixel margin (25 of 784 pixels), positive there ("ascent")."""
    b = scanned.b
    sig = counter_poison_signals(b.model, scanned.data, scanned.result.suspicious_indices, 5)
    assert sig.shape == (10, 1, 28, 28) and float(sig[5].abs().sum()) == 0.0
    mask = b.trigger.mask.amax(0) > 0  # (28, 28)
    rows, cols = torch.nonzero(mask, as_tuple=True)
    near = torch.zeros(28, 28, dtype=torch.bool)
    near[max(0, int(rows.min()) - 1):int(rows.max()) + 2,
         max(0, int(cols.min()) - 1):int(cols.max()) + 2] = True
    for y in range(10):
        if y == 5:
            continue
        v = sig[y, 0]
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-4)
        share = float((v[near] ** 2).sum())
        assert share > 0.5, (y, share)
        assert float(v[mask].mean()) > 0, y
    down = counter_poison_signals(b.model, scanned.data, scanned.result.suspicious_indices, 5,
                                  NeutralizeConfig(sign="descent"))
    torch.testing.assert_close(down, -sig)
    with pytest.raises(ValueError, match="no filtered"):
        counter_poison_signals(b.model, scanned.data, [], 5)


def test_loader_batches_are_the_plan(scanned):
    y, sus = scanned.data.y, scanned.result.suspicious_indices
    plan = neutralization_plan(y, sus, 5, 3)
    sig = torch.randn(10, 1, 28, 28)
    sig = sig / sig.flatten(1).norm(dim=1)[:, None, None, None]
    loader = NeutralizationLoader(scanned.data, plan, sig, 500.0, 256, seed=3)
    assert len(loader) == -(-len(plan) // 256)
    loader.set_epoch(2)
    first = next(iter(loader))
    loader.set_epoch(2)
    again = next(iter(loader))
    torch.testing.assert_close(first[0], again[0])
    rows = torch.arange(0, len(plan), 97)
    x, lab = loader.batch(rows)
    src, s = plan.source[rows], plan.signal[rows]
    want = scanned.data.images(src).clone()
    hit = s >= 0
    want[hit] = (want[hit] + sig[s[hit]] * (500.0 / 255.0)).clamp(0, 1)
    torch.testing.assert_close(x, want)
    assert bool((lab == plan.label[rows]).all())
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_both_remedies_neutralize_and_removal_does_not(scanned):
    """The thesis's remedy (relabel + counter-poison, 1 epoch) takes the attack from ~98%
    to <= 10% with the clean accuracy within 2 points; removing the flagged samples and
    retraining one epoch leaves the backdoor in place (the model already learned it)."""
    b = scanned.b
    both = neutralize(b.model, scanned.data, scanned.result, test=scanned.test,
                      triggered=scanned.trig, progress=False)
    assert both.before["attack_success"] > 0.9
    assert both.after["attack_success"] <= 0.10
    assert both.after["poisoned_accuracy"] >= 0.80
    assert abs(both.after["clean_accuracy"] - both.before["clean_accuracy"]) <= 0.02
    # the caller's model is untouched
    assert both.model is not b.model
    x, _ = scanned.trig
    with torch.no_grad():
        assert float((b.model(x).argmax(1) == 5).float().mean()) > 0.9
    rem = neutralize(b.model, scanned.data, scanned.result,
                     config=NeutralizeConfig(remedy="remove"), test=scanned.test,
                     triggered=scanned.trig, progress=False)
    assert rem.counts["removed"] == len(scanned.result.suspicious_indices)
    assert rem.after["attack_success"] > 0.5


def test_interrupted_retraining_resumes_to_the_same_model(scanned, tmp_path):
    b = scanned.b
    cfg = NeutralizeConfig(remedy="relabel", batch_size=256)
    whole = neutralize(b.model, scanned.data, scanned.result, config=cfg,
                       out=tmp_path / "whole", progress=False)
    part = tmp_path / "part"
    neutralize(b.model, scanned.data, scanned.result, config=cfg, out=part, progress=False,
               max_steps=7)
    resumed = neutralize(b.model, scanned.data, scanned.result, config=cfg, out=part,
                         progress=False)
    for (k, v), (_, w) in zip(whole.model.state_dict().items(),
                              resumed.model.state_dict().items(), strict=True):
        torch.testing.assert_close(v, w, msg=k)
    with pytest.raises(ValueError, match="other config"):
        neutralize(b.model, scanned.data, scanned.result,
                   config=NeutralizeConfig(remedy="relabel", batch_size=256, lr=1e-2),
                   out=part, progress=False)


def test_refuses_what_cannot_be_neutralized(scanned, mnist_backdoor):
    b = scanned.b
    clean = scan(mnist_backdoor.clean_model, ScanData(b.split.x_train, b.split.y_train),
                 progress=False)
    assert not clean.poisoned
    with pytest.raises(ValueError, match="nothing to neutralize"):
        neutralize(b.model, scanned.data, clean, progress=False)
    report = {"poisoned": True, "target_class": 5, "base_class": 3,
              "suspicious_indices": [0, len(scanned.data) + 5]}
    with pytest.raises(ValueError, match="not the data the scan saw"):
        neutralize(b.model, scanned.data, report, progress=False)


def test_exported_program_is_neutralized_and_written_back(scanned, tmp_path):
    from safedl_ext.models.io import load_model

    b = scanned.b
    ep = torch.export.export(b.model, (scanned.test[0][:2],),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, tmp_path / "poisoned.pt2")
    model = load_model(tmp_path / "poisoned.pt2")
    res = neutralize(model, scanned.data, scanned.result, test=scanned.test,
                     triggered=scanned.trig, progress=False)
    assert res.after["attack_success"] <= 0.10
    paths = save_neutralized(res, tmp_path / "out", scanned.test[0][:2])
    again = load_model(paths["export"])
    x, _ = scanned.trig
    with torch.no_grad():
        torch.testing.assert_close(again(x[:64]), res.model(x[:64]), rtol=1e-4, atol=1e-4)
    sd = torch.load(paths["state_dict"], weights_only=True)
    assert set(sd) == set(model.state_dict())
