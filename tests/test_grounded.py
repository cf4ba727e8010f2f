"""Grounded chat: retrieval into the chat template's context slot (in the graph, as the export runs it), leave-one-out
retrieval for training conversations, the hand-off below the calibrated threshold, a tiny grounded chat run whose
export answers in a clean interpreter with only TensorFlow and tensorflow-text, and one-line errors for a bad
--knowledge. The encoder is the tiny random sentence-transformers checkpoint of test_checkpoints."""

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

import tfglm
from conftest import SERVER_PREAMBLE
from test_checkpoints import import_sentence_transformers
from tfglm.cli import main
from tfglm.config import generate_settings
from tfglm.data.chat import CONTEXT, ChatTokenizer
from tfglm.data.knowledge import KnowledgeBase
from tfglm.data.tokenizers import CharTokenizer
from tfglm.errors import TfglmError
from tfglm.generation.chat import ChatSession
from tfglm.generation.decode import Generator
from tfglm.preprocessors.grounded import GroundedChatPreprocessor
from tfglm.serving.servable import Servable, SignatureStream
from tfglm.serving.signatures import WARMUP, language_module
from tfglm.tasks.chat import GROUNDING, KNOWLEDGE, Chat, Grounding
from tfglm.tasks.registry import load_run

# Questions in the tiny encoder's vocabulary; each entry's answer is a fact the model could only get from retrieval.
ENTRIES = [("the cat sat on the mat", "cats nap at noon"), ("a good film", "films play at six"),
           ("the dog was very bad", "dogs stay outside"), ("a bad film , very bad", "refunds take a week")]
GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}

