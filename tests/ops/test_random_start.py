"""Random starts: inside the ball and the box, reproducible, uniform."""

from __future__ import annotations

import math

import pytest
import torch

from safedl_ext import ops


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_inside_ball_and_box_and_reproducible(norm):
    x0 = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = 8 / 255 if norm == "linf" else 0.5
    a = ops.random_start(x0, eps, norm, generator=torch.Generator().manual_seed(7))
    b = ops.random_start(x0, eps, norm, generator=torch.Generator().manual_seed(7))
    c = ops.random_start(x0, eps, norm, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    delta = (a - x0).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-5)


def test_linf_start_is_uniform_in_the_cube():
    x0 = torch.full((2000, 50), 0.5)
    d = (ops.random_start(x0, 0.25, "linf", generator=torch.Generator().manual_seed(0)) - x0)
    # Uniform on [-0.25, 0.25]: mean 0, variance 0.25^2 / 3.
    assert abs(float(d.mean())) < 2e-3
    assert math.isclose(float(d.var()), 0.25**2 / 3, rel_tol=0.02)


def test_l2_start_is_uniform_in_the_ball():
    dim, eps = 12, 2.0
    x0 = torch.zeros(20000, dim)
    d = ops.random_start(x0, eps, "l2", lo=-10, hi=10, generator=torch.Generator().manual_seed(0))
    r = d.norm(dim=1) / eps
    # Uniform in a d-ball: P(r <= t) = t^d, so r^d ~ U(0, 1).
    u = r.pow(dim)
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float((u < 0.25).float().mean()) - 0.25) < 0.015
    # Directions are isotropic.
    assert float((d / d.norm(dim=1, keepdim=True)).mean(0).abs().max()) < 0.03


def test_per_sample_eps():
    x0 = torch.full((3, 100), 0.5)
    eps = torch.tensor([0.0, 0.1, 0.3])
    d = ops.random_start(x0, eps, "linf", generator=torch.Generator().manual_seed(0)) - x0
    amax = d.abs().amax(1)
    assert float(amax[0]) == 0.0
    assert 0.09 < float(amax[1]) <= 0.1 + 1e-6
    assert 0.25 < float(amax[2]) <= 0.3 + 1e-6
