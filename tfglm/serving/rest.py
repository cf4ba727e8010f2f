"""The REST front of `tfglm serve`: TF Serving's REST API on uvicorn + Starlette.

    GET  /v1/models/NAME[/versions/N | /labels/L]             model status
    GET  /v1/models/NAME[/versions/N | /labels/L]/metadata    signatures
    POST /v1/models/NAME[/versions/N | /labels/L]:predict     row (`instances`) or columnar (`inputs`) format
    POST /v1/models/NAME[/versions/N | /labels/L]:classify    tf.Example features as JSON; likewise :regress
    GET  /monitoring/prometheus/metrics
    GET  /v1/models, POST /v1/chat/completions, POST /v1/completions    OpenAI's API (`tfglm.serving.openai_api`)

Why uvicorn + Starlette: uvicorn is the most used and most actively kept Python HTTP server, Starlette's ASGI
responses stream (a `StreamingResponse` of server-sent events is all the OpenAI-compatible `"stream": true` needs),
and more of the limits are theirs than aiohttp's (which has a body limit but no connection cap): uvicorn answers 503
beyond `max_connections` connections or requests in flight (`limit_concurrency`), h11 rejects oversized or malformed
request lines and headers (a Content-Length of `abc` or `-1`) and closes idle keep-alive connections, Starlette
routes and answers 405 with `Allow`. What they lack is added here, once each: a deadline for a request's headers
(neither has one; encode/uvicorn#157), answered 408 (`HttpProtocol`); a body size and read-time limit, 413 and 408
(`read_body`); and a lingering close (`LingeringTransport`). Every error, theirs included, is TF Serving's
`{"error": message}`, except uvicorn's plain-text 503. Model work runs on a pool of `num_threads` threads, admitted
through the server's queue bound (503 with `Retry-After` when full).
"""

import asyncio
import base64
import binascii
import functools
import json
import logging
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import h11
import numpy as np
import prometheus_client
import tensorflow as tf
import uvicorn
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from tfglm.errors import TfglmError
from tfglm.serving.server import RequestError

log = logging.getLogger("tfglm")
ROUTE = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?(/metadata|:predict|:classify|:regress)?")
METHODS = {None: "GET", "/metadata": "GET", ":predict": "POST", ":classify": "POST", ":regress": "POST"}
METRICS = "/monitoring/prometheus/metrics"
LINGER_S = 5.0


def error_bytes(status, message, headers=()):
    """A whole HTTP/1.1 error response with TF Serving's JSON body, closing the connection."""
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close", *headers]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


class LingeringTransport:
    """A transport whose `close` sends what is buffered and a FIN, then reads and drops what the client still sends
    for up to LINGER_S before closing (Apache's and nginx's "lingering close"): closing a socket with unread input
    makes the kernel reset the connection and drop the unsent response, say a 413 answered before the body."""

    def __init__(self, transport, loop):
        self._transport, self._loop, self.lingering = transport, loop, False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self):
        return self.lingering or self._transport.is_closing()

    def write(self, data):  # once closing, what the app still sends is dropped
        if not self.lingering:
            self._transport.write(data)

    def close(self):
        if self.is_closing():
            return
        self.lingering = True
        try:
            self._transport.write_eof()
        except (OSError, NotImplementedError):  # the client is gone, or the transport cannot half-close
            return self._transport.close()
        self._transport.resume_reading()
        self._loop.call_later(LINGER_S, self._transport.close)


class HttpProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus a deadline for each request's headers (`header_timeout_s`, from the
    connection's first byte or the request's), answered 408, h11's rejections of malformed requests answered as
    TF Serving's JSON rather than uvicorn's plain text, and connections closed lingering."""

    def __init__(self, *args, header_timeout_s, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self._timer = header_timeout_s, None

    def connection_made(self, transport):
        super().connection_made(LingeringTransport(transport, self.loop))
        self._arm()

    def data_received(self, data):
        if self.transport.lingering:
            return
        if self._timer is None and self.conn.their_state is h11.IDLE:
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg):
        self._reject(400, "Malformed HTTP request: a bad request line, header or Content-Length")

    def _arm(self):
        self._timer = self.loop.call_later(self.header_timeout_s, self._timed_out)

    def _disarm(self):
        if self._timer:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self):
        self._timer = None
        if not self.transport.is_closing():
            self._reject(408, f"the request headers did not arrive within {self.header_timeout_s:g} s")

    def _reject(self, status, message):
        self.transport.write(error_bytes(status, message))
        self.transport.close()


class RestFront:
    """uvicorn serving the app on a thread of its own; `stop` ends it."""

    def __init__(self, server, sock):
        self.pool = ThreadPoolExecutor(server.num_threads, thread_name_prefix="tfglm-rest")
        config = uvicorn.Config(
            app(server, self.pool), http=functools.partial(HttpProtocol, header_timeout_s=server.read_timeout_s),
            loop="asyncio", ws="none", lifespan="off", log_config=None, access_log=False, server_header=False,
            limit_concurrency=server.max_connections, timeout_keep_alive=5, timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="tfglm-rest")
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uvicorn.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.uvicorn.started:
            raise TfglmError("the REST server did not start")

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)


def start(server, host, port):
    """(the running REST front, its port)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        raise TfglmError(f"--rest_api_port {port}: cannot bind {host}:{port} ({e.strerror})") from None
    return RestFront(server, sock), sock.getsockname()[1]


def app(server, pool):
    """The Starlette app: the model routes, the metrics and TF Serving's JSON errors."""

    async def models(request):
        try:
            with server.metrics.request() as labels:
                return await _models(request, labels)
        except RequestError as e:
            return error_response(e.status, str(e), e.headers)
        except Exception as e:  # a server fault: report it, keep serving
            log.exception("REST %s %s", request.method, request.scope["path"])
            return error_response(500, f"{type(e).__name__}: {e}")

    async def _models(request, labels):
        path = request.scope["path"]
        match = ROUTE.fullmatch(path)
        if not match:
            raise RequestError(f"Malformed request: {request.method} {path}", 404)
        name, version, label, action = match.groups()
        route = (name, int(version) if version else None, label)
        allowed = METHODS[action]
        if request.method not in ({"GET", "HEAD"} if allowed == "GET" else {"POST"}):
            raise RequestError(f"{request.method} is not allowed on {path}; use {allowed}", 405, {"Allow": allowed})
        if action is None:
            status = server.model(name).status(*route[1:])
            labels["model"] = name
            return json_response(json_format.MessageToDict(status, always_print_fields_with_no_presence=True,
                                                           preserving_proto_field_name=True))
        if action == "/metadata":
            return json_response(metadata(server.servable(*route, labels)))
        body = await read_body(request, server.max_request_bytes, server.read_timeout_s)
        handle = {":predict": predict, ":classify": classify, ":regress": regress}[action]
        with server.admission():
            response = await asyncio.get_running_loop().run_in_executor(pool, handle, server, route, body, labels)
        return json_response(response)

    async def metrics(request):
        return Response(server.metrics.exposition(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def http_error(request, exc):  # Starlette's own: an unknown path (404), a method no route takes (405)
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.scope['path']}",
                              exc.headers)

    from tfglm.serving import openai_api  # it imports this module

    return Starlette(routes=[Route("/v1/models/{path:path}", models, methods=["GET", "POST"]),
                             Route(METRICS, metrics, methods=["GET"]), *openai_api.routes(server, pool)],
                     exception_handlers={HTTPException: http_error})


async def read_body(request, max_bytes, timeout_s):
    """The request body: 413 beyond `max_bytes` (declared or sent), 408 when it takes longer than `timeout_s`."""
    declared = request.headers.get("content-length")  # h11 has checked it is digits
    if declared is not None and int(declared) > max_bytes:
        raise RequestError(f"a body of {declared} bytes; this server takes at most {max_bytes}", 413)

    async def read():
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise RequestError(f"a body of more than {max_bytes} bytes; this server takes at most {max_bytes}",
                                   413)
        return bytes(body)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout_s:g} s", 408) from None
    except ClientDisconnect:
        raise RequestError("the client disconnected while sending the body") from None


