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
                    (dict(lr=0.0), "lr"), (dict(schedule="step"), "schedule")):
        with pytest.raises(ValueError, match=msg):
            NeutralizeConfig(**kw)


def test_cli_defaults_are_the_config_defaults():
    """`safedl neutralize` and `safedl pipeline` default to NeutralizeConfig's settings."""
    from safedl_ext.cli import _neutralize_config, build_parser

    for cmd in (["neutralize", "--scan", "s"], ["pipeline"]):
        args = build_parser().parse_args([*cmd, "--model", "m", "--data", "d", "--out", "o"])
        assert _neutralize_config(args) == NeutralizeConfig()


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


# ------------------------------------------------------------------ the command line


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from safedl_ext.cli import main

    capsys.readouterr()
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_scan_then_neutralize(scanned, tmp_path, capsys):
    """`safedl scan` then `safedl neutralize` on files: the exported model, the uint8 .npz,
    test sets; the neutralized .pt2 no longer obeys the trigger; the report's keys; and
    what it refuses, each in one line."""
    import json

    import numpy as np

    b = scanned.b
    u8 = (b.poisoned.x[:, 0] * 255).round().to(torch.uint8).numpy()
    np.savez(tmp_path / "train.npz", x=u8, y=b.poisoned.y.numpy())
    xt, yt = scanned.test
    np.savez(tmp_path / "test.npz", x=xt.numpy(), y=yt.numpy())
    np.savez(tmp_path / "trig.npz", x=scanned.trig[0].numpy(), y=scanned.trig[1].numpy())
    ep = torch.export.export(b.model, (xt[:2],),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, tmp_path / "model.pt2")
    data, model = str(tmp_path / "train.npz"), str(tmp_path / "model.pt2")
    rc, out, _ = _cli(["scan", "--model", model, "--data", data, "--out",
                       str(tmp_path / "scan"), "--no-progress"], capsys)
    assert rc == 0 and "target class 5, base class 3" in out
    neu = tmp_path / "neu"
    args = ["neutralize", "--model", model, "--data", data, "--scan", str(tmp_path / "scan"),
            "--out", str(neu), "--test", str(tmp_path / "test.npz"), "--triggered-test",
            str(tmp_path / "trig.npz"), "--no-progress"]
    rc, out, err = _cli(args, capsys)
    assert rc == 0, err
    assert "attack success" in out
    rep = json.loads((neu / "report.json").read_text())
    assert {"schema_version", "remedy", "target_class", "base_class", "config", "counts",
            "before", "after", "timings", "versions", "data", "model", "scan",
            "files"} <= rep.keys()
    assert rep["remedy"] == "both" and (rep["target_class"], rep["base_class"]) == (5, 3)
    assert rep["before"]["attack_success"] > 0.9 and rep["after"]["attack_success"] <= 0.10
    for f in ("model.pt2", "model.pt", "report.md", "signals.png", "metrics.png"):
        assert (neu / f).is_file(), f
    from safedl_ext.models.io import load_model

    fixed = load_model(neu / "model.pt2")
    with torch.no_grad():
        asr = float((fixed(scanned.trig[0]).argmax(1) == 5).float().mean())
    assert asr == pytest.approx(rep["after"]["attack_success"], abs=1e-6)
    # a rerun of the finished command resumes to the same model
    rc, out2, _ = _cli(args, capsys)
    assert rc == 0 and out2.splitlines()[:3] == out.splitlines()[:3]
    # refusals: other data (one sample fewer), rho <= 0, a report that found nothing
    np.savez(tmp_path / "short.npz", x=u8[:-1], y=b.poisoned.y.numpy()[:-1])
    bad = ["neutralize", "--model", model, "--data", str(tmp_path / "short.npz"), "--scan",
           str(tmp_path / "scan"), "--out", str(tmp_path / "x")]
    rc, _, err = _cli(bad, capsys)
    assert rc == 2 and "not the data the scan saw" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _cli([*args[:-1], "--rho", "0"], capsys)
    assert rc == 2 and "rho" in err
    nothing = json.loads((tmp_path / "scan" / "report.json").read_text())
    nothing.update(poisoned=False, target_class=None, base_class=None)
    (tmp_path / "clean.json").write_text(json.dumps(nothing))
    rc, out, _ = _cli(["neutralize", "--model", model, "--data", data, "--scan",
                       str(tmp_path / "clean.json"), "--out", str(tmp_path / "none")], capsys)
    assert rc == 0 and "nothing to neutralize" in out and not (tmp_path / "none").exists()


