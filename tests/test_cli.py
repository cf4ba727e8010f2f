"""A user's mistake is one line on stderr and exit status 2, never a traceback; nothing saved is touched."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import TINY, write_conversations
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


def _one_line(capsys, code, message):
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("tfglm: error: ") and message in err, err


def test_former_tracebacks_are_one_line(tmp_path, pattern_run, capsys):
    _one_line(capsys, main(_train_args(tmp_path, "--set", "model.num_heads=0")), "model.num_heads: must be >= 1")
    _one_line(capsys, main(_train_args(tmp_path, "--set", "train.steps=99999999999999999750")),
              "train.steps: must be in [1, 1e12]")
    (tmp_path / "afile").write_text("x")
    _one_line(capsys, main(["train", "--out", str(tmp_path / "afile")]), "--out names a file")
    _one_line(capsys, main(["export", "--model", str(pattern_run), "--out", str(tmp_path / "afile")]),
              "--out names a file")
    _one_line(capsys, main(["generate", "--model", str(pattern_run), "--prompt", "ab\udcffc"]),
              "--prompt 1: not valid UTF-8")
    broken = tmp_path / "broken"
    shutil.copytree(pattern_run, broken)
    (broken / "config.json").write_text('{"model": ')
    _one_line(capsys, main(["generate", "--model", str(broken)]), "config.json:1: invalid JSON")


def test_wrong_acceptances_and_tracebacks_are_one_line(tmp_path, pattern_run, capsys):
    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    _one_line(capsys, main(["train", "--config", str(binary), "--out", str(tmp_path / "run")]),
              "config.yaml: not a YAML text file")
    for value in ("inf", ".nan", "1e400"):
        _one_line(capsys, main(_train_args(tmp_path, "--set", f"train.learning_rate={value}")),
                  "train.learning_rate: must be finite")
    _one_line(capsys, main(["predict", "--model", str(pattern_run), "some text"]), "does not classify texts")
    _one_line(capsys, main(["train", "--out", str(pattern_run), "--resume", "--overwrite"]), "give one of them")
    assert (pattern_run / "config.json").exists()
    _one_line(capsys, main(["serve", "--model_base_path", str(tmp_path), "--max_batch_size", "0"]),
              "--max_batch_size: must be a positive number, got 0")
    _one_line(capsys, main(["generate", "--model", str(pattern_run), "--top-k", "3000000000"]),
              "generate.top_k: must be in [0, 2147483647], got 3000000000")  # the server's range too


@pytest.mark.slow
def test_a_chat_fine_tune_refuses_steps_it_would_not_honour_and_needs_no_eval(tmp_path, capsys):
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "gpt-char-tiny.yaml")
    args = ["finetune", "--task", "chat", "--from-scratch", "--config", config, "--out", str(tmp_path / "run"),
            "--train", write_conversations(tmp_path / "conv.jsonl", 48)]
    _one_line(capsys, main(args + ["--set", "train.steps=200"]),
              "--set train.steps: a chat fine-tune counts epochs (chat.epochs) and sets train.steps itself; set "
              "chat.epochs instead")
    sets = ["model.max_length=32", "model.num_layers=1", "model.hidden_dim=32", "chat.epochs=1",
            "chat.batch_size=4", "generate.max_new_tokens=8", "train.jit_compile=false"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    assert (tmp_path / "run" / "best.weights.h5").exists() and not (tmp_path / "run" / "eval.json").exists()


def test_an_unreadable_best_checkpoint_falls_back_to_last_and_unreadable_last_is_one_line(tmp_path, pattern_run, capsys,
                                                                                           caplog):
    run = tmp_path / "run"
    shutil.copytree(pattern_run, run)
    (run / "best.weights.h5").write_bytes(b"half a file")
    assert main(["generate", "--model", str(run), "--prompt", "abc", "--temperature", "0"]) == 0
    assert "best.weights.h5: unreadable checkpoint; trying" in caplog.text
    capsys.readouterr()
    (run / "last.weights.h5").write_bytes(b"")
    _one_line(capsys, main(["generate", "--model", str(run)]), "unreadable checkpoint")
    _one_line(capsys, main(["train", "--out", str(run), "--resume"]), "last.weights.h5: unreadable checkpoint")


def test_evaluate_gives_a_language_models_perplexity_on_text(tmp_path, pattern_run, capsys):
    import json

    held_out = tmp_path / "held-out.txt"
    held_out.write_text("abcdefgh\n" * 40)
    assert main(["evaluate", "--model", str(pattern_run), "--data", str(held_out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    with open(pattern_run / "eval.json") as f:
        assert json.load(f) == printed
    assert printed["tokens"] == 352 and 1 <= printed["perplexity"] < 6  # below the 9 symbols of a unigram guess
    _one_line(capsys, main(["evaluate", "--model", str(pattern_run)]), "--data: a language model is scored on text")


def test_a_run_written_before_run_json_is_recognised_by_its_files(tmp_path, pattern_run, capsys):
    old = tmp_path / "old"
    shutil.copytree(pattern_run, old)
    os.remove(old / "run.json")
    assert main(["generate", "--model", str(old), "--prompt", "abc", "--temperature", "0", "--json"]) == 0
    assert '"completion": "defgh' in capsys.readouterr().out


@pytest.mark.slow
def test_the_console_shows_tfglm_lines_and_none_of_tensorflows(tmp_path):
    corpus = _corpus(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    sets = [a for s in TINY + ["train.jit_compile=true", "train.steps=20", "train.eval_interval=20"]
            for a in ("--set", s)]
    result = subprocess.run([sys.executable, "-m", "tfglm", "train", *sets, "--data", str(corpus), "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("tfglm: ") for line in lines), lines
    assert "corpus: 1 file(s)" in result.stderr and "model: " in result.stdout


def test_every_config_error_at_once_and_steps_alone_fits_the_intervals(tmp_path, capsys):
    _one_line(capsys, main(_train_args(tmp_path, "--set", "model.num_heads=3", "--set", "train.eval_interval=7",
                                       "--set", "generate.top_p=2")),
              "model.hidden_dim: must be a positive multiple of model.num_heads (3), got 32; train.eval_interval: "
              "must divide train.steps (40), got 7; train.steps_per_execution: must divide train.eval_interval (7), "
              "got 10; generate.top_p: must be in (0.0, 1.0], got 2.0")
    from tfglm.config import load_config

    for steps in (1, 7, 100, 1001):
        t = load_config("configs/default.yaml", [f"train.steps={steps}"]).train
        assert t.warmup_steps < steps and steps % t.eval_interval == 0 and t.eval_interval % t.steps_per_execution == 0


@pytest.mark.slow
def test_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer").mkdir()  # a start that failed after its tokenizer, before config.json
    args = [a for s in ("train.steps=1", "train.eval_interval=1", "train.steps_per_execution=1", "train.warmup_steps=0")
            for a in ("--set", s)] + ["--data", str(_corpus(tmp_path))]
    assert main(_train_args(tmp_path, "--overwrite", *args)) == 0
    os.remove(run / "last.weights.h5")  # as if killed before its first checkpoint
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "no checkpoint yet; starting the run from step 0" in caplog.text
    os.remove(run / "last.weights.h5")
    assert main(_train_args(tmp_path, *args)) == 0  # a plain rerun is accepted too


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefgh\n" * 300)
    return path


HELP_IMPORTS = """
import json, sys
from tfglm.cli import main
from tfglm.tasks import catalog
codes = []
for argv in (["--help"], ["finetune", "--help"], ["pretrain", "--help"], ["generate", "--top-k", "2"]):
    try:
        main(argv)
    except SystemExit as e:
        codes.append(e.code)
print(json.dumps({"codes": codes, "declared": catalog.declarations(),
                  "imported": sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tfglm.tasks."))}))
"""


def test_help_and_argument_errors_read_the_tasks_without_importing_tensorflow():
    result = subprocess.run([sys.executable, "-c", HELP_IMPORTS], capture_output=True, text=True, timeout=120)
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["codes"] == [0, 0, 0, 2] and "--model" in result.stderr  # generate without --model: one usage line
    assert out["imported"] == ["tfglm.tasks.catalog"]
    assert "pretrain" in result.stdout and "--task {classify,chat}" in result.stdout
    from tfglm.tasks import catalog, registry

    # What the command line read from the tasks' sources is what the imported classes declare.
    assert out["declared"] == [list(catalog.declaration(task)) for task in registry.tasks()]
