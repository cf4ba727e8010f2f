"""`tfglm serve`: TF Serving's REST and gRPC APIs over an export directory, on 127.0.0.1 and free ports; what a
hostile client can send (malformed requests, lying sizes, slow clients, load) and version swaps under load."""

import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc, regression_pb2)
from tensorflow_serving.config import model_server_config_pb2

from test_export import GREEDY, PROMPTS
from tfglm.tasks.registry import load_run
from tfglm.cli import main
from tfglm.serving.client import Client
from tfglm.errors import TfglmError
from tfglm.serving.export import export_run
from tfglm.generation.decode import Generator
from tfglm.serving.serve import Server
from tfglm.serving.versions import Model, read_model_config

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def base_path(sentence_run, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("serve") / "tiny")
    export_run(sentence_run, base, jit_compile=False)  # no XLA: no compile per shape bucket in the tests
    return base


@pytest.fixture(scope="module")
def expected(sentence_run):
    """Greedy completions and token counts of the in-process Generator, each prompt alone."""
    _, tokenizer, model, _ = load_run(sentence_run)
    generator = Generator(model, tokenizer, jit_compile=False)
    out = generator.generate(tf.constant(PROMPTS), *GREEDY.values())
    return {p: (c.decode(), int(n)) for p, c, n in zip(PROMPTS, out["completions"].numpy(), out["num_tokens"].numpy())}


@pytest.fixture(scope="module")
def server(base_path):
    server = Server({"tiny": base_path}, port=0, rest_api_port=0, poll_s=0.2,
                    read_timeout_s=1.0).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict(base_path):
    """A server with small limits: 4 prompts a request, 2 requests queued, 8 connections, 32 KiB, 1 s to send."""
    server = Server({"tiny": base_path}, port=0, rest_api_port=0, poll_s=60, max_batch_size=4,
                    max_enqueued_requests=2, max_connections=8, max_request_bytes=32 << 10, read_timeout_s=1.0).start()
    yield server
    server.stop()


def rest(server, path, body=None, headers=None):
    """(HTTP status, JSON response) of GET `path`, or POST when `body` is given (bytes or JSON-able)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data, headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def raw(port, data, pause_s=None):
    """(status, headers, body: JSON, or text if not JSON) of `data` sent as is on a socket, read until the server
    closes; status None if it closed without answering (a dropped connection). With `pause_s`, `data` goes one byte
    every `pause_s`."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for i in range(len(data)) if pause_s else [None]:
            if select.select([sock], [], [], 0)[0]:  # the server has answered
                break
            sock.sendall(data if i is None else data[i:i + 1])
            if pause_s:
                time.sleep(pause_s)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    if not response:
        return None, {}, None
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    json_body = headers.get("content-type") == "application/json"
    return int(lines[0].split()[1]), headers, json.loads(body) if json_body else body.decode()


