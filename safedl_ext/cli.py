"""``safedl`` command line: argument parsing, progress and report writing only.

    safedl info                       which backend is in use, CUDA kernels, versions
    safedl evaluate --dataset digits  train (or load) a standard CNN and print its
                                      robustness table (Clean, FGSM, PGD-k)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

__all__ = ["main"]


def _floats(text: str) -> list[float]:
    try:
        out = [float(eval_fraction(t)) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not out:
        raise argparse.ArgumentTypeError("expected a comma-separated list of numbers")
    return out


def eval_fraction(text: str) -> float:
    """``"8/255"`` or ``"0.1"`` as a float."""
    text = text.strip()
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def _ints(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive ints")
    return out


def _cmd_info(_: argparse.Namespace) -> int:
    from . import __version__, ops
    from .report import machine_info

    info = {"safedl_ext": __version__, **machine_info(), "cuda_kernels": ops.has_cuda_kernels()}
    if ops.native_error():
        info["native_error"] = ops.native_error()
    print(json.dumps(info, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .attacks import default_attacks, evaluate
    from .data import load_digits
    from .models import DigitsCNN
    from .report import markdown_table, write_json_atomic, write_text_atomic
    from .training import accuracy, train_classifier

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    data = load_digits(seed=args.seed)
    model = DigitsCNN(width=args.width)
    ckpt = Path(args.checkpoint) if args.checkpoint else out / "model.pt"
    if ckpt.exists() and not args.retrain:
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        print(f"loaded {ckpt}", file=sys.stderr)
        train_s = 0.0
    else:
        t0 = time.perf_counter()
        train_classifier(model, data.x_train, data.y_train, epochs=args.epochs, lr=args.lr,
                         seed=args.seed, progress=not args.no_progress)
        train_s = time.perf_counter() - t0
        tmp = ckpt.with_suffix(".pt.tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(ckpt)  # atomic: an interrupted save never leaves a broken checkpoint
    clean = accuracy(model, data.x_test, data.y_test)
    print(f"standard DigitsCNN: clean test accuracy {100 * clean:.2f}% "
          f"(trained {train_s:.1f} s)", file=sys.stderr)
    rows, results = [], {}
    for eps in args.eps:
        attacks = default_attacks(model, eps, pgd_steps=args.steps, early_stop=True,
                                  seed=args.seed)
        rep = evaluate(model, (data.x_test, data.y_test), attacks, eps=eps,
                       progress=not args.no_progress)
        rows.append([f"{eps:.4g}", *rep.accuracy.values()])
        results[f"{eps:.4g}"] = rep.to_dict()
        header = ["eps", *rep.accuracy]
    table = markdown_table(header, rows)
    summary = {"dataset": "digits", "model": "DigitsCNN", "seed": args.seed,
               "epochs": args.epochs, "train_seconds": round(train_s, 2),
               "clean_accuracy": 100 * clean, "by_eps": results}
    write_json_atomic(out / "robustness.json", summary)
    write_text_atomic(out / "robustness.md",
                      f"Robust accuracy (%) of a standard CNN on scikit-learn digits "
                      f"(n={len(data.y_test)}, seed {args.seed})\n\n{table}\n")
    print(table)
    print(f"wrote {out / 'robustness.json'} and {out / 'robustness.md'}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safedl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backend, CUDA kernels, versions").set_defaults(fn=_cmd_info)
    ev = sub.add_parser("evaluate", help="robustness table of a standard CNN")
    ev.add_argument("--dataset", choices=["digits"], default="digits",
                    help="built-in data set (scikit-learn digits, no download)")
    ev.add_argument("--eps", type=_floats, default=[0.05, 0.1, 0.2],
                    help="comma-separated L-inf radii in [0, 1] pixel units, e.g. 0.1,8/255")
    ev.add_argument("--steps", type=_ints, default=[5, 10, 20], help="PGD step counts")
    ev.add_argument("--epochs", type=int, default=15)
    ev.add_argument("--lr", type=float, default=2e-3)
    ev.add_argument("--width", type=int, default=32)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--checkpoint", help="state_dict to load (default OUT/model.pt if present)")
    ev.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    ev.add_argument("--out", default="runs/digits", help="folder for model.pt and reports")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(fn=_cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"safedl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
