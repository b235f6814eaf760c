"""Summarize a pytest-benchmark JSON of ``bench/``: medians, speed-up ratios, targets.

Usage::

    python bench/summarize.py RAW_JSON --out SUMMARY_JSON [--markdown SUMMARY_MD]

Ratios are ``baseline median / native median`` within a group (> 1: native is faster).
Targets (exit code stays 0 when one is missed; the summary marks it MISS):

* ``pgd_step-linf``: native op >= 3x the fastest in-place pure-PyTorch chain and >= 8x
  the torchattacks-style out-of-place chain.
* ``pgd20-attack``: ``pgd(early_stop=True)`` >= 2x the torchattacks-style loop, with robust
  accuracy within 1 percentage point; ``pgd(early_stop=False)`` >= 1.1x.
* ``xgrad-all-*``: input gradients of all 10 labels >= 1.4x ten forward+backward passes,
  with the same gradients (max difference <= 1e-5 of the largest gradient element).
* ``scan-cifar20k``: ``scan()`` <= 1.3x one forward+input-gradient pass over the same data
  (bracketed rounds) and >= 3x the plain implementation, with the same target and base and a
  Jaccard overlap of the suspicious sets >= 0.9; ``scan-memory``: peak RSS at 50,000
  images <= 1.3x that at 5,000.
* ``neutralize-cifar20k`` (information, no target): the scan-and-neutralize pipeline / one
  training epoch on the same data.

Everything else (wrapper overhead, reference, L2) is reported for information.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

# (name, group, native role, baseline role (the fastest of that role is used), min ratio)
TARGETS = [
    ("fused L-inf step vs best in-place chain", "pgd_step-linf", "native",
     "baseline-inplace", 3.0),
    ("fused L-inf step vs torchattacks-style chain", "pgd_step-linf", "native",
     "baseline-outofplace", 8.0),
    ("PGD-20 early_stop=True vs torchattacks-style loop", "pgd20-attack", "native-earlystop",
     "baseline-torchattacks", 2.0),
    ("PGD-20 early_stop=False vs torchattacks-style loop", "pgd20-attack", "native",
     "baseline-torchattacks", 1.1),
    ("GMM 10 groups x 5,000 points vs loop of scikit-learn fits", "gmm-10x5000", "native",
     "baseline-sklearn", 20.0),
    ("GMM 1,000 groups x 1,300 points vs loop of scikit-learn fits", "gmm-1000x1300",
     "native", "baseline-sklearn", 20.0),
    ("streamed SVD (gram) vs torch.linalg.svd, CIFAR-shaped hard regime", "svd-cifar",
     "native", "baseline-svd", 10.0),
    ("streamed SVD (gram) vs torch.svd_lowrank(q=6, niter=4)", "svd-cifar", "native",
     "baseline-lowrank", 1.0),
    # ratio = baseline / JARN: >= 0.4 means a JARN step costs <= 2.5 standard steps
    ("JARN step vs standard step, thesis MNIST CNN (JARN <= 2.5x)",
     "train-step-mnistcnn-b64", "native", "baseline-standard", 0.4),
    ("JARN step vs PGD-AT7 step, thesis MNIST CNN (JARN <= 0.4x)",
     "train-step-mnistcnn-b64", "native", "baseline-pgdat7", 2.5),
    ("JARN step vs standard step, ResNet-18 CIFAR (JARN <= 2.5x)",
     "train-step-resnet18-b64", "native", "baseline-standard", 0.4),
    ("JARN step vs PGD-AT7 step, ResNet-18 CIFAR (JARN <= 0.4x)",
     "train-step-resnet18-b64", "native", "baseline-pgdat7", 2.5),
    ("input gradients of all 10 labels vs 10 forward+backward passes, SmallCNN "
     "128x3x32x32", "xgrad-all-cifar128", "native", "baseline-k-passes", 1.4),
    ("input gradients of all 10 labels vs 10 forward+backward passes, DigitsCNN on 450 "
     "digits", "xgrad-all-digits", "native", "baseline-k-passes", 1.4),
    ("scan vs plain implementation (matrices in memory, torch.linalg.svd, scikit-learn "
     "GMMs), 20,000 CIFAR-10 images", "scan-cifar20k", "native", "baseline-plain", 3.0),
]
# Quality each target's native side must also reach: (group, native role) -> {key: min}.
QUALITY = {
    ("gmm-10x5000", "native"): {"agreement": 0.995},
    ("gmm-1000x1300", "native"): {"agreement": 0.995},
    ("svd-cifar", "native"): {"cos_vector": 0.999, "cos_projections": 0.999},
}
# Requirements on one benchmark's measured values: (name, group, role, key, "<=" or ">=",
# bound).
CHECKS = [
    ("ImageNet-shaped sketch: streamed footprint / materialized float32", "svd-imagenet",
     "native", "peak_mem_fraction", "<=", 0.05),
    ("ImageNet-shaped sketch: min projections |cosine| over 20 classes", "svd-imagenet",
     "native", "cos_projections", ">=", 0.98),
    ("all-label input gradients: max |difference| from the 10 passes' / max |gradient| "
     "(SmallCNN)", "xgrad-all-cifar128", "native", "max_rel_diff", "<=", 1e-5),
    ("all-label input gradients: max |difference| from the 10 passes' / max |gradient| "
     "(digits)", "xgrad-all-digits", "native", "max_rel_diff", "<=", 1e-5),
    ("scan / one forward+input-gradient pass over the same data (median of bracketed rounds)",
     "scan-cifar20k", "native", "overhead_ratio", "<=", 1.3),
    ("plain implementation takes the scan's decisions (target and base: 1 = same)",
     "scan-cifar20k", "baseline-plain", "same_decisions", ">=", 1.0),
    ("plain implementation: Jaccard overlap of the suspicious sets", "scan-cifar20k",
     "baseline-plain", "jaccard", ">=", 0.9),
    ("scan peak RSS less the caller's images, 50,000 / 5,000 synthetic uint8 images",
     "scan-memory", "native", "scan_peak_ratio", "<=", 1.3),
]
# (name, group, role of the faster side, role of the slower side): information only
INFO = [
    ("L-inf: wrapper overhead (wrapper / raw op)", "pgd_step-linf", "native", "wrapper"),
    ("L-inf: reference / raw op", "pgd_step-linf", "native", "reference"),
    ("L-inf: single-pass memory floor (addcmul_) / raw op", "pgd_step-linf", "native",
     "floor"),
    ("L2: reference / raw op", "pgd_step-l2", "native", "reference"),
    ("L2: torchattacks-style chain / raw op", "pgd_step-l2", "native", "baseline-outofplace"),
    ("L2: wrapper overhead (wrapper / raw op)", "pgd_step-l2", "native", "wrapper"),
    ("PGD-20 early_stop=False, input layout kept (memory_format='preserve') vs "
     "torchattacks-style loop", "pgd20-attack", "native-preserve", "baseline-torchattacks"),
    ("PGD-20: channels-last iterates vs kept layout (both early_stop=False)", "pgd20-attack",
     "native", "native-preserve"),
    ("ImageNet-shaped stream: sketch mode / projection-only floor (wall time, generation "
     "included)", "svd-imagenet", "floor-projection", "native"),
    ("CIFAR-shaped: torch.linalg.svd / sketch mode (one pass, k=2048)", "svd-cifar", "sketch",
     "baseline-svd"),
    ("all labels, SmallCNN: one batched VJP of 10 classes / loop of VJPs",
     "xgrad-all-cifar128", "native", "batched"),
    ("all labels, SmallCNN: batched VJPs of 5 classes / loop of VJPs", "xgrad-all-cifar128",
     "native", "batched-5"),
    ("all labels, SmallCNN: loop of VJPs on NCHW / on a channels-last copy",
     "xgrad-all-cifar128", "native-channels-last", "native"),
    ("all labels, digits: one batched VJP of 10 classes / loop of VJPs", "xgrad-all-digits",
     "native", "batched"),
    ("all labels, digits: batched VJPs of 5 classes / loop of VJPs", "xgrad-all-digits",
     "native", "batched-5"),
    ("xent seed 256x10, forward + backward + double backward: torch / native", "xent-256x10",
     "native", "baseline-torch"),
    ("xent seed 256x10, forward + backward: torch / native", "xent-256x10", "native-fwdbwd",
     "torch-fwdbwd"),
    ("xent seed 256x10, forward: torch / native", "xent-256x10", "native-fwd", "torch-fwd"),
    ("xent seed 4096x1000, forward + backward + double backward: torch / native",
     "xent-4096x1000", "native", "baseline-torch"),
    ("xent seed 4096x1000, forward + backward: torch / native", "xent-4096x1000",
     "native-fwdbwd", "torch-fwdbwd"),
    ("xent seed 4096x1000, forward: torch / native", "xent-4096x1000", "native-fwd",
     "torch-fwd"),
    ("AC from activations: ART / ours", "ac-cifar20k", "native", "baseline-art"),
    ("AC: ours end to end (forward included) / ART from activations", "ac-cifar20k",
     "baseline-art", "native-e2e"),
    ("AC: ours end to end / the forward pass alone", "ac-cifar20k", "floor-forward",
     "native-e2e"),
    ("SS from activations: ART / ours", "ss-cifar20k", "native", "baseline-art"),
    ("SS: ours end to end (forward included) / ART from activations", "ss-cifar20k",
     "baseline-art", "native-e2e"),
    ("scan + neutralization set + one retraining epoch / one training epoch (medians; the "
     "bracketed ratio is in the note)", "neutralize-cifar20k", "baseline-train-epoch",
     "native"),
]
ACC_TOLERANCE_PP = 1.0


def _machine() -> dict[str, Any]:
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from safedl_ext.report import machine_info

        return dict(machine_info())
    except Exception as exc:  # a report must not die on a missing extension
        return {"error": f"machine_info unavailable: {exc}"}


def _rows(raw: dict) -> list[dict[str, Any]]:
    rows = []
    for b in raw.get("benchmarks", []):
        extra = b.get("extra_info", {})
        st = b["stats"]
        row = {
            "group": b.get("group") or extra.get("group") or "",
            "name": b["name"],
            "variant": extra.get("variant", b["name"]),
            "role": extra.get("role", "?"),
            "median_ms": st["median"] * 1e3,
            "iqr_ms": st["iqr"] * 1e3,
            "min_ms": st["min"] * 1e3,
            "rounds": st["rounds"],
            "iterations": st.get("iterations", 1),
        }
        for key in ("robust_acc", "clean_acc_batch", "clean_acc_test1000", "threads",
                    "agreement", "cos_vector", "cos_projections", "peak_mem_fraction",
                    "peak_rss_fraction", "rows_per_second", "max_abs_diff", "max_rel_diff",
                    "overhead_ratio", "pipeline_ratio", "same_decisions", "jaccard",
                    "peak_ratio", "scan_peak_ratio", "peak_rss_mb",
                    "peak_increase_mb", "note"):
            if key in extra:
                row[key] = extra[key]
        rows.append(row)
    return rows


def _pick(rows, group: str, role: str) -> dict[str, Any] | None:
    """The fastest (lowest median) benchmark of ``role`` in ``group``."""
    cands = [r for r in rows if r["group"] == group and r["role"] == role]
    return min(cands, key=lambda r: r["median_ms"]) if cands else None


def summarize(raw: dict) -> dict[str, Any]:
    rows = _rows(raw)
    # Per-benchmark ratio against the group's native op (where the group has one).
    for r in rows:
        nat = _pick(rows, r["group"], "native")
        r["ratio_vs_native"] = (r["median_ms"] / nat["median_ms"]) if nat else None

    # Targets of groups this run did not include at all are left out (a partial run such as
    # `make bench-linalg`); a group that ran without the needed role shows NOT RUN.
    ran = {r["group"] for r in rows}
    targets = []
    for name, group, nrole, brole, need in TARGETS:
        if group not in ran:
            continue
        nat, base = _pick(rows, group, nrole), _pick(rows, group, brole)
        t: dict[str, Any] = {"target": name, "group": group, "native": None, "baseline": None,
                             "required": need, "ratio": None, "status": "NOT RUN",
                             "pass": None}
        if nat and base:
            ratio = base["median_ms"] / nat["median_ms"]
            ok = ratio >= need
            t.update(native=nat["variant"], native_median_ms=nat["median_ms"],
                     baseline=base["variant"], baseline_median_ms=base["median_ms"],
                     ratio=ratio, speed_vs_target=ratio / need)
            if "robust_acc" in nat and "robust_acc" in base:
                diff_pp = 100.0 * (nat["robust_acc"] - base["robust_acc"])
                t.update(native_robust_acc=nat["robust_acc"],
                         baseline_robust_acc=base["robust_acc"], robust_acc_diff_pp=diff_pp)
                if nrole == "native-earlystop":
                    acc_ok = abs(diff_pp) <= ACC_TOLERANCE_PP
                    t["robust_acc_within_1pp"] = acc_ok
                    ok = ok and acc_ok
            need_q = QUALITY.get((group, nrole), {})
            quality = {k: nat.get(k) for k in need_q}
            if need_q:
                t["quality"] = quality
                ok = ok and all(v is not None and v >= need_q[k] for k, v in quality.items())
            t["pass"] = ok
            t["status"] = "PASS" if ok else "MISS"
        targets.append(t)
    for name, group, role, key, op, bound in CHECKS:
        if group not in ran:
            continue
        row = _pick(rows, group, role)
        t = {"target": name, "group": group, "required": f"{op} {bound:g}", "ratio": None,
             "status": "NOT RUN", "pass": None, "value": None}
        if row is not None and row.get(key) is not None:
            value = row[key]
            ok = value <= bound if op == "<=" else value >= bound
            t.update(value=value, native=row["variant"], native_median_ms=row["median_ms"],
                     pass_=ok)
            t["pass"] = ok
            t["status"] = "PASS" if ok else "MISS"
        targets.append(t)

    for t in targets:
        t.pop("pass_", None)
    info = []
    for name, group, frole, srole in INFO:
        fast, slow = _pick(rows, group, frole), _pick(rows, group, srole)
        if fast and slow:
            info.append({"what": name, "group": group,
                         "ratio": slow["median_ms"] / fast["median_ms"]})

    threads = sorted({r["threads"] for r in rows if "threads" in r})
    commit = raw.get("commit_info", {})
    machine = _machine()
    return {
        "date": raw.get("datetime"),
        "commit": {"id": commit.get("id"), "dirty": commit.get("dirty")},
        "machine": machine,
        "torch": machine.get("torch"),
        "bench_threads": threads[0] if len(threads) == 1 else threads,
        "benchmarks": rows,
        "targets": targets,
        "info": info,
        "all_targets_pass": all(t["pass"] for t in targets if t["status"] != "NOT RUN"),
    }


def _f(v: Any, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _acc(v: Any) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def markdown(s: dict[str, Any]) -> str:
    m = s["machine"]
    lines = [
        f"CPU benchmarks, {s['date']}: {m.get('processor', '?')}, {s['bench_threads']} torch "
        f"threads, torch {s['torch']}, backend {m.get('safedl_backend', '?')}. "
        "Medians; ratio = this benchmark's median / the group's native-op median.",
        "",
        "| group | benchmark | role | median (ms) | IQR (ms) | rounds | ratio | robust acc |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in s["benchmarks"]:
        lines.append(
            f"| {r['group']} | {r['variant']} | {r['role']} | {_f(r['median_ms'], 3)} | "
            f"{_f(r['iqr_ms'], 3)} | {r['rounds']} | {_f(r['ratio_vs_native'])} | "
            f"{_acc(r.get('robust_acc'))} |")
    lines += ["", "| target | native (ms) | baseline (ms) | speed-up | required | "
              "quality (robust acc native / baseline; agreement; |cos|) | status |",
              "|---|---:|---:|---:|---:|---|---|"]
    for t in s["targets"]:
        acc = ""
        if "native_robust_acc" in t:
            acc = (f"{_acc(t['native_robust_acc'])} / {_acc(t['baseline_robust_acc'])} "
                   f"({t['robust_acc_diff_pp']:+.1f} pp)")
        if t.get("quality"):
            acc = ", ".join(f"{k} {_f(v, 5)}" for k, v in t["quality"].items())
        if t.get("value") is not None:
            acc = f"measured {t['value']:.4g}"
        status = t["status"] if t["status"] != "MISS" else "**MISS**"
        if t["status"] == "MISS" and t.get("ratio") is not None and t["ratio"] < t["required"]:
            status += f" ({t['speed_vs_target']:.0%} of target)"
        req = t["required"] if isinstance(t["required"], str) else f"{t['required']:g}x"
        lines.append(
            f"| {t['target']} | {_f(t.get('native_median_ms'), 3)} | "
            f"{_f(t.get('baseline_median_ms'), 3)} | {_f(t['ratio'])}x | {req} | "
            f"{acc} | {status} |")
    if s["info"]:
        lines += ["", "Information only: " + "; ".join(
            f"{i['what']} {i['ratio']:.2f}x" for i in s["info"]) + "."]
    rates = [f"{r['variant']} {r['rows_per_second']:.0f} rows/s" for r in s["benchmarks"]
             if r.get("rows_per_second")]
    if rates:
        lines += ["", "Throughput (rows generated on the fly, 2 threads): " + "; ".join(rates)
                  + "."]
    notes = [f"{r['group']} / {r['variant']}: {r['note']}" for r in s["benchmarks"]
             if r.get("note")]
    if notes:
        lines += ["", "Notes (measured in this run):", ""] + [f"* {n}" for n in notes]
    clean = [r.get("clean_acc_test1000") for r in s["benchmarks"] if r.get("clean_acc_test1000")]
    if clean:
        lines += ["", f"Bench model clean accuracy (1,000 CIFAR-10 test images): "
                      f"{_acc(clean[0])}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", help="pytest-benchmark JSON (--benchmark-json)")
    ap.add_argument("--out", required=True, help="summary JSON to write")
    ap.add_argument("--markdown", help="Markdown table to write")
    args = ap.parse_args(argv)
    raw = json.loads(Path(args.raw).read_text())
    s = summarize(raw)
    sys.path.insert(0, str(REPO_ROOT))
    from safedl_ext.report import write_json_atomic, write_text_atomic

    write_json_atomic(args.out, s)
    Path(args.out).chmod(0o644)
    md = markdown(s)
    if args.markdown:
        write_text_atomic(args.markdown, md)
        Path(args.markdown).chmod(0o644)
    print(md, end="")
    missed = [t["target"] for t in s["targets"] if t["status"] != "PASS"]
    if missed:
        print(f"\nTargets missed or not run: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