def stubs(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    return prediction_service_pb2_grpc.PredictionServiceStub(channel), model_service_pb2_grpc.ModelServiceStub(channel)


def predict_request(model="tiny", signature="generate", label=None, **inputs):
    """A PredictRequest; `inputs` are TensorProtos or values for tf.make_tensor_proto."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = model, signature
    if label:
        request.model_spec.version_label = label
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(value if isinstance(value, tensor_pb2.TensorProto) else
                                      tf.make_tensor_proto(value))
    return request


def grpc_code(call, request):
    """The status code name of an RPC (OK when it succeeds)."""
    try:
        call(request, timeout=60)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def test_rest_row_and_columnar_equal_generator(server, expected):
    status, row = rest(server, "/v1/models/tiny:predict", {"instances": [{"prompts": p} for p in PROMPTS]})
    assert status == 200
    assert [(r["completions"], r["num_tokens"]) for r in row["predictions"]] == [expected[p] for p in PROMPTS]
    status, columnar = rest(server, "/v1/models/tiny/versions/1:predict",
                            {"signature_name": "generate", "inputs": {"prompts": PROMPTS, **GREEDY}})
    assert status == 200
    assert columnar["outputs"] == {"completions": [expected[p][0] for p in PROMPTS],
                                   "num_tokens": [expected[p][1] for p in PROMPTS]}
    status, score = rest(server, "/v1/models/tiny:predict", {"signature_name": "score", "instances": PROMPTS[:2]})
    assert status == 200 and sorted(score["predictions"][0]) == ["log_likelihood", "num_tokens", "perplexity"]


def test_client_grpc_and_rest_equal_generator(server, expected, capsys):
    want = {"completions": [expected[p][0] for p in PROMPTS], "num_tokens": [expected[p][1] for p in PROMPTS]}
    for client in (Client(f"127.0.0.1:{server.grpc_port}", "tiny", "grpc"),
                   Client(f"http://127.0.0.1:{server.rest_port}", "tiny")):
        assert client.generate(PROMPTS, **GREEDY) == want
        assert client.score(PROMPTS[:1])["num_tokens"] == [2]
    assert main(["client", "--grpc", "--server", f"127.0.0.1:{server.grpc_port}", "--model", "tiny",
                 "--prompt", PROMPTS[0], "--max-new-tokens", "12", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == PROMPTS[0] + expected[PROMPTS[0]][0]
    with pytest.raises(TfglmError, match="NOT_FOUND: Servable not found for request: Latest\\(nope\\)"):
        Client(f"127.0.0.1:{server.grpc_port}", "nope", "grpc").generate(["a"])
    with pytest.raises(TfglmError, match="INVALID_ARGUMENT: temperature: must be in \\[0.0, inf\\), got -"):
        Client(f"127.0.0.1:{server.grpc_port}", "tiny", "grpc").generate(["a"], temperature=-1.0)


def test_client_and_core_load_without_the_fronts():
    """The client (and the codec it uses) needs no web server, and the serving core imports no front."""
    code = ("import sys, tfglm.serving.client, tfglm.serving.core; "
            "print(sorted(m for m in sys.modules if m in ('uvicorn', 'starlette', 'h11') "
            "or m.split('.')[-1] in ('http', 'rest', 'grpc_api', 'openai_api', 'serve') and m.startswith('tfglm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_metadata_and_status_over_rest_and_grpc(server):
    status, metadata = rest(server, "/v1/models/tiny/metadata")
    assert status == 200 and metadata["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert {"generate", "serving_default", "score", "tokenize", "detokenize"} <= set(signatures)
    assert signatures["generate"]["inputs"]["prompts"]["dtype"] == "DT_STRING"
    assert rest(server, "/v1/models/tiny") == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})

    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "tiny"
    response = stub.GetModelMetadata(request, timeout=30)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    assert response.model_spec.version.value == 1
    assert set(signature_map.signature_def["generate"].defaults) == {"max_new_tokens", "seed", "temperature",
                                                                      "top_k", "top_p"}


BAD = [  # (predict request body, status, words of the error)
    (b'{"inputs": ', 400, "JSON Parse error"),
    ({"inputs": {"prompts": [1, 2]}}, 400, "prompts: expected a string"),
    ({"inputs": {"prompts": ["a"], "max_new_tokens": 2.5}}, 400, "max_new_tokens: expected int32"),
    ({"inputs": {"max_new_tokens": 3}}, 400, "missing: ['prompts']"),
    ({"inputs": {"prompts": []}}, 400, "prompts: empty batch"),
    ({"instances": []}, 400, "empty batch"),
    ({"inputs": {"prompts": ["x" * (1 << 20)]}}, 400, "more than 65536 bytes"),
    ({"inputs": {"prompts": ["a"], "max_new_tokens": 100}}, 400, "[1, 31] for this model (context 32)"),
    ({"inputs": {"prompts": ["a"], "temperature": -0.5}}, 400, "temperature: must be in [0.0, inf), got -0.5"),
    ({"signature_name": "nope", "inputs": ["a"]}, 400, 'signature name: "nope" not found'),
    ({"signature_name": ["generate"], "inputs": {"prompts": ["a"]}}, 400, "not found in signature def"),
    ({"inputs": {"prompts": ["a"], "extra": [[1], [1, 2]]}}, 400, "unknown: ['extra']"),
    ({"inputs": {"prompts": [["a"], ["b", "c"]]}}, 400, "prompts: not a rectangular list"),
    ({"inputs": {"prompts": ["a"], "max_new_tokens": [[1], [1, 2]]}}, 400, "max_new_tokens: not a rectangular"),
    ({"inputs": {"prompts": [{"b64": "!!!="}]}}, 400, "prompts: invalid base64"),
    ({"inputs": {"prompts": [{"b64": 7}]}}, 400, "prompts: expected a string"),
    ({"inputs": {"prompts": ["a"], "temperature": "hot"}}, 400, "temperature: expected float32"),
    ({"inputs": {"prompts": ["a"], "max_new_tokens": True}}, 400, "max_new_tokens: expected int32"),
    ({"inputs": {"prompts": ["a"], "max_new_tokens": 10 ** 30}}, 400, "max_new_tokens: expected int32"),
    (b'{"inputs": {"prompts": ["a"], "top_p": NaN}}', 400, "top_p: out of range for float32"),
    (b"[" * 100000 + b"]" * 100000, 400, "JSON Parse error"),
    (b"\xff\xfe{}", 400, "JSON Parse error"),
    (b'"a string"', 400, "must be a JSON object"),
    ({"instances": {"prompts": "a"}}, 400, "instances: expected a list"),
    ({"inputs": {"prompts": ["a"] * 33}}, 400, "a batch of 33; this server takes at most 32 (--max_batch_size)"),
]
PREDICT = b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
RAW_BAD = [  # (bytes sent, status): lying sizes, wrong methods, unknown paths, broken HTTP
    (PREDICT + b"Content-Length: abc\r\n\r\n{}", 400),
    (PREDICT + b"Content-Length: -1\r\n\r\n{}", 400),
    (PREDICT + b"Content-Length: 100000000000\r\n\r\n{}", 413),
    (PREDICT + b"Content-Length: 99999999999999999999\r\n\r\n{}", 413),
    (PREDICT + b"Content-Length: 1000000000\r\n\r\n{}", 413),
    (PREDICT + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
    (PREDICT + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (PREDICT.replace(b"POST", b"PUT") + b"Content-Length: 2\r\n\r\n{}", 405),
    (b"DELETE /v1/models/tiny HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 405),
    (b"GET /v1/models/tiny:predict HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 405),
    (b"POST /v1/models/tiny/metadata HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", 405),
    (b"GET /nowhere HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 404),
    (b"GARBAGE\r\n\r\n", 400),
]


@pytest.mark.parametrize("body, status, error", BAD)
def test_bad_requests_get_tf_serving_errors(server, body, status, error):
    got, response = rest(server, "/v1/models/tiny:predict", body)
    assert got == status and error in response["error"]


@pytest.mark.parametrize("data, status", RAW_BAD)
def test_lying_sizes_wrong_methods_and_broken_http_get_4xx_json(server, data, status):
    got, headers, body = raw(server.rest_port, data)
    assert got == status and body["error"]
    if status == 405:
        assert headers["allow"]


@pytest.mark.parametrize("path, body, error", [
    (":classify", {"examples": [1]}, "examples[0]: expected an object of features"),
    (":classify", {"examples": [{"x": [[1]]}]}, "examples[0].x: expected strings, int64s or float32s"),
    (":classify", {"examples": [{"x": 10 ** 30}]}, "examples[0].x: expected strings"),
    (":classify", {"examples": [{"x": "a"}], "context": [1]}, "Missing 'examples' key"),
    (":classify", {"examples": [{"x": "a"}]}, "signature 'serving_default' is not a classification signature"),
    (":regress", {"examples": [{"x": "a"}]}, "signature 'serving_default' is not a regression signature"),
    (":regress", {"signature_name": 5, "examples": []}, 'signature name: "5" not found'),
])
def test_bad_classify_and_regress_requests_get_400(server, path, body, error):
    got, response = rest(server, f"/v1/models/tiny{path}", body)
    assert got == 400 and error in response["error"]


def test_bad_grpc_requests_are_refused_before_allocating(server):
    predict, _ = stubs(server)
    huge = tensor_pb2.TensorProto(dtype=types_pb2.DT_INT32, int_val=[1], tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=250_000_000)]))
    assert len(predict_request(prompts=["a"], max_new_tokens=huge).SerializeToString()) < 100
    rss = _rss()
    with pytest.raises(grpc.RpcError) as error:
        predict.Predict(predict_request(prompts=["a"], max_new_tokens=huge), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "declares 250000000 values; the tensor holds 1" in error.value.details()
    assert _rss() - rss < 100 << 20  # 250 M int32s would be 1 GB
    short = tf.make_tensor_proto(["a"], dtype=tf.string)
    short.tensor_shape.dim[0].size = 3
    negative = tf.make_tensor_proto([1], dtype=tf.int32)
    negative.tensor_shape.dim[0].size = -1
    content = tf.make_tensor_proto(np.arange(4, dtype=np.int32))
    content.tensor_content = content.tensor_content[:-2]
    for request, code in [
            (predict_request(prompts=short), "INVALID_ARGUMENT"),
            (predict_request(prompts=["a"], top_k=negative), "INVALID_ARGUMENT"),
            (predict_request(prompts=["a"], top_k=content), "INVALID_ARGUMENT"),
            (predict_request(prompts=[1, 2]), "INVALID_ARGUMENT"),
            (predict_request(prompts=["a"] * 33), "INVALID_ARGUMENT"),
            (predict_request(prompts=["a"], extra=[[1, 2]]), "INVALID_ARGUMENT"),
            (predict_request(signature="nope", prompts=["a"]), "INVALID_ARGUMENT"),
            (predict_request(model="nope", prompts=["a"]), "NOT_FOUND"),
            (predict_request(label="nope", prompts=["a"]), "NOT_FOUND"),
            (predict_request(prompts=["x" * (5 << 20)]), "RESOURCE_EXHAUSTED")]:  # over the message size limit
        assert grpc_code(predict.Predict, request) == code
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = "tiny"
    regress.input.example_list.examples.add()
    assert grpc_code(predict.Regress, regress) == "INVALID_ARGUMENT"


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_limits_body_size_batch_size_and_queue_bound(strict, monkeypatch):
    status, response = rest(strict, "/v1/models/tiny:predict", {"inputs": {"prompts": ["a"] * 5}})
    assert status == 400 and "at most 4 (--max_batch_size)" in response["error"]
    for size in (40000, 1 << 20):  # answered before the body is read; the server then drains it (lingering close)
        status, headers, body = raw(strict.rest_port, PREDICT + b"Content-Length: %d\r\n\r\n" % size + b" " * size)
        assert status == 413 and "at most 32768" in body["error"]
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
    chunked = PREDICT + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n"
    status, headers, body = raw(strict.rest_port, chunked)
    assert status == 413 and "more than 32768 bytes" in body["error"]

    servable, entered, release = strict.models["tiny"].servables[1], threading.Semaphore(0), threading.Event()
    predict = servable.predict

    def blocked(*args):
        entered.release()
        release.wait(30)
        return predict(*args)

    monkeypatch.setattr(servable, "predict", blocked)
    good = {"inputs": {"prompts": ["the"]}}
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(rest, strict, "/v1/models/tiny:predict", good) for _ in range(2)]
        assert entered.acquire(timeout=30) and entered.acquire(timeout=30)  # the queue bound (2) is reached
        status, headers, body = raw(strict.rest_port, PREDICT + b"Content-Length: 30\r\n\r\n" +
                                    json.dumps(good).encode())
        assert status == 503 and headers["retry-after"] == "1" and "--max_enqueued_requests" in body["error"]
        assert grpc_code(stubs(strict)[0].Predict, predict_request(prompts=["the"])) == "UNAVAILABLE"
        release.set()
        assert [f.result(timeout=60)[0] for f in held] == [200, 200]
    assert rest(strict, "/v1/models/tiny:predict", good)[0] == 200


def test_slow_clients_are_cut_off_while_others_are_served(strict):
    """Clients that trickle their headers or body, or send nothing, get 408 after the 1 s read timeout; the
    8th connection is served meanwhile, one beyond the cap of 8 gets a JSON 503, and others are served after."""
    port, slow = strict.rest_port, []

    def slow_client(data, pause_s):
        start = time.monotonic()
        slow.append((raw(port, data, pause_s), time.monotonic() - start))

    clients = [threading.Thread(target=slow_client, args=args) for args in [
        (PREDICT + b"X-Slow: " + b"a" * 40, 0.1),  # headers never finished
        (PREDICT + b"Content-Length: 100\r\n\r\n" + b"{" * 40, 0.1),  # body never finished
        (b"", None)] * 2 + [(b"", None)]]  # connected, silent
    for client in clients:
        client.start()
    time.sleep(0.3)
    status, headers, body = raw(port, PREDICT + b"Content-Length: 2\r\n\r\n{}")  # the 8th connection: served
    assert status == 400 and "inputs" in body["error"]
    with socket.create_connection(("127.0.0.1", port)):  # the 8th, held
        time.sleep(0.1)
        status, headers, body = raw(port, PREDICT + b"Content-Length: 2\r\n\r\n{}")  # the 9th
    assert status == 503 and headers["retry-after"] == "1" and "--max_connections" in body["error"]
    for client in clients:
        client.join(timeout=30)
    served = [rest(strict, "/v1/models/tiny:predict", {"inputs": {"prompts": ["the"]}})[0] for _ in range(3)]
    assert served == [200] * 3
    assert len(slow) == 7
    for (status, headers, body), seconds in slow:
        assert status == 408 and "did not arrive within 1 s" in body["error"] and seconds > 0.9  # not cut early


def test_interleaved_requests_equal_their_solo_answers(server):
    """Greedy requests with different max_new_tokens and seeded sampled ones, from 16 clients at once (sharing the
    decode engine's slots), each get what they get alone."""
    options = [dict(GREEDY, max_new_tokens=n) for n in (3, 7, 12)] + [
        dict(GREEDY, max_new_tokens=9, temperature=0.9, seed=s) for s in (1, 2)]
    requests = [{"inputs": {"prompts": prompts, **o}} for prompts in (["the cat"], ["mat. the", "t"], PROMPTS[:3])
                for o in options]
    solo = [rest(server, "/v1/models/tiny:predict", r) for r in requests]
    jobs = list(range(len(requests))) * 8
    random.Random(0).shuffle(jobs)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: rest(server, "/v1/models/tiny:predict", requests[i]), jobs))
    wrong = [i for i, answer in zip(jobs, answers) if answer != solo[i]]
    assert not wrong, f"{len(wrong)} of {len(jobs)} differ from the same request alone"


