"""``safedl scan`` end to end on real files: every ``--data`` and ``--model`` form on a
model trained on poisoned MNIST (20% of class 3 relabelled 5 with a white 3 x 3 patch),
the files it refuses, and classes with 0 or 1 samples."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from safedl_ext.cli import main
from safedl_ext.models import Normalized, SmallCNN
from safedl_ext.models.io import ExportedModel, load_model, load_safetensors

TARGET, BASE = 5, 3
SCHEMA_KEYS = {"schema_version", "method", "poisoned", "target_class", "base_class",
               "suspicious_indices", "threshold", "classes", "timings", "versions"}
FIGURES = ("scores.png", "projections.png", "signal.png", "suspicious.png")
ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}


class Payload:
    """A custom class: pickling it into a .pt makes a file weights_only refuses."""

    def __init__(self) -> None:
        self.w = 1


@dataclass(frozen=True)
class Poisoned:
    model: SmallCNN
    x: Tensor  # (N, 1, 28, 28) float in [0, 1], poisoned
    y: Tensor
    truth: Tensor  # indices of the poisoned samples
    root: Path  # model.pt, model.pt2, model.safetensors, uint8.npz


def _export(model: torch.nn.Module, x: Tensor, path: Path) -> Path:
    ep = torch.export.export(model, (x,),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, path)
    return path


def _write_safetensors(state: dict[str, Tensor], path: Path) -> Path:
    """The format: 8-byte little-endian header length, JSON header, raw little-endian bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, t in state.items():
        arr = t.detach().cpu().contiguous().numpy()
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return path


