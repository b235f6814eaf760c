"""Neutralize the CIFAR-10 backdoors of the scan reproduction (issue 13; thesis Tables
5.3-5.7 and 5.10) at this machine's scale.

For every poisoned model of ``examples/reproduce_poison_scan.py`` whose attack works
(ASR >= 80%; trained there, read from its run folder ``train.pt``): rebuild the poisoned
data (same trigger, seed and 10% of the base class; 5% in the ``-p5`` runs), scan it with
the default rule, and when the scan flags the right target, neutralize with each remedy (``both``,
the thesis's; ``relabel``; ``counter``; ``remove``), plus Spectral Signatures' filter
restricted to the target class (it is given the target and the 10% ratio, as in the
thesis's Table 5.10) and removal. Each model's clean accuracy (10,000 test images),
poisoned-base accuracy and attack success (the 1,000 base-class test images with the
trigger) before and after.

    python examples/reproduce_poison_scan.py --epochs 24          # the models, once
    python examples/reproduce_neutralize.py --epochs 24           # this; resumable
    python examples/reproduce_neutralize.py --report-only         # tables from what ran

Results per run in ``<work>/<run>/neutralize.json``; tables in
``docs/results/poison-neutralize.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce_poison_scan as rps

from safedl_ext.data import load_cifar10, load_mnist_idx
from safedl_ext.data.datasets import default_data_root
from safedl_ext.poison import poison_dataset, triggered_test_set
from safedl_ext.poison.baselines import spectral_signatures
from safedl_ext.poison.data import ScanData
from safedl_ext.poison.neutralize import NeutralizeConfig, backdoor_metrics, neutralize
from safedl_ext.poison.scan import ScanConfig, filter_metrics, scan
from safedl_ext.report import load_torch_safe, machine_info, write_json_atomic, write_text_atomic

REMEDIES = ("both", "relabel", "counter", "remove")
#: thesis Table 5.3 (overlay = blend, ResNet18, 10%): pair -> (pre all, pre poisoned, post
#: all, post poisoned)
THESIS_53 = {1: (95.0, 4.6, 94.3, 88.6), 2: (95.2, 11.3, 95.0, 97.6), 3: (95.5, 2.5, 94.5, 95.3),
             4: (95.0, 16.5, 94.4, 95.3)}
#: thesis Table 5.5 (overlay, ResNet18, 5%), pair 2 (frog <- ship)
THESIS_55_PAIR2 = (95.1, 24.3, 95.1, 96.3)
#: thesis Table 5.10 (dot, 10%): poison success after its defence, ours / SS
THESIS_510 = {1: (6.0, 7.2), 2: (0.0, 0.1), 3: (3.7, 0.1), 4: (0.4, 1.1)}


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


_CLEAN: list[torch.nn.Module] = []


def clean_models(work: Path, epochs: int) -> list[torch.nn.Module]:
    """The scan reproduction's clean models (``clean-0`` ... ``clean-2``), trained there."""
    if not _CLEAN:
        for r in rps.runs_wanted():
            done = work / r["name"] / "result.json"
            if r["kind"] == "clean" and done.exists():
                s = load_torch_safe(work / r["name"] / "train.pt", what="training checkpoint")
                if s["epoch"] == epochs:
                    m = rps.build()
                    m.load_state_dict(s["model"])
                    _CLEAN.append(m.eval())
    return _CLEAN


def skipped(name: str, scan_res: dict[str, Any]) -> dict[str, Any]:
    """The entry of a run whose attack stays below 80% ASR (nothing to neutralize)."""
    flagged = scan_res.get("scan", {}).get("target")
    return {"name": name, "skipped": "attack below 80%; the scan "
            + (f"flagged class {flagged}" if flagged is not None else "flagged nothing"),
            "attack_success": scan_res.get("attack_success")}


