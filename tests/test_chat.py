"""Chat: the template and its tokenizer, the assistant-only loss weights, trimming to the context by whole turns, a
tiny model that learns to answer through the graph and the export, and one-line errors for bad conversation files."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from conftest import NAMES, QA, write_conversations
from tfglm.cli import main
from tfglm.data.chat import MARKERS, ChatTokenizer, as_batch, read_conversations
from tfglm.data.tokenizers import CharTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece
from tfglm.errors import TfglmError
from tfglm.generation.decode import Generator
from tfglm.serving.checks import RequestError
from tfglm.serving.export import export_run
from tfglm.serving.servable import Servable
from tfglm.serving.signatures import WARMUP
from tfglm.training import runs
from tfglm.tasks.registry import load_run

ALPHABET = "abcdefghijklmnopqrstuvwxyz ,?!"


@pytest.fixture(scope="module")
def tokenizer():
    return ChatTokenizer(CharTokenizer(ALPHABET))


@pytest.fixture(scope="module", params=["char", "sentencepiece"])
def any_tokenizer(request):
    if request.param == "char":
        return ChatTokenizer(CharTokenizer(ALPHABET))
    lines = ["be brief", "hi there", "hello, how are you?", "see you soon"] * 50
    return ChatTokenizer(SentencePieceTokenizer(train_sentencepiece(lines, vocab_size=300)))


def _encode(tokenizer, conversation, budget=1000, generation_prompt=False):
    roles, contents = zip(*conversation)
    ids, weights, dropped = tokenizer.encode_chat(tf.constant([roles]), tf.constant([contents]), budget,
                                                  generation_prompt)
    return ids.to_list()[0], weights.to_list()[0], int(dropped[0])


def test_template_layout_and_save_load_round_trip(any_tokenizer, tmp_path):
    tokenizer = any_tokenizer
    conversation = [("system", "be brief"), ("user", "hi"), ("assistant", "hello")]
    ids, _, _ = _encode(tokenizer, conversation, generation_prompt=True)
    base = tokenizer.base
    text = lambda s: base.tokenize(tf.constant([s])).to_list()[0]  # noqa: E731
    system, user, assistant = (tokenizer.role_ids[r] for r in ("system", "user", "assistant"))
    eot = tokenizer.eot_id
    assert ids == ([eot, system] + text("be brief") + [eot, user] + text("hi") + [eot, assistant] + text("hello")
                   + [eot, assistant])
    assert list(tokenizer.role_ids) == ["system", "user", "assistant", "context"]
    assert sorted(tokenizer.role_ids.values()) == list(range(base.vocab_size, base.vocab_size + 4))
    assert tokenizer.detokenize(tf.ragged.constant([ids])).numpy()[0] == b"be briefhihello"  # markers write nothing
    # A user typing a marker gets its characters, never the marker's id.
    assert max(tokenizer.tokenize(tf.constant(["<|assistant|>"])).to_list()[0]) < base.vocab_size

    tokenizer.save(str(tmp_path))
    with open(tmp_path / "tokenizer.json") as f:
        assert json.load(f)["chat_markers"] == list(MARKERS)
    loaded = load_tokenizer(str(tmp_path))
    assert isinstance(loaded, ChatTokenizer) and loaded.vocab_size == tokenizer.vocab_size
    assert _encode(loaded, conversation, generation_prompt=True)[0] == ids
    # A run saved before the context marker keeps its three markers, its vocabulary size and its ids.
    with open(tmp_path / "tokenizer.json") as f:
        spec = json.load(f)
    with open(tmp_path / "tokenizer.json", "w") as f:
        json.dump({**spec, "chat_markers": list(MARKERS[:3])}, f)
    older = load_tokenizer(str(tmp_path))
    assert older.vocab_size == base.vocab_size + 3 and _encode(older, conversation, generation_prompt=True)[0] == ids


def test_loss_weights_cover_exactly_the_assistant_tokens(tokenizer):
    conversation = [("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "see you")]
    ids, weights, _ = _encode(tokenizer, conversation)
    assistant_id, eot = tokenizer.role_ids["assistant"], tokenizer.eot_id
    expected, role = [], None
    for token in ids:  # a position is learnt iff it lies after <|assistant|>, up to and including its <eot>
        if token >= tokenizer.base.vocab_size:
            role = token
            expected.append(0.0)
            continue
        expected.append(1.0 if role == assistant_id else 0.0)
        if token == eot:
            role = None
    assert weights == expected
    assert sum(weights) == len("hello") + len("see you") + 2


def test_trimming_drops_whole_oldest_turns_and_keeps_the_system_message(tokenizer):
    conversation = [("system", "sys"), ("user", "aaaa"), ("assistant", "bbbb"), ("user", "cc"), ("assistant", "dd")]
    full, _, dropped = _encode(tokenizer, conversation)
    assert dropped == 0 and len(full) == 1 + 5 + 6 + 6 + 4 + 4
    # Room for the system message and the last two messages only: the first exchange goes, whole.
    ids, weights, dropped = _encode(tokenizer, conversation, budget=1 + 5 + 4 + 4)
    assert dropped == 2
    assert ids == _encode(tokenizer, [conversation[0]] + conversation[3:])[0]
    assert sum(weights) == len("dd") + 1
    # Room for the first reply too but not its question: the reply goes with it, so what is kept starts with a user.
    ids, _, dropped = _encode(tokenizer, conversation, budget=1 + 5 + 6 + 4 + 4)
    assert dropped == 2 and ids == _encode(tokenizer, [conversation[0]] + conversation[3:])[0]
    # A conversation to answer likewise: the system message, then whole exchanges, oldest dropped first.
    asked = conversation[:4]
    ids, _, dropped = _encode(tokenizer, asked, budget=1 + 5 + 6 + 4 + 1, generation_prompt=True)
    assert dropped == 2 and ids == _encode(tokenizer, [asked[0], asked[3]], generation_prompt=True)[0]
    # Too small even for the last message: it is kept whole (the caller cuts or drops the row).
    ids, _, dropped = _encode(tokenizer, conversation, budget=3)
    assert dropped == 3 and ids == _encode(tokenizer, [conversation[0], conversation[-1]])[0]


def test_a_tiny_model_learns_to_answer_in_the_graph_and_through_the_export(chat_run, chat_base_path):
    with open(os.path.join(chat_run, runs.EVAL)) as f:
        scores = json.load(f)
    assert scores["perplexity"] < 1.2 and scores["assistant_tokens"] > 1000
    run = load_run(chat_run)
    assert run.task.name == "chat"
    questions = [q for q, _ in QA]
    roles = tf.constant([["user"]] * len(QA))
    greedy = (tf.constant(24), tf.constant(0.0), tf.constant(0), tf.constant(1.0), tf.constant(0))
    generator = run.task.generator(run.model)  # held: a tf.function method keeps only a weak reference to it
    out = generator.chat(roles, tf.constant([[q] for q in questions]), *greedy)
    assert [r.decode() for r in out["completions"].numpy()] == [a for _, a in QA]

    served = tf.saved_model.load(os.path.join(chat_base_path, "1"))
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
    out = served.signatures["chat"](roles=roles, contents=tf.constant([[q] for q in questions]),
                                    **dict(zip(names, greedy)))
    assert [r.decode() for r in out["replies"].numpy()] == [a for _, a in QA]
    assert out["num_tokens"].numpy().tolist() == [len(a) for _, a in QA]


# A chat export's `chat` signature in a fresh interpreter with TensorFlow and tensorflow-text's ops only.
CHAT_LOADER = r"""
import glob, importlib.util, json, os, sys
sys.modules.update(dict.fromkeys(["tfglm", "keras", "keras_hub", "tf_keras"]))
import tensorflow as tf

