"""Encoder-decoder translation: masking, cached and beam decoding, a learnable transduction, parallel-data policy,
the CLI and the exported `translate` signature."""

import gzip
import json
import logging
import random
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tfglm.data import parallel
from tfglm.training import runs
from tfglm.tasks.registry import load_run
from tfglm.cli import main
from tfglm.errors import TfglmError
from tfglm.serving.export import export_run
from conftest import SERVER_PREAMBLE
from tfglm.generation.beam import beam_search, greedy_search, translate_texts
from tfglm.models.encoder_decoder import EncoderDecoder
from tfglm.preprocessors import Seq2SeqPreprocessor
from tfglm.tasks.seq2seq import load_translator

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
CONFIG = """
model: {kind: translate, num_layers: 2, num_heads: 2, hidden_dim: 64, max_length: 16}
tokenizer: {kind: sentencepiece, vocab_size: 300}
translate: {pairs: %s, val_pairs: %s, label_smoothing: 0.1, beam_width: 3}
train: {steps: 300, batch_size: 32, learning_rate: 0.003, min_learning_rate: 0.0003, warmup_steps: 30,
        eval_interval: 300, eval_batches: 2, steps_per_execution: 100, jit_compile: false}
"""

# A fresh interpreter with TensorFlow and tensorflow-text's op libraries only, as in tests/test_export.py.
LOADER = SERVER_PREAMBLE + r"""
translate = tf.saved_model.load(sys.argv[1]).signatures["translate"]
print(json.dumps([t.decode() for t in translate(sources=tf.constant(json.loads(sys.argv[2])))["translations"].numpy()]))
"""


def _reversal_pairs(n, seed):
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(n)]
    return [(s, " ".join(reversed(s.split()))) for s in sentences]


