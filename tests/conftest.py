"""Shared helpers: small configs and synthetic corpora, so the suite runs in minutes on 2 cores."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

TINY = [
    "model.num_layers=2", "model.num_heads=2", "model.hidden_dim=32", "model.max_length=16",
    "train.batch_size=8", "train.steps=40", "train.eval_interval=20", "train.steps_per_execution=10",
    "train.eval_batches=2", "train.warmup_steps=5", "generate.max_new_tokens=8",
]


def tiny_config(*overrides):
    """A 2-layer, 32-wide, context-16 GPT config with a character tokenizer."""
    from tfglm.config import load_config

    return load_config(overrides=TINY + list(overrides))


@pytest.fixture
def pattern_file(tmp_path):
    """A perfectly learnable corpus: one short cycle of characters repeated."""
    path = tmp_path / "pattern.txt"
    path.write_text("abcdefgh\n" * 400, encoding="utf-8")
    return str(path)


def requires_shared(*parts):
    path = os.path.join(SHARED_DATA, *parts)
    return pytest.mark.skipif(not os.path.exists(path), reason=f"needs ../shared/data/{'/'.join(parts)}, absent here")


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

    root = tmp_path_factory.mktemp("chat")
    data = root / "conv.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in chat_conversations()))
    sets = ["model.max_length=64", "model.num_layers=2", "model.hidden_dim=64", "chat.epochs=20",
            "chat.learning_rate=3e-3", "generate.max_new_tokens=16"]
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "gpt-char-tiny.yaml")
    assert main(["finetune", "--task", "chat", "--from-scratch", "--config", config, "--train", str(data),
                 "--eval", str(data), "--out", str(root / "run"), *[a for s in sets for a in ("--set", s)]]) == 0
    return str(root / "run")


@pytest.fixture(scope="session")
def chat_base_path(chat_run, tmp_path_factory):
    """The chat run exported without XLA (no compile per shape bucket in the tests): its base path."""
    from tfglm.serving.export import export_run

    base = str(tmp_path_factory.mktemp("chat-export") / "chat")
    export_run(chat_run, base, jit_compile=False)
    return base