def _write_npz(path: Path, x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> Path:
    np.savez(path, x=np.asarray(x), y=np.asarray(y))
    return path


def _uint8(x: Tensor) -> np.ndarray:
    """(N, 1, H, W) float in [0, 1] -> (N, H, W) uint8, exact for MNIST's pixels."""
    return (x[:, 0] * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, mnist_backdoor) -> Poisoned:
    p, model = mnist_backdoor.poisoned, mnist_backdoor.model  # tests/poison/conftest.py
    assert (p.target, p.base) == (TARGET, BASE)
    root = tmp_path_factory.mktemp("poisoned")
    torch.save(model.state_dict(), root / "model.pt")
    _write_safetensors(model.state_dict(), root / "model.safetensors")
    _export(model, p.x[:4], root / "model.pt2")
    _write_npz(root / "uint8.npz", _uint8(p.x), p.y.numpy())
    return Poisoned(model, p.x, p.y, p.indices, root)


def _scan(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["scan", *args, "--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _pt_args(p: Poisoned) -> list[str]:
    return ["--model", str(p.root / "model.pt"), "--arch", "small-cnn", "--width", "16"]


def _report(out: Path) -> dict[str, Any]:
    """report.json, its schema checked."""
    rep = json.loads((out / "report.json").read_text())
    assert rep.keys() >= SCHEMA_KEYS, SCHEMA_KEYS - rep.keys()
    assert rep["schema_version"] == 1
    s = rep["suspicious_indices"]
    assert all(isinstance(i, int) for i in s) and s == sorted(set(s))
    for c in rep["classes"]:
        assert {"label", "count", "wasserstein", "score"} <= c.keys()
    assert {"safedl_ext", "torch", "python"} <= rep["versions"].keys()
    assert isinstance(rep["timings"], dict) and (out / "report.md").is_file()
    return rep


def _same_findings(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("method", "poisoned", "target_class", "base_class", "suspicious_indices",
                "threshold", "classes", "n", "num_classes", "details"):
        assert a[key] == b[key], key


@pytest.fixture(scope="module")
def reference(poisoned, tmp_path_factory) -> tuple[int, str, dict[str, Any], Path]:
    """The full scan: the .pt state dict on the uint8 .npz."""
    import contextlib

    out = tmp_path_factory.mktemp("reference")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["scan", *_pt_args(poisoned), "--data", str(poisoned.root / "uint8.npz"),
                   "--out", str(out), "--threshold", "1.5", "--no-progress"])
    return rc, buf.getvalue(), json.loads((out / "report.json").read_text()), out


# ------------------------------------------------------------------ --data forms


def test_npz_uint8_full_scan_finds_target_base_and_poison(poisoned, reference):
    rc, stdout, _, out = reference
    assert rc == 0
    assert stdout.strip().startswith(f"backdoor found: target class {TARGET}, base class {BASE}")
    rep = _report(out)
    assert rep["method"] == "gradient" and rep["poisoned"] is True
    assert (rep["target_class"], rep["base_class"]) == (TARGET, BASE)
    assert rep["threshold"] == 1.5 and rep["n"] == len(poisoned.y) == 8000
    counts = torch.bincount(poisoned.y, minlength=10).tolist()
    assert [c["count"] for c in rep["classes"]] == counts
    assert [c["label"] for c in rep["classes"]] == list(range(10))
    scores = [c["score"] for c in rep["classes"]]
    assert max(scores) == scores[TARGET] > 1.5
    for name in FIGURES:
        assert (out / name).stat().st_size > 1000, name
    # the suspicious samples are the poisoned ones, all within class 5
    sus, truth = set(rep["suspicious_indices"]), set(poisoned.truth.tolist())
    assert all(int(poisoned.y[i]) == TARGET for i in sus)
    assert len(sus & truth) / len(truth) > 0.9
    assert len(sus - truth) / int((poisoned.y == TARGET).sum() - len(truth)) < 0.05
    assert rep["model"]["arch"] == "small-cnn"
    assert not list((out / ".scan").glob("*.rows"))  # the row store is deleted


def test_npz_float32_nchw_and_gzip_idx_read_the_same_pixels(poisoned, tmp_path, capsys):
    """float32 (N, 1, H, W) in [0, 1], and MNIST IDX (gzip images + labels, written byte by
    byte): read back as exactly the poisoned pixels, and scanned (a 2000-sample subset: the
    point is the format) with the same findings."""
    from safedl_ext.poison.data import load_scan_data

    n = 2000
    x, y = poisoned.x[:n], poisoned.y[:n]
    f32 = _write_npz(tmp_path / "f32.npz", x.numpy().astype(np.float32), y.numpy())
    idx = tmp_path / "idx"
    idx.mkdir()
    with gzip.open(idx / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">IIII", 2051, n, 28, 28) + _uint8(x).tobytes())
    with gzip.open(idx / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">II", 2049, n) + y.to(torch.uint8).numpy().tobytes())
    images = idx / "train-images-idx3-ubyte.gz"
    for path in (f32, images, poisoned.root / "uint8.npz"):
        data = load_scan_data(path)
        assert data.shape == (1, 28, 28)
        assert torch.equal(data.images(slice(0, n)), x) and torch.equal(data.y[:n], y)
    reports = []
    for path, name in ((f32, "f32"), (images, "idx-out")):
        rc, _, err = _scan([*_pt_args(poisoned), "--data", str(path), "--out",
                            str(tmp_path / name), "--threshold", "1.5"], capsys)
        assert rc == 0, err
        reports.append(_report(tmp_path / name))
    assert reports[0]["n"] == n
    _same_findings(*reports)
    assert reports[0]["data"]["source"] == str(f32)


def test_idx_plain_files_subset(poisoned, tmp_path, capsys):
    """Uncompressed IDX files (a subset: the point is the format)."""
    n = 300
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, n, 28, 28) + _uint8(poisoned.x[:n]).tobytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, n) + poisoned.y[:n].to(torch.uint8).numpy().tobytes())
    rc, _, err = _scan([*_pt_args(poisoned), "--data", str(tmp_path / "t10k-images-idx3-ubyte"),
                        "--out", str(tmp_path / "out"), "--threshold", "1.5"], capsys)
    assert rc == 0, err
    rep = _report(tmp_path / "out")
    assert rep["n"] == n
    assert [c["count"] for c in rep["classes"]] == torch.bincount(
        poisoned.y[:n], minlength=10).tolist()


