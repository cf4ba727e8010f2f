"""Every task through the one trainer, on tiny synthetic data: the default strategy and MirroredStrategy over two
logical CPUs agree, `--resume` after an interruption ends with the uninterrupted run's weights, mixed_bfloat16
trains, and run.json records the run."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import stop_at_step, write_conversations
from tfglm.config import load_config
from tfglm.errors import TfglmError
from tfglm.training import runs
from tfglm.tasks.registry import get_task, load_run
from tfglm.training.trainer import train

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")
SMALL = ["model.num_layers=1", "model.num_heads=2", "model.hidden_dim=32", "model.dropout=0.0", "train.grad_clip=0",
         "train.batch_size=8", "train.eval_batches=2", "train.jit_compile=false", "generate.max_new_tokens=4"]
WORDS = "the a film movie story plot cast scene ending music".split()


def _rows(rng, n):
    labels = rng.randint(2, size=n)
    return [(" ".join(list(rng.choice(WORDS, 4)) + ["great" if y else "awful"]), "pos" if y else "neg")
            for y in labels]


@pytest.fixture(scope="module")
def task_configs(tmp_path_factory):
    """{task: overrides} for a tiny run of each task (16 steps, validation every 8)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.RandomState(0)
    text = root / "text.txt"
    text.write_text("".join(f"line {i} says {'abcdefgh'[i % 8] * (i % 5 + 1)}.\n" for i in range(600)))
    for name, n in (("train", 200), ("val", 40)):
        (root / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in _rows(rng, n)))
    pairs = [(" ".join(rng.choice(WORDS, 3)), None) for _ in range(300)]
    (root / "pairs.tsv").write_text("".join(f"{s}\t{' '.join(reversed(s.split()))}\n" for s, _ in pairs))
    write_conversations(root / "conv.jsonl", 192)
    write_conversations(root / "conv-val.jsonl", 16, seed=1)
    steps = ["train.steps=16", "train.eval_interval=8", "train.steps_per_execution=4", "train.warmup_steps=2"]
    bert = ["model.kind=bert", "tokenizer.kind=wordpiece", "tokenizer.vocab_size=300", "model.max_length=16"]
    return {
        "causal_lm": SMALL + steps + [f"data.files=[{text}]", "model.max_length=16"],
        "masked_lm": SMALL + steps + bert + [f"data.files=[{root / 'train.tsv'}]", "data.val_fraction=0.2"],
        "classify": SMALL + steps + bert + ["classify.epochs=2", "classify.batch_size=8", "classify.dropout=0.0",
                                    "train.steps_per_execution=4", f"classify.train_file={root / 'train.tsv'}",
                                    f"classify.val_file={root / 'val.tsv'}"],
        "seq2seq": SMALL + steps + ["model.kind=translate", "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=300",
                                    "model.max_length=16", f"translate.pairs={root / 'pairs.tsv'}",
                                    f"translate.val_pairs={root / 'pairs.tsv'}"],
        "classify+lora": SMALL + steps + bert + ["classify.epochs=2", "classify.batch_size=8", "classify.dropout=0.0",
                                                  "train.lora_rank=2", "classify.learning_rate=1e-2",
                                                  f"classify.train_file={root / 'train.tsv'}",
                                                  f"classify.val_file={root / 'val.tsv'}"],
        "chat": SMALL + steps + ["model.max_length=32", "chat.epochs=2", "chat.batch_size=8",
                                 f"chat.train_file={root / 'conv.jsonl'}", f"chat.val_file={root / 'conv-val.jsonl'}"],
    }


def _weights(model):
    return [w.numpy() for w in model.weights]


@pytest.fixture(scope="module")
def references(task_configs, tmp_path_factory):
    """{task: (run directory, final weights)} of an uninterrupted run under the default strategy."""
    out = {}
    for name, overrides in task_configs.items():
        run_dir = str(tmp_path_factory.mktemp(name) / "run")
        model = train(load_config(overrides=overrides), run_dir, task=name.split("+")[0], verbose=0).model
        out[name] = run_dir, _weights(model)
    return out


