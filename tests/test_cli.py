"""The ``safedl`` command line, end to end on digits."""

from __future__ import annotations

import json

import pytest
import torch

from safedl_ext.cli import eval_fraction, main

HAS_CUDA = torch.cuda.is_available()


def test_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["safedl_backend"] in ("native", "reference")
    assert "torch" in info


def test_evaluate_writes_reports_and_resumes_from_checkpoint(tmp_path, capsys):
    args = ["evaluate", "--epochs", "4", "--width", "8", "--eps", "0.1,0.3", "--steps", "5",
            "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| eps | Clean | FGSM | PGD5 |" in table
    report = json.loads((tmp_path / "robustness.json").read_text())
    assert report["clean_accuracy"] > 80
    strong = report["by_eps"]["0.3"]["accuracy"]
    assert strong["PGD5"] < report["by_eps"]["0.1"]["accuracy"]["PGD5"]
    assert strong["PGD5"] < 20
    assert (tmp_path / "model.pt").exists() and (tmp_path / "robustness.md").exists()
    # A second run loads the checkpoint instead of training again: same numbers.
    assert main(args) == 0
    again = json.loads((tmp_path / "robustness.json").read_text())
    assert again["train_seconds"] == 0.0
    for k in report["by_eps"]:
        assert again["by_eps"][k]["accuracy"] == report["by_eps"][k]["accuracy"]


def test_bad_arguments_exit_cleanly(tmp_path, capsys):
    assert main(["evaluate", "--eps", "-0.1", "--epochs", "1", "--out", str(tmp_path),
                 "--no-progress"]) == 2
    assert "eps must be >= 0" in capsys.readouterr().err


def test_eval_fraction():
    assert eval_fraction("8/255") == 8 / 255
    assert eval_fraction("0.25") == 0.25


def test_example_tour_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "attack_tour.py"
    out = subprocess.run([sys.executable, str(script), "--epochs", "3", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "| standard CNN |" in out.stdout and "transfer surrogate -> target" in out.stdout
    assert (tmp_path / "white_box.json").exists() and (tmp_path / "transfer.json").exists()


def test_train_pgd_at_on_digits_writes_run_and_resumes(tmp_path, capsys):
    """`safedl train` trains, writes the run folder and a robustness table; the same command
    again resumes from the finished checkpoint instead of training anew."""
    args = ["train", "--method", "pgd-at", "--dataset", "digits", "--epochs", "4",
            "--pgd-steps", "3", "--attacks", "fgsm,pgd10", "--out", str(tmp_path),
            "--no-progress"]
    assert main(args) == 0
    assert "| method | Clean | FGSM | PGD10 |" in capsys.readouterr().out
    for name in ("model.pt", "checkpoint.pt", "metrics.jsonl", "train.json", "model.json",
                 "robustness.json", "robustness.md"):
        assert (tmp_path / name).exists(), name
    rep = json.loads((tmp_path / "robustness.json").read_text())
    assert rep["method"]["method"] == "pgd-at" and rep["eps"] == 0.1
    assert rep["accuracy"]["Clean"] > 80 and rep["accuracy"]["PGD10"] > 30
    spec = json.loads((tmp_path / "model.json").read_text())
    assert spec["arch"] == "digits-cnn" and spec["num_classes"] == 10
    assert main(args) == 0
    assert json.loads((tmp_path / "train.json").read_text())["resumed_from"] == \
        json.loads((tmp_path / "train.json").read_text())["steps"]


def test_train_bad_arguments(tmp_path, capsys):
    base = ["train", "--dataset", "digits", "--out", str(tmp_path), "--no-progress"]
    assert main([*base, "--method", "jarn", "--jarn-fraction", "0"]) == 2
    assert "--jarn-fraction: value must be > 0" in capsys.readouterr().err
    assert main([*base, "--method", "standard", "--epochs", "1", "--attacks", "cw"]) == 2
    assert "--attacks" in capsys.readouterr().err


# ------------------------------------------------------------- errors: one line, exit != 0


def _run(args: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``safedl ARGS``."""
    return main(args), capsys.readouterr().err


def _hostile_files(tmp_path):
    import os

    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    torch.save({"w": torch.ones(4000)}, tmp_path / "good.pt")
    blob = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    import zipfile

    torch.save({"w": torch.zeros(1 << 20)}, tmp_path / "big.pt")  # 4 MB stored
    with zipfile.ZipFile(tmp_path / "big.pt") as src, zipfile.ZipFile(
            tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():  # the same entries, compressed: a 4 KB "zip bomb"
            dst.writestr(info.filename, src.read(info.filename))
    import io
    import tarfile

    for split in ("train", "test"):  # a CIFAR-10 pair whose one member is not a JPEG
        with tarfile.open(tmp_path / f"cifar10-{split}-jpeg.tar.gz", "w:gz") as tar:
            blob = b"\xff\xd8 this is no jpeg"
            info = tarfile.TarInfo(f"{split}/cat/0001.jpg")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.mark.parametrize("args, expect", [
    (["train", "--eps", "1/0"], "argument --eps: '1/0' divides by zero"),
    (["train", "--eps=-0.1"], "argument --eps: eps must be >= 0, got -0.1"),
    (["train", "--eps", "nan"], "finite"),
    (["train", "--epochs", "0"], "argument --epochs: value must be >= 1, got 0"),
    (["train", "--lr", "0"], "argument --lr: value must be > 0, got 0"),
    (["train", "--batch-size", "0"], "argument --batch-size: value must be >= 1"),
    (["train", "--epochs", "two"], "expected an integer, got 'two'"),
    (["train", "--device", "cuda:99" if HAS_CUDA else "cuda"], "cuda"),
    (["train", "--device", "tpu"], "expected"),
    (["evaluate", "--width", "0"], "argument --width: value must be >= 1"),
    (["evaluate", "--eps", "0.1,-2"], "eps must be >= 0"),
    (["evaluate", "--steps", "5,0"], "value must be >= 1"),
    (["viz", "gradients", "--n", "0"], "argument --n: value must be >= 1"),
    (["train", "--jarn-fraction", "1.5"], "must be > 0 and <= 1"),
    (["evaluate", "--checkpoint", "{tmp}/none.pt"], "--checkpoint not found: {tmp}/none.pt"),
    (["evaluate", "--checkpoint", "{tmp}/trunc.pt"], "--checkpoint {tmp}/trunc.pt is truncated"),
    (["evaluate", "--checkpoint", "{tmp}/empty.pt"], "--checkpoint {tmp}/empty.pt is empty"),
    (["evaluate", "--checkpoint", "{tmp}/junk.pt"], "--checkpoint {tmp}/junk.pt is truncated"),
    (["evaluate", "--checkpoint", "{tmp}/evil.pt"], "would need code to load"),
    (["evaluate", "--checkpoint", "{tmp}/deflated.pt"], "holds compressed entries"),
    (["evaluate", "--checkpoint", "{tmp}/good.pt"], "{tmp}/good.pt does not fit DigitsCNN"),
    (["viz", "gradients", "--model-file", "{tmp}/evil.pt"], "would need code to load"),
    (["viz", "eps", "--dataset", "tensors", "--data", "{tmp}/trunc.pt"], "--data {tmp}/trunc"),
    (["evaluate", "--epochs", "1", "--out", "/dev/null/x"], "/dev/null/x: Not a directory"),
    (["train", "--dataset", "cifar10", "--data", "{tmp}/none"], "CIFAR-10 archive not found"),
    (["train", "--dataset", "cifar10", "--data", "{tmp}"], "train/cat/0001.jpg"),
])
def test_cli_errors_are_one_clear_line(tmp_path, capsys, args, expect):
    _hostile_files(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    rc, err = _run([*args, "--no-progress"], capsys)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("safedl") and "Traceback" not in err
    assert expect.replace("{tmp}", str(tmp_path)) in lines[0]
    assert "weights_only=False" not in err  # never advise running the pickle's code
    assert not (tmp_path / "owned").exists()
    assert not (tmp_path / "run" / "model.pt").exists()  # nothing trained


def test_zero_is_a_value_not_a_default(tmp_path, capsys):
    """--epochs 0 / --lr 0 used to mean "the default" (12 epochs, lr 0.002)."""
    for opt in (["--epochs", "0"], ["--lr", "0"], ["--batch-size", "0"]):
        rc, _ = _run(["train", "--method", "standard", "--attacks", "none", *opt, "--out",
                      str(tmp_path), "--no-progress"], capsys)
        assert rc == 2 and not (tmp_path / "checkpoint.pt").exists()
    # An explicit value is used as given, however small.
    rc, _ = _run(["train", "--method", "standard", "--attacks", "none", "--epochs", "1",
                  "--batch-size", "500", "--out", str(tmp_path), "--no-progress"], capsys)
    assert rc == 0
    spec = json.loads((tmp_path / "train.json").read_text())["settings"]["train"]
    assert spec["epochs"] == 1 and spec["batch_size"] == 500


def test_evaluate_trains_into_a_missing_checkpoint_only_when_asked(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    rc, err = _run(["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path),
                    "--no-progress"], capsys)
    assert rc == 2 and "--retrain" in err and not ckpt.exists()
    rc, _ = _run(["evaluate", "--checkpoint", str(ckpt), "--retrain", "--epochs", "1",
                  "--width", "8", "--eps", "0.1", "--steps", "2", "--out", str(tmp_path),
                  "--no-progress"], capsys)
    assert rc == 0 and ckpt.exists()


def test_train_resume_refuses_other_data_and_another_model(tmp_path, capsys):
    from safedl_ext.data import default_data_root

    try:
        default_data_root()
    except FileNotFoundError as err:
        pytest.skip(f"shared data folder absent: {err}")
    base = ["train", "--dataset", "mnist", "--method", "standard", "--attacks", "none",
            "--epochs", "2", "--out", str(tmp_path), "--no-progress"]
    rc, _ = _run([*base, "--limit", "200"], capsys)
    assert rc == 0
    rc, err = _run([*base, "--limit", "400"], capsys)
    assert rc == 2 and "other training data (160 samples" in err and "now 320" in err
    rc, err = _run([*base, "--limit", "200", "--model", "small-cnn"], capsys)
    assert rc == 2 and "another architecture" in err and len(err.strip().splitlines()) == 1
    assert json.loads((tmp_path / "model.json").read_text())["arch"] == "mnist-cnn"
    rc, _ = _run([*base, "--limit", "200"], capsys)  # the same run: nothing left to do
    assert rc == 0


def test_every_option_has_help():
    import argparse

    from safedl_ext.cli import build_parser

    missing = []
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_written_files_get_plain_write_permissions(tmp_path, capsys):
    """Atomic writes (mkstemp: 0600) come out as a plain open() would make them."""
    import os

    rc, _ = _run(["train", "--method", "standard", "--attacks", "fgsm", "--epochs", "1",
                  "--eval-n", "20", "--out", str(tmp_path), "--no-progress"], capsys)
    assert rc == 0
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    want = plain.stat().st_mode & 0o777
    for name in ("checkpoint.pt", "model.pt", "train.json", "metrics.jsonl", "model.json",
                 "robustness.json", "robustness.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name
    old = os.umask(0o077)
    try:
        from safedl_ext.report import write_text_atomic

        write_text_atomic(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    (tmp_path / "private.txt").chmod(0o640)  # replacing a file keeps its mode, as open() does
    write_text_atomic(tmp_path / "private.txt", "y")
    assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o640
