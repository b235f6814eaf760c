"""L2 PGD on a digits CNN whose logits are scaled x10, in float32 and float64.

The hardening issue's probe: with a float32 norm, input gradients this small gave
||g|| = 0, the samples did not move and L2 robust accuracy was overstated (63.0% in
float32 against 17.5% in float64 before the op took its norms scaled by the max-abs).
Now both dtypes agree. About 10 s on 2 cores::

    python examples/l2_norm_underflow.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safedl_ext import attacks
from safedl_ext.data import load_digits
from safedl_ext.models import DigitsCNN
from safedl_ext.training import train_classifier


class Scaled(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, k: float) -> None:
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.k


def main() -> None:
    d = load_digits(test_fraction=0.25, seed=0)
    torch.manual_seed(0)
    net = DigitsCNN(width=16)
    train_classifier(net, d.x_train, d.y_train, epochs=12, batch_size=64, lr=2e-3, seed=0)
    x, y = d.x_test[:200], d.y_test[:200]
    for dt in (torch.float32, torch.float64):
        model = Scaled(net, 10.0).to(dt).eval()
        xx = x.to(dt).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xx), y, reduction="sum"), xx)
        g = g.flatten(1)
        tiny = int(((g != 0).any(1) & (g.float().pow(2).sum(1).sqrt() == 0)).sum())
        res = attacks.pgd(model, x.to(dt), y, eps=1.0, alpha=0.25, steps=20, norm="l2",
                          generator=torch.Generator().manual_seed(0))
        acc = 100 * (1 - res.success.float().mean().item())
        print(f"{dt}: {tiny} of {len(y)} rows have a float32 gradient norm of 0; "
              f"L2 PGD-20 (eps 1.0) robust accuracy {acc:.1f}%")


if __name__ == "__main__":
    main()
