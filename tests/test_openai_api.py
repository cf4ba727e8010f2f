"""A chat export served by `tfglm serve`: the `chat` signature over REST and gRPC Predict, and the OpenAI-compatible
endpoints through the official `openai` client, whole and streamed; the replies equal the in-process Generator's."""

import json
import math
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import tensorflow as tf

from conftest import QA
from tfglm.errors import TfglmError
from tfglm.generation.decode import Generator
from tfglm.serving.engine import STEPS
from tfglm.serving.client import Client
from tfglm.tasks.registry import load_run

pytestmark = pytest.mark.serve

GREEDY = {"max_new_tokens": 20, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}
CONVERSATIONS = [[("user", q)] for q, _ in QA] + [
    [("system", "be brief"), ("user", "hi"), ("assistant", "hello there"), ("user", "what is your name?")]]


@pytest.fixture(scope="module")
def generator(chat_run):
    run = load_run(chat_run)
    return Generator(run.model, run.tokenizer, jit_compile=False)


@pytest.fixture(scope="module")
def expected(generator):
    """Greedy replies of the in-process Generator, one per CONVERSATIONS."""
    replies = []
    for conversation in CONVERSATIONS:
        roles, contents = zip(*conversation)
        out = generator.chat(tf.constant([roles]), tf.constant([contents]), *GREEDY.values())
        replies.append(out["completions"].numpy()[0].decode())
    return replies


@pytest.fixture(scope="module")
def server(chat_base_path):
    from tfglm.serving.serve import Server

    server = Server({"chat": chat_base_path}, port=0, rest_api_port=0, poll_s=60,
                    max_prompt_bytes=256, max_enqueued_requests=1, read_timeout_s=2.0).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.rest_port}/v1", api_key="x", max_retries=0)


def messages(conversation):
    return [{"role": role, "content": content} for role, content in conversation]


def test_the_model_learnt_its_answers(expected):
    assert expected[:4] == [a for _, a in QA]


def test_openai_chat_whole_and_streamed_equal_generator(client, expected):
    for conversation, reply in zip(CONVERSATIONS, expected):
        response = client.chat.completions.create(model="chat", messages=messages(conversation), temperature=0,
                                                  max_tokens=20, seed=0, top_p=1.0, extra_body={"top_k": 0})
        choice = response.choices[0]
        assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", reply, "stop")
        assert response.object == "chat.completion" and response.model == "chat"
        assert response.usage.completion_tokens == len(reply)  # characters: one token each
        assert response.usage.total_tokens == response.usage.prompt_tokens + len(reply)

        chunks = list(client.chat.completions.create(model="chat", messages=messages(conversation),
                                                     temperature=0, max_completion_tokens=20, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
        pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) == math.ceil(len(reply) / STEPS)  # a piece every engine step (STEPS tokens)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage.completion_tokens == len(reply) and {c.id for c in chunks} == {chunks[0].id}


def test_finish_reason_length_and_export_defaults(client, server):
    response = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "bye"}],
                                              temperature=0, max_tokens=3)
    assert (response.choices[0].message.content, response.choices[0].finish_reason) == ("see", "length")
    # Options left out take the export's defaults (16 new tokens, temperature 0.8, top_k 40), as the `chat`
    # signature's own do over Predict: the same seed gives the same sampled reply.
    status, predicted = rest(server, "/v1/models/chat:predict", {"signature_name": "chat", "inputs": {
        "roles": [["user"]], "contents": [["how are you?"]], "seed": 5}})
    sampled = client.chat.completions.create(model="chat", seed=5,
                                             messages=[{"role": "user", "content": "how are you?"}])
    assert status == 200 and sampled.choices[0].message.content == predicted["outputs"]["replies"][0]


