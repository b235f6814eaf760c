"""The ``safedl`` command line, end to end on digits."""

from __future__ import annotations

import json

from safedl_ext.cli import eval_fraction, main


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
    assert "jarn_fraction" in capsys.readouterr().err
    assert main([*base, "--method", "standard", "--epochs", "1", "--attacks", "cw"]) == 2
    assert "--attacks" in capsys.readouterr().err
