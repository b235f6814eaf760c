"""``safedl`` command line: argument parsing, progress and report writing only.

    safedl info                       which backend is in use, CUDA kernels, versions
    safedl evaluate --dataset digits  train (or load) a standard CNN and print its
                                      robustness table (Clean, FGSM, PGD-k)
    safedl train --method jarn        train a model with a defence (standard, uniform, fgsm-at,
                                      pgd-at, double-backprop, trades, jarn, jarn-at1) on
                                      digits, MNIST or CIFAR-10; resumable; robustness table
    safedl viz gradients|surface|eps  the thesis's pictures (input gradients, loss surface,
                                      accuracy against eps) as PNG + JSON, for the default
                                      digits CNN or any saved state_dict (--model-file)
    safedl scan --model M --data D    scan a labelled data set for a backdoor with the model
                                      trained on it (input gradients, or AC / SS baselines);
                                      report.json + report.md + PNGs; resumable
    safedl neutralize --scan R ...    retrain a backdoored model against what a scan found
                                      (relabel + counter-poison, or removal); the model as
                                      .pt2 and state dict, report.json + PNGs; resumable
    safedl pipeline --model M --data D  scan, then neutralize what it finds; resumable
    safedl demo                       the main job, small: plant a backdoor, train, scan; then
                                      scan a clean model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``safedl train: error: argument --epochs: ...``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def eval_fraction(text: str) -> float:
    """``"8/255"`` or ``"0.1"`` as a finite float.

    Raises:
        ValueError: not a number, a zero denominator, or an infinite or NaN value.
    """
    text = text.strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            d = float(den)
            if d == 0:
                raise ValueError(f"{text!r} divides by zero")
            value = float(num) / d
        else:
            value = float(text)
    except ValueError as exc:
        if "divides by zero" in str(exc):
            raise
        raise ValueError(f"expected a number or a fraction such as 8/255, got {text!r}"
                         ) from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def _number(kind: str, lo: float, *, open_lo: bool = False, hi: float | None = None,
            name: str = "value") -> Any:
    """An argparse ``type=`` that parses an int or a fraction and checks its range."""

    def parse(text: str) -> float | int:
        try:
            if kind == "int":
                value: float | int = int(text.strip())
            else:
                value = eval_fraction(text)
        except ValueError as exc:
            msg = str(exc) if kind != "int" else f"expected an integer, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
        if value < lo or (open_lo and value == lo) or (hi is not None and value > hi):
            rng = f"> {lo:g}" if open_lo else f">= {lo:g}"
            rng += f" and <= {hi:g}" if hi is not None else ""
            raise argparse.ArgumentTypeError(f"{name} must be {rng}, got {text.strip()}")
        return value

    parse.__name__ = kind  # argparse names the type in some messages
    return parse


_POS_INT = _number("int", 1)
_NONNEG = _number("float", 0.0)
_POS = _number("float", 0.0, open_lo=True)
_EPS = _number("float", 0.0, name="eps")


def _floats(text: str) -> list[float]:
    out = [_EPS(t) for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError("expected a comma-separated list of numbers")
    return out


def _ints(text: str) -> list[int]:
    out = [_POS_INT(t) for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive ints")
    return out


def _device(text: str) -> str:
    """A torch device that exists here (``cpu``, ``cuda``, ``cuda:1``)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a device such as cpu or cuda:0, got "
                                         f"{text!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text}: CUDA is not available here (torch {torch.__version__}, "
                f"{'a CPU build' if torch.version.cuda is None else 'no GPU visible'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here")
    return text


def _cmd_info(_: argparse.Namespace) -> int:
    from . import __version__, ops
    from .report import machine_info

    info = {"safedl_ext": __version__, **machine_info(), "cuda_kernels": ops.has_cuda_kernels()}
    if ops.native_error():
        info["native_error"] = ops.native_error()
    print(json.dumps(info, indent=2))
    return 0


def _standard_digits_model(args: argparse.Namespace, out: Path) -> tuple[Any, Any, float]:
    """The standard DigitsCNN that ``evaluate`` and ``viz`` share: loaded from
    ``--checkpoint`` (default ``OUT/model.pt``) when present, else trained and saved there.

    Returns:
        (model in eval mode, the digits :class:`~safedl_ext.data.TensorSplit`, training seconds).
    """
    from .data import load_digits
    from .models import DigitsCNN
    from .report import save_torch_atomic
    from .training import train_classifier

    torch.manual_seed(args.seed)
    data = load_digits(seed=args.seed)
    model = DigitsCNN(width=args.width)
    ckpt = Path(args.checkpoint) if args.checkpoint else out / "model.pt"
    if args.checkpoint and not ckpt.exists() and not args.retrain:
        raise FileNotFoundError(f"--checkpoint not found: {ckpt} (add --retrain to train a "
                                "model and save it there)")
    if ckpt.exists() and not args.retrain:
        state = _state_dict_file(ckpt, "--checkpoint" if args.checkpoint else "checkpoint")
        _load_state(model, state, ckpt, f"DigitsCNN(width={args.width})")
        print(f"loaded {ckpt}", file=sys.stderr)
        return model.eval(), data, 0.0
    t0 = time.perf_counter()
    train_classifier(model, data.x_train, data.y_train, epochs=args.epochs, lr=args.lr,
                     seed=args.seed, progress=not args.no_progress)
    train_s = time.perf_counter() - t0
    save_torch_atomic(ckpt, model.state_dict())  # an interrupted save leaves no broken file
    return model.eval(), data, train_s