def test_image_folder_of_grey_pngs(poisoned, tmp_path, capsys):
    """``<class>/<i>.png``, 30 grey PNGs per class (a subset: the point is the format)."""
    from PIL import Image

    folder = tmp_path / "pngs"
    pixels = _uint8(poisoned.x)
    for c in range(10):
        (folder / str(c)).mkdir(parents=True)
        for i in torch.nonzero(poisoned.y == c).flatten()[:30].tolist():
            Image.fromarray(pixels[i], mode="L").save(folder / str(c) / f"{i}.png")
    rc, _, err = _scan([*_pt_args(poisoned), "--data", str(folder), "--out",
                        str(tmp_path / "out"), "--threshold", "1.5"], capsys)
    assert rc == 0, err
    rep = _report(tmp_path / "out")
    assert rep["n"] == 300 and [c["count"] for c in rep["classes"]] == [30] * 10
    assert rep["data"]["shape"] == [1, 28, 28]


# ------------------------------------------------------------------ --model forms


def test_safetensors_same_weights_same_report(poisoned, reference, tmp_path, capsys):
    st = poisoned.root / "model.safetensors"
    loaded = load_safetensors(st)
    state = poisoned.model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    rc, _, err = _scan(["--model", str(st), "--arch", "small-cnn", "--width", "16",
                        "--data", str(poisoned.root / "uint8.npz"), "--out", str(tmp_path),
                        "--threshold", "1.5"], capsys)
    assert rc == 0, err
    _same_findings(_report(tmp_path), reference[2])


def test_pt2_export_finds_the_same_target_and_base(poisoned, reference, tmp_path, capsys):
    model = load_model(poisoned.root / "model.pt2")
    assert isinstance(model, ExportedModel)
    with torch.no_grad():
        assert torch.allclose(model(poisoned.x[:64]), poisoned.model(poisoned.x[:64]),
                              atol=1e-5)
    rc, stdout, err = _scan(["--model", str(poisoned.root / "model.pt2"), "--data",
                             str(poisoned.root / "uint8.npz"), "--out", str(tmp_path),
                             "--threshold", "1.5"], capsys)
    assert rc == 0, err
    assert f"target class {TARGET}, base class {BASE}" in stdout
    rep = _report(tmp_path)
    assert (rep["target_class"], rep["base_class"]) == (TARGET, BASE)
    ref = set(reference[2]["suspicious_indices"])
    got = set(rep["suspicious_indices"])
    assert len(got & ref) / len(got | ref) > 0.95
    for a, b in zip(rep["classes"], reference[2]["classes"], strict=True):
        assert a["score"] == pytest.approx(b["score"], rel=1e-4)
    for name in FIGURES:
        assert (tmp_path / name).is_file(), name


def test_run_folder_is_built_as_safedl_train_writes_it(poisoned, tmp_path, capsys):
    """model.json + model.pt of ``safedl train``: the zoo architecture wrapped in the data
    set's normalization, no --arch needed."""
    mean, std = [0.1307], [0.3081]
    run = tmp_path / "run"
    run.mkdir()
    wrapped = Normalized(poisoned.model, mean, std).eval()
    torch.save(wrapped.state_dict(), run / "model.pt")
    (run / "model.json").write_text(json.dumps({
        "arch": "small-cnn", "in_channels": 1, "num_classes": 10, "mean": mean, "std": std,
        "dataset": "mnist", "classes": [str(i) for i in range(10)]}))
    model = load_model(run, width=16)
    assert isinstance(model, Normalized) and isinstance(model.model, SmallCNN)
    assert not model.training
    assert model.mean.flatten().tolist() == pytest.approx(mean)
    assert model.std.flatten().tolist() == pytest.approx(std)
    with torch.no_grad():
        assert torch.equal(model(poisoned.x[:64]), wrapped(poisoned.x[:64]))
    data = _write_npz(tmp_path / "sub.npz", _uint8(poisoned.x[:400]), poisoned.y[:400])
    rc, _, err = _scan(["--model", str(run), "--width", "16", "--data", str(data), "--out",
                        str(tmp_path / "out"), "--threshold", "1.5"], capsys)
    assert rc == 0, err
    rep = _report(tmp_path / "out")
    assert rep["n"] == 400 and rep["model"]["path"] == str(run)


