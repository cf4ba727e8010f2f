"""Sentence embeddings and a knowledge base: a tiny sentence-transformers checkpoint (random weights, mean pooling)
imported as an embed run; its vectors checked against a NumPy forward pass, and equal between `tfglm embed`, the
Python API, the exported `embed` signature in a clean interpreter and `POST /v1/embeddings` through the `openai`
client; `tfglm index` and `search`."""

import json
import subprocess
import sys

import numpy as np
import openai
import pytest
import tensorflow as tf

import tfglm
from conftest import SERVER_PREAMBLE
from test_checkpoints import bert_reference, bert_tensors, import_sentence_transformers, write_hf_bert
from tfglm.cli import main
from tfglm.tasks.embed import load_index
from tfglm.training import runs

TEXTS = ["the cat sat on the mat", "a good film", "the dog was very bad .", "cats , dogs and a mat"]

# A fresh interpreter with only tensorflow + tensorflow-text, as a model server: the export's `embed`.
LOADER = SERVER_PREAMBLE + r"""
path, texts = sys.argv[1], json.loads(sys.argv[2])
out = tf.saved_model.load(path).signatures["embed"](texts=tf.constant(texts))
print(json.dumps({"embeddings": out["embeddings"].numpy().tolist(), "num_tokens": out["num_tokens"].numpy().tolist()}))
"""


@pytest.fixture(scope="module")
def embed_run(tmp_path_factory):
    return import_sentence_transformers(tmp_path_factory.mktemp("embed"))


@pytest.fixture(scope="module")
def expected(embed_run):
    """The in-process embeddings of TEXTS (the Python API)."""
    run = tfglm.load_run(embed_run)
    return run.task.embedder(run.model)(TEXTS)


@pytest.fixture(scope="module")
def base_path(embed_run, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("models") / "embed")
    assert main(["export", "--model", embed_run, "--out", base, "--no-jit-compile"]) == 0
    return base


def test_an_embed_run_gives_unit_mean_pooled_vectors(embed_run, expected):
    assert runs.task_name(embed_run) == "embed"
    run = tfglm.load_run(embed_run)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-6)
    ids = run.tokenizer.tokenize(tf.constant(TEXTS)).to_list()
    for text, row, vector in zip(TEXTS, ids, expected):
        tokens = np.array([[run.tokenizer.cls_id, *row, run.tokenizer.sep_id]])
        hidden, _, _ = bert_reference(bert_tensors(), tokens, np.zeros_like(tokens), np.ones_like(tokens))
        mean = hidden[0].mean(0)
        np.testing.assert_allclose(vector, mean / np.linalg.norm(mean), atol=1e-5, err_msg=text)
    assert abs(float(expected[0] @ expected[1])) < 0.999  # different texts, different directions


