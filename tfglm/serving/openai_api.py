"""OpenAI-compatible endpoints on `tfglm serve`'s HTTP server, beside the REST front, so OpenAI clients and tools
talk to exported models:

    GET  /v1/models              the served models with streaming signatures (`id` is the model's name)
    POST /v1/chat/completions    a chat export's reply to `messages` (`"stream": true`: server-sent events)
    POST /v1/completions         a language model export's completion of one prompt
    POST /v1/embeddings          an embedding export's `embed` for a string or a list of strings

Both completions decode in the model's decode engine (`tfglm.serving.engine`), shared with every other request (an
export without it: its `_start` signature, then `advance`), so a reply equals `:predict`'s `chat` or `generate`. The
request's options map to the export's: `max_tokens` (or `max_completion_tokens`), `temperature`, `top_p`, `seed` and
the extension `top_k`; one left out takes the export's default (its SignatureDef's `defaults`, the run's `generate`
config), not OpenAI's (a temperature of 1). `stop` (a string or a list of up to 4) ends the reply before the first
stop sequence its text completes, whole or streamed (a stream holds back only text that may begin one), with
`finish_reason` "stop". `n` must be 1; `logprobs`, `echo`, `suffix` and `tools` are refused rather than ignored,
other fields ignored. A request is admitted through the server's queue bound like any
other; a stream holds its place until it ends, and a client that goes away frees its decode slot. Errors have
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400, 404 for an unknown model, 408, 413 and 503.

Embeddings come as OpenAI gives them: a list of floats (`"encoding_format": "float"`) or, as the `openai` client
asks by default, "base64" (the float32 vector's little-endian bytes); `usage` counts the tokens the vectors read.
An input list holds at most `--max_batch_size` texts, each non-empty and at most `--max_prompt_bytes`.

`GET /v1/models/NAME` stays TF Serving's model status, not OpenAI's model object.
"""

import asyncio
import base64
import json
import logging
import time
import uuid

import numpy as np
from starlette.responses import StreamingResponse
from starlette.routing import Route

from tfglm.config import stop_sequences
from tfglm.preprocessors.causal_lm import CHAT_TOO_LONG
from tfglm.serving.checks import RequestError, option_array
from tfglm.serving.codec import json_object, utf8
from tfglm.serving.http import error_response, json_response, read_body

log = logging.getLogger("tfglm")
PARAMS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed"}  # OpenAI -> export
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions")
ROLE_NAMES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DONE = b"data: [DONE]\n\n"  # a stream's last event
INPUT_PARAMS = {"contents": "messages", "roles": "messages", "prompts": "prompt", "max_new_tokens": "max_tokens"}


class OpenAIError(RequestError):
    """A RequestError naming the request field at fault (`param`) and OpenAI's error `code`."""

    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message, status)
        self.param, self.code = param, code


