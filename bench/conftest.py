"""Shared set-up of the benchmarks in ``bench/`` (pytest-benchmark).

Not part of the normal test run (``tests/`` is the configured testpath); run with
``pytest bench --benchmark-json=...`` and summarize with ``bench/summarize.py``.

Environment:
    SAFEDL_DATA: folder holding ``cifar10/cifar10-{train,test}-jpeg.tar.gz``
        (default ``<repo>/../shared/data``).
    SAFEDL_BENCH_THREADS: torch intra-op threads (default 2, the reference CPU setting).
    SAFEDL_BENCH_CACHE: where the trained bench model is cached
        (default ``~/.cache/safedl_ext/bench``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import safedl_ext  # noqa: E402, F401
from safedl_ext import ops  # noqa: E402

THREADS = int(os.environ.get("SAFEDL_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)


def _prime_allocator() -> bool:
    """Put glibc malloc in the state an attack loop leaves it in.

    glibc serves blocks above its mmap threshold (128 KiB at start) with fresh mmaps and
    trims the heap top once more than twice that threshold is free; freeing an mmapped
    block raises the threshold to that block's size (up to 32 MiB). A process that has run
    a CNN at batch 256 is past that point; a fresh one is not, and there each 3 MiB
    temporary of an out-of-place chain costs page faults (the reference step measured
    ~10 ms instead of ~2 ms, 3,040 minor faults per call). Freeing one 24 MiB block makes
    the out-of-place baselines independent of which benchmarks ran before them. It only
    ever helps the baselines. ``SAFEDL_BENCH_NO_PRIME=1`` turns it off.
    """
    if os.environ.get("SAFEDL_BENCH_NO_PRIME", "0") not in ("", "0"):
        return False
    block = torch.ones(6 << 20)  # 24 MiB (must stay <= 32 MiB to move the threshold)
    del block
    return True


ALLOCATOR_PRIMED = _prime_allocator()

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

# The bench model: SmallCNN(3, 10, width=32) behind Normalized, standard training.
TRAIN_PER_CLASS = 1000  # 10,000 training images
TRAIN_EPOCHS = 4
TRAIN_BATCH = 64
TRAIN_LR = 1e-3
TRAIN_SEED = 0
EVAL_PER_CLASS = 100  # clean accuracy is measured on 1,000 test images
BATCH = 256  # the attacked batch (CIFAR-10 test images)


def data_root() -> Path:
    """``$SAFEDL_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("SAFEDL_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).parents[1] / ".." / "shared" / "data"


def cache_dir() -> Path:
    env = os.environ.get("SAFEDL_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "safedl_ext" / "bench"


def cached_train(model: torch.nn.Module, key: str, train) -> dict:
    """Load ``model``'s weights from the bench cache under ``key``, or run ``train()``
    (trains ``model`` in place, returns its metadata) and cache them: the metadata, with
    ``cached`` saying which."""
    import json

    from safedl_ext.report import load_torch_safe, save_torch_atomic

    weights, meta_path = cache_dir() / f"{key}.pt", cache_dir() / f"{key}.json"
    if weights.exists() and meta_path.exists():
        model.load_state_dict(load_torch_safe(weights, what="bench model"))
        return {**json.loads(meta_path.read_text()), "cached": True}
    meta = train()
    cache_dir().mkdir(parents=True, exist_ok=True)
    save_torch_atomic(weights, model.state_dict())
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "cached": False}


def require_native() -> None:
    """Skip a native benchmark when the extension did not load."""
    if ops.backend() != "native":
        pytest.skip(f"native extension not loaded: {ops.native_error()}")


def warm(fn, n: int = 3) -> None:
    """A few untimed calls (thread pool start, first touch of pages)."""
    for _ in range(n):
        fn()


def _build_model() -> torch.nn.Module:
    from safedl_ext.models import Normalized, SmallCNN

    torch.manual_seed(TRAIN_SEED)
    return Normalized(SmallCNN(3, 10, width=32), CIFAR_MEAN, CIFAR_STD)


def _model_key() -> str:
    return (f"smallcnn-w32_cifar10-pc{TRAIN_PER_CLASS}_e{TRAIN_EPOCHS}_b{TRAIN_BATCH}"
            f"_lr{TRAIN_LR:g}_s{TRAIN_SEED}")


@pytest.fixture(scope="session")
def cifar_archives() -> tuple[Path, Path]:
    root = data_root() / "cifar10"
    train = root / "cifar10-train-jpeg.tar.gz"
    test = root / "cifar10-test-jpeg.tar.gz"
    missing = [str(p) for p in (train, test) if not p.exists()]
    if missing:
        pytest.skip(f"CIFAR-10 archives not found ({', '.join(missing)}); set SAFEDL_DATA to "
                    "the folder holding cifar10/cifar10-{train,test}-jpeg.tar.gz")
    return train, test


@pytest.fixture(scope="session")
def cifar_model(cifar_archives) -> tuple[torch.nn.Module, dict]:
    """The trained bench model (eval mode) and its metadata; trained once, then cached."""
    from safedl_ext.data import load_cifar10_jpeg
    from safedl_ext.report import load_torch_safe, save_torch_atomic
    from safedl_ext.training import accuracy, train_classifier

    train_path, test_path = cifar_archives
    folder = cache_dir()
    weights = folder / f"{_model_key()}.pt"
    meta_path = folder / f"{_model_key()}.json"
    model = _build_model()
    if weights.exists() and meta_path.exists():
        model.load_state_dict(load_torch_safe(weights, what="bench model"))
        meta = json.loads(meta_path.read_text())
        meta["cached"] = True
        return model.eval(), meta
    x, y = load_cifar10_jpeg(str(train_path), per_class=TRAIN_PER_CLASS, seed=TRAIN_SEED)
    t0 = time.perf_counter()
    train_classifier(model, x, y, epochs=TRAIN_EPOCHS, batch_size=TRAIN_BATCH, lr=TRAIN_LR,
                     seed=TRAIN_SEED)
    train_s = time.perf_counter() - t0
    xt, yt = load_cifar10_jpeg(str(test_path), per_class=EVAL_PER_CLASS, seed=1)
    meta = {
        "model": "Normalized(SmallCNN(3, 10, width=32))",
        "train_images": int(x.shape[0]),
        "epochs": TRAIN_EPOCHS,
        "batch_size": TRAIN_BATCH,
        "lr": TRAIN_LR,
        "seed": TRAIN_SEED,
        "clean_acc_test1000": accuracy(model, xt, yt),
        "train_seconds": round(train_s, 1),
        "torch": torch.__version__,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(weights, model.state_dict())
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    meta["cached"] = False
    return model.eval(), meta


@pytest.fixture(scope="session")
def cifar_batch(cifar_archives) -> tuple[torch.Tensor, torch.Tensor]:
    """256 CIFAR-10 test images (a seeded mix of all classes), (256, 3, 32, 32) in [0, 1]."""
    from safedl_ext.data import load_cifar10_jpeg

    _, test_path = cifar_archives
    x, y = load_cifar10_jpeg(str(test_path), per_class=BATCH // 10 + 1, seed=2)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:BATCH]
    return x[perm].contiguous(), y[perm].contiguous()