def json_response(content, status=200, headers=None):
    return Response(json.dumps(content, ensure_ascii=False).encode("utf-8"), status, headers,
                    media_type="application/json")


def error_response(status, message, headers=None, body=None):
    """TF Serving's error body (or `body`); 503 says when to retry, and 408/413 close the connection (the body is
    not read)."""
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = "1"
    if status in (408, 413):
        headers["Connection"] = "close"
    return json_response(body or {"error": message}, status, headers)


def metadata(servable):
    """TF Serving's REST metadata JSON: the model spec and its SignatureDefMap."""
    signatures = get_model_metadata_pb2.SignatureDefMap(signature_def=servable.signature_defs)
    return {"model_spec": {"name": servable.name, "signature_name": "", "version": str(servable.version)},
            "metadata": {"signature_def": json_format.MessageToDict(signatures, preserving_proto_field_name=True)}}


def predict(server, route, body, labels):
    """The JSON response to a predict request `body` (bytes), row or columnar format."""
    request = json_object(body)
    if ("instances" in request) == ("inputs" in request):
        raise RequestError('Missing \'inputs\' or \'instances\' key (give one: {"instances": [...]} or '
                           '{"inputs": ...})')
    servable = server.servable(*route, labels)
    signature_name = _signature_name(request, servable, labels)
    signature = servable.signature_defs[signature_name]
    row = "instances" in request
    columns = _rows_to_columns(request["instances"], signature) if row else _columns(request["inputs"], signature)
    servable.check_input_names(signature_name, columns)
    inputs = {k: to_array(k, v, signature.inputs[k]) for k, v in columns.items()}
    outputs = {k: to_json(k, v) for k, v in servable.predict(signature_name, inputs).items()}
    if not row:
        return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}
    sizes = {len(v) for v in outputs.values()}
    if len(sizes) != 1:
        raise RequestError("row format (instances) needs outputs of one batch size; use columnar (inputs)")
    if len(outputs) == 1:
        return {"predictions": next(iter(outputs.values()))}
    return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(sizes.pop())]}


def classify(server, route, body, labels):
    """{"result": [[[label, score], ...] per example]}."""
    request = json_object(body)
    servable = server.servable(*route, labels)
    rows = servable.classify(_signature_name(request, servable, labels), _examples(request))
    return {"result": [[list(pair) for pair in row] for row in rows]}


def regress(server, route, body, labels):
    """{"result": [value per example]}."""
    request = json_object(body)
    servable = server.servable(*route, labels)
    return {"result": servable.regress(_signature_name(request, servable, labels), _examples(request))}


def json_object(body):
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RequestError(f"JSON Parse error: {e}") from None
    if not isinstance(request, dict):
        raise RequestError("the request body must be a JSON object")
    return request


def _signature_name(request, servable, labels):
    name = request.get("signature_name") or "serving_default"
    servable.signature(name)  # 400 unless a string naming a signature
    labels["signature"] = name
    return name


def _examples(request):
    """Serialized tf.Examples of a classify or regress request (`examples`, each merged over `context`)."""
    examples, context = request.get("examples"), request.get("context", {})
    if not isinstance(examples, list) or not isinstance(context, dict):
        raise RequestError("Missing 'examples' key (a list of {feature: value} objects; 'context', if given, one "
                           "such object)")
    for i, features in enumerate(examples):
        if not isinstance(features, dict):
            raise RequestError(f"examples[{i}]: expected an object of features")
    return [to_example({**context, **features}, f"examples[{i}]").SerializeToString()
            for i, features in enumerate(examples)]