def test_openai_completions_and_models(client, generator):
    out = generator.generate(tf.constant(["hi"]), 6, 0.0, 0, 1.0, 0)
    response = client.completions.create(model="chat", prompt="hi", max_tokens=6, temperature=0)
    assert response.choices[0].text == out["completions"].numpy()[0].decode()
    assert response.usage.completion_tokens == int(out["num_tokens"][0])
    streamed = client.completions.create(model="chat", prompt=["hi"], max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == response.choices[0].text
    assert [m.id for m in client.models.list()] == ["chat"]


def test_stop_sequences_whole_and_streamed(client):
    """A reply ends before the first stop sequence its text completes, whole and streamed alike; the tokens counted
    are those up to the one that completed it; a stream never sends text of the stop."""
    question = [{"role": "user", "content": "what is your name?"}]  # "i am tfglm"
    for stop, reply, tokens, finish in [(" tfglm", "i am", 10, "stop"), (["am", "xyz"], "i ", 4, "stop"),
                                        ("i", "", 1, "stop"), ("zz", "i am tfglm", 10, "stop"),
                                        ("glm", "i a", 3, "length")]:
        options = dict(model="chat", messages=question, temperature=0, max_tokens=3 if finish == "length" else 20,
                       stop=stop)
        choice = client.chat.completions.create(**options).choices[0]
        assert (choice.message.content, choice.finish_reason) == (reply, finish), stop
        chunks = list(client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
        assert chunks[-1].usage.completion_tokens == min(tokens, options["max_tokens"])
    response = client.completions.create(model="chat", prompt="hi", max_tokens=20, temperature=0, stop=["m"])
    full = client.completions.create(model="chat", prompt="hi", max_tokens=20, temperature=0).choices[0].text
    assert response.choices[0].text == full.partition("m")[0]


def test_the_client_sends_stop_sequences_to_the_completions_endpoint(server):
    rest_client = Client(f"http://127.0.0.1:{server.rest_port}", "chat")  # one prompt a call: the queue holds 1
    options = dict(max_new_tokens=12, temperature=1.5, top_k=0, top_p=1.0)
    whole, seed = next((text, seed) for seed in range(20) for text in
                       rest_client.generate(["hi"], seed=seed, **options)["completions"] if len(text) >= 6)
    for stop in (whole[2:4], [whole[4], "zz"]):
        cut = rest_client.generate(["hi"], seed=seed, stop=stop, **options)["completions"][0]
        assert cut == whole[:min(whole.index(s) for s in ([stop] if isinstance(stop, str) else stop) if s in whole)]
    with pytest.raises(TfglmError, match="stop: needs REST"):
        Client(f"127.0.0.1:{server.grpc_port}", "chat", "grpc").generate(["hi"], stop="e")
    with pytest.raises(TfglmError, match="stop: at most 4 stop sequences"):
        rest_client.generate(["hi"], stop=list("abcde"))


def test_rest_and_grpc_predict_on_chat(server, expected):
    conversation = CONVERSATIONS[-1]
    roles, contents = [[r for r, _ in conversation]], [[c for _, c in conversation]]
    status, columnar = rest(server, "/v1/models/chat:predict", {"inputs": {"roles": roles, "contents": contents,
                                                                           **GREEDY}})
    assert status == 200 and columnar["outputs"]["replies"] == [expected[-1]]
    status, row = rest(server, "/v1/models/chat:predict", {"signature_name": "chat", "instances": [
        {"roles": roles[0], "contents": contents[0]}]})  # the export's options: sampled, seed 0
    status, defaults = rest(server, "/v1/models/chat:predict", {"inputs": {"roles": roles, "contents": contents}})
    assert status == 200 and [p["replies"] for p in row["predictions"]] == defaults["outputs"]["replies"]

    grpc_client = Client(f"127.0.0.1:{server.grpc_port}", "chat", "grpc")
    assert grpc_client.predict("chat", roles=roles, contents=contents, **GREEDY)["replies"] == [expected[-1]]
    with pytest.raises(TfglmError, match="INVALID_ARGUMENT: roles: unknown role 'tool'"):
        grpc_client.predict("chat", roles=[["user", "tool"]], contents=[["hi", "x"]])


PREDICT_BAD = [  # (predict request body, words of the 400's error)
    ({"signature_name": "chat", "inputs": {"roles": [["user", "robot"]], "contents": [["hi", "x"]]}},
     "roles: unknown role 'robot'"),
    ({"signature_name": "chat", "inputs": {"roles": [["user"]], "contents": [["hi", "x"]]}},
     "one role a message, got shapes [1, 1] and [1, 2]"),
    ({"signature_name": "chat", "inputs": {"roles": [["user"]], "contents": [["x" * 300]]}}, "more than 256 bytes"),
    ({"signature_name": "advance", "inputs": {"steps": 1}}, "not served over Predict"),
    ({"signature_name": "chat", "inputs": {"roles": [["user", ""], ["", ""]], "contents": [["hi", ""], ["", ""]]}},
     "roles: conversation 1 has no message"),
]


@pytest.mark.parametrize("body, words", PREDICT_BAD)
def test_predict_rejects_bad_chat_requests(server, body, words):
    status, response = rest(server, "/v1/models/chat:predict", body)
    assert status == 400 and words in response["error"]


BAD = [  # (body of a chat completion request, status, param, words of the message)
    (b'{"model": "chat", "messages": [', 400, None, "JSON Parse error"),
    ({"model": "chat"}, 400, "messages", "expected a non-empty list"),
    ({"model": "chat", "messages": []}, 400, "messages", "expected a non-empty list"),
    ({"model": "chat", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role",
     'unknown role "tool"'),
    ({"model": "chat", "messages": [{"role": "user", "content": None}]}, 400, "messages[0].content", "a string"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     400, "messages", "the last message must be"),
    ({"model": "chat", "messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages",
     "more than 256 bytes"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "'nope' does not exist"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "expected the name"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", "only 1"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400,
     "stop", "at most 4 stop sequences, got 5"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]}, 400, "stop",
     "expected a non-empty string or a list of them"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stop": 7}, 400, "stop",
     "got 7"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs",
     "not supported"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature",
     "must be in [0.0, inf)"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}, 400, "max_tokens",
     "[1, 63] for this model"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "seed": "7"}, 400, "seed",
     "expected an integer"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream",
     "true or false"),
]