def _state_dict_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict (names -> tensors) from ``path``, loaded safely; else one clear error."""
    from .report import load_torch_safe

    state = load_torch_safe(path, what=what)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ValueError(f"{what} {path} must hold a state_dict (names -> tensors), got "
                         f"{type(state).__name__}")
    return state


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path,
                what: str) -> None:
    """``model.load_state_dict(state)`` with one clear error when it does not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(ln.strip() for ln in first[1:3]) if len(first) > 1 else first[0]
        raise ValueError(f"{path} does not fit {what}: {detail[:300]}") from None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .attacks import default_attacks, evaluate
    from .report import markdown_table, write_json_atomic, write_text_atomic
    from .training import accuracy

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, data, train_s = _standard_digits_model(args, out)
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


# ------------------------------------------------------------------------------ viz

_ARCHS = ("digits-cnn", "small-cnn")


def _viz_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Test images (N, C, H, W) in [0, 1], labels (N,) and the class names."""
    if args.dataset == "digits":
        from .data import load_digits

        split = load_digits(seed=args.seed)
        return split.x_test, split.y_test, list(split.classes)
    if not args.data:
        raise ValueError(f"--data is required for --dataset {args.dataset}")
    if args.dataset == "cifar10":
        from .data import CIFAR10_CLASSES, load_cifar10_jpeg

        x, y = load_cifar10_jpeg(args.data, per_class=args.per_class, seed=args.seed)
        return x, y, list(CIFAR10_CLASSES)
    from .report import load_torch_safe

    path = Path(args.data)
    blob = load_torch_safe(path, what="--data")
    if not (isinstance(blob, dict) and isinstance(blob.get("x"), torch.Tensor)
            and isinstance(blob.get("y"), torch.Tensor)):
        raise ValueError(f"--data {path} must hold a dict with tensors 'x' (N, C, H, W) in "
                         "[0, 1] and 'y' (N,) int64 labels")
    x, y = blob["x"].float(), blob["y"].long()
    return x, y, [str(c) for c in range(int(y.max()) + 1 if y.numel() else 0)]


def _load_model_file(spec: str, arch: str, width: int, in_channels: int,
                     num_classes: int) -> tuple[str, torch.nn.Module]:
    """``[NAME=]PATH`` of a state_dict (loaded with ``weights_only=True``) -> (name, model).

    A state_dict of a :class:`~safedl_ext.models.Normalized` network (keys ``mean``, ``std``
    and ``model.*``) is rebuilt wrapped in ``Normalized``."""
    from .models import DigitsCNN, Normalized, SmallCNN

    name, sep, file = spec.partition("=")
    if not sep:
        name, file = Path(spec).stem, spec
    path = Path(file)
    state = _state_dict_file(path, "--model-file")
    if arch == "digits-cnn":
        net: torch.nn.Module = DigitsCNN(width=width, num_classes=num_classes)
    else:
        net = SmallCNN(in_channels=in_channels, num_classes=num_classes, width=width)
    if "mean" in state and "std" in state and all(
            k in ("mean", "std") or k.startswith("model.") for k in state):
        c = state["mean"].numel()
        net = Normalized(net, [0.0] * c, [1.0] * c)
    _load_state(net, state, path, f"--arch {arch} --width {width} (num_classes "
                f"{num_classes})")
    return name, net.eval()


def _cmd_viz(args: argparse.Namespace) -> int:
    from . import viz
    from .report import machine_info, write_json_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y, classes = _viz_data(args)
    models: dict[str, Any] = {}
    if args.model_file:
        arch = args.arch or ("digits-cnn" if args.dataset == "digits" else "small-cnn")
        for spec in args.model_file:
            name, model = _load_model_file(spec, arch, args.width, x.shape[1], len(classes))
            if name in models:
                raise ValueError(f"--model-file names must be unique, got {name!r} twice")
            models[name] = model
    elif args.dataset == "digits":
        models["standard"] = _standard_digits_model(args, out)[0]
    else:
        raise ValueError(f"--model-file is required for --dataset {args.dataset} (only "
                         "digits trains a default model)")
    n = args.n if args.n is not None else {"gradients": 8, "surface": 3, "eps": x.shape[0]}[
        args.what]
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    x, y = x[:n], y[:n]
    meta = {"dataset": args.dataset, "n": int(x.shape[0]), "seed": args.seed,
            "models": list(models), "machine": dict(machine_info())}
    if args.what == "gradients":
        png = out / "gradients.png"
        grads = viz.gradient_grid(models, x, y, png, wrt=args.wrt, scaling=args.scaling,
                                  title=f"input gradients ({args.wrt}), {args.dataset}",
                                  classes=classes)
        numbers: dict[str, Any] = {
            "wrt": args.wrt, "scaling": args.scaling, "labels": y.tolist(),
            "l2_norm": {k: g.flatten(1).norm(dim=1).tolist() for k, g in grads.items()},
            "gradients": {k: g.tolist() for k, g in grads.items()}}
    elif args.what == "surface":
        png = out / "surface.png"
        surf = viz.loss_surface(models, x, y, png, eps=args.eps, steps=args.grid_steps,
                                kind=args.kind, clip=args.clip,
                                generator=torch.Generator().manual_seed(args.seed))
        numbers = {"eps": args.eps, "steps": args.grid_steps, "clip": args.clip,
                   "labels": y.tolist(), **surf.to_dict()}
    else:
        png = out / "accuracy_vs_eps.png"
        curves = viz.accuracy_vs_eps(models, x, y, png, eps_values=args.eps_values,
                                     attacks=args.attacks, pgd_steps=args.pgd_steps,
                                     seed=args.seed, title=f"{args.dataset}, n={x.shape[0]}")
        numbers = curves.to_dict()
    stem = png.with_suffix(".json")
    write_json_atomic(stem, {"figure": png.name, **meta, **numbers})
    print(f"wrote {png} and {stem}", file=sys.stderr)
    return 0


def _add_standard_model_args(p: argparse.ArgumentParser) -> None:
    """Options of the standard digits CNN that ``evaluate`` and ``viz`` train or load."""
    p.add_argument("--epochs", type=_POS_INT, default=15, help="training epochs (>= 1)")
    p.add_argument("--lr", type=_POS, default=2e-3, help="Adam learning rate (> 0)")
    p.add_argument("--width", type=_POS_INT, default=32, help="CNN width (channels, >= 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, training, attacks")
    p.add_argument("--checkpoint", help="state_dict to load (weights only); it must exist "
                   "unless --retrain. Default OUT/model.pt, trained and saved when absent")
    p.add_argument("--retrain", action="store_true",
                   help="train even if a checkpoint exists, and save to --checkpoint")


def _add_viz_parser(sub: Any) -> None:
    vz = sub.add_parser("viz", help="the thesis's pictures as PNG + JSON",
                        description="gradients: input gradients of each model side by side; "
                        "surface: loss along the adversarial and a random direction; eps: "
                        "accuracy against eps for FGSM and PGD.")
    vz.add_argument("what", choices=["gradients", "surface", "eps"],
                    help="which picture: gradients, surface or eps")
    vz.add_argument("--dataset", choices=["digits", "cifar10", "tensors"], default="digits",
                    help="digits (built in), cifar10 (--data: a JPEG test archive) or tensors "
                    "(--data: a torch.save'd dict {'x': (N,C,H,W) in [0,1], 'y': (N,)})")
    vz.add_argument("--data", help="data file for --dataset cifar10 or tensors")
    vz.add_argument("--per-class", type=_POS_INT, default=10,
                    help="cifar10: images per class to read")
    vz.add_argument("--model-file", action="append", metavar="[NAME=]PATH",
                    help="state_dict to load (weights_only); repeat for several models. "
                    "Default (digits): the standard CNN of OUT/model.pt, trained if absent")
    vz.add_argument("--arch", choices=_ARCHS,
                    help="architecture of --model-file (default digits-cnn for digits, "
                    "small-cnn otherwise)")
    vz.add_argument("--n", type=_POS_INT, help="images to use (default 8 gradients, 3 surface, "
                    "all for eps)")
    vz.add_argument("--wrt", choices=["loss", "prob", "logit"], default="loss",
                    help="gradients: of what")
    vz.add_argument("--scaling", choices=["symmetric", "minmax", "abs"], default="symmetric",
                    help="gradients: per-image display scaling")
    vz.add_argument("--eps", type=_number("float", 0.0, open_lo=True, name="eps"), default=0.25,
                    help="surface: half-width of the grid (pixel units)")
    vz.add_argument("--grid-steps", type=_number("int", 2), default=21,
                    help="surface: points per axis (>= 2)")
    vz.add_argument("--kind", choices=["surface", "contour"], default="surface",
                    help="surface: a 3-D surface or a contour plot")
    vz.add_argument("--clip", action="store_true", help="surface: keep grid points in [0, 1]")
    vz.add_argument("--eps-values", type=_floats,
                    default=[0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3],
                    help="eps: comma-separated increasing radii, e.g. 0,2/255,4/255,8/255")
    vz.add_argument("--attacks", type=lambda t: [a.strip() for a in t.split(",") if a.strip()],
                    default=["fgsm", "pgd"], help="eps: comma-separated, from fgsm,pgd")
    vz.add_argument("--pgd-steps", type=_POS_INT, default=10, help="eps: PGD iterations")
    _add_standard_model_args(vz)
    vz.add_argument("--out", default="runs/digits", help="folder for the PNG and JSON "
                    "(and model.pt of the default model)")
    vz.add_argument("--no-progress", action="store_true", help="no progress bars")
    vz.set_defaults(fn=_cmd_viz)


# ---------------------------------------------------------------------------- train

_DATASET_DEFAULTS = {  # model, eps, optimiser settings for a few-minute CPU run
    "digits": {"model": "digits-cnn", "eps": 0.1, "lr": 2e-3, "optimizer": "adam",
               "batch_size": 64, "epochs": 12, "attacks": "fgsm,pgd5,pgd10,pgd20"},
    "mnist": {"model": "mnist-cnn", "eps": 0.3, "lr": 1e-3, "optimizer": "adam",
              "batch_size": 64, "epochs": 8, "attacks": "fgsm,pgd5,pgd40"},
    "cifar10": {"model": "small-cnn", "eps": 8 / 255, "lr": 0.05, "optimizer": "sgd",
                "batch_size": 128, "epochs": 10, "attacks": "fgsm,pgd5,pgd10,pgd20"},
}


def _parse_attacks(text: str, model: Any, eps: float, alpha: float | None, seed: int
                   ) -> dict[str, Any]:
    """``"fgsm,pgd5,pgd40"`` -> {"FGSM": FGSM, "PGD5": PGD(steps=5), ...} at ``eps``."""
    from .attacks import FGSM, PGD

    out: dict[str, Any] = {}
    for name in (t.strip().lower() for t in text.split(",") if t.strip()):
        if name == "fgsm":
            out["FGSM"] = FGSM(model, eps=eps)
        elif name.startswith("pgd") and name[3:].isdigit() and int(name[3:]) >= 1:
            k = int(name[3:])
            out[f"PGD{k}"] = PGD(model, eps=eps, alpha=alpha, steps=k, early_stop=True,
                                 seed=seed)
        else:
            raise ValueError(f"--attacks: expected fgsm or pgd<k> (e.g. pgd40), got {name!r}")
    return out


def _load_split(args: argparse.Namespace) -> Any:
    from .data import load_dataset

    if args.dataset == "digits":
        return load_dataset("digits", seed=args.seed)
    if args.dataset == "mnist":
        return load_dataset("mnist", args.data, seed=args.seed, limit=args.limit)
    return load_dataset("cifar10", args.data, train_per_class=args.train_per_class,
                        test_per_class=args.test_per_class, seed=args.seed)


def _cmd_train(args: argparse.Namespace) -> int:
    from .attacks import evaluate
    from .data import DATASET_STATS, random_crop_flip
    from .defenses import TrainConfig, fit, make_method
    from .models import build_model
    from .report import markdown_table, write_json_atomic, write_text_atomic

    d = _DATASET_DEFAULTS[args.dataset]
    eps = d["eps"] if args.eps is None else args.eps
    out = Path(args.out or f"runs/{args.dataset}-{args.method}")
    device = torch.device(args.device)
    split = _load_split(args)
    c = split.x_train.shape[1]
    k = len(split.classes)
    arch = d["model"] if args.model is None else args.model
    mean, std = DATASET_STATS[args.dataset]
    torch.manual_seed(args.seed)
    model = build_model(arch, in_channels=c, num_classes=k, mean=mean, std=std).to(device)
    method_kw: dict[str, Any] = {}
    if args.method == "pgd-at":
        method_kw["steps"] = args.pgd_steps
    elif args.method == "double-backprop":
        method_kw["lam"] = args.lam
    elif args.method == "trades":
        method_kw.update(beta=args.beta, steps=args.pgd_steps)
    elif args.method in ("jarn", "jarn-at1"):
        method_kw.update(lambda_adv=args.lambda_adv, jarn_fraction=args.jarn_fraction,
                         disc_every=args.disc_every, disc_layers=args.disc_layers,
                         disc_width=args.disc_width, wrt=args.jarn_wrt)
    method = make_method(args.method, eps=eps, **method_kw)
    attacks = None if args.attacks == "none" else _parse_attacks(
        d["attacks"] if args.attacks is None else args.attacks, model, eps, args.pgd_alpha,
        args.seed)  # fail early
    def given(name: str) -> Any:  # None means "not given": 0 is a value, not a default
        value = getattr(args, name)
        return d[name] if value is None else value

    cfg = TrainConfig(
        epochs=given("epochs"), batch_size=given("batch_size"),
        optimizer=given("optimizer"), lr=given("lr"),
        weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed,
        amp=args.amp, log_every=args.log_every)
    augment = None
    if args.augment != "none":
        pad = 4 if args.augment == "crop-flip" else 0
        flip = args.dataset == "cifar10" or args.augment == "flip"

        def augment(xb: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
            return random_crop_flip(xb, padding=pad, flip=flip, generator=g)

    spec = {"arch": arch, "in_channels": c, "num_classes": k, "mean": list(mean),
            "std": list(std), "dataset": args.dataset, "classes": split.classes}
    fresh = args.no_resume or not (out / "checkpoint.pt").exists()
    if fresh:  # a new run: its model.json is there from the start, interrupted or not
        write_json_atomic(out / "model.json", spec)
    res = fit(model, method, (split.x_train.to(device), split.y_train.to(device)), config=cfg,
              test=(split.x_test, split.y_test), out_dir=out, resume=not args.no_resume,
              augment=augment, progress=not args.no_progress)
    if not fresh:  # a resumed run: only once fit has accepted the folder's checkpoint
        write_json_atomic(out / "model.json", spec)
    print(f"{args.method} {arch} on {args.dataset}: clean test accuracy "
          f"{100 * (res.test_accuracy or 0):.2f}% after {res.steps} steps "
          f"({res.seconds:.1f} s this run)", file=sys.stderr)
    if attacks is None:
        return 0
    n = min(args.eval_n, split.x_test.shape[0]) if args.eval_n else split.x_test.shape[0]
    rep = evaluate(res.model, (split.x_test[:n].to(device), split.y_test[:n].to(device)),
                   attacks, eps=eps, progress=not args.no_progress)
    table = markdown_table(["method", *rep.accuracy], [[args.method, *rep.accuracy.values()]])
    write_json_atomic(out / "robustness.json", {
        "method": method.settings(), "model": arch, "dataset": args.dataset, "eps": eps,
        "train_steps": res.steps, "train_seconds_this_run": round(res.seconds, 2),
        **rep.to_dict()})
    write_text_atomic(out / "robustness.md", f"Robust accuracy (%) on {args.dataset} "
                      f"(n={n}, eps={eps:.4g}, seed {args.seed})\n\n{table}\n")
    print(table)
    print(f"wrote {out}/(model.pt, metrics.jsonl, train.json, robustness.json)",
          file=sys.stderr)
    return 0


def _add_train_parser(sub: Any) -> None:
    from .defenses import METHOD_NAMES
    from .models import MODEL_NAMES

    tr = sub.add_parser("train", help="train with a defence, then a robustness table",
                        description="Train a classifier with a defence on digits, MNIST or "
                        "CIFAR-10 (checkpointed every epoch; rerun the same command to resume), "
                        "then measure Clean/FGSM/PGD-k accuracy. Unset options take per-data-"
                        "set defaults sized for a few minutes on a CPU.")
    tr.add_argument("--method", choices=METHOD_NAMES, default="jarn",
                    help="the defence (default jarn)")
    tr.add_argument("--dataset", choices=list(_DATASET_DEFAULTS), default="digits",
                    help="digits (built in), mnist or cifar10 (from --data)")
    tr.add_argument("--data", help="data folder (default $SAFEDL_DATA or ../shared/data)")
    tr.add_argument("--limit", type=_number("int", 10), help="mnist: images to use "
                    "(stratified, >= 10)")
    tr.add_argument("--train-per-class", type=_POS_INT,
                    help="cifar10: training images per class")
    tr.add_argument("--test-per-class", type=_POS_INT, help="cifar10: test images per class")
    tr.add_argument("--model", help=f"architecture, one of {', '.join(MODEL_NAMES)} or "
                    "wrn-<depth>-<k>")
    tr.add_argument("--eps", type=_EPS, help="radius in pixel units, e.g. 8/255 (>= 0; "
                    "default per data set)")
    tr.add_argument("--epochs", type=_POS_INT, help="epochs (default per data set)")
    tr.add_argument("--batch-size", type=_POS_INT, help="batch size (default per data set)")
    tr.add_argument("--optimizer", choices=["sgd", "adam"],
                    help="optimiser (default per data set)")
    tr.add_argument("--lr", type=_POS, help="peak learning rate (> 0; default per data set)")
    tr.add_argument("--weight-decay", type=_NONNEG, default=0.0, help="L2 weight decay")
    tr.add_argument("--schedule", choices=["constant", "step", "cosine"], default="constant",
                    help="learning-rate schedule")
    tr.add_argument("--augment", choices=["none", "flip", "crop-flip"], default="none",
                    help="training augmentation (crop-flip: 4-pixel shifts and flips)")
    tr.add_argument("--pgd-steps", type=_POS_INT, default=7,
                    help="pgd-at / trades inner steps")
    tr.add_argument("--lam", type=_NONNEG, default=1.0, help="double-backprop weight")
    tr.add_argument("--beta", type=_NONNEG, default=6.0, help="trades weight")
    tr.add_argument("--lambda-adv", type=_NONNEG, default=1.0, help="JARN adversarial weight")
    tr.add_argument("--jarn-fraction", type=_number("float", 0.0, open_lo=True, hi=1.0),
                    default=0.25,
                    help="JARN on for this last fraction of steps (thesis 0.25, code 0.125)")
    tr.add_argument("--disc-every", type=_POS_INT, default=20,
                    help="JARN discriminator interval")
    tr.add_argument("--disc-layers", type=_POS_INT, default=None,
                    help="JARN discriminator depth (default: halve the image down to 1x1)")
    tr.add_argument("--disc-width", type=_POS_INT, default=32,
                    help="JARN discriminator width (channels of its first layer)")
    tr.add_argument("--jarn-wrt", choices=["loss", "prob", "logit"], default="prob",
                    help="JARN Jacobian: of the true-class probability (authors' code) or of "
                    "the loss (thesis text; opposite sign after normalisation)")
    tr.add_argument("--attacks", help="after training, e.g. fgsm,pgd5,pgd40 ('none': skip)")
    tr.add_argument("--pgd-alpha", type=_POS, help="PGD step (default eps/4)")
    tr.add_argument("--eval-n", type=_POS_INT, help="test images to attack (default all)")
    tr.add_argument("--device", type=_device,
                    default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda[:N] (default cuda when available)")
    tr.add_argument("--amp", choices=["bf16", "fp16"], help="CUDA mixed precision")
    tr.add_argument("--seed", type=int, default=0, help="seed of data, model and training")
    tr.add_argument("--log-every", type=_POS_INT, default=50, help="steps per metrics line")
    tr.add_argument("--out", help="run folder (default runs/<dataset>-<method>)")
    tr.add_argument("--no-resume", action="store_true",
                    help="start over, ignoring (and replacing) an existing checkpoint")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.set_defaults(fn=_cmd_train)


# ------------------------------------------------------------------------------ scan


def _cmd_scan(args: argparse.Namespace) -> int:
    from .models.io import load_model
    from .poison.baselines import activation_clustering, spectral_signatures
    from .poison.data import load_scan_data
    from .poison.report import write_report
    from .poison.scan import ScanConfig, scan

    data = load_scan_data(args.data)
    if len(data) == 0:
        raise ValueError(f"--data {args.data} holds no samples: nothing to scan")
    kw = {"width": args.width} if args.width is not None else {}
    model = load_model(args.model, arch=args.arch, in_channels=data.shape[0],
                       num_classes=args.num_classes, **kw)
    if isinstance(model, torch.nn.Module):
        model = model.to(args.device)
    out = Path(args.out)
    extra_cfg = {"threshold": args.threshold} if args.threshold is not None else {}
    config = ScanConfig(batch_size=args.batch_size, device=args.device, seed=args.seed,
                        **extra_cfg)
    t0 = time.perf_counter()
    progress = not args.no_progress
    if args.method == "gradient":
        result = scan(model, data, out=out, config=config, progress=progress)
    elif args.method == "ac":
        result = activation_clustering(model, data, config=config, progress=progress)
    else:
        result = spectral_signatures(model, data, config=config, progress=progress,
                                     expected_fraction=args.expected_fraction)
    result.timings["total"] = time.perf_counter() - t0
    write_report(result, data, out, extra={"model": {"path": str(args.model),
                                                     "arch": args.arch}})
    if result.poisoned and result.method == "gradient":
        print(f"backdoor found: target class {result.target_class}, base class "
              f"{result.base_class}, {len(result.suspicious_indices)} suspicious samples")
    elif result.poisoned:
        print(f"{result.method}: {len(result.suspicious_indices)} suspicious samples"
              + (f", target class {result.target_class}" if result.target_class is not None
                 else ""))
    else:
        print("no backdoor found: no class stands out")
    print(f"report: {out / 'report.json'}, {out / 'report.md'}", file=sys.stderr)
    return 0


def _add_scan_parser(sub: Any) -> None:
    sc = sub.add_parser("scan", help="scan a labelled data set for a backdoor",
                        description="Scan a labelled image data set for a backdoor with the "
                        "model trained on it. Exit 0 whether or not one is found.")
    sc.add_argument("--model", required=True,
                    help="a torch.export archive (.pt2), a run folder of `safedl train`, or a "
                    "state dict (.pt/.pth/.safetensors) with --arch")
    sc.add_argument("--data", required=True,
                    help="an .npz (x, y), an image folder (<class>/<file>), an MNIST images "
                    "IDX file, or a CIFAR-10 JPEG .tar.gz archive")
    sc.add_argument("--out", required=True, help="folder for the report (and checkpoints)")
    sc.add_argument("--method", choices=["gradient", "ac", "ss"], default="gradient",
                    help="input-gradient scan (default), Activation Clustering or Spectral "
                    "Signatures")
    sc.add_argument("--batch-size", type=_POS_INT, default=128,
                    help="images per forward/backward pass (memory only)")
    sc.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    sc.add_argument("--arch", default=None, help="zoo architecture of a state dict "
                    "(digits-cnn, small-cnn, mnist-cnn, resnet18, ...)")
    sc.add_argument("--width", type=_POS_INT, default=None, help="the architecture's width")
    sc.add_argument("--num-classes", type=_POS_INT, default=None,
                    help="outputs of a state dict's model (default: its head's rows)")
    sc.add_argument("--threshold", type=_NONNEG, default=None,
                    help="score above which the top class is flagged (default: calibrated)")
    sc.add_argument("--expected-fraction", type=_number("float", 0, open_lo=True, hi=1),
                    default=0.1, help="Spectral Signatures: expected poison share per class")
    sc.add_argument("--seed", type=_number("int", 0), default=0,
                    help="seed of the eigensolver's start and the sketch")
    sc.add_argument("--no-progress", action="store_true", help="no progress bars")
    sc.set_defaults(fn=_cmd_scan)


def _load_model_for(args: argparse.Namespace, data: Any) -> Any:
    from .models.io import load_model

    kw = {"width": args.width} if args.width is not None else {}
    model = load_model(args.model, arch=args.arch, in_channels=data.shape[0],
                       num_classes=args.num_classes, **kw)
    if isinstance(model, torch.nn.Module):
        model = model.to(args.device)
    return model


def _labelled_npz(path: str | None, what: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A test set in --data's formats, as (float images in [0, 1], labels)."""
    if path is None:
        return None
    from .poison.data import load_scan_data

    d = load_scan_data(path)
    if len(d) == 0:
        raise ValueError(f"{what} {path} holds no samples")
    return d.images(slice(0, len(d))), d.y