def test_pt2_penultimate_features_are_the_modules(poisoned):
    """AC / SS read the input of the last linear layer: the nn.Module's (a hook) and the
    exported graph's (its last linear call, added to the graph's outputs) agree."""
    from safedl_ext.poison.baselines import penultimate

    exported = load_model(poisoned.root / "model.pt2")
    x = poisoned.x[:256]
    with torch.no_grad():
        lm, fm = penultimate(poisoned.model)(x)
        lg, fg = penultimate(exported)(x)
        assert torch.allclose(exported(x), lm, atol=1e-5)  # the graph itself is untouched
    assert fm.shape == fg.shape == (256, 128)
    assert torch.allclose(lm, lg, atol=1e-5) and torch.allclose(fm, fg, atol=1e-5)


@pytest.mark.parametrize("method", ["ac", "ss"])
def test_baselines_same_results_for_pt_and_pt2(poisoned, tmp_path, capsys, method):
    """``--method ac|ss`` on the .pt (module hook) and the .pt2 (exported graph): the same
    suspicious sets and per-class results."""
    data = ["--data", str(poisoned.root / "uint8.npz"), "--method", method]
    rc, _, err = _scan([*_pt_args(poisoned), *data, "--out", str(tmp_path / "pt")], capsys)
    assert rc == 0, err
    rc, _, err = _scan(["--model", str(poisoned.root / "model.pt2"), *data, "--out",
                        str(tmp_path / "pt2")], capsys)
    assert rc == 0, err
    a, b = _report(tmp_path / "pt"), _report(tmp_path / "pt2")
    assert a["method"] == b["method"] == method
    assert a["suspicious_indices"] == b["suspicious_indices"]
    assert [(c["count"], c["smaller"]) for c in a["classes"]] == \
        [(c["count"], c["smaller"]) for c in b["classes"]]
    for ca, cb in zip(a["classes"], b["classes"], strict=True):
        assert ca["score"] == pytest.approx(cb["score"], rel=1e-4)
    assert a["n"] == 8000 and (tmp_path / "pt" / "scores.png").is_file()
    counts = torch.bincount(poisoned.y, minlength=10).tolist()
    assert [c["count"] for c in a["classes"]] == counts
    if method == "ac":
        # each class splits in two large clusters (~40-48%): under ART's 0.35, none flagged
        assert all(0.35 <= c["score"] < 0.5 for c in a["classes"])
        assert a["poisoned"] is False and a["suspicious_indices"] == []
    else:  # SS flags 15% of every class; in class 5 the poison is over-represented
        sus, truth = set(a["suspicious_indices"]), set(poisoned.truth.tolist())
        flagged = [sum(int(poisoned.y[i]) == c for i in sus) for c in range(10)]
        assert flagged == [int(0.15 * n) for n in counts]
        flagged5 = {i for i in sus if int(poisoned.y[i]) == TARGET}
        share = len(truth) / counts[TARGET]  # ~18% of class 5 is poison
        assert len(flagged5 & truth) / len(flagged5) > 1.5 * share


# ------------------------------------------------------------------ refusals


def _refused(args: list[str], out: Path, capsys, *needles: str) -> str:
    rc, _, err = _scan([*args, "--out", str(out)], capsys)
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (out / "report.json").exists()
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not written, written  # nothing half-written (at most an empty out/.scan)
    return lines[0]


def _rewrite_zip(src: Path, dst: Path, edit: Any) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))