@pytest.mark.parametrize("body, status, param, words", BAD)
def test_bad_chat_requests_get_openai_errors(server, body, status, param, words):
    got, response = rest(server, "/v1/chat/completions", body)
    assert got == status and set(response) == {"error"}
    error = response["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]


def test_unknown_fields_ignored_and_the_queue_bound_holds_streams(server):
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 20,
            "frequency_penalty": 0, "user": "u1", "metadata": {"a": "b"}}
    assert rest(server, "/v1/chat/completions", body)[1]["choices"][0]["message"]["content"] == "hello there"
    url = f"http://127.0.0.1:{server.rest_port}/v1/chat/completions"
    request = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as stream:  # holds the server's one place
        assert stream.headers["content-type"].startswith("text/event-stream")
        first = json.loads(stream.readline().decode().removeprefix("data: "))
        assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
        status, busy = rest(server, "/v1/chat/completions", body)
        assert status == 503 and busy["error"]["type"] == "server_error"
        events = [line.decode().strip() for line in stream if line.strip()]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "stop"
    assert rest(server, "/v1/chat/completions", body)[0] == 200  # the stream has left its place


def rest(server, path, body):
    """(status, JSON) of POST `path` with `body` (bytes or JSON-able)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.rest_port}{path}", data, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_32_concurrent_mixed_chat_requests_each_give_what_they_give_alone(chat_base_path):
    """Greedy and seeded sampled chat requests over REST and gRPC `:predict` and OpenAI's endpoint whole and
    streamed, 32 at once through the decode engine's 8 slots: each gives exactly the reply it gives alone."""
    from tfglm.serving.serve import Server

    server = Server({"chat": chat_base_path}, port=0, rest_api_port=0, poll_s=60, max_slots=8).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.rest_port}/v1", api_key="x", max_retries=0)
        grpc = Client(f"127.0.0.1:{server.grpc_port}", "chat", "grpc")
        options = [dict(GREEDY, max_new_tokens=12), dict(GREEDY, temperature=1.0, top_k=8, seed=3),
                   dict(GREEDY, temperature=0.7, seed=4), dict(GREEDY, max_new_tokens=5)]

        def ask(job):
            kind, conversation, o = job
            roles, contents = zip(*conversation)
            if kind in ("rest", "grpc"):
                inputs = {"roles": [list(roles)], "contents": [list(contents)], **o}
                if kind == "grpc":
                    return grpc.predict("chat", **inputs)["replies"][0]
                return rest(server, "/v1/models/chat:predict", {"signature_name": "chat", "inputs": inputs})[1][
                    "outputs"]["replies"][0]
            request = dict(model="chat", messages=messages(conversation), max_tokens=o["max_new_tokens"],
                           temperature=o["temperature"], seed=o["seed"], extra_body={"top_k": o["top_k"]})
            if kind == "whole":
                return client.chat.completions.create(**request).choices[0].message.content
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(**request, stream=True) if c.choices)

        jobs = [(kind, conversation, o) for kind in ("rest", "grpc", "whole", "stream") for o in options
                for conversation in (CONVERSATIONS[1], CONVERSATIONS[4])]
        alone = [ask(job) for job in jobs]
        assert len(jobs) == 32 and alone[:8] == alone[8:16] == alone[16:24] == alone[24:]  # every front, one text
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(ask, jobs))
        assert together == alone
    finally:
        server.stop()