def _print_before_after(before: dict[str, float], after: dict[str, float]) -> None:
    """The measures taken both before and after a neutralization, one line each."""
    from .poison.neutralize import MEASURES

    for key, name in MEASURES:
        if key in before and key in after:
            print(f"{name}: {100 * before[key]:.1f}% -> {100 * after[key]:.1f}%")


def _cmd_neutralize(args: argparse.Namespace) -> int:
    from .poison.data import load_scan_data
    from .poison.neutralize import (
        check_scan_report,
        neutralize,
        save_neutralized,
        write_neutralize_report,
    )

    report_path = Path(args.scan)
    if report_path.is_dir():
        report_path = report_path / "report.json"
    try:
        report = json.loads(report_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--scan {report_path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--scan {report_path} is not a JSON scan report ({exc})") from None
    config = _neutralize_config(args)
    data = load_scan_data(args.data)
    check_scan_report(report, data)
    if not report.get("poisoned") or report.get("target_class") is None:
        print("the scan found no backdoor: nothing to neutralize (nothing written)")
        return 0
    test = _labelled_npz(args.test, "--test")
    triggered = _labelled_npz(args.triggered_test, "--triggered-test")
    model = _load_model_for(args, data)
    out = Path(args.out)
    t0 = time.perf_counter()
    result = neutralize(model, data, report, config=config, out=out, test=test,
                        triggered=triggered, progress=not args.no_progress)
    files = save_neutralized(result, out, data.images(slice(0, min(2, len(data)))))
    result.timings["total"] = time.perf_counter() - t0
    write_neutralize_report(result, out, extra={
        "model": {"path": str(args.model), "arch": args.arch},
        "data": {"source": data.source, "shape": list(data.shape), "digest": data.digest()},
        "scan": {"path": str(report_path), "suspicious": len(report["suspicious_indices"])},
        "files": files})
    _print_before_after(result.before, result.after)
    print(f"neutralized model: {files['export']}, {files['state_dict']}")
    print(f"report: {out / 'report.json'}, {out / 'report.md'}", file=sys.stderr)
    return 0


def _add_neutralize_parser(sub: Any) -> None:
    ne = sub.add_parser("neutralize", help="retrain a backdoored model against what a scan "
                        "found", description="Neutralize a backdoored model (thesis Algorithms "
                        "5-6): relabel the scan's filtered samples to the base class, add "
                        "counter-poisoned copies of the other classes' images, retrain. "
                        "Rerun with the same --out to resume.")
    _add_neutralize_args(ne, scan_report=True)
    ne.set_defaults(fn=_cmd_neutralize)


def _add_neutralize_args(p: argparse.ArgumentParser, scan_report: bool) -> None:
    p.add_argument("--model", required=True,
                   help="the poisoned model: a torch.export archive (.pt2), a run folder of "
                   "`safedl train`, or a state dict with --arch")
    p.add_argument("--data", required=True, help="the training data the scan saw (the "
                   "formats of `safedl scan --data`)")
    if scan_report:
        p.add_argument("--scan", required=True, help="the scan's report.json (or its folder)")
    p.add_argument("--out", required=True, help="folder for the neutralized model, the "
                   "report and the retraining's checkpoints")
    p.add_argument("--remedy", choices=["both", "relabel", "counter", "remove"],
                   default="both", help="both (the thesis), relabel only, counter-poison "
                   "only, or remove the filtered samples")
    p.add_argument("--epochs", type=_POS_INT, default=1, help="retraining epochs (thesis: 1)")
    p.add_argument("--rho", type=_POS, default=500.0,
                   help="counter-poison factor in 0-255 pixel units (thesis: 500)")
    p.add_argument("--sign", choices=["ascent", "descent"], default="ascent",
                   help="the signal along (ascent) or against the loss gradient")
    p.add_argument("--mode", choices=["add", "replace"], default="add",
                   help="counter-poisoned copies join (add) or replace the originals")
    p.add_argument("--fraction", type=_number("float", 0, open_lo=True, hi=1), default=1.0,
                   help="share of each other class's images that get a copy")
    p.add_argument("--lr", type=_POS, default=2e-3, help="Adam learning rate (peak)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="cosine",
                   help="the learning rate over the retraining: constant, or cosine to 0")
    p.add_argument("--batch-size", type=_POS_INT, default=128, help="retraining batch size")
    p.add_argument("--test", default=None, help="clean test set (.npz x, y or --data's "
                   "formats): clean accuracy before and after")
    p.add_argument("--triggered-test", default=None, help="triggered test images with their "
                   "true labels: poisoned-base accuracy and attack success before and after")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--arch", default=None, help="zoo architecture of a state dict")
    p.add_argument("--width", type=_POS_INT, default=None, help="the architecture's width")
    p.add_argument("--num-classes", type=_POS_INT, default=None,
                   help="outputs of a state dict's model (default: its head's rows)")
    p.add_argument("--seed", type=_number("int", 0), default=0, help="retraining seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _neutralize_config(args: argparse.Namespace) -> Any:
    from .poison.neutralize import NeutralizeConfig

    return NeutralizeConfig(remedy=args.remedy, rho=args.rho, sign=args.sign, mode=args.mode,
                            fraction=args.fraction, epochs=args.epochs, lr=args.lr,
                            schedule=args.schedule, batch_size=args.batch_size,
                            seed=args.seed, device=args.device)


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from .poison.data import load_scan_data
    from .poison.pipeline import scan_and_neutralize
    from .poison.scan import ScanConfig

    config = _neutralize_config(args)
    data = load_scan_data(args.data)
    if len(data) == 0:
        raise ValueError(f"--data {args.data} holds no samples: nothing to scan")
    test = _labelled_npz(args.test, "--test")
    triggered = _labelled_npz(args.triggered_test, "--triggered-test")
    model = _load_model_for(args, data)
    extra_cfg = {"threshold": args.threshold} if args.threshold is not None else {}
    scan_config = ScanConfig(batch_size=args.scan_batch_size, device=args.device,
                             seed=args.seed, **extra_cfg)
    out = Path(args.out)
    res = scan_and_neutralize(model, data, out, scan_config=scan_config, config=config,
                              test=test, triggered=triggered, progress=not args.no_progress,
                              extra={"model": {"path": str(args.model), "arch": args.arch}})
    r = res.scan
    if res.neutralized is None:
        print("no backdoor found: no class stands out; nothing neutralized")
    else:
        print(f"backdoor found: target class {r.target_class}, base class {r.base_class}, "
              f"{len(r.suspicious_indices)} suspicious samples; neutralized "
              f"({config.remedy})")
        _print_before_after(res.neutralized.before, res.neutralized.after)
        print(f"neutralized model: {res.files['export']}")
    print(f"reports: {out / 'pipeline.json'}, {out / 'scan'}, {out / 'neutralize'}",
          file=sys.stderr)
    return 0


def _add_pipeline_parser(sub: Any) -> None:
    pi = sub.add_parser("pipeline", help="scan, then neutralize what the scan finds",
                        description="Scan a labelled data set for a backdoor with the model "
                        "trained on it and, when one is found, neutralize the model "
                        "(`safedl scan` then `safedl neutralize`, resumable as a whole: rerun "
                        "with the same --out). Exit 0 whether or not one is found.")
    _add_neutralize_args(pi, scan_report=False)
    pi.add_argument("--threshold", type=_NONNEG, default=None,
                    help="scan: score above which the top class is flagged (default: "
                    "calibrated)")
    pi.add_argument("--scan-batch-size", type=_POS_INT, default=128,
                    help="scan: images per forward/backward pass (memory only)")
    pi.set_defaults(fn=_cmd_pipeline)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .poison.demo import run_demo

    run_demo(args.out, data=args.data, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="safedl", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backend, CUDA kernels, versions").set_defaults(fn=_cmd_info)
    ev = sub.add_parser("evaluate", help="robustness table of a standard CNN")
    ev.add_argument("--dataset", choices=["digits"], default="digits",
                    help="built-in data set (scikit-learn digits, no download)")
    ev.add_argument("--eps", type=_floats, default=[0.05, 0.1, 0.2],
                    help="comma-separated L-inf radii in [0, 1] pixel units, e.g. 0.1,8/255")
    ev.add_argument("--steps", type=_ints, default=[5, 10, 20], help="PGD step counts")
    _add_standard_model_args(ev)
    ev.add_argument("--out", default="runs/digits", help="folder for model.pt and reports")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(fn=_cmd_evaluate)
    _add_train_parser(sub)
    _add_viz_parser(sub)
    _add_scan_parser(sub)
    _add_neutralize_parser(sub)
    _add_pipeline_parser(sub)
    dm = sub.add_parser("demo", help="plant a backdoor, train, scan; then a clean model")
    dm.add_argument("--out", default="runs/scan-demo", help="folder for the two reports")
    dm.add_argument("--data", choices=["auto", "mnist", "digits"], default="auto",
                    help="MNIST from the shared data folder (auto: when present) or digits")
    dm.add_argument("--no-progress", action="store_true", help="no progress bars")
    dm.set_defaults(fn=_cmd_demo)
    return p


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error is one line on stderr and a non-zero exit: 2 for bad
    arguments, data or files, 1 for anything unexpected (``SAFEDL_DEBUG=1`` shows its
    traceback), 130 on Ctrl-C (long commands checkpoint first; rerun to resume)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        print("safedl: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError) as exc:
        if os.environ.get("SAFEDL_DEBUG"):
            raise
        print(f"safedl: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("SAFEDL_DEBUG"):
            raise
        print(f"safedl: error: {type(exc).__name__}: {_one_line(exc)[:500]} (set "
              "SAFEDL_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