def one(spec: dict[str, Any], split: Any, mnist: torch.Tensor, work: Path, epochs: int,
        log: Any) -> dict[str, Any] | None:
    run_dir = work / spec["name"]
    done = run_dir / "result.json"
    if not done.exists():
        log(f"{spec['name']}: no finished scan run in {run_dir}; skipped")
        return None
    scan_res = json.loads(done.read_text())
    if scan_res.get("epochs") != epochs:
        raise SystemExit(f"error: {done} was trained {scan_res.get('epochs')} epochs, not "
                         f"{epochs}")
    if (scan_res.get("attack_success") or 0) < 0.8:
        log(f"{spec['name']}: ASR {scan_res.get('attack_success')} < 80%: the attack did "
            "not work, nothing to neutralize")
        return skipped(spec["name"], scan_res)
    out_path = run_dir / "neutralize.json"
    res: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    t, b = spec["target"], spec["base"]
    trigger = rps.make_trigger(spec["kind"], spec["seed"], mnist)
    frac = rps.fraction(spec)
    p = poison_dataset(split.x_train, split.y_train, trigger, target=t, base=b, fraction=frac,
                       seed=spec["seed"])
    model, _, _ = rps.train(run_dir, p.x, p.y, epochs=epochs, seed=spec["seed"], log=log,
                            asr=None)  # the finished checkpoint: no training
    data = ScanData(p.x, p.y, source=f"CIFAR-10 train, {spec['name']}")
    test = (split.x_test, split.y_test)
    trig = triggered_test_set(split.x_test, split.y_test, trigger, target=t, base=b)
    if "clean_models" not in res:  # what the trigger costs models that never saw it
        res["clean_models"] = [backdoor_metrics(m, test=test, triggered=trig, target=t)
                               for m in clean_models(work, epochs)]
        write_json_atomic(out_path, res)
    res.update({"name": spec["name"], "kind": spec["kind"], "pair": spec["pair"],
                "target": t, "base": b, "seed": spec["seed"], "epochs": epochs,
                "fraction": frac})
    if "scan" not in res:
        t0 = time.perf_counter()
        found = scan(model, data, config=ScanConfig(device=rps.DEVICE), progress=False)
        tid = torch.nonzero(p.y == t).flatten()
        m = filter_metrics(found.suspicious_indices, p.indices, tid) \
            if found.target_class == t else None
        res["scan"] = {"flagged": found.poisoned, "target": found.target_class,
                       "base": found.base_class, "suspicious": found.suspicious_indices,
                       "filter": m, "seconds": round(time.perf_counter() - t0, 1)}
        write_json_atomic(out_path, res)
    sc = res["scan"]
    if not sc["flagged"] or sc["target"] != t:
        log(f"{spec['name']}: the scan flagged {sc['target']}, not {t}: not neutralized")
        return res
    report = {"poisoned": True, "target_class": sc["target"], "base_class": sc["base"],
              "suspicious_indices": sc["suspicious"]}
    res.setdefault("remedies", {})
    for remedy in REMEDIES:
        cfg = NeutralizeConfig(remedy=remedy, device=rps.DEVICE)
        if res["remedies"].get(remedy, {}).get("config") == cfg.identity():
            continue  # done with these settings (other settings: run again)
        t0 = time.perf_counter()
        n = neutralize(model, data, report, config=cfg, test=test, triggered=trig,
                       progress=False)
        res["remedies"][remedy] = {"config": cfg.identity(), "before": n.before,
                                   "after": n.after, "counts": n.counts,
                                   "seconds": round(time.perf_counter() - t0, 1)}
        write_json_atomic(out_path, res)
        log(f"  {spec['name']} {remedy}: ASR {pct(n.before['attack_success'])} -> "
            f"{pct(n.after['attack_success'])}, poisoned acc. "
            f"{pct(n.after['poisoned_accuracy'])}, clean {pct(n.before['clean_accuracy'])} "
            f"-> {pct(n.after['clean_accuracy'])}")
    ss_cfg = NeutralizeConfig(remedy="remove", device=rps.DEVICE)
    if res.get("ss_remove", {}).get("config") != ss_cfg.identity():
        t0 = time.perf_counter()
        ss = spectral_signatures(model, data, config=ScanConfig(device=rps.DEVICE),
                                 expected_fraction=frac, progress=False)
        tset = set(torch.nonzero(p.y == t).flatten().tolist())
        flagged = sorted(i for i in ss.suspicious_indices if i in tset)
        n = neutralize(model, data, {"poisoned": True, "target_class": t, "base_class": b,
                                     "suspicious_indices": flagged},
                       config=ss_cfg, test=test, triggered=trig, progress=False)
        m = filter_metrics(flagged, p.indices, torch.tensor(sorted(tset)))
        res["ss_remove"] = {"config": ss_cfg.identity(), "filter": m, "before": n.before,
                            "after": n.after, "seconds": round(time.perf_counter() - t0, 1)}
        write_json_atomic(out_path, res)
        log(f"  {spec['name']} SS + remove: ASR -> {pct(n.after['attack_success'])}")
    return res