def test_refuses_pickled_models(poisoned, tmp_path, capsys):
    data = ["--data", str(poisoned.root / "uint8.npz")]
    edited = []

    def use_pickle(name: str, raw: bytes) -> bytes:
        if not name.endswith("_weights_config.json"):
            return raw
        cfg = json.loads(raw)
        first = next(iter(cfg["config"]))
        cfg["config"][first]["use_pickle"] = True
        edited.append(first)
        return json.dumps(cfg).encode()

    bad = tmp_path / "pickled.pt2"
    _rewrite_zip(poisoned.root / "model.pt2", bad, use_pickle)
    assert edited
    _refused(["--model", str(bad), *data], tmp_path / "o1", capsys, "safedl: error:",
             "pickled object", edited[0])

    obj = tmp_path / "custom.pt"
    torch.save({"w": Payload()}, obj)
    _refused(["--model", str(obj), "--arch", "small-cnn", *data], tmp_path / "o2", capsys,
             "safedl: error:", str(obj), f"{__name__}.Payload", "refused")

    nan = dict(poisoned.model.state_dict())
    name = next(k for k in nan if k.endswith("weight"))
    nan[name] = nan[name].clone()
    nan[name].view(-1)[0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    sub = _write_npz(tmp_path / "sub.npz", _uint8(poisoned.x[:200]), poisoned.y[:200])
    _refused(["--model", str(tmp_path / "nan.pt"), "--arch", "small-cnn", "--width", "16",
              "--data", str(sub)], tmp_path / "o3", capsys, "safedl: error:", "NaN logits",
             "indices 0, 1, 2")

    _refused(["--model", str(poisoned.root / "model.pt"), *data], tmp_path / "o4", capsys,
             "safedl: error:", "--arch")
    _refused([*_pt_args(poisoned), *data, "--method", "strip"], tmp_path / "o5", capsys,
             "--method", "strip")


def test_refuses_malformed_safetensors(poisoned, tmp_path, capsys):
    data = ["--data", str(poisoned.root / "uint8.npz"), "--arch", "small-cnn", "--width", "16"]
    raw = (poisoned.root / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    past = tmp_path / "past.safetensors"
    past.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    _refused(["--model", str(past), *data], tmp_path / "o1", capsys, str(past),
             "header length")

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:len(raw) - 100])  # the last tensor's bytes run past the end
    _refused(["--model", str(cut), *data], tmp_path / "o2", capsys, str(cut), "byte range")

    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    b, e = header[name]["data_offsets"]
    header[name]["shape"] = [*header[name]["shape"][:-1], header[name]["shape"][-1] + 1]
    head = json.dumps(header).encode()
    shape = tmp_path / "shape.safetensors"
    shape.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])
    _refused(["--model", str(shape), *data], tmp_path / "o3", capsys, repr(name),
             f"byte range [{b}, {e})")