def routes(core, pool):
    """The Starlette routes of the OpenAI endpoints; model work runs on `pool`."""

    async def models(request):
        data = []
        for name, model in core.models.items():
            servables = model.servables
            if servables and {"advance", "embed"} & set(servables[max(servables)].signature_defs):
                data.append({"id": name, "object": "model", "created": servables[max(servables)].created,
                             "owned_by": "tfglm"})
        return json_response({"object": "list", "data": data})

    def endpoint(respond):
        async def handle(request):
            try:
                with core.metrics.request() as labels:
                    return await respond(request, labels)
            except RequestError as e:
                return error_response(e.status, str(e), e.headers, error_body(e))
            except Exception as e:  # a server fault: report it, keep serving
                log.exception("REST %s %s", request.method, request.scope["path"])
                error = RequestError(f"{type(e).__name__}: {e}", 500)
                return error_response(500, str(error), body=error_body(error))

        return handle

    async def complete(request, kind, labels):
        body = await read_body(request, core.max_request_bytes, core.read_timeout_s)
        loop = asyncio.get_running_loop()
        query = parse(json_object(body), kind, core, labels)
        if not query.stream:
            with core.admission():
                stream = await loop.run_in_executor(pool, query.servable.stream, kind, query.arrays, query.stop,
                                                    False)
                try:
                    text = await loop.run_in_executor(pool, stream.text)
                finally:
                    stream.cancel()  # a client gone while it waits
            return json_response(query.response(text, stream.finish_reason, stream.usage))
        admitted = core.admission()
        admitted.__enter__()  # left when the stream ends (`EventStream`), or here if it cannot start
        stream = None
        try:
            stream = await loop.run_in_executor(pool, query.servable.stream, kind, query.arrays, query.stop)
            first = await loop.run_in_executor(pool, next, stream, None)  # the start's errors get their status
        except BaseException:
            if stream is not None:
                stream.cancel()
            admitted.__exit__(None, None, None)
            raise

        def close():
            stream.cancel()  # a client gone mid-stream frees its decode slot at the engine's next step
            admitted.__exit__(None, None, None)

        return EventStream(events(query, stream, first, loop), close)

    async def embeddings(request, labels):
        body = await read_body(request, core.max_request_bytes, core.read_timeout_s)
        model, servable, texts, encoding = parse_embeddings(json_object(body), core, labels)
        with core.admission():
            try:
                outputs = await asyncio.get_running_loop().run_in_executor(pool, servable.predict, "embed",
                                                                           {"texts": texts})
            except RequestError as e:
                raise OpenAIError(str(e), "input", e.status) from None
        tokens = int(outputs["num_tokens"].sum())
        data = [{"object": "embedding", "index": i, "embedding": encode_embedding(vector, encoding)}
                for i, vector in enumerate(outputs["embeddings"])]
        return json_response({"object": "list", "data": data, "model": model,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def events(query, stream, piece, loop):
        """The stream's server-sent events: the role chunk goes out with the first text, and the finish chunk, usage
        and `[DONE]` together (each write costs the server a pass through uvicorn and h11)."""
        head = sse(query.chunk(None, role=True))
        try:
            while piece is not None:
                if piece:
                    yield head + sse(query.chunk(piece))
                    head = b""
                piece = await loop.run_in_executor(pool, next, stream, None)
        except Exception as e:  # the status is sent: the error goes as an event
            if not isinstance(e, RequestError):
                log.exception("REST stream of %s", query.model)
                e = RequestError(f"{type(e).__name__}: {e}", 500)
            yield head + sse(error_body(e))
            return
        usage = [{**query.chunk(None), "choices": [], "usage": stream.usage}] if query.include_usage else []
        yield head + b"".join(map(sse, [query.chunk(None, finish_reason=stream.finish_reason), *usage])) + DONE

    return [Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", endpoint(lambda request, labels: complete(request, "chat", labels)),
                  methods=["POST"]),
            Route("/v1/completions", endpoint(lambda request, labels: complete(request, "generate", labels)),
                  methods=["POST"]),
            Route("/v1/embeddings", endpoint(embeddings), methods=["POST"])]


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs when the response ends, however it ends (a client gone included)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.on_close()


class Query:
    """A parsed completion request: the servable, its checked signature inputs, and the response's pieces."""

    def __init__(self, kind, model, servable, arrays, stop, stream, include_usage):
        self.kind, self.model, self.servable, self.arrays, self.stop = kind, model, servable, arrays, stop
        self.stream, self.include_usage = stream, include_usage
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, object_name):
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def response(self, text, finish_reason, usage):
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, text, role=False, finish_reason=None):
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}


def served_model(request, core, labels):
    """(the request's `model`, its servable); 404 for a model not served."""
    model = request.get("model")
    if not isinstance(model, str):
        raise OpenAIError("model: expected the name of a served model (GET /v1/models lists them)", "model")
    try:
        return model, core.servable(model, labels=labels)
    except RequestError as e:
        raise OpenAIError(f"The model '{model}' does not exist ({e})", "model", 404, "model_not_found") from None


def parse(request, kind, core, labels):
    """The Query of a chat (`kind` "chat") or completions ("generate") request body; OpenAIError if it is bad."""
    model, servable = served_model(request, core, labels)
    if f"{kind}_start" not in servable.signature_defs or "advance" not in servable.signature_defs:
        what = "a chat model (an export of a chat run)" if kind == "chat" else "a model with a generate signature"
        raise OpenAIError(f"model {model!r} is not {what} with streaming signatures (re-export it with this tfglm)",
                          "model")
    labels["signature"] = kind
    for name in UNSUPPORTED:
        if request.get(name):
            raise OpenAIError(f"{name}: not supported by tfglm serve", name)
    for name in ("n", "best_of"):
        if request.get(name) not in (None, 1):
            raise OpenAIError(f"{name}: only 1 is supported, got {json.dumps(request[name])[:40]}", name)
    try:
        stop = stop_sequences(request.get("stop"))
    except ValueError as e:
        raise OpenAIError(f"stop: {e}", "stop") from None
    stream = request.get("stream") or False
    stream_options = request.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(stream_options, dict):
        raise OpenAIError("stream: expected true or false (and stream_options an object)", "stream")
    inputs = conversation(request.get("messages")) if kind == "chat" else prompt(request.get("prompt"))
    inputs.update(options(request, servable.context))
    try:
        arrays = servable.prepare(kind, inputs)
    except RequestError as e:
        raise OpenAIError(str(e), INPUT_PARAMS.get(str(e).split(":")[0], str(e).split(":")[0])) from None
    return Query(kind, model, servable, arrays, stop, stream, bool(stream_options.get("include_usage")))


