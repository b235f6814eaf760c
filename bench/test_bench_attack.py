"""End-to-end PGD-20 (L-inf, eps 8/255, alpha 2/255, random start) robust-accuracy evaluation
of a standard CIFAR-10 CNN on a batch of 256 test images: ``safedl_ext.attacks.pgd`` against
a torchattacks-style loop in plain PyTorch.

Group ``pgd20-attack``; roles ``native-earlystop`` (``early_stop=True``), ``native``
(``early_stop=False``) and ``baseline-torchattacks``. Each benchmark records the robust
accuracy it measured in ``extra_info["robust_acc"]``.

``pgd`` counts a sample as fooled if *any* iterate fooled it; the torchattacks loop looks at
the final iterate only, so ``pgd``'s robust accuracy is lower or equal by construction.
"""

from __future__ import annotations

import torch
from conftest import THREADS, require_native
from torch import nn

from safedl_ext.attacks import pgd

GROUP = "pgd20-attack"
EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 20
ROUNDS, WARMUP = 5, 1


def _tag(benchmark, role: str, variant: str, meta: dict, x: torch.Tensor, model) -> None:
    benchmark.group = GROUP
    with torch.no_grad():
        clean = float((model(x[0]).argmax(1) == x[1]).float().mean())
    benchmark.extra_info.update(
        group=GROUP, role=role, variant=variant, batch=int(x[0].shape[0]), eps=EPS,
        alpha=ALPHA, steps=STEPS, threads=THREADS, clean_acc_batch=clean,
        clean_acc_test1000=meta.get("clean_acc_test1000"), model=meta.get("model"),
        train_images=meta.get("train_images"), epochs=meta.get("epochs"))


def torchattacks_pgd(model, images, labels, eps, alpha, steps, generator):
    """torchattacks.PGD's loop, written out in plain PyTorch (seeded random start)."""
    model.eval()
    loss = nn.CrossEntropyLoss()
    adv = images.clone().detach()
    adv = adv + torch.empty_like(adv).uniform_(-eps, eps, generator=generator)
    adv = torch.clamp(adv, min=0, max=1).detach()
    for _ in range(steps):
        adv.requires_grad = True
        cost = loss(model(adv), labels)
        grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
        adv = adv.detach() + alpha * grad.sign()
        delta = torch.clamp(adv - images, min=-eps, max=eps)
        adv = torch.clamp(images + delta, min=0, max=1).detach()
    with torch.no_grad():
        return float((model(adv).argmax(1) == labels).float().mean())


def _native(model, x, y, early_stop: bool, memory_format: str = "auto") -> float:
    res = pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, early_stop=early_stop,
              memory_format=memory_format, generator=torch.Generator().manual_seed(0))
    return 1.0 - float(res.success.float().mean())


def test_pgd20_native_early_stop(benchmark, cifar_model, cifar_batch):
    require_native()
    model, meta = cifar_model
    x, y = cifar_batch
    _tag(benchmark, "native-earlystop", "safedl_ext.attacks.pgd(early_stop=True)", meta,
         cifar_batch, model)
    acc = benchmark.pedantic(_native, args=(model, x, y, True), rounds=ROUNDS, iterations=1,
                             warmup_rounds=WARMUP)
    benchmark.extra_info["robust_acc"] = acc


def test_pgd20_native(benchmark, cifar_model, cifar_batch):
    require_native()
    model, meta = cifar_model
    x, y = cifar_batch
    _tag(benchmark, "native", "safedl_ext.attacks.pgd(early_stop=False)", meta, cifar_batch,
         model)
    acc = benchmark.pedantic(_native, args=(model, x, y, False), rounds=ROUNDS, iterations=1,
                             warmup_rounds=WARMUP)
    benchmark.extra_info["robust_acc"] = acc


def test_pgd20_native_preserve_layout(benchmark, cifar_model, cifar_batch):
    """Information: ``early_stop=False`` with the iterates kept NCHW, as the baseline has
    them, so the per-step gain of the fused step alone shows (the default ``"auto"`` runs
    the iterates channels-last on CPU, which speeds up oneDNN convolutions)."""
    require_native()
    model, meta = cifar_model
    x, y = cifar_batch
    _tag(benchmark, "native-preserve",
         "safedl_ext.attacks.pgd(early_stop=False, memory_format='preserve')", meta,
         cifar_batch, model)
    acc = benchmark.pedantic(_native, args=(model, x, y, False, "preserve"), rounds=ROUNDS,
                             iterations=1, warmup_rounds=WARMUP)
    benchmark.extra_info["robust_acc"] = acc


def test_pgd20_torchattacks_style(benchmark, cifar_model, cifar_batch):
    model, meta = cifar_model
    x, y = cifar_batch
    _tag(benchmark, "baseline-torchattacks", "torchattacks-style loop (plain PyTorch)", meta,
         cifar_batch, model)

    def run():
        return torchattacks_pgd(model, x, y, EPS, ALPHA, STEPS,
                                torch.Generator().manual_seed(0))

    acc = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    benchmark.extra_info["robust_acc"] = acc