@pytest.mark.parametrize("name", ["causal_lm", "masked_lm", "classify", "classify+lora", "seq2seq", "chat"])
def test_each_task_trains_records_its_run_and_resumes_exactly(name, task_configs, references, tmp_path, monkeypatch):
    """Stopped mid-way through its second interval, a run refuses to start again without --resume, and with it ends
    with the uninterrupted run's weights and validation loss. classify+lora: LoRA factors (and their optimizer
    moments) resume unmerged, as every other weight."""
    reference_dir, reference_weights = references[name]
    name, lora = name.split("+")[0], name.endswith("+lora")
    rows = runs.read_metrics(reference_dir)
    # Two epochs: classify's 200 rows and chat's 391 examples (192 conversations, split into exchanges to fit 32
    # tokens), every one of them in each epoch, in batches of 8 (the last one filled up from the epoch's start).
    assert [r["step"] for r in rows] == {"classify": [25, 50], "chat": [49, 98]}.get(name, [8, 16])
    assert all(np.isfinite(r["val_loss"]) for r in rows)
    with open(os.path.join(reference_dir, runs.RUN)) as f:
        record = json.load(f)
    assert record["task"] == name and record["strategy"] == "default" and record["replicas"] == 1
    assert record["mixed_precision"] == "float32" and record["resumed_from_step"] == []
    assert load_run(reference_dir).task.name == name

    run_dir = str(tmp_path / "run")
    config = load_config(overrides=task_configs[name + "+lora" * lora])
    fit = keras.Model.fit
    monkeypatch.setattr(keras.Model, "fit", lambda self, *a, callbacks=(), **k: fit(
        self, *a, callbacks=[*callbacks, stop_at_step(rows[0]["step"] + 2)], **k))
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir, task=name, verbose=0)
    monkeypatch.undo()
    assert os.path.exists(os.path.join(run_dir, runs.LAST_LORA)) == lora
    assert [r["step"] for r in runs.read_metrics(run_dir)] == [rows[0]["step"]]
    with pytest.raises(TfglmError, match="already holds a run"):
        train(config, run_dir, task=name, verbose=0)
    resumed = train(config, run_dir, task=name, resume=True, verbose=0).model
    assert len(_weights(resumed)) == len(reference_weights)
    for a, b in zip(_weights(resumed), reference_weights):
        np.testing.assert_allclose(a, b, atol=1e-5)
    resumed_rows = runs.read_metrics(run_dir)
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in rows]
    assert resumed_rows[-1]["val_loss"] == pytest.approx(rows[-1]["val_loss"], abs=1e-4)
    with open(os.path.join(run_dir, runs.RUN)) as f:
        assert json.load(f)["resumed_from_step"] == [rows[0]["step"]]


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["masked_lm", "classify", "seq2seq", "chat"])
def test_each_task_under_mirrored_strategy_matches_one_device(name, task_configs, references, tmp_path):
    """Two logical CPUs (a process of its own: devices are set before TensorFlow starts), against the one-device run
    (the GPT's case is in test_distribute). Tolerance 2e-3 on the weights after 16 steps: the all-reduce sums the
    replicas' gradients in another order."""
    overrides = task_configs[name] + ["train.strategy=mirrored", f"task={name}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.path.dirname(__file__)}
    result = subprocess.run([sys.executable, WORKER, str(tmp_path / "run"), str(tmp_path / "w.npz"), "2", "0",
                             *overrides], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "run" / runs.RUN) as f:
        assert json.load(f)["replicas"] == 2
    rows, reference = runs.read_metrics(str(tmp_path / "run")), runs.read_metrics(references[name][0])
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    np.testing.assert_allclose([r["val_loss"] for r in rows], [r["val_loss"] for r in reference], rtol=1e-3)
    with np.load(tmp_path / "w.npz") as f:
        weights = [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]
    for a, b in zip(weights, references[name][1]):
        np.testing.assert_allclose(a, b, atol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["masked_lm", "classify", "seq2seq", "chat"])
def test_each_task_trains_in_mixed_bfloat16(name, task_configs, tmp_path):
    config = load_config(overrides=task_configs[name] + ["train.mixed_precision=mixed_bfloat16"])
    try:
        model = train(config, str(tmp_path / "run"), task=name, verbose=0).model
        assert model.compute_dtype == "bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(np.isfinite(r["val_loss"]) for r in runs.read_metrics(str(tmp_path / "run")))


def test_the_registry_names_its_tasks_and_rejects_others(task_configs):
    assert get_task("classify").name == "classify"
    with pytest.raises(TfglmError, match=r"^task: unknown task 'chitchat' \(known: causal_lm, masked_lm, classify, "
                                         r"seq2seq, chat, embed\)$"):
        get_task("chitchat")
    with pytest.raises(TfglmError, match="the seq2seq task trains 'translate' models, got 'gpt'"):
        get_task("seq2seq")(load_config(), "run")