def _write_tsv(path, pairs):
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    return str(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny encoder-decoder trained with `tfglm train` to reverse the word order of 1-4 word sentences."""
    root = tmp_path_factory.mktemp("translate")
    config = root / "reverse.yaml"
    config.write_text(CONFIG % (_write_tsv(root / "train.tsv", _reversal_pairs(2000, 0)),
                                _write_tsv(root / "val.tsv", _reversal_pairs(100, 1))))
    run_dir = str(root / "run")
    assert main(["train", "--config", str(config), "--out", run_dir]) == 0
    return run_dir


@pytest.fixture(scope="module")
def translators(run_dir):
    """Greedy and width-3 beam translators of the run (each compiles once per shape, so they are shared)."""
    return {beam: load_translator(run_dir, beam) for beam in (1, 3)}


@pytest.fixture(scope="module")
def held_out():
    return _reversal_pairs(30, 2)


@pytest.fixture(scope="module")
def model():
    model = EncoderDecoder(40, num_layers=2, num_heads=2, hidden_dim=32, max_length=16)
    model.build()
    return model


def test_decoder_never_sees_future_target_tokens_nor_source_padding(model):
    source = tf.constant([[5, 6, 7, 8, 0, 0]])
    target = tf.constant([[1, 9, 10, 11, 12, 13]])
    logits = model({"source_ids": source, "target_ids": target}).numpy()
    changed = model({"source_ids": source, "target_ids": tf.constant([[1, 9, 10, 30, 31, 32]])}).numpy()
    np.testing.assert_allclose(changed[:, :3], logits[:, :3], atol=1e-5)
    assert np.abs(changed[:, 3:] - logits[:, 3:]).max() > 1e-3
    padded = model({"source_ids": tf.pad(source, [[0, 0], [0, 4]]), "target_ids": target}).numpy()
    np.testing.assert_allclose(padded, logits, atol=1e-5)


def _uncached_greedy(model, source_ids, total, eot_id):
    tokens = tf.fill([source_ids.shape[0], 1], eot_id)
    for _ in range(total - 1):
        logits = model({"source_ids": source_ids, "target_ids": tokens})
        tokens = tf.concat([tokens, tf.argmax(logits[:, -1:], axis=-1, output_type=tf.int32)], axis=1)
    return tokens.numpy()


def test_cached_decode_and_width_1_beam_equal_uncached_greedy(model):
    source = tf.constant([[5, 6, 7, 8, 0, 0, 0, 0], [9, 10, 11, 12, 13, 14, 15, 16], [0] * 8], tf.int32)
    expected = _uncached_greedy(model, source, 16, eot_id=1)
    for search in (lambda s: greedy_search(model, s, 16, 1), lambda s: beam_search(model, s, 16, 1, 1, 0.0)):
        tokens, generated = tf.function(search, jit_compile=True)(source)
        before_eot = np.cumsum(expected[:, 1:] == 1, axis=1) == 0
        assert (generated.numpy()[:, 1:] == before_eot).all()
        assert (np.where(before_eot, tokens.numpy()[:, 1:], 0) == np.where(before_eot, expected[:, 1:], 0)).all()


def test_learns_to_reverse_with_greedy_and_beam_search(run_dir, translators, held_out):
    for translator in translators.values():
        assert translate_texts(translator, [s for s, _ in held_out]) == [t for _, t in held_out]
    assert runs.read_metrics(run_dir)[-1]["val_accuracy"] > 0.95


def test_batched_sources_of_different_lengths_equal_each_alone(translators):
    sources = ["red cat", "moon", "tree sun dog blue", "", "green dog"]
    batched = translate_texts(translators[1], sources)
    assert batched == [translate_texts(translators[1], [s])[0] for s in sources]
    assert batched == ["cat red", "moon", "blue dog sun tree", "", "dog green"]


def test_cli_translate_and_evaluate_bleu(run_dir, tmp_path, capsys, caplog):
    pairs = _reversal_pairs(20, 3)
    with gzip.open(tmp_path / "test.src.gz", "wt") as f:
        f.writelines(s + "\n" for s, _ in pairs)
    (tmp_path / "test.ref").write_text("".join(t + "\n" for _, t in pairs))
    assert main(["translate", "--model", run_dir, "--beam", "1", "--json", "red cat dog", "sun " * 20]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == {"text": "red cat dog", "translation": "dog cat red"}
    assert "1 source(s) over the model's context (16 tokens) truncated" in caplog.text
    assert main(["evaluate", "--model", run_dir, "--source", str(tmp_path / "test.src.gz"),
                 "--reference", str(tmp_path / "test.ref")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("BLEU = 100.0  (nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    with open(runs.path(run_dir, "eval.json")) as f:
        result = json.load(f)
    assert result["bleu"] == 100.0 and result["sentences"] == 20 and result["signature"].startswith("nrefs:1")
    assert main(["evaluate", "--model", run_dir, "--data", "x.tsv"]) == 2
    assert "--source and --reference" in capsys.readouterr().err


@pytest.mark.serve
def test_exported_translate_in_a_clean_interpreter_and_served_equals_in_process(run_dir, translators, held_out, tmp_path):
    """The export decodes with the run's beam width (3), one batch of the held-out sources."""
    path = export_run(run_dir, str(tmp_path / "models"))
    sources = [s for s, _ in held_out]
    out = subprocess.run([sys.executable, "-c", LOADER, path, json.dumps(sources)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    expected = translate_texts(translators[3], sources)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected

    from tfglm.serving.client import Client
    from tfglm.serving.serve import Server

    server = Server({"en-de": str(tmp_path / "models")}, port=0, rest_api_port=0, poll_s=60).start()
    try:
        assert Client(f"http://127.0.0.1:{server.rest_port}", "en-de").translate(sources) == expected
        assert Client(f"127.0.0.1:{server.grpc_port}", "en-de", "grpc").translate(sources[:2]) == expected[:2]
    finally:
        server.stop()


def test_misaligned_files_are_rejected_naming_both_counts(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n")
    with gzip.open(tmp_path / "a.de.gz", "wt") as f:
        f.write("eins\nzwei\n")
    with pytest.raises(TfglmError) as e:
        parallel.read_pairs(str(tmp_path / "a.en"), str(tmp_path / "a.de.gz"))
    assert str(e.value) == (f"{tmp_path}/a.en has 3 lines but {tmp_path}/a.de.gz has 2: parallel files must be "
                            f"aligned line by line")
    (tmp_path / "bad.tsv").write_text("a\tb\nc\td\te\n")
    with pytest.raises(TfglmError, match=r"bad.tsv:2: 3 tab-separated fields"):
        parallel.read_pairs(pairs=str(tmp_path / "bad.tsv"))


def test_empty_lines_are_skipped_and_counted(tmp_path, caplog):
    (tmp_path / "s.txt").write_text("one\n\nthree\nfour\n")
    (tmp_path / "t.txt").write_text("eins\nzwei\n \nvier\n")
    with caplog.at_level(logging.WARNING, logger="tfglm"):
        assert parallel.read_pairs(str(tmp_path / "s.txt"), str(tmp_path / "t.txt")) == (["one", "four"],
                                                                                       ["eins", "vier"])
    assert "skipped 2 pair(s) with an empty side (the first on line 2)" in caplog.text


def test_long_sources_truncated_long_targets_dropped_buckets_static(run_dir, caplog):
    _, tokenizer, _, _ = load_run(run_dir)
    sources = ["red " * 20 + "cat", "blue dog", "sun"]
    targets = ["cat red", "dog blue", "moon " * 30]
    preprocessor = Seq2SeqPreprocessor(tokenizer, 16)
    with caplog.at_level(logging.WARNING, logger="tfglm"):
        preprocessor.report_lengths(sources, targets, "pairs.tsv")
    assert "pairs.tsv: 1 source(s) over model.max_length (16 tokens) truncated" in caplog.text
    assert "pairs.tsv: 1 pair(s) dropped: target over model.max_length - 1 (15 tokens)" in caplog.text
    batches = list(preprocessor.dataset(sources, targets, batch_size=2).take(4).as_numpy_iterator())
    assert {x["source_ids"].shape for x, _, _ in batches} == {(2, 8), (2, 16)}  # the long source's bucket is 16
    for x, labels, weights in batches:
        assert x["source_ids"].shape == x["target_ids"].shape == labels.shape
        assert (x["target_ids"][:, 0] == tokenizer.eot_id).all() and ((weights > 0) == (labels != parallel.PAD)).all()
