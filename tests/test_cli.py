"""A user's mistake is one line on stderr and exit status 2, never a traceback; nothing saved is touched."""

import os
import subprocess
import sys

import pytest

from conftest import TINY
from tfglm.cli import main


def _train_args(tmp_path, *extra):
    sets = [a for s in TINY for a in ("--set", s)]
    return ["train", *sets, "--out", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize("make_input, message", [
    (lambda d: str(d / "missing.txt"), "missing.txt: no such file or directory"),
    (lambda d: (d / "x.bin").write_bytes(b"\x7fELF\x00\x00") and str(d / "x.bin"), "x.bin:1: binary file"),
    (lambda d: (d / "e.txt").write_text("\n\n") and str(d / "e.txt"), "corpus is empty"),
    (lambda d: str(d / "*.none"), "matches no files"),
])
def test_bad_training_data_is_one_line(tmp_path, capsys, make_input, message):
    assert main(_train_args(tmp_path, "--data", make_input(tmp_path))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tfglm: error: ") and message in err


def test_bad_config_and_resume_errors(tmp_path, capsys):
    assert main(_train_args(tmp_path, "--set", "model.num_heads=3")) == 2
    assert "model.hidden_dim: must be a positive multiple of model.num_heads (3)" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    keep = tmp_path / "notarun"
    keep.mkdir()
    (keep / "precious.txt").write_text("keep me")
    assert main(["train", "--out", str(keep), "--overwrite"]) == 2
    assert "--overwrite only replaces a tfglm run directory" in capsys.readouterr().err
    assert (keep / "precious.txt").read_text() == "keep me"


def test_process_prints_no_traceback(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-m", "tfglm", "train", "--config", str(tmp_path / "nope.yaml"),
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"tfglm: error: {tmp_path / 'nope.yaml'}: config file not found"
