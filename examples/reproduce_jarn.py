"""Reproduce the thesis's JARN tables (3.1: MNIST, 3.3: CIFAR-10) at the scale this machine
allows, and write them beside the thesis's numbers.

    python examples/reproduce_jarn.py mnist              # all MNIST rows
    python examples/reproduce_jarn.py cifar10 --methods standard,jarn
    python examples/reproduce_jarn.py mnist --table-only # rebuild the table from finished runs
    python examples/reproduce_jarn.py mnist --table-only --sweep 0.1,0.2,0.3  # + margin PGD vs eps

Each row is one run folder under ``runs/repro-<dataset>/<method>`` (resumable: rerun the
same command after an interruption); the table goes to
``docs/results/jarn-<dataset>.{md,json}`` with seeds, epochs, steps and wall times.
Settings per data set are in :data:`SETUPS`; they are scaled down from the thesis (fewer
images and epochs, a smaller CIFAR-10 network) and say so in the table.

Besides the thesis's columns (cross-entropy FGSM/PGD), each table has a PGD column on the
Carlini-Wagner margin loss: a model whose softmax saturates (logits in the thousands) has
cross-entropy gradients that vanish in float32, so cross-entropy attacks fail on it
without the model being robust (gradient masking). The margin column exposes that.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from safedl_ext.attacks import FGSM, PGD, evaluate
from safedl_ext.cli import eval_fraction
from safedl_ext.data import DATASET_STATS, load_dataset, random_crop_flip
from safedl_ext.defenses import TrainConfig, fit, make_method
from safedl_ext.models import build_model
from safedl_ext.report import (
    load_torch_safe,
    machine_info,
    markdown_table,
    write_json_atomic,
    write_text_atomic,
)

REPO = Path(__file__).resolve().parents[1]

# Thesis numbers (robust accuracy %, white-box), filled from the thesis / ICLR paper tables.
THESIS: dict[str, dict[str, dict[str, float]]] = {"mnist": {}, "cifar10": {}}

SETUPS: dict[str, dict[str, Any]] = {
    "mnist": {
        "data": {"seed": 0},  # the 10,000 t10k images: stratified 8,000 / 2,000 split
        "model": "mnist-cnn",
        "eps": 0.3,
        "train": dict(epochs=10, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0,
                      schedule="constant", log_every=25),
        "augment": None,
        "attacks": [("FGSM", None), ("PGD5", (5, 0.1)), ("PGD40", (40, 0.01)),
                    ("PGD40-margin", (40, 0.01, "margin"))],
        "eval_n": 2000,
        "methods": {
            "standard": {},
            "uniform": {},
            "jarn": dict(jarn_fraction=0.5, disc_every=5, disc_layers=3, disc_width=32,
                         gan_loss="non_saturating", wrt="prob"),
            # The same JARN with the true-class logit's Jacobian, which does not vanish when
            # the softmax saturates: it shows whether JARN's robustness survives without
            # the gradient masking that the "prob" row exhibits.
            "jarn-logit": dict(method="jarn", jarn_fraction=0.5, disc_every=5, disc_layers=3,
                               disc_width=32, gan_loss="non_saturating", wrt="logit"),
            "fgsm-at": {},
            "pgd-at": dict(steps=10, alpha=0.075),
        },
    },
    "cifar10": {
        "data": {"train_per_class": 2000, "test_per_class": 200, "seed": 0},
        "model": "small-cnn",
        "eps": 8 / 255,
        "train": dict(epochs=15, batch_size=128, optimizer="sgd", lr=0.05, weight_decay=5e-4,
                      schedule="cosine", log_every=25),
        "augment": "crop-flip",
        "attacks": [("FGSM", None), ("PGD5", (5, 2 / 255)), ("PGD10", (10, 2 / 255)),
                    ("PGD20", (20, 2 / 255)), ("PGD20-margin", (20, 2 / 255, "margin"))],
        "eval_n": 2000,
        "methods": {
            "standard": {},
            "uniform": {},
            "fgsm-at": {},
            "double-backprop": dict(lam=0.1),
            "jarn": dict(jarn_fraction=0.25, disc_every=5, disc_layers=5, disc_width=32,
                         gan_loss="non_saturating", wrt="prob"),
            "jarn-at1": dict(jarn_fraction=0.25, disc_every=5, disc_layers=5, disc_width=32,
                             gan_loss="non_saturating", wrt="prob"),
            "pgd-at": dict(steps=7, alpha=2 / 255),
            # The discriminator of the "jarn" row wins from its first update. This row
            # gives the classifier the better odds: a 3-layer, 8-wide D updated every 20
            # steps (the authors' interval), the non-vanishing logit Jacobian, JARN on for
            # the last half of training.
            "jarn-weak-d": dict(method="jarn", jarn_fraction=0.5, disc_every=20,
                                disc_layers=3, disc_width=8, gan_loss="non_saturating",
                                wrt="logit"),
        },
    },
}


def _attacks(model: Any, eps: float, spec: list, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, pgd in spec:
        if pgd is None:
            out[name] = FGSM(model, eps=eps)
        else:
            steps, alpha, *loss = pgd
            out[name] = PGD(model, eps=eps, alpha=alpha, steps=steps, early_stop=True,
                            seed=seed, loss=loss[0] if loss else "ce")
    return out


def _model(dataset: str, split: Any) -> torch.nn.Module:
    """The data set's table model, freshly initialised (seed first for reproducibility)."""
    mean, std = DATASET_STATS[dataset]
    return build_model(SETUPS[dataset]["model"], in_channels=split.x_train.shape[1],
                       num_classes=len(split.classes), mean=mean, std=std)