LOADER = SERVER_PREAMBLE + r"""
path, roles, contents, greedy = sys.argv[1], *map(json.loads, sys.argv[2:])
out = tf.saved_model.load(path).signatures["chat"](
    roles=tf.constant(roles), contents=tf.constant(contents), **{k: tf.constant(v) for k, v in greedy.items()})
print(json.dumps({"replies": [r.decode() for r in out["replies"].numpy()],
                  "handed_off": out["handed_off"].numpy().tolist(), "score": out["score"].numpy().tolist(),
                  "modules": sorted(m for m in ("tfglm", "keras", "keras_hub") if sys.modules.get(m))}))
"""


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    return import_sentence_transformers(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def embedder(encoder_run):
    run = tfglm.load_run(encoder_run)
    return run.task.embedder(run.model)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    """The training conversations, one per entry, as a question/answer CSV: also the index's entries."""
    path = tmp_path_factory.mktemp("data") / "train.csv"
    path.write_text("question,answer\n" + "".join(f"\"{q}\",{a}\n" for q, a in ENTRIES))
    return str(path)


@pytest.fixture(scope="module")
def index(encoder_run, train_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kb") / "kb")
    assert main(["index", "--model", encoder_run, "--data", train_file, "--out", out]) == 0
    return out


def preprocessor_for(embedder, threshold, top_k=1, context_tokens=40):
    entries = [{"id": str(i), "questions": [q], "answer": a, "intent": None} for i, (q, a) in enumerate(ENTRIES)]
    knowledge = KnowledgeBase.build(entries, embedder)
    tokenizer = ChatTokenizer(CharTokenizer("abcdefghijklmnopqrstuvwxyz ,.\n"))
    return GroundedChatPreprocessor(tokenizer, 96, embedder, knowledge.vectors, knowledge.question_entries(),
                                    [a for _, a in ENTRIES], top_k, context_tokens, threshold, "ask a person")


def test_retrieval_puts_the_expected_entry_in_the_context_slot(embedder):
    preprocessor = preprocessor_for(embedder, threshold=0.5)
    roles = tf.constant([["user", "assistant", "user"]] * len(ENTRIES))
    contents = tf.constant([["hi", "hello", question] for question, _ in ENTRIES])  # the last user turn counts
    retrieved = preprocessor.retrieve(roles, contents)
    assert [c.decode() for c in retrieved["context"].numpy()] == [answer for _, answer in ENTRIES]
    np.testing.assert_allclose(retrieved["score"].numpy(), 1.0, atol=1e-5)
    assert not retrieved["handed_off"].numpy().any()

    # The ids are the chat template's with the context message first: `<eot> <|context|> answer <eot> <|user|> ...`
    ids = preprocessor.chat_ids(roles[:1], contents[:1], 8).to_list()[0]
    tokenizer = preprocessor.tokenizer
    expected, _, _ = tokenizer.encode_chat(tf.constant([[CONTEXT, "user", "assistant", "user"]]),
                                           tf.constant([[ENTRIES[0][1], "hi", "hello", ENTRIES[0][0]]]), 88, True)
    assert ids == expected.to_list()[0] and ids[1] == tokenizer.role_ids[CONTEXT]

    # Two entries, best first, cut to context_tokens characters.
    two = preprocessor_for(embedder, threshold=0.5, top_k=2, context_tokens=20)
    context = two.retrieve(roles[1:2], contents[1:2])["context"].numpy()[0].decode()
    assert len(context) == 20 and context.startswith(ENTRIES[1][1] + "\n\n")


def test_trimming_keeps_the_context_and_system_messages_and_drops_old_turns():
    tokenizer = ChatTokenizer(CharTokenizer("abcdefghijklmnopqrstuvwxyz "))
    roles = [CONTEXT, "system", "user", "assistant", "user"]
    contents = ["facts", "be brief", "an old question", "an old answer", "new"]
    ids, _, dropped = tokenizer.encode_chat(tf.constant([roles]), tf.constant([contents]), 30, True)
    kept, _, _ = tokenizer.encode_chat(tf.constant([[CONTEXT, "system", "user"]]),
                                       tf.constant([["facts", "be brief", "new"]]), 30, True)
    assert int(dropped[0]) == 2 and ids.to_list() == kept.to_list()
    assert tokenizer.role_ids[CONTEXT] in ids.to_list()[0]


def test_hand_off_below_the_threshold_and_not_above(embedder):
    probe = preprocessor_for(embedder, threshold=-1.0)
    queries = ["cat", "very very very", "film", "the the the"]
    scores = probe.retrieve(tf.constant([["user"]] * 4), tf.constant([[q] for q in queries]))["score"].numpy()
    threshold = float(np.median(scores))
    preprocessor = preprocessor_for(embedder, threshold=threshold)
    replies = tf.constant(["generated"] * 4)
    encoded = preprocessor.encode(tf.constant([["user"]] * 4), tf.constant([[q] for q in queries]), 8)
    served = preprocessor.served(encoded, replies, tf.constant([3] * 4))
    below = scores < threshold
    assert below.any() and not below.all()
    assert served["handed_off"].numpy().tolist() == below.tolist()
    assert [r.decode() for r in served["replies"].numpy()] == [
        "ask a person" if b else "generated" for b in below]
    assert served["num_tokens"].numpy().tolist() == [0 if b else 3 for b in below]


def test_training_retrieves_a_follow_up_as_serving_does(index, tmp_path):
    grounding = Grounding.copy(index, str(tmp_path / "run"), {"top_k": 1, "context_tokens": 40,
                                                               "handoff_message": "x"})
    preprocessor = grounding.preprocessor(ChatTokenizer(CharTokenizer("abcdefghijklmnopqrstuvwxyz ,.")), 96)
    conversations = [(["user", "assistant", "user", "assistant"], [ENTRIES[1][0], "fine", follow_up, "ok"])
                     for follow_up in ("very bad", "the cat", ",")]
    grounded, scores = grounding.retrieve(conversations, preprocessor)
    served = preprocessor.retrieve(tf.constant([roles[:3] for roles, _ in conversations]),
                                   tf.constant([contents[:3] for _, contents in conversations]))
    assert [contents[0] for _, contents in grounded] == [c.decode() for c in served["context"].numpy()]
    np.testing.assert_allclose(scores, served["score"].numpy(), atol=1e-5)
    alone = preprocessor.retrieve(tf.constant([["user"]] * 3), tf.constant([[c[2]] for _, c in conversations]))
    assert (served["score"].numpy() >= alone["score"].numpy() - 1e-6).all()  # the better of the two queries


def test_training_conversations_leave_their_own_entry_out(index, tmp_path):
    run_dir = str(tmp_path / "run")
    grounding = Grounding.copy(index, run_dir, {"top_k": 1, "context_tokens": 40, "handoff_message": "x"})
    preprocessor = grounding.preprocessor(ChatTokenizer(CharTokenizer("abcdefghijklmnopqrstuvwxyz ,.")), 96)
    own = [(["user", "assistant"], [q, a]) for q, a in ENTRIES]
    grounded, scores = grounding.retrieve(own, preprocessor)
    assert [roles for roles, _ in grounded] == [[CONTEXT, "user", "assistant"]] * len(ENTRIES)
    contexts = [contents[0] for _, contents in grounded]
    assert all(context != answer for context, (_, answer) in zip(contexts, ENTRIES))
    assert all(context in [a for _, a in ENTRIES] for context in contexts) and (scores < 1 - 1e-4).all()
    # The same question with another answer (not the entry's row) finds the entry itself, as serving would.
    other, scores = grounding.retrieve([(["user", "assistant"], [ENTRIES[2][0], "something else"])], preprocessor)
    assert other[0][1][0] == ENTRIES[2][1] and scores[0] == pytest.approx(1.0, abs=1e-5)


def test_a_share_of_training_conversations_gets_its_own_entry_first(index, tmp_path):
    grounding = Grounding.copy(index, str(tmp_path / "run"), {"top_k": 2, "context_tokens": 40, "handoff_message": "x"})
    preprocessor = grounding.preprocessor(ChatTokenizer(CharTokenizer("abcdefghijklmnopqrstuvwxyz ,.\n")), 96)
    own = [(["user", "assistant"], [q, a]) for q, a in ENTRIES] * 25
    contexts = {share: [contents[0] for _, contents in grounding.retrieve(own, preprocessor, share, seed=3)[0]]
                for share in (0.0, 0.5, 1.0)}
    first = {share: [context.split("\n\n")[0] == answer for context, (_, (_, answer)) in zip(found, own)]
             for share, found in contexts.items()}
    assert not any(first[0.0]) and all(first[1.0])
    assert 0.3 < np.mean(first[0.5]) < 0.7
    # The rest of the slot is the nearest others, the own entry once.
    assert all(len(set(context.split("\n\n"))) == 2 for context in contexts[1.0])
    assert contexts[0.5] == [contents[0] for _, contents in grounding.retrieve(own, preprocessor, 0.5, seed=3)[0]]


def test_own_entry_epochs_train_on_the_own_entry_examples_first(tmp_path):
    """The first chat.own_entry_epochs' steps draw every row of the own-entry examples, the later ones every row of
    the mixed ones, each epoch in a new order."""
    config = tfglm.load_config(overrides=["chat.epochs=3", "chat.own_entry_epochs=1", "chat.batch_size=4"])
    task = Chat(config, str(tmp_path / "run"))
    rows = 12
    ids = np.arange(rows, dtype=np.int32)[:, None].repeat(5, axis=1)  # row r: all r (the mixed examples)
    task.train = ids, np.ones(ids.shape, np.float32)
    task.own_train = ids + 100, np.ones(ids.shape, np.float32)  # row r: all r + 100 (its own entry in the slot)
    task.val = task.train
    train, _ = task.datasets(0)
    steps = [x.numpy()[:, 0] for x, _, _ in train]
    assert len(steps) == 9
    epochs = [np.sort(np.concatenate(steps[e * 3:e * 3 + 3])).tolist() for e in range(3)]
    assert epochs == [list(range(100, 100 + rows)), list(range(rows)), list(range(rows))]
    assert [x.numpy()[:, 0].tolist() for x, _, _ in task.datasets(4)[0]] == [s.tolist() for s in steps[4:]]


@pytest.mark.parametrize("files", [{}, {"val_file"}, {"eval_file"}, {"val_file", "eval_file"}])
def test_the_hand_off_is_calibrated_on_separate_validation_conversations_when_named(index, tmp_path, caplog, files):
    """The validation file's scores (those of the validation conversations), else the evaluation file's, else the
    held-out training conversations' with a warning: their paraphrases in the index make their matches too near."""
    eval_file = tmp_path / "eval.csv"
    eval_file.write_text("question,answer\n\"a bad film , very bad\",x\n\"the cat sat\",y\n")
    paths = {"val_file": str(tmp_path / "val.csv"), "eval_file": str(eval_file)}
    config = tfglm.load_config(overrides=[f"chat.{key}={json.dumps(paths[key])}" for key in files])
    task = Chat(config, str(tmp_path / "run"))
    task.grounding = Grounding.copy(index, task.run_dir, {"top_k": 1, "context_tokens": 40, "handoff_message": "x"})
    preprocessor = task.grounding.preprocessor(ChatTokenizer(CharTokenizer("abcdefghijklmnopqrstuvwxyz ,.")), 96)
    validation = np.array([0.25, 0.5])
    scores = task.calibration_scores(validation, preprocessor)
    if files == {"eval_file"}:
        assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[1] < 1.0
    else:
        assert scores is validation
    assert ("held-out training conversations" in caplog.text) == (not files)


@pytest.fixture(scope="module")
def grounded_run(index, train_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("grounded")
    sets = ["model.max_length=64", "model.num_layers=1", "model.hidden_dim=32", "chat.epochs=2", "chat.batch_size=2",
            "chat.val_fraction=0.5", "chat.context_tokens=24", "chat.handoff_rate=0.5", "generate.max_new_tokens=40"]
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "gpt-char-tiny.yaml")
    run_dir = str(root / "run")
    assert main(["finetune", "--task", "chat", "--from-scratch", "--config", config, "--train", train_file,
                 "--knowledge", index, "--out", run_dir, *[a for s in sets for a in ("--set", s)]]) == 0
    return run_dir


def test_a_grounded_run_keeps_its_knowledge_and_threshold(grounded_run, index):
    knowledge = os.path.join(grounded_run, KNOWLEDGE)
    with open(os.path.join(knowledge, GROUNDING)) as f:
        settings = json.load(f)
    assert settings["index"] == os.path.abspath(index) and settings["top_k"] == 1
    assert settings["context_tokens"] == 24 and -1.0 < settings["threshold"] <= 1.0
    run = load_run(grounded_run)
    assert isinstance(run.task.generator(run.model).preprocessor, GroundedChatPreprocessor)
    assert run.config.chat.knowledge == index


def test_the_export_answers_a_grounded_chat_in_a_clean_interpreter(grounded_run, tmp_path):
    base = str(tmp_path / "models")
    assert main(["export", "--model", grounded_run, "--out", base, "--no-jit-compile"]) == 0
    run = load_run(grounded_run)
    generator = Generator(run.model, run.tokenizer, jit_compile=False, preprocessor=run.task.chat_preprocessor())
    threshold = generator.preprocessor.threshold
    queries = [q for q, _ in ENTRIES] + ["cat", "mat mat mat mat", "film", "xyz qq", ","]
    roles, contents = [["user"]] * len(queries), [[q] for q in queries]
    expected = generator.chat(tf.constant(roles), tf.constant(contents), *GREEDY.values())
    handed_off = expected["handed_off"].numpy().tolist()
    assert not any(handed_off[:len(ENTRIES)]) and any(handed_off), (threshold, expected["score"].numpy())
    out = subprocess.run([sys.executable, "-c", LOADER, os.path.join(base, "1"), json.dumps(roles),
                          json.dumps(contents), json.dumps(GREEDY)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    served = json.loads(out.stdout.strip().splitlines()[-1])
    assert served["modules"] == []
    assert served["replies"] == [r.decode() for r in expected["completions"].numpy()]
    assert served["handed_off"] == handed_off
    np.testing.assert_allclose(served["score"], expected["score"].numpy(), atol=1e-5)
    assert [r for r, h in zip(served["replies"], handed_off) if h] == [run.config.chat.handoff_message] * sum(
        handed_off)

    # The warm-up asks for as many new tokens as leave room for its conversation with the retrieved context, and
    # the version loads (replaying it).
    record = next(iter(tf.data.TFRecordDataset(os.path.join(base, "1", WARMUP))))
    inputs = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request.inputs
    conversation = [tf.make_ndarray(inputs[k]) for k in ("roles", "contents")]
    prompt = len(generator.preprocessor.chat_ids(*map(tf.constant, conversation), 1)[0])
    assert int(tf.make_ndarray(inputs["max_new_tokens"])) == run.config.model.max_length - prompt < 40
    servable = Servable("grounded", 1, os.path.join(base, "1"), max_batch_size=16)
    try:  # `tfglm serve` decodes in its engine and hands off the same rows, whole and streamed
        assert servable.engine is not None
        options = {k: np.array(v, np.float32 if isinstance(v, float) else np.int32) for k, v in GREEDY.items()}
        conversations = {name: np.array([[m.encode() for m in row] for row in rows], object)
                         for name, rows in (("roles", roles), ("contents", contents))}
        out = servable.predict("chat", {**conversations, **options})
        assert [r.decode() for r in out["replies"]] == served["replies"]
        assert out["handed_off"].tolist() == handed_off and out["num_tokens"][handed_off.index(True)] == 0
        off = handed_off.index(True)
        one = servable.prepare("chat", {**{k: v[off:off + 1] for k, v in conversations.items()}, **options})
        stream = servable.stream("chat", one)
        assert "".join(stream) == run.config.chat.handoff_message and stream.finish_reason == "stop"
        # An export served without the engine streams through `chat_start` and `advance`: the same hand-off.
        stream = SignatureStream(servable, "chat", one)
        assert stream.text() == run.config.chat.handoff_message and stream.usage["completion_tokens"] == 0
    finally:
        servable.close()

    # TF Serving's streaming signatures: `chat_start` says which rows are handed off, and `advance` gives them the
    # hand-off message and the others the reply `chat` gives.
    signatures = tf.saved_model.load(os.path.join(base, "1")).signatures
    state = signatures["chat_start"](roles=tf.constant(roles), contents=tf.constant(contents),
                                     max_new_tokens=tf.constant(GREEDY["max_new_tokens"]))
    assert state["handed_off"].numpy().tolist() == handed_off
    np.testing.assert_allclose(state["score"].numpy(), served["score"], atol=1e-5)
    assert state["dropped_turns"].numpy().tolist() == [0] * len(queries)
    names = signatures["advance"].structured_input_signature[1]
    out = signatures["advance"](**{k: state[k] for k in names if k in state},
                                **{k: tf.constant(v) for k, v in GREEDY.items() if k in names},
                                steps=tf.constant(run.config.model.max_length))
    assert [r.decode() for r in out["completions"].numpy()] == served["replies"] and bool(out["finished"])
    assert out["handed_off"].numpy().tolist() == handed_off


def test_the_terminal_chat_hands_off_as_the_chat_signature_does(grounded_run, capsys):
    run = load_run(grounded_run)
    session = run.task.chat_session(run.model, generate_settings(run.config, GREEDY), "")
    preprocessor = session.generator.preprocessor
    queries = [q for q, _ in ENTRIES] + ["cat", "mat mat mat mat", "film", "xyz qq", ","]
    handed_off = preprocessor.retrieve(tf.constant([["user"]] * len(queries)),
                                       tf.constant([[q] for q in queries]))["handed_off"].numpy()
    off, on = queries[handed_off.argmax()], queries[handed_off.argmin()]
    assert handed_off.any() and not handed_off.all()
    message = run.config.chat.handoff_message
    assert "".join(session.stream(off)) == message and session.turns[-1] == ("assistant", message)
    session.reset()
    assert "".join(session.stream(on)) != message

    assert main(["chat", "--model", grounded_run, "--message", off, "--message", on, "--json", "--temperature", "0",
                 "--max-new-tokens", str(GREEDY["max_new_tokens"])]) == 0
    told = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert told[0]["reply"] == message and told[0]["num_tokens"] == 0 and told[1]["reply"] != message


def test_a_grounded_turn_embeds_its_queries_once(grounded_run):
    run = load_run(grounded_run)
    preprocessor = run.task.chat_preprocessor()
    embedder, calls = preprocessor.embedder, []
    preprocessor.embedder = types.SimpleNamespace(
        embed=lambda texts: calls.append(texts) or embedder.embed(texts), tokenizer=embedder.tokenizer,
        encoder=embedder.encoder)
    generator = Generator(run.model, run.tokenizer, jit_compile=False, preprocessor=preprocessor)
    module = language_module(generator, generate_settings(run.config))
    for name in ("chat", "chat_start", "conversation_ids"):  # each traced once: one retrieval in its graph
        calls.clear()
        getattr(module, name).get_concrete_function()
        assert len(calls) == 1, name
    calls.clear()
    ChatSession(generator, "", generate_settings(run.config, GREEDY)).reply(ENTRIES[0][0])
    assert len(calls) == 1


@pytest.mark.parametrize("make, message", [
    (lambda tmp: str(tmp / "absent"), "not an index"),
    (lambda tmp: (tmp / "half").mkdir() or (tmp / "half" / "index.json").write_text("{}") and str(tmp / "half"),
     "not a whole index"),
])
def test_a_bad_knowledge_dir_is_one_line(train_file, tmp_path, capsys, make, message):
    knowledge = make(tmp_path)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "gpt-char-tiny.yaml")
    code = main(["finetune", "--task", "chat", "--from-scratch", "--config", config, "--train", train_file,
                 "--knowledge", knowledge, "--out", str(tmp_path / "run"), "--set", "model.max_length=64", "--set",
                 "chat.context_tokens=24"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and error.startswith("tfglm: error: chat.knowledge: ")
    assert message in error and not (tmp_path / "run").exists()


def test_a_knowledge_base_whose_embed_run_is_gone_is_one_line(index, tmp_path):
    copy = tmp_path / "kb"
    shutil.copytree(index, copy)
    meta = json.loads((copy / "index.json").read_text())
    (copy / "index.json").write_text(json.dumps({**meta, "model": str(tmp_path / "gone")}))
    with pytest.raises(TfglmError, match="chat.knowledge: .*its embed run .* is not there"):
        Grounding.copy(str(copy), str(tmp_path / "run"), {"top_k": 1, "context_tokens": 8, "handoff_message": "x"})
