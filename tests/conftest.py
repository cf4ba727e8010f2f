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


CHAT_QA = [("hi", "hello there"), ("what is your name?", "i am tfglm"), ("how are you?", "fine, thanks"),
           ("bye", "see you soon")]


@pytest.fixture(scope="session")
def chat_run_dir(tmp_path_factory):
    """A tiny chat run (2 layers, 64 wide, context 64, characters) that learnt the answers of CHAT_QA from 240
    conversations of 1 to 3 of its pairs (about 30 s); its exports default to 24 new tokens, temperature 0.8."""
    import json
    import random

    from tfglm.cli import main

    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    with open(root / "conversations.jsonl", "w") as f:
        for _ in range(240):
            messages = []
            for question, answer in rng.sample(CHAT_QA, rng.randint(1, 3)):
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    data, run_dir = str(root / "conversations.jsonl"), str(root / "run")
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "gpt-char-tiny.yaml")
    assert main(["finetune", "--task", "chat", "--from-scratch", "--config", config, "--train", data, "--eval", data,
                 "--out", run_dir, "--set", "model.max_length=64", "--set", "model.num_layers=2",
                 "--set", "model.hidden_dim=64", "--set", "chat.epochs=20", "--set", "chat.learning_rate=3e-3",
                 "--set", "generate.max_new_tokens=24"]) == 0
    return run_dir


@pytest.fixture(scope="session")
def chat_base_path(chat_run_dir, tmp_path_factory):
    """The chat run exported without XLA (no compile per shape bucket in the tests): its base path."""
    from tfglm.serving.export import export_run

    base = str(tmp_path_factory.mktemp("chat-export") / "chat")
    export_run(chat_run_dir, base, jit_compile=False)
    return base
