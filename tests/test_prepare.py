"""`tfglm prepare` (Apache Beam) and training that streams its shards."""

import collections
import json
import os
import random
import shutil

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

beam = pytest.importorskip("apache_beam", reason="tfglm prepare needs Apache Beam (pip install 'tfglm[beam]')")

from conftest import TINY, fit_with, stop_at_step, tiny_config  # noqa: E402
from tfglm.cli import main  # noqa: E402
from tfglm.data import corpus, prepare as preparing, shards  # noqa: E402
from tfglm.data.prepare import prepare  # noqa: E402
from tfglm.data.tokenizers import CharTokenizer  # noqa: E402
from tfglm.errors import TfglmError  # noqa: E402
from tfglm.training import runs  # noqa: E402
from tfglm.tasks.causal_lm import CausalLM  # noqa: E402
from tfglm.tasks.masked_lm import pretraining_dataset  # noqa: E402
from tfglm.tasks.registry import load_run  # noqa: E402
from tfglm.training.trainer import train  # noqa: E402

IN_PROCESS = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]  # Beam's options: no worker processes
WORDS = "the cat sat on a mat while dogs ran over hills and rivers".split()
UNIQUE, COPIES = 240, 15


def documents(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + f" {i}" for i in range(n)]


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({field: t}) + "\n" for t in texts)
    return str(path)


def corpus_texts():
    """UNIQUE documents and the first COPIES of them again."""
    docs = documents(UNIQUE)
    return docs + docs[:COPIES]


def split_documents(ids, tokenizer):
    """The texts of a token stream, each document ending with <eot>."""
    splits = np.concatenate([[0], np.flatnonzero(ids == tokenizer.eot_id) + 1])
    return [t.decode() for t in tokenizer.detokenize(tf.RaggedTensor.from_row_splits(ids, splits)).numpy()]


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    """The corpus of `corpus_texts`, a null text and an empty document, prepared through the command line, Beam's
    options passed through."""
    root = tmp_path_factory.mktemp("prepare")
    source = write_jsonl(root / "corpus.jsonl", corpus_texts())
    with open(source, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": None}) + "\n" + json.dumps({"text": "  "}) + "\n")
    out = str(root / "shards")
    sets = [arg for setting in TINY for arg in ("--set", setting)]
    assert main(["prepare", *sets, "--data", source, "--out", out, *IN_PROCESS]) == 0
    return out


def test_duplicates_short_and_null_documents_are_dropped_and_counted(prepared_dir):
    with open(os.path.join(prepared_dir, shards.MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["documents"] == {"read": UNIQUE + COPIES + 1, "kept": UNIQUE, "duplicates": COPIES,
                                     "too_short": 1, "too_long": 0, "no_text": 1, "binary_files": 0}
    # A character tokenizer: each kept document is its characters and one <eot>, every one once.
    assert manifest["train_tokens"] + manifest["validation_tokens"] == sum(len(d) + 1 for d in documents(UNIQUE))
    assert 0 < manifest["validation_tokens"] < manifest["train_tokens"]
    prepared = shards.Prepared(prepared_dir)
    tokenizer = shards.read_tokenizer(prepared.tokenizer_dir)
    texts = split_documents(prepared.streams["train"].window(0, prepared.streams["train"].num_tokens), tokenizer)
    assert len(texts) == len(set(texts)) and set(texts) < set(documents(UNIQUE))


def test_parquet_and_jsonl_inputs_give_the_same_token_stream(tmp_path, prepared_dir):
    """The same documents, in a Parquet file of three row groups (three units of work) under another field name,
    NFC-normalized alike."""
    texts = corpus_texts()
    texts[0] = texts[0].replace("the", "the cafe\u0301", 1)  # decomposed é: NFC makes it one character
    table = pa.table({"id": list(range(len(texts))), "body": texts})
    pq.write_table(table, tmp_path / "corpus.parquet", row_group_size=100)
    write_jsonl(tmp_path / "corpus.jsonl", texts, field="body")
    streams = {}
    for name in ("corpus.parquet", "corpus.jsonl"):
        out = str(tmp_path / (name + ".shards"))
        prepare(tiny_config("data.text_field=body"), [str(tmp_path / name)], out, IN_PROCESS)
        stream = shards.Prepared(out).streams["train"]
        streams[name] = stream.window(0, stream.num_tokens)
    assert len(shards.Prepared(str(tmp_path / "corpus.parquet.shards")).manifest["splits"]["train"]) == 3
    np.testing.assert_array_equal(streams["corpus.parquet"], streams["corpus.jsonl"])
    tokenizer = shards.read_tokenizer(str(tmp_path / "corpus.jsonl.shards" / shards.TOKENIZER))
    assert "\u00e9" in tokenizer.chars and "\u0301" not in tokenizer.chars


def test_shard_batches_are_the_in_memory_batches_and_resume_at_any_step(prepared_dir):
    prepared = shards.Prepared(prepared_dir)
    stream = prepared.streams["train"]
    tokens = stream.window(0, stream.num_tokens)
    args = (16, 8, 1337)
    from_shards = [b[0].numpy() for b in prepared.train_dataset(*args, 0, 6)]
    in_memory = [b[0].numpy() for b in corpus.train_dataset(tokens, *args, 0, 6)]
    resumed = [b[0].numpy() for b in prepared.train_dataset(*args, 3, 3)]
    np.testing.assert_array_equal(from_shards, in_memory)
    np.testing.assert_array_equal(from_shards[3:], resumed)


def test_two_workers_read_disjoint_shares_of_each_batch(prepared_dir):
    whole = [b[0].numpy() for b in shards.Prepared(prepared_dir).train_dataset(16, 8, 1337, 0, 4)]
    parts, read = [], []
    for worker in (0, 1):
        prepared = shards.Prepared(prepared_dir)
        stream = prepared.streams["train"]
        blocks = stream.blocks
        stream.blocks = lambda starts, length: (read.append((worker, len(starts))), blocks(starts, length))[1]
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=2)
        parts.append([b[0].numpy() for b in prepared.train_dataset(16, 8, 1337, 0, 4, context)])
    for step in range(4):
        np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]), whole[step])
    assert sorted(read) == [(0, 4)] * 4 + [(1, 4)] * 4  # each worker read its 4 rows of each batch, no more


