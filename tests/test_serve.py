"""`tfglm serve`: TF Serving's REST and gRPC APIs over an export directory, on 127.0.0.1 and free ports."""

import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

from test_export import GREEDY, PROMPTS, run_dir  # noqa: F401  (run_dir: the module's trained tiny model)
from tfglm.tasks.registry import load_run
from tfglm.cli import main
from tfglm.serving.client import Client
from tfglm.errors import TfglmError
from tfglm.serving.export import export_run
from tfglm.generation.decode import Generator
from tfglm.serving.server import Server, read_model_config


@pytest.fixture(scope="module")
def base_path(run_dir, tmp_path_factory):  # noqa: F811
    base = str(tmp_path_factory.mktemp("serve") / "tiny")
    export_run(run_dir, base, jit_compile=False)  # no XLA: no compile per shape bucket in the tests
    return base


@pytest.fixture(scope="module")
def expected(run_dir):  # noqa: F811
    """Greedy completions and token counts of the in-process Generator, each prompt alone."""
    _, tokenizer, model, _ = load_run(run_dir)
    generator = Generator(model, tokenizer, jit_compile=False)
    out = generator.generate(tf.constant(PROMPTS), *GREEDY.values())
    return {p: (c.decode(), int(n)) for p, c, n in zip(PROMPTS, out["completions"].numpy(), out["num_tokens"].numpy())}


@pytest.fixture(scope="module")
def server(base_path):
    server = Server({"tiny": base_path}, port=0, rest_api_port=0, enable_batching=True, poll_s=0.2).start()
    yield server
    server.stop()


def rest(server, path, body=None):
    """(HTTP status, JSON response) of GET `path`, or POST when `body` is given (bytes or JSON-able)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


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
    with pytest.raises(TfglmError, match="INVALID_ARGUMENT: temperature: must be >= 0"):
        Client(f"127.0.0.1:{server.grpc_port}", "tiny", "grpc").generate(["a"], temperature=-1.0)


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


BAD = [  # (request body, status, words of the error)
    (b'{"inputs": ', 400, "JSON Parse error"),
    ({"inputs": {"prompts": [1, 2]}}, 400, "prompts: expected a string"),
    ({"inputs": {"prompts": ["a"], "max_new_tokens": 2.5}}, 400, "max_new_tokens: expected int32"),
    ({"inputs": {"max_new_tokens": 3}}, 400, "missing: ['prompts']"),
    ({"inputs": {"prompts": []}}, 400, "prompts: empty batch"),
    ({"instances": []}, 400, "empty batch"),
    ({"inputs": {"prompts": ["x" * (1 << 20)]}}, 400, "more than 65536 bytes"),
    ({"inputs": {"prompts": ["a"], "max_new_tokens": 100}}, 400, "[1, 31] for this model (context 32)"),
    ({"inputs": {"prompts": ["a"], "temperature": -0.5}}, 400, "temperature: must be >= 0"),
    ({"signature_name": "nope", "inputs": ["a"]}, 400, 'signature name: "nope" not found'),
]


@pytest.mark.parametrize("body, status, error", BAD)
def test_bad_requests_get_tf_serving_errors(server, body, status, error):
    got, response = rest(server, "/v1/models/tiny:predict", body)
    assert got == status and error in response["error"]


def test_unknown_model_or_version_is_404(server):
    assert rest(server, "/v1/models/nope:predict", {"inputs": ["a"]}) == (
        404, {"error": "Servable not found for request: Latest(nope)"})
    assert rest(server, "/v1/models/tiny/versions/7:predict", {"inputs": ["a"]}) == (
        404, {"error": "Servable not found for request: Specific(tiny, 7)"})
    assert rest(server, "/v1/models/tiny/versions/7")[0] == 404


def test_concurrent_good_and_bad_requests(server, expected):
    """~200 requests from 16 clients: no 5xx, every good one answered correctly (greedy requests get batched)."""
    rng = random.Random(0)
    jobs = []
    for i in range(192):
        if i % 4 == 3:
            body, status, _ = BAD[i % len(BAD)]
            jobs.append((body, status, None))
        else:
            prompts = rng.sample(PROMPTS, rng.randint(1, 3))
            jobs.append(({"inputs": {"prompts": prompts, **GREEDY}}, 200, prompts))

    def send(job):
        body, status, prompts = job
        got, response = rest(server, "/v1/models/tiny:predict", body)
        ok = got == status
        if ok and prompts:
            outputs = response["outputs"]
            ok = list(zip(outputs["completions"], outputs["num_tokens"])) == [expected[p] for p in prompts]
        return ok

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    assert all(results), f"{results.count(False)} of {len(jobs)} wrong"
    assert time.monotonic() - start < 60


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


def test_new_version_is_picked_up_without_restart(server, run_dir, base_path, expected):  # noqa: F811
    export_run(run_dir, base_path, jit_compile=False)
    deadline = time.monotonic() + 60
    while rest(server, "/v1/models/tiny")[1]["model_version_status"][0]["version"] != "2":
        assert time.monotonic() < deadline, "version 2 not picked up"
        time.sleep(0.2)
    status, response = rest(server, "/v1/models/tiny/versions/2:predict",
                            {"inputs": {"prompts": PROMPTS[:1], **GREEDY}})
    assert status == 200 and response["outputs"]["completions"] == [expected[PROMPTS[0]][0]]
    assert rest(server, "/v1/models/tiny/versions/1:predict", {"inputs": ["a"]})[0] == 404
    assert os.path.isdir(os.path.join(base_path, "2"))