def conversation(messages):
    """`roles` and `contents` [1, messages] of OpenAI `messages` ("developer" is the system role; a content may be
    a list of text parts)."""
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("messages: expected a non-empty list of {\"role\": ..., \"content\": ...}", "messages")
    roles, contents = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise OpenAIError(f"{where}: expected an object {{\"role\": ..., \"content\": ...}}", where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_NAMES:
            raise OpenAIError(f"{where}.role: unknown role {json.dumps(role)[:40]} (expected "
                              f"{', '.join(ROLE_NAMES)})", f"{where}.role")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise OpenAIError(f"{where}.content: expected a string or a list of text parts", f"{where}.content")
        roles.append(ROLE_NAMES[role].encode())  # bytes, as the REST and gRPC fronts give
        contents.append(utf8(f"{where}.content", content))
    if roles[-1] == b"assistant":
        raise OpenAIError("messages: the last message must be the user's or the system's (the reply follows it)",
                          "messages")
    return {"roles": np.array([roles], dtype=object), "contents": np.array([contents], dtype=object)}


def prompt(value):
    """`prompts` [1] of a completions `prompt`: a string or a list of one."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise OpenAIError("prompt: expected a string (or a list of one string)", "prompt")
    return {"prompts": np.array([utf8("prompt", value)], dtype=object)}


def options(request, context):
    """The export's generation options the request sets (others take the export's defaults)."""
    given = {"max_new_tokens": ("max_completion_tokens", request.get("max_completion_tokens")),
             **{name: (param, request.get(param)) for param, name in PARAMS.items()}}
    if given["max_new_tokens"][1] is None:
        given["max_new_tokens"] = ("max_tokens", request.get("max_tokens"))
    arrays = {}
    for name, (param, value) in given.items():
        if value is not None:
            try:
                arrays[name] = option_array(name, value, context, where=param)
            except RequestError as e:
                raise OpenAIError(str(e), param) from None
    return arrays


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode("utf-8")


def error_body(error):
    """OpenAI's error object of a RequestError; a conversation too long for the context (the export's error) gets
    OpenAI's `context_length_exceeded`."""
    kind = "server_error" if error.status >= 500 else "invalid_request_error"
    param, code = getattr(error, "param", None), getattr(error, "code", None)
    if str(error).startswith(CHAT_TOO_LONG):
        param, code = "messages", "context_length_exceeded"
    return {"error": {"message": str(error), "type": kind, "param": param, "code": code}}


def parse_embeddings(request, core, labels):
    """(model name, servable, texts as a [batch] object array, encoding format) of an embeddings request body;
    OpenAIError if it is bad."""
    model, servable = served_model(request, core, labels)
    if "embed" not in servable.signature_defs:
        raise OpenAIError(f"model {model!r} does not embed texts (it has no embed signature: export an embed run)",
                          "model")
    labels["signature"] = "embed"
    texts = request.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise OpenAIError("input: expected a string or a non-empty list of strings (token arrays are not taken)",
                          "input")
    empty = next((i for i, t in enumerate(texts) if not t.strip()), None)
    if empty is not None:
        raise OpenAIError(f"input[{empty}]: an empty string", "input")
    encoding = request.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise OpenAIError(f"encoding_format: expected 'float' or 'base64', got {json.dumps(encoding)[:40]}",
                          "encoding_format")
    dim = servable.signature_defs["embed"].outputs["embeddings"].tensor_shape.dim[-1].size
    if request.get("dimensions") not in (None, dim):
        raise OpenAIError(f"dimensions: this model gives {dim}-dimensional embeddings only", "dimensions")
    return model, servable, np.array([t.encode("utf-8") for t in texts], dtype=object), encoding


def encode_embedding(vector, encoding):
    """A vector as OpenAI sends it: floats, or "base64" of its little-endian float32 bytes."""
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")
    return vector.tolist()