def prepared_config(prepared_dir):
    return tiny_config(f"data.files=[{prepared_dir}]", "model.dropout=0.0")


@pytest.fixture(scope="module")
def prepared_run(prepared_dir, tmp_path_factory):
    """A run trained on the prepared corpus without interruption: what a resumed run must end as, and what
    `tfglm evaluate` scores."""
    run_dir = str(tmp_path_factory.mktemp("prepared-run") / "run")
    train(prepared_config(prepared_dir), run_dir, verbose=0)
    return run_dir


def test_prepare_train_resume_gives_the_uninterrupted_run(tmp_path, prepared_dir, prepared_run, monkeypatch):
    config = prepared_config(prepared_dir)
    run_dir = str(tmp_path / "run")
    monkeypatch.setattr(keras.Model, "fit", fit_with(keras.Model.fit, stop_at_step(30)))
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir, verbose=0)
    monkeypatch.undo()
    train(config, run_dir, resume=True, verbose=0)
    assert [r["step"] for r in runs.read_metrics(run_dir)] == [20, 40]
    resumed, uninterrupted = load_run(run_dir, runs.LAST).model, load_run(prepared_run, runs.LAST).model
    for a, b in zip(resumed.weights, uninterrupted.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    assert shards.tokenizer_hash(runs.path(run_dir, runs.TOKENIZER)) == \
        shards.Prepared(prepared_dir).tokenizer_sha256


def test_a_broken_shard_is_one_line_naming_it(tmp_path, prepared_dir, capsys):
    broken = str(tmp_path / "broken")
    shutil.copytree(prepared_dir, broken)
    shard = os.path.join(broken, "train-00000.bin")
    with open(shard, "r+b") as f:
        f.truncate(1001)
    sets = [arg for setting in TINY for arg in ("--set", setting)]
    assert main(["train", *sets, "--data", broken, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"tfglm: error: {shard}: broken shard (1001 bytes; the manifest says "
        f"{shards.Prepared(prepared_dir).streams['train'].num_tokens} uint16 tokens); prepare the corpus again"]


def test_a_run_whose_tokenizer_is_not_the_manifests_is_one_line_naming_it(tmp_path, prepared_dir):
    run_dir = str(tmp_path / "run")
    os.makedirs(runs.path(run_dir, runs.TOKENIZER))
    CharTokenizer("abc").save(runs.path(run_dir, runs.TOKENIZER))
    task = CausalLM(tiny_config(f"data.files=[{prepared_dir}]"), run_dir)
    with pytest.raises(TfglmError) as error:
        task.prepare(resume=True, chief=True)
    message = str(error.value)
    assert "\n" not in message and message.startswith(os.path.join(prepared_dir, shards.MANIFEST) + ": ")
    assert "another tokenizer" in message


def test_a_corpus_with_no_document_left_is_one_line(tmp_path):
    source = write_jsonl(tmp_path / "short.jsonl", ["ab", "cd"])
    with pytest.raises(TfglmError, match=r"^data: no document left to prepare \(2 read, 2 too short"):
        prepare(tiny_config("data.min_chars=10"), [source], str(tmp_path / "out"), IN_PROCESS)


def test_a_sentencepiece_vocabulary_is_trained_on_a_sample_and_round_trips_the_documents(tmp_path, monkeypatch):
    docs = documents(120, seed=1)
    source = write_jsonl(tmp_path / "corpus.jsonl", docs)
    out = str(tmp_path / "shards")
    pipelines, run = [], beam.Pipeline.run
    monkeypatch.setattr(beam.Pipeline, "run", lambda self, *args: (pipelines.append(self), run(self, *args))[1])
    manifest = prepare(tiny_config("tokenizer.kind=sentencepiece", "tokenizer.vocab_size=300"), [source], out,
                       IN_PROCESS)
    assert len(pipelines) == 1  # scan, tokenizer and shards in one pipeline: the runner starts once
    assert manifest["tokenizer_kind"] == "sentencepiece" and manifest["dtype"] == "uint16"
    prepared = shards.Prepared(out)
    tokenizer = shards.read_tokenizer(prepared.tokenizer_dir)
    texts = []
    for stream in prepared.streams.values():
        ids = stream.window(0, stream.num_tokens)
        texts += split_documents(ids, tokenizer)
    assert sorted(texts) == sorted(docs)


def test_a_causal_corpus_indexes_its_documents(prepared_dir):
    prepared = shards.Prepared(prepared_dir, reader="causal_lm")
    stream, segments = prepared.streams["train"], prepared.segments["train"]
    ends = np.flatnonzero(stream.window(0, stream.num_tokens) == prepared.manifest["eot_id"]) + 1
    bounds = [segments.bounds(s) for s in range(segments.num_segments)]
    assert [(start, end) for start, end, _ in bounds] == list(zip([0, *ends[:-1]], ends))
    assert not any(has_next for _, _, has_next in bounds)  # a segment is a whole document


LINES = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def line_documents(n, seed=0):
    """`n` documents of 1 to 4 lines of words, an empty line among them."""
    rng = random.Random(seed)
    return ["\n\n".join(" ".join(rng.choice(LINES) for _ in range(rng.randint(3, 9))) for _ in range(rng.randint(1, 4)))
            + f" {i}" for i in range(n)]


def bert_config(*overrides):
    return tiny_config("model.kind=bert", "tokenizer.kind=wordpiece", "tokenizer.vocab_size=300",
                       "model.dropout=0.0", "data.val_fraction=0.2", *overrides)


@pytest.fixture(scope="module")
def lines_dir(tmp_path_factory):
    """`line_documents` prepared with a BERT config: a WordPiece vocabulary, a segment a line."""
    root = tmp_path_factory.mktemp("lines")
    source = write_jsonl(root / "docs.jsonl", line_documents(200))
    prepare(bert_config(), [source], str(root / "shards"), IN_PROCESS)
    return str(root / "shards")


def test_a_masked_lm_corpus_keeps_each_line_as_a_segment_and_where_documents_end(lines_dir):
    prepared = shards.Prepared(lines_dir, reader="masked_lm")
    assert prepared.manifest["segments"] == "lines" and prepared.manifest["tokenizer_kind"] == "wordpiece"
    tokenizer = shards.read_tokenizer(prepared.tokenizer_dir)
    found = []
    for segments in prepared.segments.values():
        document = []
        for s in range(segments.num_segments):
            start, end, has_next = segments.bounds(s)
            document.append(tuple(segments.window(start, end)))
            if not has_next:
                found.append(tuple(document))
                document = []
        assert not document
    expected = [tuple(tuple(ids) for ids in tokenizer.tokenize(tf.constant(doc.split("\n\n"))).to_list())
                for doc in line_documents(200)]
    assert sorted(found) == sorted(expected)


def test_a_corpus_prepared_for_another_kind_of_model_is_one_line(lines_dir, prepared_dir):
    with pytest.raises(TfglmError, match=r"^\S+manifest.json: its segments are lines, prepared for a masked_lm run, "
                                         r"not this causal_lm run; prepare the corpus with this run's config$"):
        shards.Prepared(lines_dir, reader="causal_lm")
    with pytest.raises(TfglmError, match="its segments are documents, prepared for a causal_lm run, not this "
                                         "masked_lm run"):
        shards.Prepared(prepared_dir, reader="masked_lm")


def test_two_workers_pretrain_on_disjoint_shares_of_each_batch_reading_only_their_rows(lines_dir):
    tokenizer = shards.read_tokenizer(shards.Prepared(lines_dir).tokenizer_dir)
    args = (tokenizer, 32, 8, 1337, 4)
    reads = collections.defaultdict(list)  # (worker, or "whole") -> starts of the token windows read

    def recorded(who):
        segments = shards.Prepared(lines_dir, reader="masked_lm").segments["train"]
        window = segments.window
        segments.window = lambda start, end: (reads[who].append(int(start)), window(start, end))[1]
        return segments

    whole = list(pretraining_dataset(recorded("whole"), *args))
    parts = [list(pretraining_dataset(recorded(worker), *args, context=tf.distribute.InputContext(2, worker, 2)))
             for worker in (0, 1)]
    for step in range(4):
        for full, first, second in zip(*(tf.nest.flatten(batches[step]) for batches in [whole, *parts])):
            np.testing.assert_array_equal(np.concatenate([first, second]), full)  # inputs, targets and weights
    assert len(reads[0]) == len(reads[1]) == 4 * 4 * 2  # each worker read A and B of its 4 rows of each batch
    assert sorted(reads[0] + reads[1]) == sorted(reads["whole"])


@pytest.mark.slow
def test_prepare_pretrain_resume_gives_the_uninterrupted_run(tmp_path, lines_dir, monkeypatch):
    config = bert_config(f"data.files=[{lines_dir}]")
    reference_dir, run_dir = str(tmp_path / "reference"), str(tmp_path / "run")
    train(config, reference_dir, task="masked_lm", verbose=0)
    monkeypatch.setattr(keras.Model, "fit", fit_with(keras.Model.fit, stop_at_step(30)))
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir, task="masked_lm", verbose=0)
    monkeypatch.undo()
    train(config, run_dir, task="masked_lm", resume=True, verbose=0)
    metrics, reference = runs.read_metrics(run_dir), runs.read_metrics(reference_dir)
    assert [r["step"] for r in metrics] == [20, 40]
    np.testing.assert_allclose([r["val_loss"] for r in metrics], [r["val_loss"] for r in reference], rtol=1e-4)
    resumed, uninterrupted = load_run(run_dir, runs.LAST).model, load_run(reference_dir, runs.LAST).model
    for a, b in zip(resumed.weights, uninterrupted.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    assert shards.tokenizer_hash(runs.path(run_dir, runs.TOKENIZER)) == shards.Prepared(lines_dir).tokenizer_sha256


def test_a_bad_line_in_a_workers_unit_is_one_error_line_naming_file_and_line(tmp_path, monkeypatch, capsys):
    """The bad line is in a later unit of work than the first, read by a Beam worker: the error is re-raised out of
    the runner."""
    texts = [json.dumps({"text": t}) for t in documents(60)]
    texts[47] = '{"text": "unfinished'
    source = tmp_path / "corpus.jsonl"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    monkeypatch.setattr(preparing, "UNIT_BYTES", 2000)  # about 10 lines a unit
    sets = [arg for setting in TINY for arg in ("--set", setting)]
    assert main(["prepare", *sets, "--data", str(source), "--out", str(tmp_path / "out"), *IN_PROCESS]) == 2
    error = capsys.readouterr().err.splitlines()
    assert error == [f"tfglm: error: {source}:48: not JSON (Unterminated string starting at: line 1 column 10 "
                     f"(char 9))"]


@pytest.mark.parametrize("row, message", [
    ({"body": "a text"}, "{path}:2: no field 'text' (data.text_field)"),
    ("[1, 2]", "{path}:2: no field 'text' (data.text_field)"),
    ("{'text': 'single quotes'}", "{path}:2: not JSON (Expecting property name enclosed in double quotes: line 1 "
                                  "column 2 (char 1))"),
])
def test_a_wrong_first_line_stops_before_the_pipeline(tmp_path, monkeypatch, row, message):
    source = tmp_path / "corpus.jsonl"
    source.write_text("\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n", encoding="utf-8")
    monkeypatch.setattr(beam, "Pipeline", None)  # never reached
    with pytest.raises(TfglmError) as error:
        prepare(tiny_config(), [str(source)], str(tmp_path / "out"), IN_PROCESS)
    assert str(error.value) == message.format(path=source)


def test_a_parquet_column_that_is_not_text_is_one_line(tmp_path):
    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    with pytest.raises(TfglmError, match=rf"^{path}: column 'text' \(data.text_field\) holds int64, not text$"):
        prepare(tiny_config(), [str(path)], str(tmp_path / "out"), IN_PROCESS)


def test_a_file_that_cannot_be_read_in_a_worker_is_one_line_naming_it(tmp_path):
    missing = str(tmp_path / "gone.txt")  # listed when the units were planned, removed before a worker reads it
    with pytest.raises(TfglmError, match=rf"^{missing}: cannot read \("):
        list(preparing.read_unit(("text", [missing]), "text", collections.Counter()))


def test_evaluate_on_a_prepared_corpus_scores_its_validation_split_as_the_same_text_would_be(
        tmp_path, prepared_dir, prepared_run, capsys):
    prepared = shards.Prepared(prepared_dir)
    stream = prepared.streams["validation"]
    texts = split_documents(stream.window(0, stream.num_tokens), shards.read_tokenizer(prepared.tokenizer_dir))
    for i, text in enumerate(texts):  # one document a file, in the stream's order: the same tokens
        (tmp_path / "text").mkdir(exist_ok=True)
        (tmp_path / "text" / f"{i:04d}.txt").write_text(text, encoding="utf-8")
    results = []
    for data in (prepared_dir, str(tmp_path / "text")):
        assert main(["evaluate", "--model", prepared_run, "--data", data]) == 0
        results.append(json.loads(capsys.readouterr().out.splitlines()[-1]))
    assert results[0]["split"] == "validation" and results[0]["tokens"] == results[1]["tokens"] > 0
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)


def test_one_unit_of_work_runs_in_process_and_beams_own_options_win():
    def mode(args, units):
        return preparing.pipeline_options(args, units).get_all_options()["direct_running_mode"]

    assert mode([], 1) == "in_memory"  # a small corpus: no worker process to start
    assert mode([], 2) == "multi_processing"
    assert mode(["--direct_running_mode=multi_threading"], 1) == "multi_threading"