def to_example(features, where):
    """A tf.Example from JSON features: strings (or {"b64": ...}) as bytes, integers as int64, numbers as float."""
    example = tf.train.Example()
    for key, value in features.items():
        values, feature = value if isinstance(value, list) else [value], example.features.feature[key]
        try:
            if all(isinstance(v, (str, dict)) for v in values):
                feature.bytes_list.value.extend(_bytes(f"{where}.{key}", values))
            elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                feature.int64_list.value.extend(values)
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                feature.float_list.value.extend(values)
            else:
                raise ValueError
        except (ValueError, TypeError, OverflowError):
            raise RequestError(f"{where}.{key}: expected strings, int64s or float32s, got {_short(value)}") from None
    return example


def _single_input(signature):
    """The one input without a default, for requests that send a bare value instead of named inputs."""
    required = [k for k in signature.inputs if k not in signature.defaults]
    if len(required) != 1:
        raise RequestError(f"this signature needs named inputs {sorted(signature.inputs)}")
    return required[0]


def _columns(inputs, signature):
    return inputs if isinstance(inputs, dict) and set(inputs) - {"b64"} else {_single_input(signature): inputs}


def _rows_to_columns(instances, signature):
    if not isinstance(instances, list) or not instances:
        raise RequestError("instances: empty batch" if instances == [] else "instances: expected a list")
    if not all(isinstance(i, dict) and set(i) - {"b64"} for i in instances):
        return {_single_input(signature): instances}
    names = set(instances[0])
    if any(set(i) != names for i in instances):
        raise RequestError("instances: every object must have the same keys")
    return {k: [i[k] for i in instances] for k in names}


def to_array(name, value, info):
    """A JSON value (nested lists; strings as text or {"b64": ...}) as a numpy array of the input's dtype."""
    dtype = tf.as_dtype(info.dtype)
    try:
        array = np.array(_bytes(name, value), dtype=object) if dtype == tf.string else np.array(value)
    except (ValueError, TypeError, RecursionError):
        raise RequestError(f"{name}: not a rectangular list of at most 32 dimensions") from None
    if dtype == tf.string:
        if not all(isinstance(s, bytes) for s in array.flat):
            raise RequestError(f"{name}: not a rectangular list")
        return array
    kinds = "iu" if dtype.is_integer else "iuf" if dtype.is_floating else "b"
    if array.dtype.kind not in kinds:
        raise RequestError(f"{name}: expected {dtype.name}, got {_short(value)}")
    if dtype.is_integer and array.size and (array.min() < dtype.min or array.max() > dtype.max):
        raise RequestError(f"{name}: out of range for {dtype.name}")
    array = array.astype(dtype.as_numpy_dtype)
    if dtype.is_floating and not np.isfinite(array).all():
        raise RequestError(f"{name}: out of range for {dtype.name}")
    return array


def _bytes(name, value):
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{name}: invalid base64") from None
    if isinstance(value, list):
        return [_bytes(name, v) for v in value]
    raise RequestError(f"{name}: expected a string or {{\"b64\": ...}}, got {_short(value)}")


def _short(value):
    """The start of a JSON value, for an error message."""
    try:
        return json.dumps(value)[:80]
    except (ValueError, RecursionError):
        return "a value nested too deeply"


def to_json(name, array):
    """An output array as TF Serving writes it: text as UTF-8 strings ({"b64": ...} for names ending in `_bytes`),
    float32 in its shortest round-trip form."""
    if array.dtype == object:
        if name.endswith("_bytes"):
            convert = lambda b: {"b64": base64.b64encode(b).decode("ascii")}  # noqa: E731
        else:
            convert = lambda b: b.decode("utf-8", errors="replace")  # noqa: E731
    elif array.dtype.kind == "f":
        array, convert = array.astype(str), float  # numpy's str is the shortest form that round-trips the dtype
    else:
        return array.tolist()
    values = np.empty(array.shape, dtype=object)
    values.flat[:] = [convert(x) for x in array.flat]
    return values.tolist()
