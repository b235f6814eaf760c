"""Loaders on the real data sets, and the report helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from safedl_ext.data import CIFAR10_CLASSES, load_cifar10_jpeg, load_digits
from safedl_ext.report import markdown_table, write_json_atomic

DATA = Path(os.environ.get("SAFEDL_DATA", Path(__file__).parents[1] / ".." / "shared" / "data"))
CIFAR_TEST = DATA / "cifar10" / "cifar10-test-jpeg.tar.gz"


def test_digits_split_is_stratified_and_scaled():
    d = load_digits(test_fraction=0.25, seed=0)
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_test.dtype == torch.float32
    assert len(d.y_train) + len(d.y_test) == 1797
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0
    counts = torch.bincount(d.y_test, minlength=10)
    assert int(counts.min()) >= 43 and int(counts.max()) <= 46  # class sizes 174..183
    again = load_digits(test_fraction=0.25, seed=0)
    assert torch.equal(d.x_test, again.x_test)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)


@pytest.mark.skipif(not CIFAR_TEST.exists(), reason=f"{CIFAR_TEST} not present")
def test_cifar10_jpeg_subset():
    x, y = load_cifar10_jpeg(str(CIFAR_TEST), per_class=20, seed=3)
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 20))
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # Real photographs: per-image contrast, and the seeded choice is reproducible.
    assert float(x.flatten(1).std(dim=1).min()) > 0.01
    x2, y2 = load_cifar10_jpeg(str(CIFAR_TEST), per_class=20, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert len(CIFAR10_CLASSES) == 10


def test_cifar10_missing_archive_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 archive not found"):
        load_cifar10_jpeg(str(tmp_path / "nope.tar.gz"))


def test_atomic_json_and_markdown(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic(path, {"a": 1.5})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left behind
    md = markdown_table(["", "Clean"], [["m", 98.2222]])
    assert md.splitlines() == ["|  | Clean |", "|---|---|", "| m | 98.22 |"]


def test_tensor_digest_sums_in_chunks_without_a_wide_copy(monkeypatch):
    """The sums run in chunks (no int64 copy of uint8 images, no float64 copy of float32
    data) and give the digest of one sum over the whole tensor."""
    import hashlib

    import safedl_ext.report as report

    def one_sum(t: torch.Tensor) -> str:
        h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.reshape(-1)
        step = max(1, flat.numel() // 65536)
        wide = torch.float64 if flat.is_floating_point() else torch.int64
        h.update(flat[::step].to(wide).contiguous().numpy().tobytes())
        if flat.is_floating_point():
            total = flat.sum(dtype=torch.float64)
            absolute = torch.linalg.vector_norm(flat, 1, dtype=torch.float64)
        else:
            total, absolute = flat.sum(dtype=torch.int64), flat.abs().sum(dtype=torch.int64)
        h.update(f"{float(total):.10g}|{float(absolute):.10g}".encode())
        return h.hexdigest()[:16]

    monkeypatch.setattr(report, "_DIGEST_CHUNK", 1000)
    g = torch.Generator().manual_seed(0)
    for t in (torch.randint(0, 256, (7, 3, 17, 19), dtype=torch.uint8, generator=g),
              torch.randint(-128, 128, (12345,), dtype=torch.int8, generator=g),
              torch.rand(5, 3, 31, 29, generator=g), torch.arange(999)):
        assert report.tensor_digest(t) == one_sum(t)
