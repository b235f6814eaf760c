"""Backdoor attacks: the trigger equation, the poisoned set, and a backdoor a CNN learns."""

from __future__ import annotations

import pytest
import torch

from safedl_ext.models import DigitsCNN
from safedl_ext.poison import (
    Trigger,
    attack_success_rate,
    blend_trigger,
    dot_trigger,
    image_pattern,
    noise_pattern,
    patch_trigger,
    poison_dataset,
    triggered_test_set,
)
from safedl_ext.training import accuracy, train_classifier

SHAPE = (1, 8, 8)


def test_apply_is_the_thesis_equation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 6, 7, generator=g)
    m, p = torch.rand(1, 6, 7, generator=g), torch.rand(3, 6, 7, generator=g)
    out = Trigger(m, p).apply(x)
    assert torch.allclose(out, (1 - m) * x + m * p)
    assert out.shape == x.shape and torch.equal(x, x.clone())  # x itself untouched


def test_blend_dot_patch_shapes_and_areas():
    blend = blend_trigger(noise_pattern((3, 32, 32), seed=1), opacity=0.2)
    assert blend.area == 1.0 and float(blend.mask.max()) == pytest.approx(0.2)
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(blend.apply(x), 0.8 * x + 0.2 * blend.pattern)
    dot = dot_trigger((3, 32, 32), seed=5)
    assert dot.area == pytest.approx(1 / 1024)
    changed = (dot.apply(x) != x).any(1).flatten(1).sum(1)
    assert int(changed.max()) <= 1  # one pixel, the same for every image
    assert torch.equal(dot.mask, dot_trigger((3, 32, 32), seed=5).mask)  # fixed per attack
    assert not torch.equal(dot.mask, dot_trigger((3, 32, 32), seed=6).mask)
    patch = patch_trigger((3, 32, 32), size=3)
    assert patch.area == pytest.approx(9 / 1024)
    assert patch.mask[0, 29:, 29:].eq(1).all() and patch.mask.sum() == 9
    out = patch.apply(x)
    assert out[:, :, 29, 29].eq(1).all() and out[:, :, 29, 30].eq(0).all()  # checkerboard
    top = patch_trigger((3, 32, 32), size=4, position=(2, 5), fill="white")
    assert top.mask[0, 2:6, 5:9].eq(1).all() and top.mask.sum() == 16


def test_image_pattern_resizes_and_converts_channels():
    digit = torch.rand(28, 28)
    p = image_pattern(digit, (3, 32, 32))
    assert p.shape == (3, 32, 32) and torch.equal(p[0], p[2])
    assert image_pattern(torch.rand(3, 32, 32), (1, 8, 8)).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="channels"):
        image_pattern(torch.rand(2, 8, 8), (3, 8, 8))


@pytest.mark.parametrize("make, match", [
    (lambda: Trigger(torch.zeros(1, 8, 8), torch.rand(1, 8, 8)), "zero everywhere"),
    (lambda: Trigger(torch.ones(2, 8, 8), torch.rand(3, 8, 8)), r"mask must be \(1, 8, 8\)"),
    (lambda: Trigger(torch.ones(1, 8, 8) * 2, torch.rand(1, 8, 8)), r"mask must lie in"),
    (lambda: blend_trigger(torch.rand(1, 8, 8), opacity=0.0), "opacity"),
    (lambda: patch_trigger(SHAPE, size=9), "size must be"),
    (lambda: patch_trigger(SHAPE, size=3, position=(6, 0)), "outside"),
    (lambda: patch_trigger(SHAPE, position="middle"), "position must be"),
    (lambda: dot_trigger(SHAPE, colour=(0.1, 0.2)), "colour must have"),
    (lambda: noise_pattern((8, 8)), r"shape must be \(C, H, W\)"),
])
def test_trigger_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_apply_checks_its_input():
    t = patch_trigger(SHAPE, size=2)
    with pytest.raises(ValueError, match=r"x must be \(N, 1, 8, 8\)"):
        t.apply(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="x must lie in"):
        t.apply(torch.rand(2, 1, 8, 8) * 255)


def test_poison_dataset_takes_a_seeded_share_of_the_base_class(digits):
    x, y = digits.x_train, digits.y_train
    trig = patch_trigger(SHAPE, size=2, fill="white")
    pd = poison_dataset(x, y, trig, target=5, base=3, fraction=0.1, seed=0)
    n_base = int((y == 3).sum())
    assert pd.indices.numel() == round(0.1 * n_base)
    assert (y[pd.indices] == 3).all() and (pd.y[pd.indices] == 5).all()
    assert torch.equal(pd.indices, pd.indices.sort().values)
    others = ~pd.is_poisoned
    assert torch.equal(pd.y[others], y[others]) and torch.equal(pd.x[others], x[others])
    assert torch.equal(pd.x[pd.indices], trig.apply(x[pd.indices]))
    assert torch.equal(pd.y_clean, y)
    again = poison_dataset(x, y, trig, target=5, base=3, fraction=0.1, seed=0)
    other = poison_dataset(x, y, trig, target=5, base=3, fraction=0.1, seed=1)
    assert torch.equal(again.indices, pd.indices) and not torch.equal(other.indices, pd.indices)
    # All-to-one: from every class but the target.
    a2o = poison_dataset(x, y, trig, target=5, base=None, fraction=0.05)
    assert (y[a2o.indices] != 5).all() and len(set(y[a2o.indices].tolist())) > 5
    assert a2o.indices.numel() == round(0.05 * int((y != 5).sum()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=5, base=5), "must differ"), (dict(target=5, base=3, fraction=0.0), "fraction"),
    (dict(target=-1, base=3), "target must be"), (dict(target=5, base=42), "no samples"),
])
def test_poison_dataset_errors(digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        poison_dataset(digits.x_train, digits.y_train, patch_trigger(SHAPE, size=2), **kwargs)


def test_triggered_test_set_is_the_base_class_with_the_trigger(digits):
    trig = patch_trigger(SHAPE, size=2, fill="white")
    xt, yt = triggered_test_set(digits.x_test, digits.y_test, trig, target=5, base=3)
    assert (yt == 3).all() and xt.shape[0] == int((digits.y_test == 3).sum())
    assert xt[:, 0, 6:, 6:].eq(1).all()


@pytest.mark.slow
def test_a_cnn_learns_a_patch_backdoor_and_a_clean_one_does_not(digits, digits_model):
    """10% of the 3s carry a 2x2 white corner patch and the label 5: the CNN keeps its
    clean accuracy and obeys the trigger (measured: clean 98.7%, ASR 93%); a model trained
    on clean data does not (ASR near 0)."""
    trig = patch_trigger(SHAPE, size=2, fill="white")
    pd = poison_dataset(digits.x_train, digits.y_train, trig, target=5, base=3, fraction=0.1)
    torch.manual_seed(0)
    model = DigitsCNN(width=16)
    train_classifier(model, pd.x, pd.y, epochs=12, batch_size=64, lr=2e-3, seed=0)
    assert accuracy(model, digits.x_test, digits.y_test) > 0.95
    asr = attack_success_rate(model, digits.x_test, digits.y_test, trig, target=5, base=3)
    clean_asr = attack_success_rate(digits_model, digits.x_test, digits.y_test, trig,
                                    target=5, base=3)
    assert asr >= 0.8 and clean_asr <= 0.1, (asr, clean_asr)
    assert not digits_model.training  # attack_success_rate leaves the mode as it was
