"""Shared helpers: small configs and synthetic corpora, and the runs several modules share, each trained once a
session, so the suite runs in minutes on 2 cores."""

import os
import shutil

import pytest
from filelock import FileLock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

# Without XLA: compiling a tiny model's steps costs more than running them (test_cli's console test trains with it).
TINY = [
    "model.num_layers=2", "model.num_heads=2", "model.hidden_dim=32", "model.max_length=16",
    "train.batch_size=8", "train.steps=40", "train.eval_interval=20", "train.steps_per_execution=10",
    "train.eval_batches=2", "train.warmup_steps=5", "train.jit_compile=false", "generate.max_new_tokens=8",
]


def tiny_config(*overrides):
    """A 2-layer, 32-wide, context-16 GPT config with a character tokenizer."""
    from tfglm.config import load_config

    return load_config(overrides=TINY + list(overrides))


# The fixtures that train a model (here and in test modules): a test that uses one, directly or through another
# fixture, is `slow` as a test that trains in its body is; so is a test that serves or runs distributed.
TRAINED = {"chat_run", "sentence_run", "pattern_run", "documents_run", "classifier", "references",
           "single_device", "run_dir", "grounded_run", "prepared_run"}


def pytest_collection_modifyitems(items):
    """Marks `slow` the tests that use a trained fixture, serve or run distributed."""
    for item in items:
        if TRAINED & set(item.fixturenames) or item.get_closest_marker("serve") or \
                item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)


def built_once(tmp_path_factory, name, build):
    """A session directory `name` that `build(directory)` fills: under pytest-xdist the first worker to ask builds it
    and the others wait for it and read it (pytest-xdist's documented pattern: a lock in the session's temporary
    directory, which its workers share), so a session fixture trains once wherever its modules run."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root, built = base / name, base / f"{name}.built"
    with FileLock(f"{root}.lock"):
        if not built.exists():
            shutil.rmtree(root, ignore_errors=True)  # what a worker whose build failed left
            root.mkdir()
            build(root)
            built.touch()
    return root


def stop_at_step(step):
    """A Keras callback that interrupts training, as Ctrl-C would, once the optimizer has taken `step` steps."""
    import keras

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) >= step:
                raise KeyboardInterrupt
    return Stop()


def fit_with(fit, extra_callback):
    """`keras.Model.fit` with `extra_callback` added to the caller's callbacks (to monkeypatch onto keras.Model)."""
    def fit_and_stop(self, *args, callbacks=(), **kwargs):
        return fit(self, *args, callbacks=[*callbacks, extra_callback], **kwargs)
    return fit_and_stop


@pytest.fixture
def pattern_file(tmp_path):
    """A perfectly learnable corpus: one short cycle of characters repeated."""
    path = tmp_path / "pattern.txt"
    path.write_text("abcdefgh\n" * 400, encoding="utf-8")
    return str(path)


# The start of a script for a fresh interpreter as a model server has it: TensorFlow and tensorflow-text's op
# libraries, no tfglm, Keras or keras-hub (blocked; tensorflow_text's Python package would import Keras).
SERVER_PREAMBLE = r"""
import glob, importlib.util, json, os, sys
sys.modules.update(dict.fromkeys(["tfglm", "keras", "keras_hub", "tf_keras"]))
import tensorflow as tf
text_dir = importlib.util.find_spec("tensorflow_text").submodule_search_locations[0]
for library in glob.glob(os.path.join(text_dir, "python", "ops", "*.so")):
    tf.load_op_library(library)
"""


def requires_shared(*parts):
    path = os.path.join(SHARED_DATA, *parts)
    return pytest.mark.skipif(not os.path.exists(path), reason=f"needs ../shared/data/{'/'.join(parts)}, absent here")