def test_mixed_load_from_16_clients_over_both_protocols(server, expected):
    """A few hundred good and bad requests, REST and gRPC, from 16 clients while slow clients hold connections:
    every good one answered correctly, every bad one its 4xx / error code, never a 5xx or a dropped connection."""
    rng = random.Random(0)
    predict, models = stubs(server)
    client = Client(f"127.0.0.1:{server.grpc_port}", "tiny", "grpc")
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "tiny"

    def good_rest():
        prompts = rng.sample(PROMPTS, rng.randint(1, 3))
        got, response = rest(server, "/v1/models/tiny:predict", {"inputs": {"prompts": prompts, **GREEDY}})
        outputs = response.get("outputs", {})
        return got == 200 and list(zip(outputs["completions"], outputs["num_tokens"])) == [expected[p] for p in prompts]

    def good_grpc():
        prompts = rng.sample(PROMPTS, rng.randint(1, 3))
        outputs = client.generate(prompts, **GREEDY)
        return list(zip(outputs["completions"], outputs["num_tokens"])) == [expected[p] for p in prompts]

    def bad_rest(i):
        body, want, _ = BAD[i % len(BAD)]
        return rest(server, "/v1/models/tiny:predict", body)[0] == want

    def bad_raw(i):
        data, want = RAW_BAD[i % len(RAW_BAD)]
        return raw(server.rest_port, data)[0] == want

    def bad_grpc(i):
        request = [predict_request(prompts=[1]), predict_request(model="nope", prompts=["a"]),
                   predict_request(prompts=["a"], max_new_tokens=100)][i % 3]
        return grpc_code(predict.Predict, request) == ("NOT_FOUND" if i % 3 == 1 else "INVALID_ARGUMENT")

    def slow(i):
        return raw(server.rest_port, PREDICT + b"X-Slow: " + b"a" * 30, 0.05)[0] == 408

    kinds = [good_rest, good_rest, good_grpc, lambda i: bad_rest(i), lambda i: bad_raw(i), lambda i: bad_grpc(i),
             lambda i: grpc_code(models.GetModelStatus, status) == "OK",
             lambda i: rest(server, "/v1/models/tiny/metadata")[0] == 200]
    jobs = [(kinds[i % len(kinds)], i) for i in range(320)] + [(slow, i) for i in range(4)]
    rng.shuffle(jobs)

    def run(job):
        kind, i = job
        try:
            return kind(i) if kind not in (good_rest, good_grpc) else kind()
        except Exception as e:  # a dropped connection, a 5xx, an unexpected code
            return f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs))
    failed = [(job[0].__name__, result) for job, result in zip(jobs, results) if result is not True]
    assert not failed, f"{len(failed)} of {len(jobs)} failed: {failed[:5]}"


