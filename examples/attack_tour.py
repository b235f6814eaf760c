"""A tour of the attack engine on scikit-learn's digits (no download, CPU, ~30 s).

    python examples/attack_tour.py [--epochs 10] [--out runs/tour]

Trains two standard CNNs, then: a white-box robustness table (Clean/FGSM/PGD-k), an
L2 attack, a targeted attack, early stop against the plain loop, and transfer from one
model to the other. Prints Markdown and writes the tables as JSON.
"""

from __future__ import annotations

import argparse
import time

import torch

from safedl_ext import ops
from safedl_ext.attacks import PGD, default_attacks, evaluate, pgd, transfer_evaluate
from safedl_ext.data import load_digits
from safedl_ext.models import DigitsCNN
from safedl_ext.training import accuracy, train_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--eps", type=float, default=0.1, help="L-inf radius in [0, 1] pixels")
    p.add_argument("--out", default="runs/tour")
    args = p.parse_args()

    print(f"backend: {ops.backend()}")
    data = load_digits(seed=0)
    x, y = data.x_test, data.y_test
    torch.manual_seed(0)
    target = train_classifier(DigitsCNN(width=16), data.x_train, data.y_train,
                              epochs=args.epochs, lr=2e-3, seed=0)
    surrogate = train_classifier(DigitsCNN(width=8), data.x_train, data.y_train,
                                 epochs=args.epochs, lr=2e-3, seed=1)
    print(f"clean accuracy: target {accuracy(target, x, y):.3f}, "
          f"surrogate {accuracy(surrogate, x, y):.3f}")

    # 1. The thesis-style table, white-box.
    report = evaluate(target, (x, y), default_attacks(target, args.eps), progress=False)
    print("\nwhite-box, eps =", args.eps)
    print(report.to_markdown("standard CNN"))
    report.save(args.out, "white_box")

    # 2. L2 PGD with 4 restarts stacked into one batch.
    res = pgd(target, x, y, eps=1.0, alpha=0.1, steps=20, norm="l2", restarts=4,
              generator=torch.Generator().manual_seed(0))
    print(f"\nL2 PGD-20 (eps 1.0, 4 restarts): robust accuracy "
          f"{1 - res.success.float().mean():.3f}")

    # 3. Targeted: push every digit to (label + 1) mod 10.
    goal = (y + 1) % 10
    res = PGD(target, eps=0.3, alpha=0.03, steps=40, targeted=True, loss="margin")(x, goal)
    print(f"targeted PGD-40 (eps 0.3): reached the target for {res.success.float().mean():.3f}")

    # 4. Early stop spends fewer steps for the same robust accuracy.
    for early in (False, True):
        t0 = time.perf_counter()
        res = PGD(target, eps=args.eps, steps=20, early_stop=early)(x, y)
        print(f"PGD-20 early_stop={early}: robust accuracy "
              f"{1 - res.success.float().mean():.4f} in {time.perf_counter() - t0:.2f} s")

    # 5. Black-box transfer: craft on the surrogate, measure on the target.
    tr = transfer_evaluate(surrogate, target, (x, y), eps=args.eps, progress=False)
    print("\ntransfer surrogate -> target")
    print(tr.to_markdown("standard CNN"))
    tr.save(args.out, "transfer")


if __name__ == "__main__":
    main()
