"""GPU benchmarks without pytest-benchmark (the GPU machine may lack it): CUDA-event
timings of the fused step against the device's copy bandwidth and the pure-PyTorch chains,
the end-to-end PGD-20 race, the linalg ops, and the input-gradient engine with the
cross-entropy seed op. Writes one JSON file.

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


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten().cpu(), b.double().flatten().cpu()
    return abs(float(a @ b / (a.norm() * b.norm())))


def linalg_benchmarks(dev: str = "cuda", timer=None) -> dict:
    """Issue 3 on the GPU: streamed SVD (CIFAR-shaped hard regime), the structured
    projection's throughput at d = 150,528, and batched GMM, with their baselines.
    (``dev``/``timer`` let it be smoke-tested on a CPU.)"""
    from safedl_ext.linalg import StreamingSVD, gmm1d
    from safedl_ext.linalg.synthetic import planted_matrix
    from safedl_ext.ops import sketch

    cuda_median_ms = timer or globals()["cuda_median_ms"]
    x_cpu, _ = planted_matrix(5000, 3072, fraction=0.1, strength=0.6, seed=0)
    _, _, vh = torch.linalg.svd(x_cpu.double(), full_matrices=False)
    ref_v, ref_p = vh[0], x_cpu.double() @ vh[0]
    x = x_cpu.to(dev)
    zeros = torch.zeros(256, dtype=torch.int64, device=dev)
    out: dict = {}

    def streamed():
        svd = StreamingSVD(1, 3072, mode="gram", device=dev)
        for i in range(0, 5000, 256):
            r = x[i:i + 256]
            svd.update(r, zeros[:r.shape[0]], torch.arange(i, i + r.shape[0], device=dev))
        svd.finalize()
        for i in range(0, 5000, 256):
            r = x[i:i + 256]
            svd.project(r, zeros[:r.shape[0]], torch.arange(i, i + r.shape[0], device=dev))
        return svd.results()[0]

    def full_svd():
        v = torch.linalg.svd(x, full_matrices=False)[2][0]
        return v, x @ v

    def lowrank():
        v = torch.svd_lowrank(x, q=6, niter=4)[2][:, 0]
        return v, x @ v

    res = streamed()
    out["svd_cifar"] = {
        "median_ms": {"streamed_gram": cuda_median_ms(streamed, reps=10, warmup=2),
                      "torch_linalg_svd": cuda_median_ms(full_svd, reps=5, warmup=1),
                      "torch_svd_lowrank_q6_niter4": cuda_median_ms(lowrank, reps=10,
                                                                    warmup=2)},
        "cos_vector": _cos(res.vectors[0], ref_v),
        "cos_projections": _cos(res.projections[:, 0], ref_p),
        "cos_vector_lowrank": _cos(lowrank()[0], ref_v),
    }
    rows = torch.randn(256, 3 * 224 * 224, device=dev)
    t = cuda_median_ms(lambda: sketch.srht_project(rows, 2048, 1), reps=20)
    tv = cuda_median_ms(lambda: rows @ rows[0], reps=20)
    out["srht_150528"] = {"median_ms": t, "rows_per_second": 256 / t * 1e3,
                          "projection_only_rows_per_second": 256 / tv * 1e3}
    g = torch.Generator().manual_seed(0)
    for c, n in ((10, 5000), (1000, 1300)):
        z = torch.rand((c, n), generator=g, dtype=torch.float64) < 0.5
        vals = torch.where(z, torch.randn((c, n), generator=g, dtype=torch.float64),
                           4 + torch.randn((c, n), generator=g, dtype=torch.float64)).to(dev)
        lengths = torch.full((c,), n, dtype=torch.int64, device=dev)
        cpu = gmm1d(vals.cpu(), lengths.cpu())
        gpu = gmm1d(vals, lengths)
        agree = float((gpu.assignments.cpu() == cpu.assignments).double().mean())
        out[f"gmm_{c}x{n}"] = {"median_ms": cuda_median_ms(lambda v=vals, n_=lengths: gmm1d(v, n_),
                                                          reps=10),
                               "agreement_with_cpu": agree}
    return out


def gradients_benchmarks(dev: str = "cuda", timer=None, batch: int = 256) -> dict:
    """Issue 4 on the GPU: input gradients of all 10 labels (a loop of VJPs over one
    forward pass, batched VJPs, and 10 separate forward+backward passes), and the native
    cross-entropy seed op against the torch composition (float32 and float16).
    (``dev``/``timer``/``batch`` let it be smoke-tested on a CPU.)"""
    from safedl_ext.gradients import input_gradients
    from safedl_ext.ops import reference

    cuda_median_ms = timer or globals()["cuda_median_ms"]
    torch.manual_seed(0)
    model = Normalized(SmallCNN(3, 10, 32), (0.4914, 0.4822, 0.4465),
                       (0.2470, 0.2435, 0.2616)).to(dev).eval()
    # Untrained weights: a timing race (the CPU benchmark uses the trained model).
    x = torch.rand(batch, 3, 32, 32, device=dev)

    def k_passes():
        out = []
        for k in range(10):
            xi = x.detach().requires_grad_(True)
            loss = F.cross_entropy(model(xi), torch.full((batch,), k, device=dev),
                                   reduction="sum")
            out.append(torch.autograd.grad(loss, xi)[0])
        return torch.stack(out, 1)

    ref = k_passes()
    runs = {"loop_chunk1": lambda: input_gradients(model, x, labels="all"),
            "batched_chunk5": lambda: input_gradients(model, x, labels="all", chunk_size=5),
            "batched_chunk10": lambda: input_gradients(model, x, labels="all", chunk_size=10),
            "k_passes": k_passes}
    times = {name: cuda_median_ms(fn, reps=10, warmup=2) for name, fn in runs.items()}
    diff = max(float((runs[n]() - ref).abs().max()) for n in runs if n != "k_passes")
    out: dict = {"all_labels": {
        "batch": [batch, 3, 32, 32], "median_ms": times,
        "speedup_loop_vs_k_passes": times["k_passes"] / times["loop_chunk1"],
        "speedup_best_vs_k_passes": times["k_passes"] / min(
            t for n, t in times.items() if n != "k_passes"),
        "max_abs_diff_vs_k_passes": diff, "max_abs_grad": float(ref.abs().max())}}

    for n, k in ((256, 10), (4096, 1000)):
        for dt in (torch.float32, torch.float16):
            g = torch.Generator().manual_seed(0)
            z = (3 * torch.randn((n, k), generator=g)).to(dev, dt).requires_grad_(True)
            y = torch.randint(0, k, (n,), generator=g).to(dev)
            v = torch.randn((n, k), generator=g).to(dev, dt)
            u = torch.randn((n, k), generator=g).to(dev, dt)

            def chain(fn, depth, z=z, y=y, v=v, u=u):
                s = fn(z, y)
                if depth == 0:
                    return s
                (gz,) = torch.autograd.grad(s, z, v, create_graph=depth > 1)
                if depth == 1:
                    return gz
                return torch.autograd.grad(gz, z, u)[0]

            res = {}
            for depth, name in ((0, "fwd"), (1, "fwd_bwd"), (2, "fwd_bwd_dbl")):
                tn = cuda_median_ms(lambda d=depth: chain(ops.xent_seed, d))
                tt = cuda_median_ms(lambda d=depth: chain(reference.xent_seed, d))
                err = float((chain(ops.xent_seed, depth).detach().float()
                             - chain(reference.xent_seed, depth).detach().float()).abs().max())
                res[name] = {"native_ms": tn, "torch_ms": tt, "speedup": tt / tn,
                             "max_abs_diff": err}
            out[f"xent_{n}x{k}_{str(dt).replace('torch.', '')}"] = res
    return out


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
        "linalg": linalg_benchmarks(),
        "gradients": gradients_benchmarks(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