for library in glob.glob(os.path.join(importlib.util.find_spec("tensorflow_text").submodule_search_locations[0],
                                      "python", "ops", "*.so")):
    tf.load_op_library(library)
path, roles, contents, greedy = sys.argv[1], *map(json.loads, sys.argv[2:])
out = tf.saved_model.load(path).signatures["chat"](
    roles=tf.constant(roles), contents=tf.constant(contents), **{k: tf.constant(v) for k, v in greedy.items()})
print(json.dumps({"replies": [r.decode() for r in out["replies"].numpy()],
                  "num_tokens": out["num_tokens"].numpy().tolist(),
                  "modules": sorted(m for m, module in sys.modules.items()
                                   if module and m.split(".")[0] in ("tfglm", "keras", "keras_hub"))}))
"""


def test_chat_signature_loaded_without_tfglm_equals_generator_chat(chat_run, chat_base_path):
    roles, contents = as_batch([(["user"], ["what is your name?"]),
                                (["system", "user", "assistant", "user"], ["be brief", "hi", "hello there", "bye"])])
    greedy = {"max_new_tokens": 20, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}
    out = subprocess.run([sys.executable, "-c", CHAT_LOADER, os.path.join(chat_base_path, "1"), json.dumps(roles),
                          json.dumps(contents), json.dumps(greedy)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    served = json.loads(out.stdout.strip().splitlines()[-1])
    run = load_run(chat_run)
    generator = Generator(run.model, run.tokenizer, jit_compile=False)  # held: the tf.function keeps a weak reference
    expected = generator.chat(tf.constant(roles), tf.constant(contents), *greedy.values())
    assert served["modules"] == []
    assert served["replies"] == [r.decode() for r in expected["completions"].numpy()]
    assert served["replies"][0] == "i am tfglm"
    assert served["num_tokens"] == expected["num_tokens"].numpy().tolist()


def test_an_export_whose_default_fills_the_context_warms_up_with_fewer_new_tokens(chat_run, tmp_path):
    """The chat signature refuses a conversation that does not fit beside `max_new_tokens`; with the run's default at
    context - 1, the warm-up conversation asks for as many new tokens as leave it room, and the version loads."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(chat_run, run_dir)
    config = runs.read_json(runs.path(run_dir, runs.CONFIG))
    context = config["model"]["max_length"]
    config["generate"]["max_new_tokens"] = context - 1
    runs.write_json(runs.path(run_dir, runs.CONFIG), config)
    path = export_run(run_dir, str(tmp_path / "models"), jit_compile=False)

    record = next(iter(tf.data.TFRecordDataset(os.path.join(path, WARMUP))))
    inputs = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request.inputs
    conversation = {k: tf.make_ndarray(inputs[k]) for k in ("roles", "contents")}
    tokens = len(load_run(run_dir).tokenizer.encode_chat(*map(tf.constant, conversation.values()), context,
                                                         generation_prompt=True)[0][0])
    assert int(tf.make_ndarray(inputs["max_new_tokens"])) == context - tokens
    served = Servable("chat", 1, path, max_batch_size=1)  # replays the warm-up request
    with pytest.raises(RequestError, match=f"context of {context} less {context - 1} new tokens leaves 1"):
        served.predict("chat", conversation)