def test_prometheus_metrics(server):
    rest(server, "/v1/models/tiny:predict", {"inputs": {"prompts": ["the"]}})
    rest(server, "/v1/models/tiny:predict", {"inputs": {"prompts": [1]}})
    rest(server, "/v1/models/evil-label-value:predict", {"inputs": {"prompts": ["the"]}})
    with urllib.request.urlopen(f"http://127.0.0.1:{server.rest_port}/monitoring/prometheus/metrics") as response:
        text = response.read().decode()
    assert 'tfglm_requests_total{model="tiny",signature="generate",status="OK"}' in text
    assert 'tfglm_requests_total{model="tiny",signature="serving_default",status="INVALID_ARGUMENT"}' in text
    assert 'tfglm_requests_total{model="",signature="",status="NOT_FOUND"}' in text
    assert 'tfglm_request_latency_seconds_count{model="tiny",signature="generate",status="OK"}' in text
    assert 'tfglm_time_to_first_token_seconds_count{model="tiny"}' in text and "evil" not in text
    assert 'tfglm_engine_slots_in_use{model="tiny"} 0.0' in text and 'tfglm_engine_queue_length{model="tiny"}' in text
    assert float(text.split('tfglm_generated_tokens_total{model="tiny"} ')[1].split()[0]) > 0


