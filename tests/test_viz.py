"""safedl_ext.viz and ``safedl viz``: the numbers behind the pictures, and the PNGs."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from safedl_ext import viz
from safedl_ext.attacks import fgsm
from safedl_ext.cli import main
from safedl_ext.gradients import input_gradients
from safedl_ext.models import DigitsCNN, Normalized
from safedl_ext.training import accuracy

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()  # decodes the whole file, not just the header
        assert img.format == "PNG"
        return img.size


@pytest.fixture(scope="module")
def untrained() -> DigitsCNN:
    torch.manual_seed(1)
    return DigitsCNN(width=4).eval()


@pytest.fixture(scope="module")
def correct(digits, digits_model):
    """The first 8 test images the standard model classifies correctly."""
    with torch.no_grad():
        ok = digits_model(digits.x_test).argmax(1) == digits.y_test
    idx = ok.nonzero().squeeze(1)[:8]
    return digits.x_test[idx], digits.y_test[idx]


# ------------------------------------------------------------------------ gradient grid


def test_gradient_grid_returns_input_gradients_and_writes_png(digits, digits_model, untrained,
                                                              tmp_path):
    x, y = digits.x_test[:5], digits.y_test[:5]
    untrained.train()
    path = tmp_path / "sub" / "grid.png"
    grads = viz.gradient_grid({"standard": digits_model, "untrained": untrained}, x, y, path,
                              wrt="prob", panel_size=1.0, dpi=60)
    assert list(grads) == ["standard", "untrained"]
    assert untrained.training  # mode restored
    assert all(p.requires_grad for p in untrained.parameters())
    untrained.eval()
    for name, model in (("standard", digits_model), ("untrained", untrained)):
        ref = input_gradients(model, x, y, wrt="prob")
        assert grads[name].shape == (5, 1, 8, 8)
        torch.testing.assert_close(grads[name], ref, rtol=0, atol=0)
    assert not torch.equal(grads["standard"], grads["untrained"])
    # 0.4 in label column + 1.0 in per image; one row of inputs + one per model.
    assert _png_size(path) == (round((0.4 + 5 * 1.0) * 60), round(3 * 1.0 * 60))
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_gradient_grid_numbers_only_and_rgb():
    gen = torch.Generator().manual_seed(0)
    rgb = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 3))
    x = torch.rand(2, 3, 6, 6, generator=gen)
    y = torch.tensor([0, 2])
    grads = viz.gradient_grid(rgb, x, y)
    assert list(grads) == ["model"] and grads["model"].shape == (2, 3, 6, 6)


def test_gradient_grid_rgb_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    rgb = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 3))
    x = torch.rand(3, 3, 6, 6, generator=gen)
    viz.gradient_grid(rgb, x, torch.tensor([0, 1, 2]), tmp_path / "rgb.png", dpi=50,
                      scaling="minmax")
    assert _png_size(tmp_path / "rgb.png") == (round((0.4 + 3 * 1.2) * 50), round(2 * 1.2 * 50))


def test_gradient_image_scalings():
    g = torch.tensor([[-2.0, 0.0, 1.0, 2.0]]).view(1, 1, 2, 2)
    sym = viz.gradient_image(g, "symmetric").flatten()
    torch.testing.assert_close(sym, torch.tensor([0.0, 0.5, 0.75, 1.0]))
    mm = viz.gradient_image(g, "minmax").flatten()
    torch.testing.assert_close(mm, torch.tensor([0.0, 0.5, 0.75, 1.0]))
    g2 = torch.tensor([[0.0, 1.0, 2.0, 4.0]]).view(1, 1, 2, 2)
    torch.testing.assert_close(viz.gradient_image(g2, "minmax").flatten(),
                               torch.tensor([0.0, 0.25, 0.5, 1.0]))
    torch.testing.assert_close(viz.gradient_image(g2, "symmetric").flatten(),
                               torch.tensor([0.5, 0.625, 0.75, 1.0]))
    torch.testing.assert_close(viz.gradient_image(-g2, "abs").flatten(),
                               torch.tensor([0.0, 0.25, 0.5, 1.0]))
    zero = torch.zeros(2, 3, 2, 2)
    assert bool((viz.gradient_image(zero, "symmetric") == 0.5).all())
    assert bool((viz.gradient_image(zero, "minmax") == 0.5).all())
    assert bool((viz.gradient_image(zero, "abs") == 0).all())
    # One scale per image: a large gradient in image 0 does not wash out image 1.
    two = torch.stack([g2[0] * 100, g2[0]])
    torch.testing.assert_close(viz.gradient_image(two)[0], viz.gradient_image(two)[1])
    with pytest.raises(ValueError, match="scaling must be one of"):
        viz.gradient_image(g, "log")  # type: ignore[arg-type]


# ------------------------------------------------------------------------- loss surface


def test_loss_surface_origin_is_clean_loss_and_adversarial_axis_dominates(digits_model,
                                                                          correct, tmp_path):
    x, y = correct
    res = viz.loss_surface(digits_model, x, y, eps=0.2, steps=11)
    L, clean = res.losses["model"], res.clean_loss["model"]
    assert L.shape == (8, 11, 11) and res.adv.shape == res.rand.shape == (11,)
    c = 5
    assert float(res.adv[c]) == 0.0 and float(res.rand[c]) == 0.0
    assert float(res.adv[0]) == pytest.approx(-0.2) and float(res.adv[-1]) == pytest.approx(0.2)
    with torch.no_grad():
        ref = F.cross_entropy(digits_model(x), y, reduction="none")
    torch.testing.assert_close(clean, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(L[:, c, c], ref, rtol=1e-4, atol=1e-5)
    # The directions: FGSM's sign of the input gradient, and a +-1 random one.
    torch.testing.assert_close(res.d_adv["model"], input_gradients(digits_model, x, y).sign())
    assert set(res.d_rand.unique().tolist()) == {-1.0, 1.0}
    # Thesis Fig. 3.3: for a standard model the loss climbs along the adversarial axis and
    # barely moves along a random direction of the same L-inf size.
    rise_adv = L[:, -1, c] - clean
    move_rand = (L[:, c, :] - clean[:, None]).abs().amax(dim=1)
    assert bool((rise_adv > move_rand).all()), (rise_adv, move_rand)
    assert float(rise_adv.mean()) > 10 * float(move_rand.mean())
    assert float(rise_adv.mean()) > 2.0


def test_loss_surface_seeded_clipped_several_models_png(digits_model, untrained, correct,
                                                        tmp_path):
    x, y = correct[0][:2], correct[1][:2]
    kw = dict(eps=0.3, steps=6, eps_rand=0.1, clip=True, batch_size=7)
    a = viz.loss_surface({"std": digits_model, "raw": untrained}, x, y, tmp_path / "s.png",
                         generator=torch.Generator().manual_seed(3), panel_size=2.0, dpi=40,
                         **kw)
    b = viz.loss_surface({"std": digits_model, "raw": untrained}, x, y,
                         generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(a.losses["std"], b.losses["std"], rtol=0, atol=0)
    torch.testing.assert_close(a.d_rand, b.d_rand, rtol=0, atol=0)
    assert a.losses["raw"].shape == (2, 6, 6)
    assert float(a.rand.abs().max()) == pytest.approx(0.1)
    # Even number of steps: 0 is not a grid point; the corners are +-eps.
    assert not bool((a.adv == 0).any())
    # With clip, the grid point (eps, 0-ish) is a valid image: the FGSM corner equals the
    # loss of the clipped point computed directly.
    pt = (x + 0.3 * a.d_adv["std"] + float(a.rand[0]) * a.d_rand).clamp(0, 1)
    with torch.no_grad():
        direct = F.cross_entropy(digits_model(pt), y, reduction="none")
    torch.testing.assert_close(a.losses["std"][:, -1, 0], direct, rtol=1e-4, atol=1e-5)
    assert _png_size(tmp_path / "s.png") == (round(2 * 2.0 * 40), round(2 * 2.0 * 40))
    c = viz.loss_surface(digits_model, x[:1], y[:1], tmp_path / "c.png", eps=0.1, steps=4,
                         kind="contour", dpi=30)
    assert c.losses["model"].shape == (1, 4, 4)
    assert _png_size(tmp_path / "c.png") == (90, 90)


# ---------------------------------------------------------------------- accuracy vs eps


def test_accuracy_vs_eps_curves(digits, digits_model, untrained, tmp_path):
    x, y = digits.x_test[:150], digits.y_test[:150]
    eps = [0.0, 0.05, 0.1, 0.2, 0.3]
    res = viz.accuracy_vs_eps({"standard": digits_model, "untrained": untrained}, x, y,
                              tmp_path / "eps.png", eps_values=eps, pgd_steps=5,
                              batch_size=200, dpi=50)
    assert res.n == 150 and res.cumulative
    assert res.eps.tolist() == eps
    assert list(res.accuracy["standard"]) == ["FGSM", "PGD5"]
    clean = 100 * accuracy(digits_model, x, y)
    assert res.clean["standard"] == pytest.approx(clean)
    for curves in res.accuracy.values():
        for acc in curves.values():
            assert acc.shape == (5,)
            assert bool((acc[1:] <= acc[:-1]).all()), acc
    for acc in res.accuracy["standard"].values():
        assert float(acc[0]) == pytest.approx(clean)
        assert float(acc[-1]) < 20  # a standard model falls apart at eps = 0.3 on digits
    assert float(res.accuracy["standard"]["PGD5"][2]) < clean - 20
    assert _png_size(tmp_path / "eps.png") == (300, 200)
    # Plain per-radius accuracy: the batched radii give what a plain FGSM call at that radius
    # gives, and the cumulative curve never lies above it.
    raw = viz.accuracy_vs_eps(digits_model, x, y, eps_values=eps, attacks=["fgsm"],
                              cumulative=False, batch_size=64)
    for i, e in enumerate(eps[1:], start=1):
        plain = 100 * float((~fgsm(digits_model, x, y, eps=e).success).double().mean())
        assert abs(float(raw.accuracy["model"]["FGSM"][i]) - plain) <= 100 / 150 + 1e-9
    assert bool((res.accuracy["standard"]["FGSM"] <= raw.accuracy["model"]["FGSM"]).all())
    json.dumps(res.to_dict())


def test_accuracy_vs_eps_custom_attack(digits, digits_model):
    x, y = digits.x_test[:40], digits.y_test[:40]
    seen = []

    def noop(model, xb, yb, eps, gen):
        seen.append(eps.clone())
        return fgsm(model, xb, yb, eps=0.0 * eps + 1e-6)

    res = viz.accuracy_vs_eps(digits_model, x, y, eps_values=[0.0, 0.1, 0.2],
                              attacks={"tiny": noop})
    acc = res.accuracy["model"]["tiny"]
    assert torch.allclose(acc, torch.full_like(acc, acc[0].item()))  # attack does nothing
    radii = torch.cat(seen)
    assert radii.shape == (80,)
    assert radii.unique().tolist() == pytest.approx([0.1, 0.2])


# ------------------------------------------------------------------------------ errors


def test_bad_input_raises_clear_errors(digits, digits_model):
    x, y = digits.x_test[:4], digits.y_test[:4]
    with pytest.raises(ValueError, match="eps must be > 0"):
        viz.loss_surface(digits_model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        viz.loss_surface(digits_model, x, y, eps=0.1, steps=1)
    with pytest.raises(ValueError, match="kind must be"):
        viz.loss_surface(digits_model, x, y, eps=0.1, kind="wire")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"y must have shape \(4,\)"):
        viz.gradient_grid(digits_model, x, y[:3])
    with pytest.raises(ValueError, match=r"y must have shape \(4,\)"):
        viz.accuracy_vs_eps(digits_model, x, y[:3], eps_values=[0.1])
    with pytest.raises(ValueError, match="x must have shape \\(N, C, H, W\\)"):
        viz.gradient_grid(digits_model, x.flatten(1), y)
    with pytest.raises(ValueError, match="x must lie in"):
        viz.loss_surface(digits_model, x * 3, y, eps=0.1)
    with pytest.raises(ValueError, match="eps_values must be strictly increasing"):
        viz.accuracy_vs_eps(digits_model, x, y, eps_values=[0.1, 0.05])
    with pytest.raises(ValueError, match="eps_values\\[i\\] must be >= 0"):
        viz.accuracy_vs_eps(digits_model, x, y, eps_values=[-0.1, 0.05])
    with pytest.raises(ValueError, match="attacks must be names from"):
        viz.accuracy_vs_eps(digits_model, x, y, eps_values=[0.1], attacks=["cw"])
    with pytest.raises(ValueError, match="labels must be 'true'"):
        viz.gradient_grid(digits_model, x, y, labels="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one model"):
        viz.gradient_grid({}, x, y)
    with pytest.raises(TypeError, match="models\\['a'\\] must be"):
        viz.gradient_grid({"a": 3}, x, y)  # type: ignore[dict-item]


def test_missing_matplotlib_names_the_extra(digits, digits_model, monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    x, y = digits.x_test[:2], digits.y_test[:2]
    assert viz.gradient_grid(digits_model, x, y)["model"].shape == (2, 1, 8, 8)  # no drawing
    with pytest.raises(ImportError, match=r"pip install 'safedl_ext\[viz\]'"):
        viz.gradient_grid(digits_model, x, y, tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


# --------------------------------------------------------------------------------- CLI


def test_cli_viz_with_model_files_and_tensor_data(digits, digits_model, tmp_path, capsys):
    torch.save(digits_model.state_dict(), tmp_path / "std.pt")
    torch.manual_seed(2)
    wrapped = Normalized(DigitsCNN(width=16), [0.3], [0.4]).eval()
    torch.save(wrapped.state_dict(), tmp_path / "norm.pt")
    x, y = digits.x_test[:30], digits.y_test[:30]
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    common = ["--dataset", "tensors", "--data", str(tmp_path / "data.pt"),
              "--arch", "digits-cnn", "--width", "16",
              "--model-file", f"standard={tmp_path / 'std.pt'}",
              "--model-file", str(tmp_path / "norm.pt"), "--out", str(tmp_path / "out")]
    out = tmp_path / "out"

    assert main(["viz", "gradients", "--n", "3", *common]) == 0
    rep = json.loads((out / "gradients.json").read_text())
    assert rep["models"] == ["standard", "norm"] and rep["labels"] == y[:3].tolist()
    got = torch.tensor(rep["gradients"]["standard"])
    torch.testing.assert_close(got, input_gradients(digits_model, x[:3], y[:3]))
    torch.testing.assert_close(torch.tensor(rep["gradients"]["norm"]),
                               input_gradients(wrapped, x[:3], y[:3]))
    assert _png_size(out / "gradients.png") == (round((0.4 + 3 * 1.2) * 100), 360)

    assert main(["viz", "surface", "--n", "1", "--grid-steps", "5", "--eps", "1/10",
                 "--kind", "contour", *common]) == 0
    rep = json.loads((out / "surface.json").read_text())
    assert len(rep["losses"]["standard"][0]) == 5 and rep["adv"][2] == 0.0
    assert rep["losses"]["standard"][0][2][2] == pytest.approx(rep["clean_loss"]["standard"][0],
                                                               rel=1e-4, abs=1e-5)
    assert _png_size(out / "surface.png") == (300, 600)

    assert main(["viz", "eps", "--eps-values", "0,0.1,0.3", "--pgd-steps", "3",
                 "--attacks", "pgd", *common]) == 0
    rep = json.loads((out / "accuracy_vs_eps.json").read_text())
    assert rep["n"] == 30 and list(rep["accuracy"]["standard"]) == ["PGD3"]
    curve = rep["accuracy"]["standard"]["PGD3"]
    assert curve[0] == pytest.approx(100 * accuracy(digits_model, x, y))
    assert curve[0] >= curve[1] >= curve[2]
    assert _png_size(out / "accuracy_vs_eps.png") == (600, 400)
    assert "wrote" in capsys.readouterr().err


def test_cli_viz_default_digits_model_is_trained_once(tmp_path, capsys):
    args = ["--epochs", "1", "--width", "4", "--out", str(tmp_path), "--no-progress"]
    assert main(["viz", "eps", "--n", "20", "--eps-values", "0,0.2", "--attacks", "fgsm",
                 *args]) == 0
    assert (tmp_path / "model.pt").exists()
    rep = json.loads((tmp_path / "accuracy_vs_eps.json").read_text())
    assert rep["models"] == ["standard"] and rep["n"] == 20
    capsys.readouterr()
    assert main(["viz", "gradients", "--n", "2", *args]) == 0
    assert "loaded" in capsys.readouterr().err
    assert _png_size(tmp_path / "gradients.png") == (round((0.4 + 2 * 1.2) * 100), 240)


def test_cli_viz_errors(tmp_path, capsys, digits_model):
    assert main(["viz", "gradients", "--dataset", "cifar10", "--out", str(tmp_path)]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["viz", "gradients", "--model-file", str(tmp_path / "nope.pt"),
                 "--out", str(tmp_path)]) == 2
    assert "--model-file not found" in capsys.readouterr().err
    torch.save(digits_model.state_dict(), tmp_path / "std.pt")
    assert main(["viz", "gradients", "--model-file", str(tmp_path / "std.pt"), "--width", "8",
                 "--out", str(tmp_path)]) == 2
    assert "does not fit --arch digits-cnn --width 8" in capsys.readouterr().err
    assert main(["viz", "surface", "--model-file", str(tmp_path / "std.pt"), "--width", "16",
                 "--eps", "-0.1", "--out", str(tmp_path)]) == 2
    assert "eps must be > 0" in capsys.readouterr().err
