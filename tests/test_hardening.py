"""What a hostile or careless client sends `tfglm serve` and gets a 4xx for, the same on every front: options out of
range, half-closed connections, more connections than the limit, `detokenize` inputs that do not fit, text that is
not Unicode."""

import json
import socket
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

CHAT = {"signature_name": "chat", "inputs": {"roles": [["user"]], "contents": [["hi"]], "max_new_tokens": 2}}


@pytest.fixture(scope="module")
def server(chat_base_path):
    from tfglm.serving.serve import Server

    server = Server({"chat": chat_base_path}, port=0, rest_api_port=0, poll_s=60, max_connections=8,
                    read_timeout_s=5.0).start()
    yield server
    server.stop()


def post(server, path, body):
    """(HTTP status, JSON response) of POST `path` with `body` (JSON-able, or bytes as they are)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def message(body):
    """The error message of a TF Serving or an OpenAI error body."""
    error = body["error"]
    return error["message"] if isinstance(error, dict) else error


def half_closed(server, request):
    """(status, headers, body) of `request` (bytes) sent on a socket whose sending side is then shut."""
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]) if response else None, headers, body


def http_request(body, content_length=None):
    return (f"POST /v1/models/chat:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if content_length is None else content_length}\r\n\r\n").encode() + body


def test_an_option_out_of_range_is_the_same_400_on_every_front(server):
    too_big = 2 ** 31  # beyond int32, the signatures' type
    status, body = post(server, "/v1/chat/completions", {"model": "chat", "messages": [{"role": "user",
                                                                                         "content": "hi"}],
                                                          "top_k": too_big})
    assert status == 400 and message(body).startswith("top_k: ") and body["error"]["param"] == "top_k"
    status, body = post(server, "/v1/models/chat:predict", {**CHAT, "inputs": {**CHAT["inputs"], "top_k": too_big}})
    assert status == 400 and message(body).startswith("top_k: ")
    for value, name in ((10 ** 400, "temperature"), (-1, "seed"), (0, "max_tokens")):
        status, body = post(server, "/v1/chat/completions", {"model": "chat", "messages": [{"role": "user",
                                                                                             "content": "hi"}],
                                                              name: value})
        assert status == 400 and message(body).startswith(f"{name}: "), (name, body)


def test_a_half_closed_connection_gets_its_answer(server):
    status, headers, body = half_closed(server, http_request(json.dumps(CHAT).encode()))
    assert status == 200 and "predictions" in json.loads(body) or "outputs" in json.loads(body)
    status, headers, body = half_closed(server, http_request(b'{"inputs": ', content_length=500))
    assert status == 400 and "500" in json.loads(body)["error"]
    status, _, body = half_closed(server, b"POST /v1/models/chat:predict HTTP/1.1\r\nHost")
    assert status == 400 and "half-closed" in json.loads(body)["error"]


def test_idle_connections_up_to_the_limit_leave_room_then_503_as_json(server):
    idle = [socket.create_connection(("127.0.0.1", server.rest_port)) for _ in range(7)]
    try:
        time.sleep(0.2)
        assert post(server, "/v1/models/chat:predict", CHAT)[0] == 200  # the 8th connection
        idle.append(socket.create_connection(("127.0.0.1", server.rest_port)))
        time.sleep(0.2)
        status, headers, body = half_closed(server, http_request(json.dumps(CHAT).encode()))
        assert status == 503 and headers["retry-after"] == "1"
        assert "--max_connections" in json.loads(body)["error"]
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert post(server, "/v1/models/chat:predict", CHAT)[0] == 200


def detokenize(server, token_ids, lengths):
    return post(server, "/v1/models/chat:predict", {"signature_name": "detokenize",
                                                    "inputs": {"token_ids": token_ids, "lengths": lengths}})


def test_detokenize_inputs_that_do_not_fit_are_named(server):
    status, body = detokenize(server, [[5, 6]], [2])
    assert status == 200 and len(body["outputs"]) == 1
    status, body = detokenize(server, [[5, 100000]], [2])
    assert status == 400 and "100000" in body["error"] and "vocabulary has" in body["error"]
    assert detokenize(server, [[5, 100000]], [1])[0] == 200  # ids past the length are padding
    status, body = detokenize(server, [[5, 6], [7, 8]], [1])
    assert status == 400 and body["error"].startswith("lengths: ")
    status, body = detokenize(server, [[5, 6]], [1000000])
    assert status == 400 and body["error"].startswith("lengths[0]: ")
    assert detokenize(server, [[5, 6]], [-1])[0] == 400
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "chat", "detokenize"
    request.inputs["token_ids"].CopyFrom(tf.make_tensor_proto(np.array([[5, 6], [7, 8]], np.int32)))
    request.inputs["lengths"].CopyFrom(tf.make_tensor_proto(np.array([1], np.int32)))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lengths" in error.value.details()


def test_a_lone_surrogate_is_named(server):
    lone = b'"hi \\ud800"'  # valid JSON, but no Unicode text
    status, body = post(server, "/v1/models/chat:predict",
                        b'{"signature_name": "chat", "inputs": {"roles": [["user"]], "contents": [[' + lone + b']]}}')
    assert status == 400 and "lone surrogate \\ud800" in body["error"]
    status, body = post(server, "/v1/chat/completions",
                        b'{"model": "chat", "messages": [{"role": "user", "content": ' + lone + b'}]}')
    assert status == 400 and "lone surrogate \\ud800" in message(body)


def test_a_conversation_that_does_not_fit_beside_max_tokens_is_refused_not_cut(server):
    long = "what is your name? " * 3  # about 60 tokens of a 64-token context
    status, body = post(server, "/v1/chat/completions", {"model": "chat", "max_tokens": 40,
                                                         "messages": [{"role": "user", "content": long}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "messages" and "context of 64 less 40 new tokens" in body["error"]["message"]
    chat = {"signature_name": "chat", "inputs": {"roles": [["user"]], "contents": [[long]], "max_new_tokens": 40}}
    status, body = post(server, "/v1/models/chat:predict", chat)
    assert status == 400 and body["error"].startswith("messages: the conversation does not fit")
    status, body = post(server, "/v1/chat/completions", {"model": "chat", "max_tokens": 40, "stream": True,
                                                         "messages": [{"role": "user", "content": long}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    # older turns that do not fit are dropped whole, as before; the last one fits
    older = [{"role": "user", "content": long}, {"role": "assistant", "content": "hi"}]
    status, body = post(server, "/v1/chat/completions", {"model": "chat", "max_tokens": 40,
                                                         "messages": older + [{"role": "user", "content": "hi"}]})
    assert status == 200 and body["usage"]["prompt_tokens"] < 24
