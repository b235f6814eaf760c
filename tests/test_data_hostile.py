"""Hostile data files: image bombs, truncated, corrupt and wrong-size members, links, gzip
bombs. Every one is built here, in tmp_path, and must fail fast with a ValueError that
names the file (and, in an archive, the member) without taking memory."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from safedl_ext.data import (
    ImageFolder,
    load_cifar10,
    load_cifar10_jpeg,
    load_image_folder,
    read_idx,
)
from safedl_ext.data.images import decode_image, read_tar_member

REPO = Path(__file__).resolve().parents[1]


def _image_bytes(w: int = 32, h: int = 32, mode: str = "RGB", fmt: str = "JPEG",
                 seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode in ("L", "1") else (h, w, len(mode))
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _jpeg_declaring(w: int, h: int) -> bytes:
    """A 32 x 32 JPEG whose SOF0 header is patched to declare w x h pixels."""
    data = bytearray(_image_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _png_declaring(w: int, h: int) -> bytes:
    """A 4 x 4 PNG whose IHDR is patched (CRC recomputed) to declare w x h pixels."""
    data = bytearray(_image_bytes(4, 4, fmt="PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _tar_gz(path: Path, members: list[tuple[str, bytes] | tarfile.TarInfo]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def _good(i: int) -> tuple[str, bytes]:
    return f"test/cat/{i:04d}.jpg", _image_bytes(seed=i)


# ---------------------------------------------------------------- CIFAR-10 archives


def test_cifar_bomb_members_raise_before_decoding(tmp_path, monkeypatch):
    """Eight JPEGs declaring 9000 x 9000 (an 8 KB archive) once decoded to 10 GB."""
    archive = _tar_gz(tmp_path / "bomb.tar.gz",
                      [_good(0)] + [(f"test/dog/{i:04d}.jpg", _jpeg_declaring(9000, 9000))
                                    for i in range(8)])
    assert archive.stat().st_size < 16_000
    decoded = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(ValueError, match=r"bomb\.tar\.gz: member 'test/dog/0000\.jpg': image "
                                         r"must be 32x32 .* declares 9000x9000"):
        load_cifar10_jpeg(archive)
    assert all(s == (32, 32) for s in decoded), decoded


def test_cifar_bomb_archive_peak_memory_stays_small(tmp_path):
    """Measured in a fresh process (VmHWM), with an address-space limit as a safety net."""
    archive = _tar_gz(tmp_path / "bomb.tar.gz",
                      [(f"train/dog/{i:04d}.jpg", _jpeg_declaring(9000, 9000))
                       for i in range(8)])
    script = textwrap.dedent(f"""
        import json, resource
        from safedl_ext.data import load_cifar10_jpeg

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

        limit = status("VmSize") + 2 * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        base = status("VmHWM")
        try:
            load_cifar10_jpeg({str(archive)!r})
            out = {{"type": None, "msg": ""}}
        except BaseException as err:
            out = {{"type": type(err).__name__, "msg": str(err)}}
        out["growth"] = status("VmHWM") - base
        print(json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["type"] == "ValueError", out
    assert "member 'train/dog/0000.jpg'" in out["msg"] and "9000x9000" in out["msg"]
    assert out["growth"] < 64 * 2**20, out


def _cifar_error(tmp_path: Path, members, match: str) -> None:
    archive = _tar_gz(tmp_path / "cifar10-test-jpeg.tar.gz", members)
    with pytest.raises(ValueError, match=match):
        load_cifar10_jpeg(archive)


def test_cifar_wrong_size_member(tmp_path):
    _cifar_error(tmp_path, [_good(0), ("test/cat/0001.jpg", _image_bytes(33, 32))],
                 r"cifar10-test-jpeg\.tar\.gz: member 'test/cat/0001\.jpg': image must be "
                 r"32x32 pixels \(width x height\), it declares 33x32 \(CIFAR-10\)")


def test_cifar_corrupt_members(tmp_path):
    _cifar_error(tmp_path, [_good(0), ("test/cat/0001.jpg", b"\x00" * 700)],
                 r"member 'test/cat/0001\.jpg': not a JPEG image")
    cut = _image_bytes()[:-300]  # a complete member holding a cut-short JPEG
    _cifar_error(tmp_path, [_good(0), ("test/cat/0001.jpg", cut)],
                 r"member 'test/cat/0001\.jpg': corrupt or truncated image data")
    png = _image_bytes(fmt="PNG")  # a PNG named .jpg: CIFAR-10 members are JPEGs
    _cifar_error(tmp_path, [("test/cat/0001.jpg", png)], r"'test/cat/0001\.jpg': not a JPEG")


def test_cifar_truncated_member(tmp_path):
    """The tar stream ends inside the last member's data (the gzip stream is whole)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (_good(0), _good(1)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    last = raw.rindex(b"test/cat/0001.jpg")  # its header, then its data
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(gzip.compress(raw[:last + 512 + 200]))
    with pytest.raises(ValueError, match=r"cut\.tar\.gz: truncated or corrupt archive at or "
                                         r"after member 'test/cat/0001\.jpg'"):
        load_cifar10_jpeg(archive)
    # The gzip stream itself cut short, inside the first member.
    whole = gzip.compress(raw)
    archive.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut\.tar\.gz: truncated or corrupt archive at or "
                                         r"after member 'test/cat/0000\.jpg'"):
        load_cifar10_jpeg(archive)
    # A file cut short after its members were listed: found when the member is read.
    plain = tmp_path / "cut.tar"
    plain.write_bytes(raw)
    with tarfile.open(plain) as tar:
        member = tar.getmember("test/cat/0001.jpg")
        os.truncate(plain, last + 512 + 200)
        with pytest.raises(ValueError, match=r"cut\.tar: member 'test/cat/0001\.jpg': "
                                             r"truncated"):
            read_tar_member(tar, member, plain, max_bytes=1 << 20)
    archive.write_bytes(b"not a gzip file")
    with pytest.raises(ValueError, match=r"cut\.tar\.gz: not a readable tar archive"):
        load_cifar10_jpeg(archive)


def test_cifar_non_regular_and_oversized_members(tmp_path):
    link = tarfile.TarInfo("test/cat/0001.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _cifar_error(tmp_path, [_good(0), link],
                 r"member 'test/cat/0001\.jpg': must be a regular file, got a symbolic link")
    big = ("test/cat/0001.jpg", _image_bytes() + b"\x00" * (2 << 20))
    _cifar_error(tmp_path, [_good(0), big], r"member 'test/cat/0001\.jpg': declares "
                                            r"2,09\d,\d{3} bytes, more than the 1,048,576")
    _cifar_error(tmp_path, [_good(0), _good(0)], r"member 'test/cat/0000\.jpg' appears more "
                                                 "than once")


def test_cifar_modes_grey_accepted_cmyk_refused(tmp_path):
    grey = ("test/cat/0001.jpg", _image_bytes(mode="L"))
    archive = _tar_gz(tmp_path / "grey.tar.gz", [_good(0), grey])
    x, y = load_cifar10_jpeg(archive)
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [3, 3]
    assert torch.equal(x[1, 0], x[1, 1]) and torch.equal(x[1, 0], x[1, 2])
    cmyk = ("test/cat/0001.jpg", _image_bytes(mode="CMYK"))
    _cifar_error(tmp_path, [_good(0), cmyk], r"'test/cat/0001\.jpg': image mode must be one "
                                             r"of RGB, L, got CMYK")


def test_load_cifar10_names_the_bad_member(tmp_path):
    _tar_gz(tmp_path / "cifar10-train-jpeg.tar.gz", [("train/cat/0000.jpg",
                                                      _jpeg_declaring(64, 64))])
    _tar_gz(tmp_path / "cifar10-test-jpeg.tar.gz", [_good(0)])
    with pytest.raises(ValueError, match=r"cifar10-train-jpeg\.tar\.gz: member "
                                         r"'train/cat/0000\.jpg'.*declares 64x64"):
        load_cifar10(tmp_path, cache=False)


# ---------------------------------------------------------------- MNIST IDX


def test_idx_gzip_bomb_reads_only_the_declared_bytes(tmp_path):
    """A header declaring 10 x 28 x 28 followed by 256 MB of zeros (a 250 KB file)."""
    path = tmp_path / "bomb-images-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 10, 28, 28)
    zeros = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(header)
        for _ in range(256):
            fh.write(zeros)
    del zeros
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"over-long IDX file: the header gives dimensions "
                                             r"\(10, 28, 28\) \(7840 bytes of data\), the "
                                             r"file holds more than 7840"):
            read_idx(path, magic=2051)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_idx_declared_dimensions_are_capped(tmp_path):
    path = tmp_path / "huge-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 0x08, 3]) +
                                   struct.pack(">III", 2**31, 4096, 4096)))
    with pytest.raises(ValueError, match=rf"{path.name}: the IDX header declares dimensions "
                                         r"\(2147483648, 4096, 4096\) .* more than "
                                         r"max_bytes=1,073,741,824"):
        read_idx(path)
    small = tmp_path / "small.idx"
    small.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 100) + bytes(100))
    assert read_idx(small, max_bytes=100).shape == (100,)
    with pytest.raises(ValueError, match="more than max_bytes=99"):
        read_idx(small, max_bytes=99)


# ---------------------------------------------------------------- image folders


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_load_image_folder_classes_labels_and_pixels(tmp_path):
    root = _folder(tmp_path / "imgs", {
        "zebra/b.png": _image_bytes(5, 4, fmt="PNG", seed=1),
        "zebra/a.png": _image_bytes(5, 4, fmt="PNG", seed=2),
        "ant/x/c.bmp": _image_bytes(5, 4, mode="L", fmt="BMP", seed=3),
        "ant/notes.txt": b"not an image",
        "ant/.hidden.png": b"skipped",
    })
    out = load_image_folder(root)
    assert isinstance(out, ImageFolder)
    assert out.classes == ("ant", "zebra") and out.y.tolist() == [0, 1, 1]
    assert out.paths == ("ant/x/c.bmp", "zebra/a.png", "zebra/b.png")
    assert out.x.shape == (3, 3, 4, 5) and out.x.dtype == torch.float32
    assert out.x.is_contiguous() and out.y.dtype == torch.int64
    want = np.asarray(Image.open(root / "zebra/a.png").convert("RGB"))
    assert torch.equal(out.x[1], torch.from_numpy(want.transpose(2, 0, 1).copy()) / 255.0)
    assert torch.equal(out.x[0, 0], out.x[0, 2])  # grey repeated into RGB
    grey = load_image_folder(root, mode="L")
    assert grey.x.shape == (3, 1, 4, 5)
    resized = load_image_folder(root, size=(8, 6))
    assert resized.x.shape == (3, 3, 8, 6)
    assert float(resized.x.min()) >= 0.0 and float(resized.x.max()) <= 1.0


def test_load_image_folder_refuses_hostile_files(tmp_path):
    root = _folder(tmp_path / "a", {"c0/a.png": _png_declaring(5000, 5000),
                                    "c1/b.png": _image_bytes(4, 4, fmt="PNG")})
    with pytest.raises(ValueError, match=r"c0/a\.png: image declares 5000x5000 = "
                                         r"25,000,000 pixels, more than max_pixels=16,777,216"):
        load_image_folder(root)
    with pytest.raises(ValueError, match=r"c0/a\.png: image declares .* max_pixels=100"):
        load_image_folder(root, max_pixels=100, size=4)
    (root / "c0/a.png").write_bytes(_png_declaring(100_000, 100_000))  # Pillow's own limit
    with pytest.raises(ValueError, match=r"c0/a\.png: image too large for Pillow's "
                                         r"decompression-bomb limit"):
        load_image_folder(root, max_pixels=10**11)
    root = _folder(tmp_path / "b", {"c0/a.png": _image_bytes(4, 4, fmt="PNG"),
                                    "c1/b.png": _image_bytes(5, 4, fmt="PNG")})
    with pytest.raises(ValueError, match=r"c1/b\.png: image must be 4x4 pixels .* declares "
                                         r"5x4 like .*c0/a\.png \(pass size= to resize\)"):
        load_image_folder(root)
    assert load_image_folder(root, size=4).x.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"c0/a\.png: \d+ bytes, more than max_bytes=50"):
        load_image_folder(root, max_bytes=50)
    (root / "c1/b.png").write_bytes(_image_bytes(4, 4, fmt="PNG")[:60])
    with pytest.raises(ValueError, match=r"c1/b\.png: corrupt or truncated image data"):
        load_image_folder(root)
    (root / "c1/b.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n")
    with pytest.raises(ValueError, match=r"c1/b\.png: not a BMP/GIF/JPEG/PNG/PPM/TIFF/WEBP"):
        load_image_folder(root)
    (root / "c1/b.png").unlink()
    os.mkfifo(root / "c1/b.png")
    with pytest.raises(ValueError, match=r"c1/b\.png: must be a regular file"):
        load_image_folder(root)
    (root / "c1/b.png").unlink()
    with pytest.raises(ValueError, match=r"c1: class folder holds no images"):
        load_image_folder(root)


def test_load_image_folder_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="root must be a folder"):
        load_image_folder(tmp_path / "f.png")
    with pytest.raises(ValueError, match="no class folders"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match=r"size must be an int >= 1 or a \(height, width\)"):
        load_image_folder(tmp_path, size=(0, 3))
    with pytest.raises(ValueError, match="mode must be 'RGB' or 'L', got 'CMYK'"):
        load_image_folder(tmp_path, mode="CMYK")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pixels must be an int >= 1, got 0"):
        load_image_folder(tmp_path, max_pixels=0)


def test_decode_image_sixteen_bit_refused():
    """Pillow would clip 16-bit grey to 8 bits rather than scale it: refused, named."""
    img = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with pytest.raises(ValueError, match=r"x\.png: image mode must be one of .*, got I;16"):
        decode_image(buf.getvalue(), "x.png")
