"""GPU benchmarks without pytest-benchmark (the GPU machine may lack it): CUDA-event
timings of the fused step against the device's copy bandwidth and the pure-PyTorch chains,
and the end-to-end PGD-20 race. Writes one JSON file.

    python bench/gpu_bench.py --out bench/results/gpu-<date>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safedl_ext import attacks, ops
from safedl_ext.models import Normalized, SmallCNN
from safedl_ext.report import machine_info


def cuda_median_ms(fn, reps: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def step_benchmarks(n: int, dtype: torch.dtype) -> dict:
    dev = "cuda"
    x0 = torch.rand(n, 3, 32, 32, device=dev, dtype=dtype)
    g = torch.randn_like(x0)
    xa = x0.clone()
    src, dst = torch.rand_like(x0), torch.empty_like(x0)
    alpha = torch.tensor(2 / 255, device=dev)
    eps = torch.tensor(8 / 255, device=dev)
    buf = torch.empty_like(x0)
    nbytes = x0.numel() * x0.element_size()

    def fused():
        torch.ops.safedl.pgd_step_(xa, x0, g, alpha, eps, "linf", 0.0, 1.0)

    def fused_l2():
        torch.ops.safedl.pgd_step_(xa, x0, g, alpha, eps * 20, "l2", 0.0, 1.0)

    def copy():
        dst.copy_(src)

    def inplace():
        torch.sign(g, out=buf)
        xa.add_(buf, alpha=2 / 255)
        xa.sub_(x0).clamp_(-8 / 255, 8 / 255).add_(x0).clamp_(0, 1)

    def outofplace():
        nonlocal xa
        adv = xa + 2 / 255 * g.sign()
        delta = torch.clamp(adv - x0, min=-8 / 255, max=8 / 255)
        xa = torch.clamp(x0 + delta, min=0, max=1).detach()

    t = {name: cuda_median_ms(fn) for name, fn in
         [("fused_linf", fused), ("fused_l2", fused_l2), ("copy", copy),
          ("inplace_chain", inplace), ("outofplace_chain", outofplace)]}
    copy_bw = 2 * nbytes / (t["copy"] * 1e-3)
    step_bw = 4 * nbytes / (t["fused_linf"] * 1e-3)
    return {
        "batch": [n, 3, 32, 32], "dtype": str(dtype), "median_ms": t,
        "copy_GBps": copy_bw / 1e9, "fused_linf_GBps": step_bw / 1e9,
        "fused_fraction_of_copy_bandwidth": step_bw / copy_bw,
        "speedup_vs_inplace": t["inplace_chain"] / t["fused_linf"],
        "speedup_vs_outofplace": t["outofplace_chain"] / t["fused_linf"],
    }


def pgd_race(n: int = 256) -> dict:
    torch.manual_seed(0)
    model = Normalized(SmallCNN(3, 10, 32), (0.4914, 0.4822, 0.4465),
                       (0.2470, 0.2435, 0.2616)).cuda().eval()
    # Untrained weights: a timing race only (the CPU benchmark uses a trained model).
    x = torch.rand(n, 3, 32, 32, device="cuda")
    with torch.no_grad():
        y = model(x).argmax(1)
    eps, alpha = 8 / 255, 2 / 255

    def ours(early):
        return attacks.pgd(model, x, y, eps=eps, alpha=alpha, steps=20, early_stop=early,
                           generator=torch.Generator().manual_seed(0))

    def plain():
        adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(20):
            adv.requires_grad = True
            cost = F.cross_entropy(model(adv), y)
            grad = torch.autograd.grad(cost, adv)[0]
            adv = adv.detach() + alpha * grad.sign()
            delta = torch.clamp(adv - x, -eps, eps)
            adv = torch.clamp(x + delta, 0, 1).detach()
        with torch.no_grad():
            return (model(adv).argmax(1) == y).float().mean().item()

    def wall(fn, reps=5):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    t_es, t_plain_ours, t_ref = wall(lambda: ours(True)), wall(lambda: ours(False)), wall(plain)
    return {"median_ms": {"pgd20_early_stop": t_es, "pgd20_no_early_stop": t_plain_ours,
                          "torchattacks_style": t_ref},
            "speedup_early_stop": t_ref / t_es, "speedup_no_early_stop": t_ref / t_plain_ours}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    assert ops.backend() == "native" and ops.has_cuda_kernels(), ops.native_error()
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": dict(machine_info()),
        "step": [step_benchmarks(n, dt) for n in (256, 4096)
                 for dt in (torch.float32, torch.float16)],
        "pgd20": pgd_race(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