def run_row(dataset: str, method_name: str, seed: int, root: Path, progress: bool
            ) -> dict[str, Any]:
    setup = SETUPS[dataset]
    split = load_dataset(dataset, **setup["data"])
    eps = setup["eps"]
    torch.manual_seed(seed)
    model = _model(dataset, split)
    kwargs = dict(setup["methods"][method_name])
    method = make_method(kwargs.pop("method", method_name), eps=eps, **kwargs)
    augment = None
    if setup["augment"] == "crop-flip":
        def augment(xb: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
            return random_crop_flip(xb, padding=4, flip=True, generator=g)
    cfg = TrainConfig(seed=seed, **setup["train"])
    out = root / method_name
    t0 = time.perf_counter()
    res = fit(model, method, (split.x_train, split.y_train), config=cfg,
              test=(split.x_test, split.y_test), out_dir=out, augment=augment,
              progress=progress)
    train_wall = time.perf_counter() - t0
    n = min(setup["eval_n"], split.x_test.shape[0])
    rep = evaluate(res.model, (split.x_test[:n], split.y_test[:n]),
                   _attacks(res.model, eps, setup["attacks"], seed), eps=eps,
                   progress=progress)
    train_json = json.loads((out / "train.json").read_text())
    steps_per_s = [h["seconds_per_step"] for h in res.history if "seconds_per_step" in h]
    row = {"method": method_name, "settings": method.settings(), "seed": seed,
           "epochs": cfg.epochs, "steps": res.steps, "n_train": int(split.x_train.shape[0]),
           "n_eval": n, "accuracy": rep.accuracy,
           "train_seconds_last_call": round(train_wall, 1),
           "train_seconds_recorded": train_json.get("seconds_this_run"),
           "median_seconds_per_step": sorted(steps_per_s)[len(steps_per_s) // 2]
           if steps_per_s else None,
           "eval_seconds": rep.seconds}
    write_json_atomic(out / "row.json", row)
    return row


def write_table(dataset: str, rows: list[dict[str, Any]]) -> None:
    setup = SETUPS[dataset]
    cols = ["Clean", *[name for name, _ in setup["attacks"]]]
    thesis = THESIS.get(dataset, {})
    body = []
    for r in rows:
        ours = [r["accuracy"].get(c) for c in cols]
        ref = thesis.get(r["method"], {})
        body.append([r["method"], *ours, " / ".join(
            f"{ref[c]:.1f}" if c in ref else "–" for c in cols),
            r["epochs"], r["steps"], r.get("median_seconds_per_step")])
    header = ["method", *[f"{c} %" for c in cols], "thesis (" + " / ".join(cols) + ")",
              "epochs", "steps", "s/step"]
    md = (f"# JARN table, {dataset} (eps = {setup['eps']:.4g})\n\n"
          f"Model `{setup['model']}`, data {setup['data']}, training {setup['train']}, "
          f"augment {setup['augment']}; white-box attacks on the first {setup['eval_n']} "
          f"test images: {setup['attacks']} (name, (steps, step size)); PGD with a random "
          "start and early stop (same robust accuracy as without).\n\n"
          + markdown_table(header, body) + "\n\nRow settings (beyond each method's defaults):\n\n"
          + "".join(f"- `{r['method']}`: {setup['methods'].get(r['method'], {}) or 'defaults'}\n"
                    for r in rows))
    folder = REPO / "docs" / "results"
    write_text_atomic(folder / f"jarn-{dataset}.md", md)
    write_json_atomic(folder / f"jarn-{dataset}.json", {
        "dataset": dataset, "setup": {k: v for k, v in setup.items() if k != "methods"},
        "rows": rows, "thesis": thesis, "machine": dict(machine_info()),
        "date": time.strftime("%Y-%m-%d")})
    print(md)


def sweep(dataset: str, root: Path, radii: list[float], steps: int, seed: int,
          progress: bool) -> None:
    """Margin-loss PGD accuracy of every finished row at several radii (pixel units).

    Cached per row in ``<run>/sweep.json``; table in ``docs/results/jarn-<ds>-eps.md``.
    Step size 2.5 eps / steps (Madry et al.), random start, 1 restart.
    """
    setup = SETUPS[dataset]
    split = load_dataset(dataset, **setup["data"])
    n = min(setup["eval_n"], split.x_test.shape[0])
    x, y = split.x_test[:n], split.y_test[:n]
    rows = []
    for name in setup["methods"]:
        folder = root / name
        if not (folder / "model.pt").exists() or not (folder / "row.json").exists():
            continue
        cache_path = folder / "sweep.json"
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        model = _model(dataset, split)
        model.load_state_dict(load_torch_safe(folder / "model.pt", what="model"))
        model.eval()
        accs = {}
        for eps in radii:
            key = f"margin-pgd{steps}@{eps:.6g}/n{n}/seed{seed}"
            if key not in cache:
                atk = PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps,
                          early_stop=True, seed=seed, loss="margin")
                cache[key] = evaluate(model, (x, y), {"m": atk}, eps=eps,
                                      progress=progress).accuracy["m"]
                write_json_atomic(cache_path, cache)
            accs[eps] = cache[key]
        rows.append([name, *[accs[e] for e in radii]])
    header = ["method", *[f"ε={e:.4g} %" for e in radii]]
    md = (f"# Margin-loss PGD{steps} accuracy against ε, {dataset}\n\n"
          f"Models of `jarn-{dataset}.md` (same run folders); white-box PGD{steps} on the "
          f"Carlini-Wagner margin loss, step 2.5 ε / {steps}, random start, first {n} test "
          "images.\n\n" + markdown_table(header, rows) + "\n")
    folder = REPO / "docs" / "results"
    write_text_atomic(folder / f"jarn-{dataset}-eps.md", md)
    write_json_atomic(folder / f"jarn-{dataset}-eps.json", {
        "dataset": dataset, "steps": steps, "radii": radii, "n_eval": n, "seed": seed,
        "rows": {r[0]: dict(zip(map(str, radii), r[1:], strict=True)) for r in rows},
        "machine": dict(machine_info()), "date": time.strftime("%Y-%m-%d")})
    print(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=list(SETUPS))
    p.add_argument("--methods", help="comma-separated subset (default: all rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs", help="parent of the run folders")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--sweep", metavar="EPS,...",
                   type=lambda t: [eval_fraction(v) for v in t.split(",") if v.strip()],
                   help="also tabulate margin-loss PGD accuracy of the finished rows at these "
                        "radii (pixel units; '8/255' allowed) -> docs/results/jarn-<ds>-eps.md")
    p.add_argument("--sweep-steps", type=int, default=40)
    args = p.parse_args(argv)
    setup = SETUPS[args.dataset]
    names = args.methods.split(",") if args.methods else list(setup["methods"])
    root = Path(args.runs) / f"repro-{args.dataset}"
    unknown = [n for n in names if n not in setup["methods"]]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown} for {args.dataset}; "
                         f"choose from {list(setup['methods'])}")

    def finished_rows() -> list[dict[str, Any]]:
        return [json.loads((root / n / "row.json").read_text()) for n in setup["methods"]
                if (root / n / "row.json").exists()]

    for name in [] if args.table_only else names:
        row = run_row(args.dataset, name, args.seed, root, not args.no_progress)
        print(json.dumps({k: row[k] for k in ("method", "accuracy", "steps")}),
              file=sys.stderr)
        write_table(args.dataset, finished_rows())  # after every row: nothing waits on the last
    if args.table_only:
        write_table(args.dataset, finished_rows())
    if args.sweep:
        sweep(args.dataset, root, args.sweep, args.sweep_steps, args.seed,
              not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