def test_export_needs_no_extra():
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    assert any(d.startswith("tensorflow-serving-api") for d in dependencies)


def test_version_policy_labels_model_status_and_stale_exports(base_path, tmp_path):
    base = tmp_path / "m"
    for version in (1, 2, 3):
        shutil.copytree(os.path.join(base_path, "1"), base / str(version))
    stale, fresh = base / "tmp-4-killed", base / "tmp-5-running"
    for directory in (stale, fresh):
        directory.mkdir()
        (directory / "saved_model.pb").write_text("partial")
    for path in (stale / "saved_model.pb", stale):
        os.utime(path, (time.time() - 3600,) * 2)
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "m" base_path: "{base}" model_platform: "tensorflow" '
                      "model_version_policy { specific { versions: 1 versions: 3 } } "
                      'version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 3 } } }')
    server = Server(read_model_config(str(config)), port=0, rest_api_port=0, poll_s=60).start()
    try:
        assert not stale.exists() and fresh.exists()
        assert [s["version"] for s in rest(server, "/v1/models/m")[1]["model_version_status"]] == ["1", "3"]
        assert [s["version"] for s in rest(server, "/v1/models/m/labels/canary")[1]["model_version_status"]] == ["3"]
        assert rest(server, "/v1/models/m/labels/stable/metadata")[1]["model_spec"]["version"] == "1"
        assert rest(server, "/v1/models/m/labels/stable:predict", {"inputs": {"prompts": ["the"]}})[0] == 200
        assert rest(server, "/v1/models/m/versions/2:predict", {"inputs": {"prompts": ["the"]}})[0] == 404
        assert rest(server, "/v1/models/m/labels/nope:predict", {"inputs": ["the"]}) == (
            404, {"error": "Unrecognized servable version label: nope"})
        predict, models = stubs(server)
        response = predict.Predict(predict_request(model="m", label="canary", prompts=["the"]), timeout=60)
        assert response.model_spec.version.value == 3
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "m"
        assert [s.version for s in models.GetModelStatus(request, timeout=30).model_version_status] == [1, 3]
        request.model_spec.version_label = "stable"
        statuses = models.GetModelStatus(request, timeout=30).model_version_status
        assert [(s.version, s.state) for s in statuses] == [(1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]
        request.model_spec.name = "nope"
        assert grpc_code(models.GetModelStatus, request) == "NOT_FOUND"
    finally:
        server.stop()
    for policy, wanted in [("", {3}), ("model_version_policy { latest { num_versions: 2 } }", {2, 3}),
                           ("model_version_policy { all {} }", {1, 2, 3})]:
        model = Model(text_format.Parse(f'name: "m" base_path: "b" {policy}', model_server_config_pb2.ModelConfig()))
        assert model.wanted([1, 2, 3]) == wanted


def test_regress_runs_a_regression_signature(tmp_path):
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress(inputs):
        x = tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([], tf.float32)})["x"]
        return {"outputs": 2 * x}

    module.regress = regress
    tf.saved_model.save(module, str(tmp_path / "r" / "1"), signatures={"serving_default": regress})
    server = Server({"r": str(tmp_path / "r")}, port=0, rest_api_port=0, poll_s=60).start()
    try:
        examples = {"examples": [{"x": 1.5}, {"x": 2.5}]}
        assert rest(server, "/v1/models/r:regress", examples) == (200, {"result": [3.0, 5.0]})
        request = regression_pb2.RegressionRequest()
        request.model_spec.name = "r"
        request.input.example_list.examples.add().features.feature["x"].float_list.value.append(0.25)
        assert [r.value for r in stubs(server)[0].Regress(request, timeout=30).result.regressions] == [0.5]
    finally:
        server.stop()