@pytest.fixture(scope="session")
def pattern_run(tmp_path_factory):
    """The run directory of a tiny GPT trained 60 steps without XLA on lines of `abcdefgh`, validated at steps 20, 40
    and 60: what test_cli's commands read and test_train's interrupted runs are compared with."""
    from tfglm.training.trainer import train

    def build(root):
        (root / "pattern.txt").write_text("abcdefgh\n" * 400, encoding="utf-8")
        train(tiny_config(f"data.files=[{root / 'pattern.txt'}]", "train.steps=60", "train.jit_compile=false"),
              str(root / "run"), verbose=0)
    return built_once(tmp_path_factory, "pattern", build) / "run"


DOCUMENT = "the cat sat on the mat. "


@pytest.fixture(scope="session")
def sentence_run(tmp_path_factory):
    """A 2-layer, 32-wide, context-32 GPT with a SentencePiece tokenizer (so the graph holds tensorflow-text ops),
    trained briefly on copies of one sentence: what test_export exports and test_serve serves."""
    from tfglm.training.trainer import train

    def build(root):
        for i in range(100):
            (root / f"{i:03d}.txt").write_text(DOCUMENT * 4)
        config = tiny_config(f"data.files=[{root}/*.txt]", "model.max_length=32", "train.jit_compile=false",
                             "train.steps=20", "train.learning_rate=0.003", "train.min_learning_rate=0.0003",
                             "data.val_fraction=0.2", "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=300",
                             "generate.prompt=the", "generate.temperature=0", "generate.max_new_tokens=12")
        train(config, str(root / "run"), verbose=0)
    return str(built_once(tmp_path_factory, "sentence", build) / "run")


QA = [("hi", "hello there"), ("what is your name?", "i am tfglm"), ("how are you?", "fine, thanks"),
      ("bye", "see you soon")]


def write_conversations(path, n, seed=0):
    """`n` JSONL conversations of 1 to 3 of the fixed question/answer pairs `QA`, in a seeded random order."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            messages = []
            for question, answer in rng.sample(QA, rng.randint(1, 3)):
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


NAMES = ("ana", "bob", "eve", "max")


def chat_conversations():
    """1 to 3 of the fixed question/answer pairs `QA`; a name told, then asked back; the name asked, never told."""
    import random

    rng = random.Random(0)
    rows = [rng.sample(QA, rng.randint(1, 3)) for _ in range(240)]
    rows += [[(f"my name is {name}", f"hi {name}"), ("what is my name?", name)] for name in NAMES * 40]
    rows += [[("what is my name?", "i do not know")]] * 40
    return [{"messages": [{"role": role, "content": text} for question, answer in turns
                          for role, text in (("user", question), ("assistant", answer))]} for turns in rows]


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory):
    """A tiny GPT fine-tuned from scratch on `chat_conversations` (about 30 s): it answers the `QA` questions and
    remembers a name told earlier in the conversation."""
    import json

    from tfglm.cli import main

    def build(root):
        data = root / "conv.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in chat_conversations()))
        held_out = write_conversations(root / "eval.jsonl", 80, seed=1)  # scored into eval.json, replies generated
        sets = ["model.max_length=64", "model.num_layers=2", "model.hidden_dim=64", "chat.epochs=20",
                "chat.learning_rate=3e-3", "generate.max_new_tokens=16"]
        config = os.path.join(os.path.dirname(__file__), "..", "configs", "gpt-char-tiny.yaml")
        assert main(["finetune", "--task", "chat", "--from-scratch", "--config", config, "--train", str(data),
                     "--eval", held_out, "--out", str(root / "run"), *[a for s in sets for a in ("--set", s)]]) == 0
    return str(built_once(tmp_path_factory, "chat", build) / "run")


@pytest.fixture(scope="session")
def chat_base_path(chat_run, tmp_path_factory):
    """The chat run exported without XLA (no compile per shape bucket in the tests): its base path."""
    from tfglm.serving.export import export_run

    root = built_once(tmp_path_factory, "chat-export", lambda root: export_run(chat_run, str(root / "chat"),
                                                                                 jit_compile=False))
    return str(root / "chat")
