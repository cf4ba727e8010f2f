"""SavedModel export for TF Serving: loaded without tfglm or Keras, its signatures match the in-process Generator."""

import json
import logging
import os
import random
import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import DOCUMENT
from tfglm.tasks.registry import load_run
from tfglm.cli import main
from tfglm.serving.export import export_run
from tfglm.serving.signatures import WARMUP
from tfglm.generation.decode import Generator

PROMPTS = ["the cat", "", "mat. the", "t"]
GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}

# Runs in a fresh interpreter as a model server would: TensorFlow with tensorflow-text's op libraries, and no tfglm,
# Keras or keras-hub (blocked; tensorflow_text's Python package would import Keras, so only its ops are loaded).
LOADER = r"""
import glob, importlib.util, json, os, sys
sys.modules.update(dict.fromkeys(["tfglm", "keras", "keras_hub", "tf_keras"]))
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

path, prompts, greedy = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    graph = saved_model_pb2.SavedModel.FromString(f.read()).meta_graphs[0].graph_def
functions = {f.signature.name for f in graph.library.function}
ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
not_core = sorted(op for op in ops - functions if op_def_registry.get(op) is None)
text_dir = importlib.util.find_spec("tensorflow_text").submodule_search_locations[0]
for library in glob.glob(os.path.join(text_dir, "python", "ops", "*.so")):
    tf.load_op_library(library)
unknown = sorted(op for op in not_core if op_def_registry.get(op) is None)

def texts(tensor):
    return [t.decode() for t in tensor.numpy()]

loaded = tf.saved_model.load(path)
generate = loaded.signatures["generate"]
def complete(batch):
    out = generate(prompts=tf.constant(batch), **{k: tf.constant(v) for k, v in greedy.items()})
    return texts(out["completions"]), out["num_tokens"].numpy().tolist()

score = loaded.signatures["score"](texts=tf.constant(sys.argv[4:]))
tokens = loaded.signatures["tokenize"](texts=tf.constant(prompts))
# TF Serving runs a SavedModel in a TF1 session and feeds only the inputs a request sends.
with tf.compat.v1.Session(graph=tf.Graph()) as session:
    signature = tf.compat.v1.saved_model.load(session, ["serve"], path).signature_def["serving_default"]
    fetches = {k: v.name for k, v in signature.outputs.items()}
    defaults = session.run(fetches, {signature.inputs["prompts"].name: prompts})
print(json.dumps({
    "ops": sorted(ops - functions), "not_core": not_core, "unknown": unknown,
    "batched": complete(prompts), "alone": [complete([p]) for p in prompts],
    "score": {k: v.numpy().tolist() for k, v in score.items()},
    "roundtrip": texts(loaded.signatures["detokenize"](**tokens)["texts"]),
    "defaults": [[t.decode() for t in defaults["completions"]], defaults["num_tokens"].tolist()],
    "signature_defaults": sorted(signature.defaults),
    "modules": sorted(m for m, module in sys.modules.items()
                      if module and m.split(".")[0] in ("tfglm", "keras", "keras_hub", "tf_keras")),
}))
"""


@pytest.fixture(scope="module")
def base_path(sentence_run, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("models") / "tiny")
    assert export_run(sentence_run, base) == os.path.join(base, "1")
    return base


@pytest.fixture(scope="module")
def random_text():
    rng = random.Random(0)
    return "".join(rng.choice(sorted(set(DOCUMENT))) for _ in range(24))