def test_tfglm_embed_equals_the_python_api(embed_run, expected, tmp_path, capsys):
    assert main(["embed", "--model", embed_run, *TEXTS[:2]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["text"] for row in rows] == TEXTS[:2]
    np.testing.assert_allclose([row["embedding"] for row in rows], expected[:2], atol=1e-6)

    (tmp_path / "texts.txt").write_text("\n".join(TEXTS[1:]) + "\n")
    assert main(["embed", "--model", embed_run, TEXTS[0], "--input", str(tmp_path / "texts.txt"),
                 "--output", str(tmp_path / "vectors.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "vectors.npy"), expected, atol=1e-6)

    assert main(["embed", "--model", embed_run, "--input", str(tmp_path / "texts.txt"),
                 "--output", str(tmp_path / "vectors.txt")]) == 2
    assert "--output" in capsys.readouterr().err
    plain = str(tmp_path / "plain")  # a BERT checkpoint without sentence-transformers' pooling: a masked_lm run
    assert main(["import", "--from", "huggingface", write_hf_bert(tmp_path / "bert"), "--out", plain]) == 0
    capsys.readouterr()
    assert main(["embed", "--model", plain, "a"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "a masked_lm run does not embed texts" in error


def test_the_export_embeds_in_a_clean_interpreter(base_path, expected):
    result = subprocess.run([sys.executable, "-c", LOADER, f"{base_path}/1", json.dumps(TEXTS)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(served["embeddings"], expected, atol=1e-5)
    assert served["num_tokens"] == [6, 3, 6, 8]  # cat ##s , dog ##s [UNK] a mat


@pytest.fixture(scope="module")
def client(base_path, tmp_path_factory):
    """`tfglm serve` of the embed export and of a model without `embed`, through the `openai` client."""
    from tfglm.serving.serve import Server

    other = tmp_path_factory.mktemp("other")
    module = tf.Module()
    module.lengths = tf.function(lambda texts: {"lengths": tf.strings.length(texts)},
                                 input_signature=[tf.TensorSpec([None], tf.string, name="texts")])
    tf.saved_model.save(module, str(other / "1"), signatures={"serving_default": module.lengths})
    server = Server({"embed": base_path, "other": str(other)}, port=0, rest_api_port=0, poll_s=60,
                    max_prompt_bytes=64, max_batch_size=4).start()
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.rest_port}/v1", api_key="x", max_retries=0)
    server.stop()


@pytest.mark.serve
def test_v1_embeddings_with_the_openai_client(client, expected):
    one = client.embeddings.create(model="embed", input=TEXTS[0])  # base64, as the client asks by default
    assert one.model == "embed" and len(one.data) == 1 and one.data[0].index == 0
    np.testing.assert_allclose(one.data[0].embedding, expected[0], atol=1e-5)
    assert one.usage.prompt_tokens == one.usage.total_tokens == 6
    many = client.embeddings.create(model="embed", input=TEXTS, encoding_format="float")
    assert [d.index for d in many.data] == [0, 1, 2, 3] and many.object == "list"
    np.testing.assert_allclose([d.embedding for d in many.data], expected, atol=1e-5)
    assert many.usage.prompt_tokens == 23
    assert "embed" in [m.id for m in client.models.list().data]


@pytest.mark.serve
@pytest.mark.parametrize("request_body, status, param", [
    ({"input": []}, 400, "input"),
    ({"input": ["a", 3]}, 400, "input"),
    ({"input": [[1, 2, 3]]}, 400, "input"),
    ({"input": ""}, 400, "input"),
    ({"input": ["a"] * 5}, 400, "input"),  # more than --max_batch_size
    ({"input": "the cat " * 20}, 400, "input"),  # more than --max_prompt_bytes
    ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "a", "dimensions": 8}, 400, "dimensions"),
    ({"input": "a", "model": "other"}, 400, "model"),
    ({"input": "a", "model": "nothing"}, 404, "model"),
])
def test_bad_embeddings_requests_are_openai_errors(client, request_body, status, param):
    body = {"model": "embed", **request_body}
    with pytest.raises(openai.APIStatusError) as raised:
        client.post("/embeddings", body=body, cast_to=object)
    assert raised.value.status_code == status
    error = raised.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def write_entries(path):
    rows = [{"id": "cancel", "questions": ["how do i cancel my order", "cancel the order"],
             "answer": "Open your orders and press cancel.", "intent": "cancel_order"},
            {"question": "where is my parcel", "answer": "Track it from the link we sent.", "intent": "track"},
            {"question": "a good film", "answer": "We sell films too."},
            {"question": "the dog sat on the mat", "answer": "Pets are welcome."}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path), rows


def test_tfglm_index_and_search_find_an_entrys_own_answer(embed_run, tmp_path, capsys):
    data, rows = write_entries(tmp_path / "entries.jsonl")
    out = str(tmp_path / "kb")
    assert main(["index", "--model", embed_run, "--data", data, "--out", out]) == 0
    knowledge = load_index(out)
    for row in rows:
        for question in row.get("questions", [row.get("question")]):
            hits = knowledge.search(question, k=2)
            assert hits[0]["answer"] == row["answer"] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
            assert len(hits) == 2 and hits[1]["score"] <= hits[0]["score"]
    assert knowledge.search("cancel the order", k=1)[0]["id"] == "cancel"
    assert knowledge.search("where is my parcel", k=1)[0]["intent"] == "track"
    assert len(knowledge.search("a", k=10)) == len(rows)

    (tmp_path / "more.csv").write_text("instruction,response,intent\nwhat is a film,A moving picture.,films\n")
    assert main(["index", "--model", embed_run, "--data", str(tmp_path / "more.csv"), "--out", out]) == 0
    replaced = load_index(out)  # the index is replaced whole
    assert [entry["answer"] for entry in replaced.entries] == ["A moving picture."]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("tmp")) == []


@pytest.mark.parametrize("name, text, line, message", [
    ("bad.jsonl", '{"question": "a", "answer": "b"}\n{"question": "a", "answer": \n', 2, "invalid JSON"),
    ("noanswer.jsonl", '{"question": "a", "answer": "b"}\n\n{"question": "c"}\n', 3, "no answer field"),
    ("empty.jsonl", '{"question": "  ", "answer": "b"}\n', 1, "empty question"),
    ("emptylist.jsonl", '{"questions": [], "answer": "b"}\n', 1, "empty question"),
    ("empty.csv", 'question,answer\na,b\n,c\n', 3, "empty question"),
])
def test_malformed_entries_are_one_line_naming_file_and_line(embed_run, tmp_path, capsys, name, text, line,
                                                             message):
    (tmp_path / name).write_text(text)
    out = tmp_path / "kb"
    assert main(["index", "--model", embed_run, "--data", str(tmp_path / name), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{tmp_path / name}:{line}: " in error and message in error
    assert not out.exists()