def meets(before: dict[str, float], after: dict[str, float]) -> str:
    """The issue's three bars: ASR <= 10%, poisoned-base >= 80%, clean within 2 points."""
    ok = [after["attack_success"] <= 0.10, after["poisoned_accuracy"] >= 0.80,
          after["clean_accuracy"] >= before["clean_accuracy"] - 0.02]
    return "yes" if all(ok) else "no (" + ", ".join(
        n for n, o in zip(("ASR", "poisoned", "clean"), ok, strict=True) if not o) + ")"


def control(res: dict[str, Any], after: dict[str, float]) -> list[str]:
    """The clean models' poisoned-base accuracy (min-max), and whether ``after`` reaches
    their best."""
    cm = [m["poisoned_accuracy"] for m in res.get("clean_models", [])]
    if not cm:
        return ["–", "–"]
    return [f"{100 * min(cm):.1f}–{100 * max(cm):.1f}",
            "yes" if after["poisoned_accuracy"] >= max(cm) else "no"]


def write_tables(results: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    d = NeutralizeConfig()
    lines = ["# Neutralization on CIFAR-10 at this machine's scale (issue 13)", "",
             f"Generated by `examples/reproduce_neutralize.py` on {meta['date']}: "
             f"{meta['model']}, {meta['epochs']} epochs of training (the scan reproduction's "
             f"models, `docs/results/poison-scan.md`), 10% of the base class poisoned (5% in "
             "the runs named `-p5`); neutralization with `NeutralizeConfig`'s defaults: "
             f"{d.epochs} epoch, {d.optimizer} lr {d.lr:g} ({d.schedule}), batch "
             f"{d.batch_size}, rho {d.rho:g} (0-255 units), sign {d.sign}, copies "
             f"{'added' if d.mode == 'add' else 'replacing'} for {d.fraction:.0%} of each "
             f"other class; {meta['machine']}. Accuracies in %: clean on the 10,000 test "
             "images; base class untriggered, poisoned-base (against the true base label) and "
             "ASR on the 1,000 base-class test images (without, with the trigger). The "
             "control: the scan reproduction's 3 clean models (never poisoned) on the same "
             "triggered images, what a model of this size gets when the trigger means "
             "nothing to it. Seeds: a model's training seed is its pair number (which images "
             "are poisoned, the blend's digit, the initialisation, the batch order; "
             "`docs/results/poison-scan.md`), the scans' and neutralizations' seed 0 (the "
             "retraining's shuffle and the copies' choice, `NeutralizeConfig.seed`). Wall "
             "times: `seconds` per neutralization, signals and measurements included.", "",
             f"## The default remedy ({d.remedy})", ""]
    head = ["run", "pair", "ASR", "poisoned-base", "base untriggered", "clean",
            "meets the bars", "poisoned-base − untriggered after",
            "clean models on the triggered images", "≥ the clean models", "seconds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        got = res.get("remedies", {}).get(d.remedy)
        if not got:
            continue
        b, a = got["before"], got["after"]
        lines.append("| " + " | ".join([
            res["name"], str(res["pair"]),
            *(f"{pct(b.get(k))} → {pct(a.get(k))}" for k in
              ("attack_success", "poisoned_accuracy", "base_accuracy", "clean_accuracy")),
            meets(b, a), f"{100 * (a['poisoned_accuracy'] - a['base_accuracy']):+.1f}"
            if "base_accuracy" in a else "–", *control(res, a), f"{got['seconds']:.0f}"])
            + " |")
    lines += ["", "## The remedies side by side", ""]
    head = ["run", "pair", "ASR before", "clean before", "poisoned before"]
    for r in REMEDIES:
        head += [f"{r}: ASR", f"{r}: poisoned", f"{r}: clean"]
    head += ["SS+remove: ASR", "SS filter spec/sens"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        if res.get("skipped") or "remedies" not in res:
            why = res.get("skipped") or "scan did not flag the target"
            lines.append(f"| {res['name']} | {res.get('pair', '')} | "
                         f"{pct(res.get('attack_success'))} | {why} |" + " |" * (len(head) - 4))
            continue
        rm = res["remedies"]
        b = next(iter(rm.values()))["before"]
        row = [res["name"], str(res["pair"]), pct(b["attack_success"]), pct(b["clean_accuracy"]),
               pct(b["poisoned_accuracy"])]
        for r in REMEDIES:
            a = rm.get(r, {}).get("after")
            row += [pct(a and a["attack_success"]), pct(a and a["poisoned_accuracy"]),
                    pct(a and a["clean_accuracy"])]
        ss = res.get("ss_remove")
        row += [pct(ss and ss["after"]["attack_success"]),
                f"{pct(ss['filter']['specificity'])}/{pct(ss['filter']['sensitivity'])}"
                if ss and ss.get("filter") else "–"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "The thesis (ResNet18, about 95% clean): Table 5.3 (blend, 10%), before -> "
              "after neutralization, clean / poisoned-base: "
              + "; ".join(f"pair {k}: {v[0]}/{v[1]} -> {v[2]}/{v[3]}"
                          for k, v in THESIS_53.items())
              + "; Table 5.5 (blend, 5%), pair 2: " + "/".join(map(str, THESIS_55_PAIR2[:2]))
              + " -> " + "/".join(map(str, THESIS_55_PAIR2[2:]))
              + ". Table 5.10 (dot, 10%), poison success after the defence, ours / SS: "
              + "; ".join(f"pair {k}: {v[0]} / {v[1]}" for k, v in THESIS_510.items()) + "."]
    write_text_atomic(out / "poison-neutralize.md", "\n".join(lines) + "\n")
    write_json_atomic(out / "poison-neutralize.json", {"meta": meta, "runs": results})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=24, help="the scan runs' training epochs")
    ap.add_argument("--work", default=None, help="the scan runs' folder (default: "
                    "runs/poison-cifar10-e<epochs>)")
    ap.add_argument("--only", nargs="*", help="run names (default: every poisoned run)")
    ap.add_argument("--results", default="docs/results")
    ap.add_argument("--report-only", action="store_true",
                    help="tables from the runs' neutralize.json only")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t_all = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:7.0f} s] {msg}", flush=True)

    work = Path(args.work or f"runs/poison-cifar10-e{args.epochs}")
    wanted = [r for r in rps.runs_wanted() if r["kind"] != "clean"]
    if args.only:
        wanted = [r for r in wanted if r["name"] in args.only]
    results = []
    if args.report_only:
        for r in wanted:
            f, done = work / r["name"] / "neutralize.json", work / r["name"] / "result.json"
            if f.exists():
                results.append(json.loads(f.read_text()))
            elif done.exists():
                results.append(skipped(r["name"], json.loads(done.read_text())))
    else:
        root = default_data_root()
        split = load_cifar10(root / "cifar10")
        mnist = load_mnist_idx(root / "mnist", seed=0).x_test
        for r in wanted:
            got = one(r, split, mnist, work, args.epochs, log)
            if got is not None:
                results.append(got)
    info = dict(machine_info())
    meta = {"date": time.strftime("%Y-%m-%d"), "epochs": args.epochs,
            "model": f"SmallCNN(width={rps.WIDTH})",
            "machine": f"{info.get('processor', '?')}, {torch.get_num_threads()} threads, "
                       f"torch {torch.__version__}"}
    write_tables(results, meta, Path(args.results))
    log(f"wrote {Path(args.results) / 'poison-neutralize.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
