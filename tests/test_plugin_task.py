"""A task defined here alone, registered through `tfglm.tasks.register`, plugs in whole: its config section (with its
checks), its fine-tuning files and its `tfglm evaluate` option reach the config and the command line, and it trains,
evaluates and exports as a built-in task does."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfglm import config as config_tree
from tfglm.cli import main
from tfglm.errors import TfglmError
from tfglm.tasks import Evaluation, Task, catalog, register, registry
from tfglm.tasks.base import TextClassifier
from tfglm.training import runs

LENGTH = 12


@dataclasses.dataclass
class MajorityConfig:
    """The task's section, `majority:` in the config."""
    train_file: str = ""
    val_file: str = ""
    eval_file: str = ""
    letters: str = "ab"  # the two letters counted: is the first the more frequent?


@dataclasses.dataclass
class MajorityEvaluation(Evaluation):
    min_length: int = dataclasses.field(default=0, metadata={"help": "majority: score texts this long or longer"})


def encode(texts):
    """Texts -> their first LENGTH bytes as ids, zero-padded."""
    return tf.strings.unicode_decode(texts, "UTF-8").to_tensor(shape=[None, LENGTH]) % 256


class Majority(Task):
    """Whether a text holds more of `majority.letters[0]` than of `[1]`, learnt by a bag of byte embeddings."""

    name = "majority"
    model_kinds = ("gpt",)
    section = MajorityConfig
    finetune = "texts, one a line"
    Evaluation = MajorityEvaluation

    @classmethod
    def checks(cls, section, config):
        return [(len(section.letters) == 2, "majority.letters", f"must be two letters, got {section.letters!r}")]

    def read(self, path):
        first, second = self.config.majority.letters
        with open(path) as f:
            texts = f.read().split()
        return texts, np.array([int(t.count(first) > t.count(second)) for t in texts], np.int32)

    def load_vocabulary(self):
        """Bytes need no vocabulary."""

    def prepare(self, resume, chief):
        self.train_rows, self.val_rows = self.read(self.config.majority.train_file), \
            self.read(self.config.majority.val_file)

    def build_model(self):
        model = keras.Sequential([keras.Input([LENGTH], dtype="int32"), keras.layers.Embedding(256, 8),
                                  keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
        return model

    def compile_options(self):
        return {"weighted_metrics": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]}

    def datasets(self, step):
        t = self.config.train
        train = tf.data.Dataset.from_tensor_slices(self.train_rows).repeat().shuffle(256, seed=t.seed)
        val = tf.data.Dataset.from_tensor_slices(self.val_rows)
        return tuple(ds.batch(t.batch_size).map(lambda x, y: (encode(x), y)) for ds in (train.skip(step), val))

    def tokens_per_step(self):
        return self.config.train.batch_size * LENGTH

    def evaluate(self, model, inputs):
        texts, labels = self.read(inputs.data)
        keep = np.array([len(t) >= inputs.min_length for t in texts])
        predicted = model.predict(encode(tf.constant(texts)), verbose=0).argmax(-1)
        return {"rows": int(keep.sum()), "accuracy": float((predicted == labels)[keep].mean())}

    def exported(self, model, jit_compile):
        return TextClassifier(model, None, encode, ["no", "yes"], "text")


@pytest.fixture
def majority(monkeypatch):
    """The task, registered for this test only."""
    registry.discover()
    monkeypatch.setattr(catalog, "TASKS", dict(catalog.TASKS))
    monkeypatch.setattr(config_tree, "SECTIONS", dict(config_tree.SECTIONS))
    return register(Majority)


def write_texts(path, n, seed):
    rng = np.random.RandomState(seed)
    texts = ["".join(rng.choice(list("abc"), rng.randint(3, LENGTH + 1))) for _ in range(n)]
    path.write_text("\n".join(texts) + "\n")
    return str(path)


@pytest.mark.slow
def test_a_plugin_task_trains_evaluates_and_exports(majority, tmp_path, capsys):
    assert registry.get_task("majority") is Majority and Majority in registry.tasks()
    assert config_tree.load_config(overrides=["majority.letters=ca"]).majority.letters == "ca"
    with pytest.raises(TfglmError, match="majority.letters: must be two letters, got 'abc'"):
        config_tree.load_config(overrides=["majority.letters=abc"])

    config = tmp_path / "majority.yaml"
    config.write_text("train: {steps: 40, batch_size: 16, learning_rate: 0.05, warmup_steps: 0, eval_interval: 20, "
                      "steps_per_execution: 10, jit_compile: false}\n")
    train, val, test = (write_texts(tmp_path / f"{name}.txt", n, seed)
                        for name, n, seed in (("train", 512, 0), ("val", 64, 1), ("test", 128, 2)))
    out = str(tmp_path / "run")
    assert main(["finetune", "--task", "majority", "--from-scratch", "--config", str(config), "--train", train,
                 "--val", val, "--eval", test, "--out", out]) == 0
    scores = json.loads(capsys.readouterr().out.splitlines()[-2])
    assert scores["rows"] == 128 and scores["accuracy"] > 0.8  # chance is about one half
    assert runs.read_json(runs.path(out, runs.RUN))["task"] == "majority"
    assert runs.read_json(runs.path(out, runs.CONFIG))["majority"]["train_file"] == train

    assert main(["evaluate", "--model", out, "--data", test, "--min-length", "8"]) == 0
    long_rows = sum(len(t) >= 8 for t in open(test).read().split())
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["rows"] == long_rows < 128
    assert runs.read_json(runs.path(out, runs.EVAL))["rows"] == long_rows

    assert main(["export", "--model", out, "--out", str(tmp_path / "models"), "--no-jit-compile"]) == 0
    exported = capsys.readouterr().out.strip()
    assert exported == str(tmp_path / "models" / "1") and os.path.exists(os.path.join(exported, "saved_model.pb"))
    texts = ["aab", "bbbc", "acacac", "cb"]
    served = tf.saved_model.load(exported).signatures["predict"](texts=tf.constant(texts))["labels"].numpy()
    run = registry.load_run(out)
    expected = run.model.predict(encode(tf.constant(texts)), verbose=0).argmax(-1)
    assert [label.decode() for label in served] == [["no", "yes"][i] for i in expected]

    assert main(["predict", "--model", out, "ab"]) == 2  # a capability it does not declare is a one-line error
    assert "a majority run does not classify texts" in capsys.readouterr().err