def test_pipeline_resumes_as_a_whole(scanned, tmp_path, capsys):
    """`safedl pipeline` uninterrupted, against the same pipeline interrupted in its
    retraining (the scan finished, 9 steps trained) and rerun: the same model and the same
    before/after figures."""
    import json

    import numpy as np

    from safedl_ext.models.io import load_model
    from safedl_ext.poison.data import load_scan_data

    b = scanned.b
    u8 = (b.poisoned.x[:, 0] * 255).round().to(torch.uint8).numpy()
    np.savez(tmp_path / "train.npz", x=u8, y=b.poisoned.y.numpy())
    np.savez(tmp_path / "trig.npz", x=scanned.trig[0].numpy(), y=scanned.trig[1].numpy())
    ep = torch.export.export(b.model, (scanned.test[0][:2],),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, tmp_path / "model.pt2")
    common = ["--model", str(tmp_path / "model.pt2"), "--data", str(tmp_path / "train.npz"),
              "--triggered-test", str(tmp_path / "trig.npz"), "--remedy", "relabel",
              "--no-progress"]
    rc, out, err = _cli(["pipeline", *common, "--out", str(tmp_path / "whole")], capsys)
    assert rc == 0, err
    assert "target class 5, base class 3" in out and "attack success" in out
    whole = json.loads((tmp_path / "whole" / "pipeline.json").read_text())
    assert whole["poisoned"] and whole["after"]["attack_success"] < whole["before"][
        "attack_success"]
    # the interruption: the pipeline's scan done, its retraining stopped after 9 steps
    part = tmp_path / "part"
    data = load_scan_data(tmp_path / "train.npz")
    model = load_model(tmp_path / "model.pt2")
    found = scan(model, data, out=part / "scan", progress=False)
    neutralize(model, data, found, config=NeutralizeConfig(remedy="relabel"),
               out=part / "neutralize", progress=False, max_steps=9)
    assert not (part / "pipeline.json").exists()
    rc, _, err = _cli(["pipeline", *common, "--out", str(part)], capsys)
    assert rc == 0, err
    again = json.loads((part / "pipeline.json").read_text())
    for key in ("poisoned", "target_class", "base_class", "suspicious", "before", "after"):
        assert again[key] == whole[key], key
    a = torch.load(tmp_path / "whole" / "neutralize" / "model.pt", weights_only=True)
    c = torch.load(part / "neutralize" / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], c[k], msg=k)


def test_demo_prints_the_before_after_table(scanned, tmp_path, capsys):
    """The demo's neutralization step (``make demo``) on the session's backdoor: the
    table's three lines, the model and the report written."""
    from safedl_ext.poison.demo import DemoData, PoisonRun, _demo_neutralize

    b = scanned.b
    s = b.split
    run = PoisonRun(True, 5, 3, 0.2, 0, 0.0, None, scanned.result, None, 0.0, 0.0,
                    scanned.data, b.poisoned.indices, b.model, b.trigger)
    d = DemoData("mnist", s.x_train, s.y_train, s.x_test, s.y_test)
    capsys.readouterr()
    _demo_neutralize(run, d, tmp_path / "neu", progress=False)
    out = capsys.readouterr().out
    lines = {ln.split("  ")[1].strip(): ln for ln in out.splitlines() if ln.startswith("  ")
             and "%" in ln}
    assert {"clean accuracy", "poisoned-base accuracy", "attack success"} <= set(lines)
    asr_after = float(lines["attack success"].split()[-1].rstrip("%"))
    assert asr_after <= 10.0
    for f in ("model.pt2", "model.pt", "report.json", "report.md"):
        assert (tmp_path / "neu" / f).is_file(), f