def test_unknown_model_or_version_is_404(server):
    assert rest(server, "/v1/models/nope:predict", {"inputs": ["a"]}) == (
        404, {"error": "Servable not found for request: Latest(nope)"})
    assert rest(server, "/v1/models/tiny/versions/7:predict", {"inputs": ["a"]}) == (
        404, {"error": "Servable not found for request: Specific(tiny, 7)"})
    assert rest(server, "/v1/models/tiny/versions/7")[0] == 404


def test_model_config_file_and_cli_errors(base_path, tmp_path, capsys):
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "tiny" base_path: "{base_path}" '
                      'model_platform: "tensorflow" } }')
    assert {k: v.base_path for k, v in read_model_config(str(config)).items()} == {"tiny": base_path}
    config.write_text("model_config_list { config { nme: 1 } }")
    with pytest.raises(TfglmError, match="--model_config_file"):
        read_model_config(str(config))
    assert main(["serve", "--model_base_path", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "--model_base_path" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--model_base_path", base_path, "--port", "0", "--rest_api_port", port]) == 2
    assert f"--rest_api_port {port}: cannot bind" in capsys.readouterr().err


def test_new_version_is_picked_up_without_restart(server, sentence_run, base_path, expected):
    export_run(sentence_run, base_path, jit_compile=False)
    deadline = time.monotonic() + 60
    while rest(server, "/v1/models/tiny")[1]["model_version_status"][0]["version"] != "2":
        assert time.monotonic() < deadline, "version 2 not picked up"
        time.sleep(0.2)
    status, response = rest(server, "/v1/models/tiny/versions/2:predict",
                            {"inputs": {"prompts": PROMPTS[:1], **GREEDY}})
    assert status == 200 and response["outputs"]["completions"] == [expected[PROMPTS[0]][0]]
    assert rest(server, "/v1/models/tiny/versions/1:predict", {"inputs": ["a"]})[0] == 404
    assert os.path.isdir(os.path.join(base_path, "2"))


# A server in a process of its own whose XLA writes every program it compiles to a directory (XLA_FLAGS), so that
# compilations are counted; 4 clients send 1-4 prompts a request while version 2 appears and is swapped in.
SWAP_UNDER_LOAD = r"""
import json, os, random, shutil, sys, threading, time, urllib.request, weakref
from tfglm.serving.serve import Server

base, dump = sys.argv[1:]


def compiled():  # XLA programs compiled so far: one module_NNNN.* group of files each
    return len({name.split(".")[0] for name in os.listdir(dump)}) if os.path.isdir(dump) else 0


def predict(n):
    body = json.dumps({"inputs": {"prompts": ["the"] * n}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}/v1/models/m:predict", body)
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


server = Server({"m": base}, port=0, rest_api_port=0, poll_s=0.1, max_batch_size=4).start()
try:
    want = predict(1)["outputs"]["completions"][0]
    results, stop = [], threading.Event()

    def client(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            n = rng.randint(1, 4)
            try:
                ok = predict(n)["outputs"]["completions"] == [want] * n
            except OSError:
                ok = False
            results.append((time.monotonic(), ok))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for c in clients:
        c.start()
    time.sleep(3)
    before = compiled()
    version_1 = weakref.ref(server.models["m"].servables[1])
    shutil.copytree(os.path.join(base, "1"), os.path.join(base, "tmp-2"))  # version 2, written as export does
    os.replace(os.path.join(base, "tmp-2"), os.path.join(base, "2"))
    deadline = time.monotonic() + 120
    while list(server.models["m"].servables) != [2] and time.monotonic() < deadline:
        time.sleep(0.01)
    swapped, warm = time.monotonic(), compiled()
    time.sleep(2)
    stop.set()
    for c in clients:
        c.join(timeout=60)
    print(json.dumps({"swapped": list(server.models["m"].servables) == [2], "before_swap": before,
                      "wrong": sum(not ok for _, ok in results), "answers": len(results),
                      "after_swap": sum(start >= swapped for start, _ in results),
                      "compiled_after_swap": compiled() - warm, "version_1_freed": version_1() is None}))
finally:
    server.stop()
"""


def test_version_swap_under_load_loses_nothing_and_compiles_nothing_after_the_swap(sentence_run, tmp_path):
    """An XLA export (each batch shape compiles on its first call unless warmed up): every answer right, version 2
    compiles every program the requests after the swap run while it loads (none compiles on a request's time), and
    version 1 freed."""
    base, dump = str(tmp_path / "m"), str(tmp_path / "xla")
    export_run(sentence_run, base)
    env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={dump}"}
    result = subprocess.run([sys.executable, "-c", SWAP_UNDER_LOAD, base, dump], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["swapped"], "version 2 not swapped in"
    assert out["before_swap"] > 0  # version 1's warm-up compiled, and the dump counts it
    assert out["wrong"] == 0 and out["after_swap"] > 0, out
    assert out["compiled_after_swap"] == 0, out
    assert out["version_1_freed"]


def completion(server, prompt, stream=False, **options):
    """The text of an OpenAI `/v1/completions` request, whole or streamed (the server-sent events joined)."""
    body = json.dumps({"model": "tiny", "prompt": prompt, "stream": stream, **options}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}/v1/completions", body)
    with urllib.request.urlopen(request, timeout=60) as response:
        if not stream:
            return json.load(response)["choices"][0]["text"]
        events = [line.decode().removeprefix("data: ").strip() for line in response if line.startswith(b"data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])


def test_32_concurrent_mixed_requests_each_give_what_they_give_alone(server):
    """Greedy and seeded sampled requests, REST and gRPC `:predict` and OpenAI completions whole and streamed, 32 at
    once through the decode engine: each gives exactly the text it gives alone."""
    client = Client(f"127.0.0.1:{server.grpc_port}", "tiny", "grpc")
    options = [dict(GREEDY, max_new_tokens=n) for n in (5, 12)] + [
        dict(GREEDY, max_new_tokens=10, temperature=t, top_k=k, seed=s) for t, k, s in ((0.9, 0, 1), (1.3, 5, 2))]

    def ask(job):
        kind, prompt, o = job
        if kind == "rest":
            return rest(server, "/v1/models/tiny:predict", {"inputs": {"prompts": [prompt], **o}})[1]["outputs"][
                "completions"][0]
        if kind == "grpc":
            return client.generate([prompt], **o)["completions"][0]
        openai = {"max_tokens": o["max_new_tokens"], "temperature": o["temperature"], "top_k": o["top_k"],
                  "seed": o["seed"]}
        return completion(server, prompt, stream=kind == "stream", **openai)

    jobs = [(kind, prompt, o) for kind in ("rest", "grpc", "whole", "stream") for o in options
            for prompt in ("the cat", "mat. the")]
    alone = [ask(job) for job in jobs]
    assert len(jobs) == 32 and alone[:8] == alone[8:16] == alone[16:24] == alone[24:]  # every front, one text
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, jobs))
    assert together == alone


def metric(server, name):
    """The value of metric `name` (with its labels) on the server's Prometheus page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.rest_port}/monitoring/prometheus/metrics") as response:
        return float(response.read().decode().split(name + " ")[1].split()[0])


SLOW_ENGINE = """
import time
from tfglm.serving import engine

step = engine.Engine._step_all
engine.Engine._step_all = lambda self: time.sleep(0.05) or step(self)  # a slow model
"""


def test_a_disconnected_stream_frees_its_slot_and_the_queue_bound_holds(base_path, tmp_path, monkeypatch):
    """One slot: a streamed completion whose client goes away after its first event is cancelled at the engine's
    next step, and the request queued behind it is served; a third request beyond the queue bound gets 503."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_ENGINE)  # run by the version's process as it starts
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    server = Server({"tiny": base_path}, port=0, rest_api_port=0, poll_s=60, max_slots=1,
                    max_enqueued_requests=2).start()
    try:
        request = {"model": "tiny", "prompt": "the", "max_tokens": 28}
        whole = rest(server, "/v1/completions", request)[1]["usage"]["completion_tokens"]  # to its end
        tokens = metric(server, 'tfglm_generated_tokens_total{model="tiny"}')
        body = json.dumps({**request, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            received = b""
            while b"data: " not in received:  # the headers, then the first event
                received += sock.recv(65536)
            with ThreadPoolExecutor(1) as pool:
                queued = pool.submit(completion, server, "mat. the", max_tokens=4, temperature=0)
                while metric(server, 'tfglm_engine_queue_length{model="tiny"}') < 1:  # the second is in the queue
                    time.sleep(0.01)
                status, _ = rest(server, "/v1/models/tiny:predict", {"inputs": {"prompts": ["the"]}})
                assert status == 503
                sock.shutdown(socket.SHUT_RDWR)
                assert queued.result(timeout=60)
        generated = metric(server, 'tfglm_generated_tokens_total{model="tiny"}') - tokens
        assert generated - 4 < whole  # the first was cut short (the queued one made at most 4)
        assert metric(server, 'tfglm_engine_slots_in_use{model="tiny"}') == 0
    finally:
        server.stop()


GOOD = {"inputs": {"prompts": ["the"]}}


def serve_a_copy(base_path, tmp_path, **options):
    """A server of model `m` whose version 1 is a copy of `base_path`'s, and its base path."""
    base = str(tmp_path / "m")
    shutil.copytree(os.path.join(base_path, "1"), os.path.join(base, "1"))
    return Server({"m": base}, port=0, rest_api_port=0, **options).start(), base


def swap_in(server, base, version, timeout_s=300):
    """Writes `version` (a copy of version 1, as `tfglm export` writes one) and waits until it alone is served."""
    shutil.copytree(os.path.join(base, "1"), os.path.join(base, f"tmp-{version}"))
    os.replace(os.path.join(base, f"tmp-{version}"), os.path.join(base, str(version)))
    deadline = time.monotonic() + timeout_s
    while list(server.models["m"].servables) != [version]:
        assert time.monotonic() < deadline, f"version {version} not swapped in"
        time.sleep(0.05)
    return server.models["m"].servables[version]


def test_redeploys_keep_the_server_memory_flat_and_end_retired_versions(base_path, tmp_path):
    """Each version runs in a process of its own that ends once the version is retired: 4 swaps leave the server's
    own memory where the first left it, and only the serving version's process alive."""
    server, base = serve_a_copy(base_path, tmp_path, poll_s=0.1)
    try:
        want = rest(server, "/v1/models/m:predict", GOOD)
        versions = [server.models["m"].servables[1]]
        rss = []
        for version in range(2, 6):
            versions.append(swap_in(server, base, version))
            assert rest(server, "/v1/models/m:predict", GOOD) == want
            assert all(retired.join(timeout=60) for retired in versions[:-1])
            rss.append(_rss())
        assert versions[-1].alive
        assert rss[-1] - rss[0] < 30 << 20, [r >> 20 for r in rss]
    finally:
        server.stop()
    assert versions[-1].join(timeout=60)


def test_a_killed_version_process_answers_503_then_is_reloaded(base_path, tmp_path):
    """A version whose process dies answers its request in flight and the next ones 503 (gRPC UNAVAILABLE), never a
    hang or a 500; the next poll reloads it."""
    server, base = serve_a_copy(base_path, tmp_path, poll_s=0.2)
    try:
        want = rest(server, "/v1/models/m:predict", GOOD)
        version = server.models["m"].servables[1]
        os.kill(version.process.pid, signal.SIGSTOP)  # the request below waits in the version's process
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(rest, server, "/v1/models/m:predict", GOOD)
            time.sleep(0.5)
            os.kill(version.process.pid, signal.SIGKILL)
            status, response = in_flight.result(timeout=60)
        assert status == 503 and "its process ended" in response["error"], response
        assert grpc_code(stubs(server)[0].Predict, predict_request("m", prompts=["the"])) == "UNAVAILABLE"
        deadline = time.monotonic() + 300
        while rest(server, "/v1/models/m:predict", GOOD) != want:
            assert time.monotonic() < deadline, "version 1 not reloaded"
            time.sleep(0.2)
        assert server.models["m"].servables[1] is not version
    finally:
        server.stop()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_tfglm_serve_leaves_no_version_process(base_path, stop):
    """`tfglm serve` stopped (SIGTERM, or killed outright) takes its versions' processes with it."""
    server = subprocess.Popen([sys.executable, "-m", "tfglm", "serve", "--model_base_path", base_path,
                               "--port", "0", "--rest_api_port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        for line in server.stderr:
            if "serving default" in line:
                break
        children = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if parent_of(pid) == server.pid]
        assert children, "no version process"
        server.send_signal(stop)
        server.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in children):
            assert time.monotonic() < deadline, "a version's process outlived the server"
            time.sleep(0.1)
    finally:
        server.kill()
        server.wait()


def parent_of(pid):
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])


def alive(pid):
    """Whether process `pid` runs (a zombie, ended and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
