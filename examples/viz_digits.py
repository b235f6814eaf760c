"""The thesis's three pictures on scikit-learn's digits, standard vs adversarially trained.

    python examples/viz_digits.py [--epochs 10] [--eps 0.1] [--out runs/viz]

Trains a standard CNN and a PGD-adversarially-trained one (a short loop written out below;
the package's own defences come later), then writes into ``--out``:

- ``gradients.png``: input gradients of both models (thesis Fig. 3.4, where robust models'
  gradients look more like the input than a standard model's; on 8x8 digits after a short
  run the difference is modest).
- ``surface.png``: loss along the adversarial and a random direction (Fig. 3.3): it rises
  along the adversarial axis and hardly moves along the random one, far less steeply for the
  adversarially trained model (the script prints the corner losses).
- ``accuracy_vs_eps.png``: accuracy against eps for FGSM and PGD (Fig. 3.2).

About 35 s on two CPU cores.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from safedl_ext import viz
from safedl_ext.attacks import pgd
from safedl_ext.data import load_digits
from safedl_ext.models import DigitsCNN
from safedl_ext.training import accuracy, train_classifier


def pgd_train(model: DigitsCNN, x: torch.Tensor, y: torch.Tensor, *, eps: float, epochs: int,
              seed: int = 0) -> DigitsCNN:
    """Madry-style adversarial training: each batch replaced by its PGD-5 examples."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], 64):
            idx = perm[i:i + 64]
            x_adv = pgd(model, x[idx], y[idx], eps=eps, steps=5, generator=gen).x_adv
            loss = F.cross_entropy(model(x_adv), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--eps", type=float, default=0.1, help="training radius (pixel units)")
    p.add_argument("--out", default="runs/viz")
    args = p.parse_args()

    data = load_digits(seed=0)
    x, y = data.x_test, data.y_test
    torch.manual_seed(0)
    standard = train_classifier(DigitsCNN(width=16), data.x_train, data.y_train,
                                epochs=args.epochs, lr=2e-3, seed=0)
    robust = pgd_train(DigitsCNN(width=16), data.x_train, data.y_train, eps=args.eps,
                       epochs=args.epochs)
    models = {"standard": standard, f"PGD-AT ({args.eps:g})": robust}
    for name, m in models.items():
        print(f"{name}: clean accuracy {100 * accuracy(m, x, y):.1f}%")

    viz.gradient_grid(models, x[:8], y[:8], f"{args.out}/gradients.png",
                      title="input gradients of the loss")
    surf = viz.loss_surface(models, x[:3], y[:3], f"{args.out}/surface.png", eps=2 * args.eps,
                            steps=21)
    for name, losses in surf.losses.items():
        c = losses.shape[1] // 2
        print(f"{name}: mean loss at the FGSM corner {float(losses[:, -1, c].mean()):.2f}, "
              f"at the random corner {float(losses[:, c, -1].mean()):.2f}")
    curves = viz.accuracy_vs_eps(models, x, y, f"{args.out}/accuracy_vs_eps.png",
                                 eps_values=[0.0, 0.05, 0.1, 0.15, 0.2, 0.3], pgd_steps=10)
    for name, by_attack in curves.accuracy.items():
        for attack, acc in by_attack.items():
            print(f"{name} {attack}: " + ", ".join(f"{a:.1f}" for a in acc.tolist()))
    print(f"wrote {args.out}/gradients.png, surface.png, accuracy_vs_eps.png")


if __name__ == "__main__":
    main()
