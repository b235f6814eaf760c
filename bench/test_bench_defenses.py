"""One training step of JARN against a standard step and a PGD-AT7 step, same model and
batch (thesis, chapter 3: JARN 217 s vs PGD-AT7 704 s per CIFAR-10 epoch).

Groups: ``train-step-<model>-b<batch>`` for the thesis's MNIST CNN on MNIST-shaped input
and ResNet-18 on CIFAR-shaped input (real CIFAR-10 test images). Roles:

* ``native``: a JARN step with JARN switched on (forward, input gradient with
  ``create_graph``, adaptor, discriminator, double backward, optimiser step; the
  discriminator's own step every ``disc_every=20`` calls, as configured by default);
* ``baseline-standard``: a standard cross-entropy step;
* ``baseline-pgdat7``: a PGD-AT step with 7 PGD iterations (Madry's CIFAR setting);
* ``info-double-backprop``: a double-backpropagation step (information).

Targets (``summarize.py``): standard / JARN >= 0.4 (JARN <= 2.5x standard) and
PGD-AT7 / JARN >= 2.5 (JARN <= 0.4x PGD-AT7).
"""

from __future__ import annotations

import pytest
import torch
from conftest import THREADS, require_native, warm

from safedl_ext.defenses import JARN, PGDAT, DoubleBackprop, JARNConfig, Standard, StepContext
from safedl_ext.models import build_model

CASES = {
    "train-step-mnistcnn-b64": ("mnist-cnn", (64, 1, 28, 28), 0.3),
    "train-step-resnet18-b64": ("resnet18", (64, 3, 32, 32), 8 / 255),
}
ROLES = {
    "native": lambda eps: JARN(JARNConfig(eps=eps, jarn_fraction=1.0)),
    "baseline-standard": lambda eps: Standard(),
    "baseline-pgdat7": lambda eps: PGDAT(eps=eps, steps=7, alpha=2.5 * eps / 7),
    "info-double-backprop": lambda eps: DoubleBackprop(lam=1.0),
}


def _batch(shape, cifar_batch):
    if shape[1] == 3:
        x, y = cifar_batch
        return x[: shape[0]].contiguous(), y[: shape[0]].contiguous()
    g = torch.Generator().manual_seed(0)
    return torch.rand(shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)


@pytest.mark.parametrize("group", list(CASES))
@pytest.mark.parametrize("role", list(ROLES))
def test_train_step(benchmark, group, role, cifar_batch):
    require_native()
    arch, shape, eps = CASES[group]
    x, y = _batch(shape, cifar_batch)
    torch.manual_seed(0)
    model = build_model(arch, in_channels=shape[1], num_classes=10).train()
    method = ROLES[role](eps)
    method.setup(model, x[:2])
    params = list(model.parameters()) + method.extra_parameters()
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    state = {"step": 0}

    def step():
        ctx = StepContext(step=state["step"], total_steps=10**9, epoch=0, generator=gen,
                          device=x.device)
        loss, _, _ = method.loss(model, x, y, ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.after_step(model, ctx)
        state["step"] += 1

    warm(step, 2)
    benchmark.group = group
    benchmark.extra_info.update(role=role, variant=method.name, threads=THREADS, model=arch,
                                batch=list(shape))
    benchmark.pedantic(step, rounds=7 if "mnist" in group else 5, iterations=1)
