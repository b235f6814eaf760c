"""The measurements behind ``NeutralizeConfig``'s defaults (docs/poison-neutralize.md):
the demo's MNIST backdoor (20% of class 3 with a white 3x3 corner patch relabelled 5, a
SmallCNN trained 4 epochs), scanned once, then neutralized with each setting; prints
clean accuracy, poisoned-base accuracy and attack success before -> after, the set's size
and the wall time. About 2 minutes on 2 idle cores.

    python examples/neutralize_options_mnist.py
"""

from __future__ import annotations

import time

import torch

from safedl_ext.poison.attacks import triggered_test_set
from safedl_ext.poison.demo import demo_data, poisoned_run
from safedl_ext.poison.neutralize import NeutralizeConfig, neutralize

SETTINGS = [
    {"remedy": "both"},
    {"remedy": "both", "lr": 1e-3, "schedule": "constant"},
    {"remedy": "both", "sign": "descent"},
    {"remedy": "both", "lr": 1e-4},
    {"remedy": "both", "lr": 1e-4, "sign": "descent"},
    {"remedy": "both", "lr": 1e-4, "epochs": 3},
    {"remedy": "both", "mode": "replace"},
    {"remedy": "relabel"},
    {"remedy": "relabel", "lr": 1e-4},
    {"remedy": "counter"},
    {"remedy": "counter", "lr": 1e-4},
    {"remedy": "remove"},
    {"remedy": "remove", "lr": 1e-4},
]


def main() -> None:
    torch.set_num_threads(2)
    d = demo_data("mnist")
    run = poisoned_run(d, target=5, base=3)
    r = run.result
    print(f"scan: flagged {r.poisoned}, target {r.target_class}, base {r.base_class}, "
          f"{len(r.suspicious_indices)} filtered; filter {run.metrics}")
    assert run.trigger is not None
    trig = triggered_test_set(d.x_test, d.y_test, run.trigger, target=5, base=3)
    print("| setting | clean acc. | base class, untriggered | poisoned-base acc. | ASR | "
          "set size | seconds |")
    print("|---|---|---|---|---|---|---|")
    for kw in SETTINGS:
        t0 = time.perf_counter()
        res = neutralize(run.model, run.data, r, config=NeutralizeConfig(**kw),
                         test=(d.x_test, d.y_test), triggered=trig, progress=False)
        b, a = res.before, res.after

        def pair(k: str, b: dict = b, a: dict = a) -> str:
            return f"{100 * b[k]:.1f} → {100 * a[k]:.1f}"

        name = ", ".join(f"{k}={v}" for k, v in kw.items())
        print(f"| {name} | {pair('clean_accuracy')} | {pair('base_accuracy')} | "
              f"{pair('poisoned_accuracy')} | "
              f"{pair('attack_success')} | {res.counts['total']} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