def test_refuses_bad_data_files(poisoned, tmp_path, capsys):
    pt2 = ["--model", str(poisoned.root / "model.pt2")]
    x, y = _uint8(poisoned.x[:200]), poisoned.y[:200].numpy()
    full = _write_npz(tmp_path / "good.npz", x, y)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(full.read_bytes()[:full.stat().st_size // 2])
    _refused([*pt2, "--data", str(cut)], tmp_path / "o1", capsys, "safedl: error:", str(cut))

    no_y = tmp_path / "no_y.npz"
    np.savez(no_y, x=x, labels=y)
    _refused([*pt2, "--data", str(no_y)], tmp_path / "o2", capsys, "lacks y")

    y12 = y.copy()
    y12[17] = 12
    far = _write_npz(tmp_path / "y12.npz", x, y12)
    _refused([*pt2, "--data", str(far)], tmp_path / "o3", capsys,
             "labels out of range: sample 17 has label 12", "10 outputs")
    _refused([*_pt_args(poisoned), "--num-classes", "10", "--data", str(far)], tmp_path / "o4",
             capsys, "labels out of range: sample 17 has label 12")
    # without --num-classes a state dict is built with its head's outputs (10)
    _refused([*_pt_args(poisoned), "--data", str(far)], tmp_path / "o4b", capsys,
             "labels out of range: sample 17 has label 12", "10 outputs")
    _refused([*_pt_args(poisoned), "--num-classes", "13", "--data", str(far)],
             tmp_path / "o4c", capsys, "does not fit --arch small-cnn", "num_classes 13")

    empty = _write_npz(tmp_path / "empty.npz", np.zeros((0, 28, 28), np.uint8),
                       np.zeros(0, np.int64))
    _refused([*pt2, "--data", str(empty)], tmp_path / "o5", capsys, "no samples")

    rgb = _write_npz(tmp_path / "rgb.npz", np.repeat(x[..., None], 3, axis=3), y)
    _refused([*pt2, "--data", str(rgb)], tmp_path / "o6", capsys, "rejects",
             "(3, 28, 28)")
    _refused([*_pt_args(poisoned), "--data", str(rgb)], tmp_path / "o7", capsys,
             "does not fit --arch small-cnn", "in_channels 3")

    csv = tmp_path / "data.csv"
    csv.write_text("0,1\n")
    _refused([*pt2, "--data", str(csv)], tmp_path / "o8", capsys, "unknown format")


def test_refuses_cifar_archive_with_an_unsafe_member_path(poisoned, tmp_path, capsys):
    from PIL import Image

    from safedl_ext.poison.data import load_scan_data

    def jpeg(seed: int) -> bytes:
        buf = io.BytesIO()
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    def archive(path: Path, names: tuple[str, ...]) -> Path:
        with tarfile.open(path, "w:gz") as tar:
            for seed, name in enumerate(names):
                data = jpeg(seed)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    good = archive(tmp_path / "good.tar.gz", ("train/cat/0000.jpg",))
    data = load_scan_data(good)  # the same archive without the bad member reads
    assert data.shape == (3, 32, 32) and data.y.tolist() == [3] and data.classes[3] == "cat"
    bad = archive(tmp_path / "cifar10-train-jpeg.tar.gz",
                  ("train/cat/0000.jpg", "../evil/cat/0.jpg"))
    _refused(["--model", str(poisoned.root / "model.pt2"), "--data", str(bad)],
             tmp_path / "out", capsys, "safedl: error:", str(bad),
             "member '../evil/cat/0.jpg'", "unsafe path")


# ------------------------------------------------------------------ tiny classes


def test_classes_with_one_and_zero_samples(poisoned, tmp_path, capsys):
    """Class 7 has 1 sample, class 8 none: both reported as degenerate, the rest scored."""
    keep = []
    for c in range(10):
        idx = torch.nonzero(poisoned.y == c).flatten()
        keep.append(idx[:1] if c == 7 else idx[:0] if c == 8 else idx[:150])
    sel = torch.cat(keep)
    data = _write_npz(tmp_path / "tiny.npz", _uint8(poisoned.x[sel]), poisoned.y[sel])
    rc, _, err = _scan([*_pt_args(poisoned), "--data", str(data), "--out",
                        str(tmp_path / "out"), "--threshold", "1.5"], capsys)
    assert rc == 0, err
    rep = _report(tmp_path / "out")
    classes = {c["label"]: c for c in rep["classes"]}
    assert rep["num_classes"] == 10 and len(classes) == 10
    assert classes[7]["count"] == 1 and classes[7]["score"] is None
    assert classes[8]["count"] == 0 and classes[8]["score"] is None
    assert classes[7]["degenerate"] and classes[8]["degenerate"]
    for c in set(range(10)) - {7, 8}:
        assert classes[c]["count"] == 150 and classes[c]["score"] is not None
    assert "degenerate" in (tmp_path / "out" / "report.md").read_text()
    for method in ("ac", "ss"):
        rc, _, err = _scan([*_pt_args(poisoned), "--data", str(data), "--method", method,
                            "--out", str(tmp_path / method)], capsys)
        assert rc == 0, err
        rep = _report(tmp_path / method)
        assert [c["count"] for c in rep["classes"]][7:9] == [1, 0]
        assert rep["classes"][7]["score"] is None and rep["classes"][8]["score"] is None