def test_evaluate_scores_the_generated_last_replies_and_their_intents(chat_run, tmp_path, capsys):
    conversations = [[(q, a)] for q, a in QA] + [[(f"my name is {name}", f"hi {name}"), ("what is my name?", name)]
                                                 for name in NAMES]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": role, "content": text} for q, a in turns
                                                     for role, text in (("user", q), ("assistant", a))],
                                        "intent": "name" if turns[-1][1] in NAMES else turns[-1][1]}) + "\n"
                            for turns in conversations))
    assert main(["evaluate", "--model", chat_run, "--data", str(data), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["conversations"] == len(conversations) and result["loss"] < 0.2
    # The tiny model answers these exactly, so its last replies are the references.
    assert (result["replies"], result["chrf"], result["rouge_l"]) == (len(conversations), 100.0, 100.0)
    assert result["intent_accuracy"] == 1.0 and result["intents"] == len(QA) + 1
    assert result["max_new_tokens"] == 16 and result["replies_at_limit"] == 0
    assert result["samples"][1] == {"conversation": [QA[1][0]], "reply": QA[1][1], "reference": QA[1][1]}
    assert out[0].startswith(f"BLEU = {result['bleu']}  chrF = 100.0  ROUGE-L = 100.0  intent accuracy = 1.0  (")
    with open(os.path.join(chat_run, runs.EVAL)) as f:
        assert json.load(f) == result

    # Replies cut at 2 new tokens score lower, and are counted; a table without intents scores none.
    table = tmp_path / "qa.csv"
    table.write_text("question,answer\n" + "".join(f"{q},\"{a}\"\n" for q, a in QA))
    assert main(["evaluate", "--model", chat_run, "--data", str(table), "--max-new-tokens", "2"]) == 0
    cut = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cut["replies_at_limit"] == len(QA) and cut["rouge_l"] < 50 and "intent_accuracy" not in cut
    assert main(["evaluate", "--model", chat_run, "--data", str(table), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "tfglm: error: --batch-size: must be >= 1, got 0\n"


def test_lora_chat_fine_tune_trains_the_embeddings_with_the_lora_factors(chat_run, tmp_path):
    data = write_conversations(tmp_path / "conv.jsonl", 200, seed=2)
    run_dir = str(tmp_path / "lora")
    assert main(["finetune", "--task", "chat", "--model", chat_run, "--train", data, "--out", run_dir,
                 "--set", "train.lora_rank=2", "--set", "chat.epochs=1", "--set", "chat.learning_rate=1e-2"]) == 0
    before, after = load_run(chat_run).model, load_run(run_dir).model
    markers = slice(before.vocab_size - 3, None)
    embeddings = [m.token_embedding.embeddings.numpy() for m in (before, after)]
    assert np.abs(embeddings[0][markers] - embeddings[1][markers]).max() > 1e-3  # the markers' rows trained
    qkv = [m.blocks[0].attention.qkv.kernel.numpy() for m in (before, after)]
    assert np.abs(qkv[0] - qkv[1]).max() > 1e-4  # the LoRA update, merged into the saved kernel
    norms = [m.final_norm.gamma.numpy() for m in (before, after)]
    np.testing.assert_array_equal(norms[0], norms[1])  # frozen


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', r"conv.jsonl:2: invalid JSON"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', r"conv.jsonl:2: message 1: unknown role 'robot'"),
    ('{"messages": []}', r"conv.jsonl:2: expected .* with at least one message"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"conv.jsonl:2: the conversation has no assistant message"),
    ('{"messages": [{"role": "user", "content": 5}]}', r"conv.jsonl:2: message 1: expected"),
])
def test_bad_conversation_files_are_one_line_errors(tmp_path, content, message):
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
    path = tmp_path / "conv.jsonl"
    path.write_text(good + "\n" + content + "\n")
    with pytest.raises(TfglmError, match=message) as error:
        read_conversations(str(path))
    assert "\n" not in str(error.value)


def test_question_answer_tables_and_cli_errors(tmp_path, capsys):
    table = tmp_path / "qa.tsv"
    table.write_text("q\ta\nhi\thello\n")
    assert read_conversations(str(table), "q", "a") == [(["user", "assistant"], ["hi", "hello"])]
    with pytest.raises(TfglmError, match=r"qa.tsv:2: no column 'question' \(has: q, a\)"):
        read_conversations(str(table))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["finetune", "--task", "chat", "--from-scratch", "--config", "configs/gpt-char-tiny.yaml",
                 "--train", str(bad), "--eval", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tfglm: error: {bad}:1: the conversation has no assistant message (nothing to learn)"


def test_a_long_conversation_is_split_at_turn_boundaries_and_every_reply_is_learnt(tokenizer):
    from tfglm.tasks.chat import encode

    turns = [("system", "be kind")] + [(role, f"{word} {i}") for i, word in enumerate("abcdefghij")
                                       for role in ("user", "assistant")]
    conversation = ([r for r, _ in turns], [t for _, t in turns])
    ids, weights = encode(tokenizer, [conversation], 32, "conv.jsonl")
    replies = sum(len(t) + 1 for r, t in turns if r == "assistant")  # each reply's text and its closing <eot>
    assert len(ids) > 3 and weights.sum() == replies
    system = _encode(tokenizer, [turns[0]])[0]
    for row in ids:  # each piece opens with the system message, then whole messages
        assert list(row[:len(system)]) == system
    assert len(encode(tokenizer, [conversation], 1000, "conv.jsonl")[0]) == 1


def test_long_exchanges_are_cut_from_the_right_or_dropped_never_learnt_without_their_question(tokenizer, caplog):
    from tfglm.tasks.chat import encode

    user, assistant = tokenizer.role_ids["user"], tokenizer.role_ids["assistant"]
    short = (["user", "assistant"], ["hi", "hello"])
    long_reply = (["user", "assistant"], ["where is it?", "b" * 40])
    long_question = (["user", "assistant"], ["a" * 40, "yes"])
    with caplog.at_level(logging.INFO, logger="tfglm"):
        ids, weights = encode(tokenizer, [short, long_reply, long_question], 25, "conv.jsonl", long="cut")
    assert len(ids) == 2  # the long question leaves no room for its reply: nothing to learn
    row = list(ids[1])
    assert row[:2] == [tokenizer.eot_id, user] and assistant in row  # the question whole, then the reply's start
    assert weights[1].sum() == 25 - row.index(assistant) - 1
    assert "2 exchange(s) longer than the context (24 tokens) on their own: the question kept" in caplog.text
    assert "1 example(s) with no reply within the context (24 tokens) left out" in caplog.text

    ids, weights = encode(tokenizer, [short, long_reply, long_question], 25, "conv.jsonl", long="drop")
    assert len(ids) == 1 and weights.sum() == len("hello") + 1
    with pytest.raises(TfglmError, match="conv.jsonl: no conversation has an assistant token"):
        encode(tokenizer, [long_reply], 25, "conv.jsonl", long="drop")


def test_a_split_conversation_keeps_each_reply_with_the_question_it_answers(tokenizer):
    from tfglm.tasks.chat import encode

    # Exchanges of 22 and 19 template tokens, not both within 32: a split by messages alone would keep "answer 1"
    # with the second exchange, apart from its question.
    conversation = (["user", "assistant", "user", "assistant"], ["question 1", "answer 1", "q", "a longer reply"])
    ids, weights = encode(tokenizer, [conversation], 33, "conv.jsonl")
    assert len(ids) == 2
    user = tokenizer.role_ids["user"]
    for row in ids:
        assert list(row[:2]) == [tokenizer.eot_id, user]  # every piece opens with the user's question
    assert weights.sum() == len("answer 1") + len("a longer reply") + 2


@pytest.mark.parametrize("reply_tokens, max_new_tokens, expected", [
    ([150] * 96 + [200] * 4, 64, "generate.max_new_tokens 64 cuts 100% of the training replies short (95% end within "
                                 "150 tokens); consider --set generate.max_new_tokens=152"),
    ([150] * 96 + [200] * 4, 160, None),
    ([20] * 100, 400, "generate.max_new_tokens 400 leaves a reply only 112 tokens of the conversation before it "
                      "(context 512), and 95% of the training replies end within 20 tokens; consider --set "
                      "generate.max_new_tokens=24"),
    ([300] * 100, 64, "consider --set generate.max_new_tokens=304 and a longer model.max_length"),
])
def test_length_advice_reads_the_replies(reply_tokens, max_new_tokens, expected):
    from tfglm.tasks.chat import length_advice

    advice = length_advice(np.array(reply_tokens), max_new_tokens, 512)
    if expected is None:
        assert advice is None
    else:
        assert expected in advice


def test_conversations_to_answer_end_with_the_users_turn(tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "hi"}\n{"messages": [{"role": "user", "content": "a"}, '
                         '{"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}\n')
    assert read_conversations(str(questions), answered=False) == [(["user"], ["hi"]),
                                                                  (["user", "assistant", "user"], ["a", "b", "c"])]
    table = tmp_path / "questions.csv"
    table.write_text("question,id\nwhere is my order?,1\n")
    assert read_conversations(str(table), answered=False) == [(["user"], ["where is my order?"])]
    answered = tmp_path / "answered.jsonl"
    answered.write_text('{"question": "hi"}\n{"messages": [{"role": "user", "content": "a"}, '
                        '{"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(TfglmError, match=r"answered.jsonl:2: the conversation's last message is the assistant's; "
                                         r"expected the user's turn to answer"):
        read_conversations(str(answered), answered=False)
    with pytest.raises(TfglmError, match=r"answered.jsonl:1: no column 'answer' \(has: question\)"):
        read_conversations(str(answered))
