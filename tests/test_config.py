import glob
import os

import pytest

from conftest import SHARED_DATA, requires_shared
from tfglm import load_config
from tfglm.data.chat import read_conversations, read_intents
from tfglm.errors import TfglmError

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.model.hidden_dim % config.model.num_heads == 0


def test_nanogpt_recipe_config():
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "gpt-char-tiny.yaml"))
    m, t = config.model, config.train
    assert (m.num_layers, m.num_heads, m.hidden_dim, m.max_length, t.batch_size) == (4, 4, 128, 64, 12)
    assert config.tokenizer.kind == "char"


def test_support_config_holds_a_question_retrieved_entries_and_a_reply_in_subwords():
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "support.yaml"))
    assert config.tokenizer.kind == "sentencepiece" and config.model.max_length == 512
    assert config.generate.max_new_tokens <= config.model.max_length // 2 and config.chat.long == "cut"


@requires_shared("bitext-customer-support", "val.csv")
def test_support_config_reads_bitext_as_it_comes():
    c = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "support.yaml")).chat
    path = os.path.join(SHARED_DATA, "bitext-customer-support", "val.csv")
    conversations = read_conversations(path, c.question_column, c.answer_column)
    intents = read_intents(path, c.intent_column)
    assert len(conversations) == len(intents) > 100 and len(set(intents)) == 27
    assert all(roles == ["user", "assistant"] and all(contents) for roles, contents in conversations)


def test_dotted_overrides_are_typed():
    config = load_config(overrides=["train.steps=500", "model.dropout=0.1", "data.files=[a.txt, b.txt]",
                                    "generate.prompt=Hello there", "train.learning_rate=2e-3"])
    assert config.train.steps == 500 and config.model.dropout == 0.1 and config.train.learning_rate == 0.002
    assert config.data.files == ["a.txt", "b.txt"] and config.generate.prompt == "Hello there"


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=3"], "train.stepz: unknown key"),
    (["optimizer.lr=3"], "optimizer: unknown section"),
    (["train.steps=many"], "train.steps: expected int"),
    (["train.jit_compile=3"], "train.jit_compile: expected bool"),
    (["train.learning_rate=fast"], "train.learning_rate: expected float"),
    (["model.hidden_dim=130"], "model.hidden_dim: must be a positive multiple of model.num_heads"),
    (["train.eval_interval=300"], "train.eval_interval: must divide train.steps"),
    (["tokenizer.kind=words"], "tokenizer.kind"),
    (["generate.top_p=0"], "generate.top_p"),
    (["train.steps"], "expected KEY=VALUE"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(TfglmError, match=message.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: 2\n  hidden_dim: [1,\n")
    with pytest.raises(TfglmError, match=r"bad\.yaml: line \d+: invalid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model: {layers: 2}\n")
    with pytest.raises(TfglmError, match=r"unknown\.yaml: model\.layers: unknown key"):
        load_config(str(unknown))
    with pytest.raises(TfglmError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