@pytest.fixture(scope="module")
def served(base_path, random_text):
    """What a fresh interpreter without tfglm or Keras gets from version 1."""
    out = subprocess.run([sys.executable, "-c", LOADER, os.path.join(base_path, "1"), json.dumps(PROMPTS),
                          json.dumps(GREEDY), DOCUMENT * 8, random_text, ""],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _in_process(sentence_run, prompts):
    _, tokenizer, model, _ = load_run(sentence_run)
    generator = Generator(model, tokenizer)  # held: a tf.function method keeps only a weak reference to it
    out = generator.generate(tf.constant(prompts), *GREEDY.values())
    return [t.decode() for t in out["completions"].numpy()], out["num_tokens"].numpy().tolist()


def test_loaded_without_tfglm_or_keras_greedy_equals_generator(served, sentence_run):
    assert served["modules"] == []
    assert served["batched"] == list(_in_process(sentence_run, PROMPTS))
    assert any(served["batched"][1])  # the model does generate something


def test_batched_prompts_of_different_lengths_equal_each_alone(served):
    completions, counts = served["batched"]
    assert [a[0][0] for a in served["alone"]] == completions
    assert [a[1][0] for a in served["alone"]] == counts


def test_session_loader_fills_in_signature_defaults(served):
    """Only `prompts` sent: the run's generate config (greedy, 12 tokens) applies, as in TF Serving."""
    assert served["signature_defaults"] == ["max_new_tokens", "seed", "temperature", "top_k", "top_p"]
    assert served["defaults"] == served["batched"]


def test_graph_holds_only_core_and_tensorflow_text_ops(served):
    assert served["unknown"] == []
    assert served["not_core"] and all(op.startswith("Sentencepiece") for op in served["not_core"])
    assert not {"PyFunc", "PyFuncStateless", "EagerPyFunc"} & set(served["ops"])
    assert "PlaceholderWithDefault" in served["ops"]


def test_score_tokenize_detokenize(served, random_text):
    score = served["score"]
    long, short, empty = score["num_tokens"]
    assert long == 31 and 0 < short < 31 and empty == 0  # a long text is scored on its first context - 1 tokens
    trained, random_chars, _ = score["perplexity"]
    assert all(p == p and p < float("inf") for p in score["perplexity"])
    assert trained < random_chars
    assert served["roundtrip"] == PROMPTS


def test_saved_model_cli_lists_the_signatures(base_path):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    out = subprocess.run([cli, "show", "--all", "--dir", os.path.join(base_path, "1")], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    for name in ("serving_default", "generate", "score", "tokenize", "detokenize", "prompt_ids", "slot_prefill",
                 "slot_step", "output_projection"):
        assert f"signature_def['{name}']" in out
    for name in ("prompts", "max_new_tokens", "completions", "log_likelihood", "perplexity", "token_ids"):
        assert f"['{name}']" in out


def test_warmup_requests_parse_as_prediction_logs(base_path):
    from tensorflow_serving.apis import prediction_log_pb2

    records = list(tf.data.TFRecordDataset(os.path.join(base_path, "1", WARMUP)).as_numpy_iterator())
    logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in records]
    assert len(logs) == 1
    request = logs[0].predict_log.request
    assert request.model_spec.signature_name == "generate"
    assert tf.make_ndarray(request.inputs["prompts"]).tolist() == [b"the"]


def _xla_functions(export_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        library = saved_model_pb2.SavedModel.FromString(f.read()).meta_graphs[0].graph_def.library
    return [f.signature.name for f in library.function if f.attr["_XlaMustCompile"].b]


def test_cli_export_next_version_and_errors(sentence_run, base_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="tfglm")
    assert main(["export", "--model", sentence_run, "--out", base_path, "--no-jit-compile"]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(base_path, "2")
    assert (f"exported version 2 of {base_path}; in Python: import tensorflow_text, then "
            f"tf.saved_model.load({os.path.join(base_path, '2')!r})") in caplog.text
    assert sorted(os.listdir(base_path)) == ["1", "2"]  # no temporary directory left behind
    assert len(_xla_functions(os.path.join(base_path, "1"))) == 4  # prefill, advance; the engine's prefill, step
    assert _xla_functions(os.path.join(base_path, "2")) == []
    assert main(["export", "--model", sentence_run, "--out", base_path, "--version", "2"]) == 2
    assert "version 2 already exists" in capsys.readouterr().err
    assert main(["export", "--model", sentence_run + "-missing", "--out", base_path]) == 2
    assert "no such run directory" in capsys.readouterr().err
