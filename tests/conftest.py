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
