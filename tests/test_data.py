"""Loaders (MNIST IDX, CIFAR-10 JPEG with its cache, by name), the data root, augmentation
and the seeded mini-batch loader."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import safedl_ext.data.cifar10 as cifar10_module
from safedl_ext.data import (
    CIFAR10_CLASSES,
    DATASET_STATS,
    TensorLoader,
    batches,
    default_cache_dir,
    default_data_root,
    load_cifar10,
    load_cifar10_jpeg,
    load_dataset,
    load_digits,
    load_mnist_idx,
    random_crop_flip,
    read_idx,
)

# Class sizes of MNIST's 10,000-image t10k split (LeCun et al.).
MNIST_T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def data_root() -> Path:
    try:
        return default_data_root()
    except FileNotFoundError as err:
        pytest.skip(f"shared data folder absent: {err}")


@pytest.fixture(scope="module")
def mnist_dir(data_root) -> Path:
    folder = data_root / "mnist"
    if not (folder / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{folder} holds no t10k-images-idx3-ubyte.gz")
    return folder


@pytest.fixture(scope="module")
def cifar_dir(data_root) -> Path:
    folder = data_root / "cifar10"
    if not (folder / "cifar10-train-jpeg.tar.gz").is_file():
        pytest.skip(f"{folder} holds no CIFAR-10 archives")
    return folder


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


# ---------------------------------------------------------------- data root


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEDL_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.setenv("SAFEDL_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="SAFEDL_DATA"):
        default_data_root()
    monkeypatch.delenv("SAFEDL_DATA")
    shared = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
    if shared.is_dir():
        assert default_data_root() == shared
    else:
        with pytest.raises(FileNotFoundError, match="set SAFEDL_DATA"):
            default_data_root()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEDL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("SAFEDL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "safedl_ext" / "data"


# ---------------------------------------------------------------- MNIST


def test_mnist_t10k_stratified_split(mnist_dir):
    d = load_mnist_idx(mnist_dir, test_fraction=0.2, seed=0)
    assert d.x_train.shape == (8000, 1, 28, 28) and d.x_test.shape == (2000, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0
    counts = torch.bincount(torch.cat([d.y_train, d.y_test]), minlength=10)
    assert counts.tolist() == MNIST_T10K_COUNTS
    # Stratified: each class's test share is 20% of the class, to within one image.
    expected = torch.tensor(MNIST_T10K_COUNTS) * 0.2
    assert float((torch.bincount(d.y_test, minlength=10) - expected).abs().max()) <= 1.0
    # Real digits: ink covers roughly a fifth of the pixels; mean near MNIST's 0.13.
    assert 0.11 < float(d.x_test.mean()) < 0.15
    assert d.classes == tuple("0123456789")
    again = load_mnist_idx(mnist_dir, test_fraction=0.2, seed=0)
    assert torch.equal(again.x_test, d.x_test) and torch.equal(again.y_train, d.y_train)
    other = load_mnist_idx(mnist_dir, test_fraction=0.2, seed=1)
    assert not torch.equal(other.y_test, d.y_test)


def test_mnist_limit_and_load_dataset(data_root, mnist_dir):
    d = load_dataset("mnist", data_root, limit=500, test_fraction=0.2, seed=3)
    assert d.x_train.shape[0] == 400 and d.x_test.shape[0] == 100
    assert int(torch.bincount(d.y_train, minlength=10).min()) >= 30
    same = load_mnist_idx(mnist_dir, limit=500, test_fraction=0.2, seed=3)
    assert torch.equal(same.x_train, d.x_train)
    with pytest.raises(ValueError, match=r"limit must be >= 10 \(one image per class\), got 5"):
        load_mnist_idx(mnist_dir, limit=5)
    with pytest.raises(ValueError, match="splits 20 images into 16 train and 4 test, fewer than"):
        load_mnist_idx(mnist_dir, limit=20, test_fraction=0.2)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_mnist_idx(mnist_dir, test_fraction=0.0)


def test_mnist_corrupt_files_are_named(mnist_dir, tmp_path):
    images = mnist_dir / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    # A download cut short: the gzip stream ends early.
    cut = tmp_path / "cut" / "t10k-images-idx3-ubyte.gz"
    cut.parent.mkdir()
    cut.write_bytes(images.read_bytes()[:200_000])
    with pytest.raises(ValueError, match=f"{cut}: corrupt or truncated IDX file"):
        read_idx(cut)
    # A complete gzip stream of a truncated IDX file.
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(raw[:-784], compresslevel=1))
    with pytest.raises(ValueError, match=r"truncated IDX file: the header gives dimensions "
                                         r"\(10000, 28, 28\) \(7840000 bytes"):
        read_idx(short)
    # Labels where images are expected.
    with pytest.raises(ValueError, match="magic number must be 2051, got 2049"):
        read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz", magic=2051)
    # The loader names the bad file as well.
    (cut.parent / "t10k-labels-idx1-ubyte.gz").write_bytes(
        (mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz"):
        load_mnist_idx(cut.parent)


def test_mnist_plain_idx_equals_gzipped(mnist_dir, tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((mnist_dir / f"{name}.gz").read_bytes()))
    plain = load_mnist_idx(tmp_path, limit=300, seed=0)
    gz = load_mnist_idx(mnist_dir, limit=300, seed=0)
    assert torch.equal(plain.x_train, gz.x_train) and torch.equal(plain.y_test, gz.y_test)


def test_mnist_train_and_t10k_files_are_the_two_splits(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                   rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    d = load_mnist_idx(tmp_path)
    assert d.x_train.shape == (60, 1, 28, 28) and d.x_test.shape == (20, 1, 28, 28)
    assert d.y_test.tolist() == [i % 10 for i in range(20)]  # file order kept
    t10k = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz", magic=2051)
    assert torch.equal(d.x_test[:, 0], torch.from_numpy(t10k.copy()).float() / 255)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="no matching train-labels"):
        load_mnist_idx(tmp_path)


def test_mnist_missing_folder_and_label_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no MNIST IDX files .*SAFEDL_DATA"):
        load_mnist_idx(tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((20, 28, 28), np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    with pytest.raises(ValueError, match=r"holds 20 images but .* holds 19 labels"):
        load_mnist_idx(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(20, 12, np.uint8))
    with pytest.raises(ValueError, match=r"labels must be digits 0..9, got 12"):
        load_mnist_idx(tmp_path)


# ---------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope="module")
def cifar_cache(cifar_dir, tmp_path_factory):
    """A small subset loaded once through an empty cache (which it fills)."""
    cache = tmp_path_factory.mktemp("cifar-cache")
    split = load_cifar10(cifar_dir, train_per_class=20, test_per_class=10, seed=3,
                         cache_dir=cache)
    return cache, split


def test_cifar10_subset_shapes_and_balance(cifar_dir, cifar_cache):
    _, d = cifar_cache
    assert d.x_train.shape == (200, 3, 32, 32) and d.x_test.shape == (100, 3, 32, 32)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert torch.equal(torch.bincount(d.y_train, minlength=10), torch.full((10,), 20))
    assert torch.equal(torch.bincount(d.y_test, minlength=10), torch.full((10,), 10))
    assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
    assert d.classes == CIFAR10_CLASSES
    # The same images as the one-archive loader with the same subset and seed.
    x, y = load_cifar10_jpeg(cifar_dir / "cifar10-test-jpeg.tar.gz", per_class=10, seed=3)
    assert torch.equal(x, d.x_test) and torch.equal(y, d.y_test)
    # Channel means of real photographs, near the training-set statistics.
    mean = d.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(DATASET_STATS["cifar10"][0]), atol=0.05)


def test_cifar10_second_load_reads_the_cache(cifar_dir, cifar_cache, monkeypatch):
    cache, first = cifar_cache
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 2 and all(e.endswith(".npz") for e in entries), entries

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded the archive although the cache holds it")

    monkeypatch.setattr(cifar10_module, "_decode_cifar10_archive", no_decoding)
    second = load_cifar10(cifar_dir, train_per_class=20, test_per_class=10, seed=3,
                          cache_dir=cache)
    for a, b in ((first.x_train, second.x_train), (first.y_train, second.y_train),
                 (first.x_test, second.x_test), (first.y_test, second.y_test)):
        assert torch.equal(a, b)
    with pytest.raises(AssertionError, match="decoded the archive"):
        load_cifar10(cifar_dir, train_per_class=20, test_per_class=10, seed=4, cache_dir=cache)


def test_cifar10_unreadable_cache_entry_is_rebuilt(cifar_dir, cifar_cache):
    cache, first = cifar_cache
    test_entry = next(p for p in cache.iterdir() if p.name.startswith("cifar10-test"))
    test_entry.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="ignoring unreadable CIFAR-10 cache entry"):
        again = load_cifar10(cifar_dir, train_per_class=20, test_per_class=10, seed=3,
                             cache_dir=cache)
    assert torch.equal(again.x_test, first.x_test)
    with np.load(test_entry) as z:  # replaced by a good entry
        assert z["x"].shape == (100, 3, 32, 32) and z["x"].dtype == np.uint8
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]  # no temporary left


def test_cifar10_cache_off_and_errors(cifar_dir, tmp_path, monkeypatch):
    def tiny(archive, per_class, seed):
        return np.zeros((1, 3, 32, 32), np.uint8), np.zeros(1, np.int64)

    monkeypatch.setattr(cifar10_module, "_decode_cifar10_archive", tiny)
    monkeypatch.setenv("SAFEDL_CACHE", str(tmp_path / "cache"))
    assert load_cifar10(cifar_dir, cache=False).x_train.shape == (1, 3, 32, 32)
    assert not (tmp_path / "cache").exists()
    load_cifar10(cifar_dir)  # the default cache folder comes from SAFEDL_CACHE
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    with pytest.raises(ValueError, match="train_per_class must be >= 1, got 0"):
        load_cifar10(cifar_dir, train_per_class=0)
    with pytest.raises(FileNotFoundError, match=r"cifar10-train-jpeg.tar.gz"):
        load_cifar10(tmp_path)


def test_load_dataset_by_name():
    d = load_dataset("digits", test_fraction=0.25, seed=0)
    assert torch.equal(d.x_test, load_digits(0.25, 0).x_test)
    with pytest.raises(ValueError, match="name must be one of digits, mnist, cifar10, got 'svhn'"):
        load_dataset("svhn")


def test_dataset_stats_digits_are_measured():
    d = load_digits()
    x = torch.cat([d.x_train, d.x_test])
    mean, std = DATASET_STATS["digits"]
    assert abs(float(x.mean()) - mean[0]) < 1e-3 and abs(float(x.std()) - std[0]) < 1e-3
    assert {k: len(v[0]) for k, v in DATASET_STATS.items()} == {
        "digits": 1, "mnist": 1, "cifar10": 3}


# ---------------------------------------------------------------- augmentation


def _images(n: int = 16, c: int = 3, h: int = 8, w: int = 10) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(0))


def test_crop_flip_is_seeded_and_keeps_shape():
    x = _images()
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(1))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(1))
    c = random_crop_flip(x, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, _images())  # input untouched


def test_padding_zero_without_flip_is_identity():
    x = _images()
    out = random_crop_flip(x, padding=0, flip=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_flip_only_mirrors_about_half():
    x = _images(n=64)
    out = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 16 <= int(mirrored.sum()) <= 48  # Binomial(64, 1/2)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_crop_is_a_window_of_the_padded_image(mode):
    x, p = _images(n=12), 3
    out = random_crop_flip(x, padding=p, flip=True, padding_mode=mode,
                           generator=torch.Generator().manual_seed(5))
    padded = F.pad(x, (p, p, p, p), mode="constant" if mode == "zeros" else "reflect")
    h, w = x.shape[2:]
    offsets = set()
    for i in range(x.shape[0]):
        windows = {(dy, dx): padded[i, :, dy:dy + h, dx:dx + w]
                   for dy in range(2 * p + 1) for dx in range(2 * p + 1)}
        hits = [at for at, win in windows.items()
                if torch.equal(out[i], win) or torch.equal(out[i], win.flip(-1))]
        assert hits, f"sample {i} is no window of its padded image"
        offsets.add(hits[0])
    assert len(offsets) > 3  # the shifts vary from sample to sample


def test_crop_flip_errors_and_gradient():
    x = _images().requires_grad_(True)
    random_crop_flip(x, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and float(x.grad.sum()) > 0
    with pytest.raises(ValueError, match="padding must be >= 0, got -1"):
        random_crop_flip(x, padding=-1)
    with pytest.raises(ValueError, match="padding_mode must be 'zeros' or 'reflect'"):
        random_crop_flip(x, padding_mode="edge")
    with pytest.raises(ValueError, match="padding must be < the image size 8x10"):
        random_crop_flip(x, padding=8, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"x must be \(N, C, H, W\), got shape \(3, 8, 10\)"):
        random_crop_flip(x[0])


# ---------------------------------------------------------------- mini-batches


def test_batches_cover_every_sample_once():
    x, y = torch.arange(10).float().view(10, 1), torch.arange(10)
    out = list(batches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in out] == [4, 4, 2]
    seen = torch.cat([b[1] for b in out])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in out)  # pairs stay together
    kept = list(batches(x, y, 4, shuffle=False, drop_last=True))
    assert [b[1].tolist() for b in kept] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        batches(x, y, 0)  # raised at the call, not at the first batch
    with pytest.raises(ValueError, match="same length, got 10 and 9"):
        batches(x, y[:9], 2)


def test_tensor_loader_is_reproducible_and_resumable():
    x, y = torch.rand(50, 1, 4, 4), torch.arange(50)

    def epoch(loader):
        return [yb.tolist() for _, yb in loader]

    a = TensorLoader(x, y, 16, seed=7)
    assert len(a) == 4 and len(TensorLoader(x, y, 16, drop_last=True)) == 3
    e0, e1 = epoch(a), epoch(a)
    assert e0 != e1 and a.epoch == 2  # a new order every epoch
    b = TensorLoader(x, y, 16, seed=7)
    assert epoch(b) == e0
    c = TensorLoader(x, y, 16, seed=7)
    c.set_epoch(1)  # resuming at epoch 1
    assert epoch(c) == e1
    assert epoch(TensorLoader(x, y, 16, seed=8)) != e0
    assert epoch(TensorLoader(x, y, 16, shuffle=False))[0] == list(range(16))


def test_tensor_loader_augments_with_its_generator():
    x, y = torch.rand(20, 3, 8, 8), torch.arange(20)

    def aug(xb, g):
        return random_crop_flip(xb, padding=2, generator=g)

    first = [xb for xb, _ in TensorLoader(x, y, 8, seed=1, transform=aug)]
    second = [xb for xb, _ in TensorLoader(x, y, 8, seed=1, transform=aug)]
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))
    plain = [xb for xb, _ in TensorLoader(x, y, 8, seed=1)]
    assert not all(torch.equal(p, q) for p, q in zip(first, plain, strict=True))
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
        TensorLoader(x, y, 8).set_epoch(-1)
