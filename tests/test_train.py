"""Integration: a tiny GPT really trains, checkpoints, resumes and generates."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from tfglm.training import runs
from tfglm.tasks.registry import load_run
from tfglm.errors import TfglmError
from tfglm.generation.decode import Generator
from tfglm.training.trainer import train


def _metrics(run_dir):
    return runs.read_metrics(run_dir)


@pytest.mark.slow
def test_tiny_model_learns_a_pattern_and_generates_it(tmp_path, pattern_file):
    config = tiny_config(f"data.files=[{pattern_file}]", "train.steps=240", "train.eval_interval=80",
                         "train.steps_per_execution=40", "train.learning_rate=0.003", "train.min_learning_rate=0.0003")
    run_dir = str(tmp_path / "run")
    train(config, run_dir, verbose=0)
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [80, 160, 240]
    assert rows[-1]["val_loss"] < 0.05 and rows[-1]["train_loss"] < 0.1
    assert set(rows[-1]) >= {"step", "train_loss", "val_loss", "tokens_per_s", "wall_s"}
    events = _tensorboard(run_dir)
    assert sorted(events["train/loss"]) == list(range(40, 241, 40))  # every logged optimizer step
    assert sorted(events["train/learning_rate"]) == list(range(40, 241, 40))
    assert sorted(events["validation/loss"]) == sorted(events["samples/generate"]) == [80, 160, 240]

    _, tokenizer, model, _ = load_run(run_dir)
    generator = Generator(model, tokenizer)
    out = generator.generate(tf.constant(["abc", "fgh\nab"]), 12, 0.0, 0, 1.0, 0)
    assert out["completions"].numpy().tolist() == [b"defgh\nabcdef", b"cdefgh\nabcde"]
    assert out["num_tokens"].numpy().tolist() == [12, 12]


def _tensorboard(run_dir):
    """{tag: [steps]} of the run's TensorBoard event files."""
    tags = {}
    for name in os.listdir(os.path.join(run_dir, runs.LOGS)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(run_dir, runs.LOGS, name)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_previous_checkpoint(tmp_path, pattern_file,
                                                                                     monkeypatch):
    config = tiny_config(f"data.files=[{pattern_file}]")
    run_dir = str(tmp_path / "run")
    original = keras.Model.save_weights

    def save_weights(self, path, *args, **kwargs):
        if int(self.optimizer.iterations.numpy()) == 40:
            with open(path, "wb") as f:
                f.write(b"part")
            raise OSError(28, "No space left on device")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", save_weights)
    with pytest.raises(TfglmError, match=r"best.weights.h5: cannot write \(No space left on device\); the previous "
                                         r"version is intact$"):
        train(config, run_dir, verbose=0)
    monkeypatch.undo()
    assert not [name for name in os.listdir(run_dir) if name.startswith("tmp-")]
    assert int(load_run(run_dir, runs.LAST).model.weights[0].shape[0]) > 0
    train(config, run_dir, resume=True, verbose=0)
    assert [r["step"] for r in _metrics(run_dir)] == [20, 40]


@pytest.mark.slow
def test_a_crash_while_saving_never_corrupts_the_last_checkpoint(tmp_path, pattern_file, monkeypatch):
    config = tiny_config(f"data.files=[{pattern_file}]")
    run_dir = str(tmp_path / "run")
    saves = []
    original = keras.Model.save_weights

    def save_then_crash(self, path, *args, **kwargs):
        saves.append(path)
        if saves.count(path) == 2 and path.endswith("last.weights.h5"):  # the step-40 save of the last checkpoint
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise KeyboardInterrupt
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir, verbose=0)
    monkeypatch.undo()
    _, _, model, _ = load_run(run_dir, runs.LAST)  # the step-20 checkpoint is intact
    assert model.count_params() > 0
    train(config, run_dir, resume=True, verbose=0)
    assert [r["step"] for r in _metrics(run_dir)] == [20, 40]


def test_metrics_log_is_json_lines(pattern_run):
    with open(os.path.join(pattern_run, runs.METRICS)) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [20, 40, 60]
    assert all(r["tokens_per_s"] > 0 and r["val_perplexity"] > 1 for r in rows)



@pytest.mark.parametrize("kill_at", ["before best", "writing best", "after best", "writing last", "after last"])
def test_a_kill_at_any_point_of_the_checkpoint_sequence_loses_nothing(tmp_path, pattern_run, monkeypatch, kill_at):
    """Each validation point appends its metrics row, then writes best (when better), then last. Killed at each
    point of step 40's sequence, a run continued with --resume ends with the uninterrupted run's weights (last and
    best) and its metrics rows."""
    config, reference_dir = runs.read_config(str(pattern_run)), str(pattern_run)
    run_dir = str(tmp_path / "run")
    when, target = kill_at.split()
    original = runs.atomic_write
    seen = []

    def atomic_write(path, write):
        seen.append(os.path.basename(path))
        if seen.count(f"{target}.weights.h5") < 2:  # step 20's checkpoints go through
            return original(path, write)
        if when == "writing":  # killed mid-write: a torn temporary file, never renamed
            with open(os.path.join(os.path.dirname(path), "tmp-" + os.path.basename(path)), "wb") as f:
                f.write(b"half a file")
        elif when == "after":
            original(path, write)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "atomic_write", atomic_write)
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir, verbose=0)
    monkeypatch.undo()
    assert [r["step"] for r in _metrics(run_dir)] == [20, 40]  # the row came first
    train(config, run_dir, resume=True, verbose=0)
    rows, reference = _metrics(run_dir), _metrics(reference_dir)
    assert [r["step"] for r in rows] == [20, 40, 60]
    assert [r["val_loss"] for r in rows] == pytest.approx([r["val_loss"] for r in reference], abs=1e-4)
    for name in (runs.LAST, runs.BEST):
        resumed, uninterrupted = load_run(run_dir, name).model, load_run(reference_dir, name).model
        for a, b in zip(resumed.weights, uninterrupted.weights):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
