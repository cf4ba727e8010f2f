"""The HTTP server under the REST and OpenAI fronts: uvicorn + Starlette, with the limits they lack, and the request
and response helpers both fronts use.

Why uvicorn + Starlette: uvicorn is the most used and most actively kept Python HTTP server, Starlette's ASGI
responses stream (a `StreamingResponse` of server-sent events is all the OpenAI-compatible `"stream": true` needs),
and more of the limits are theirs than aiohttp's (which has a body limit but no connection cap): h11 rejects
oversized or malformed request lines and headers (a Content-Length of `abc` or `-1`) and closes idle keep-alive
connections, Starlette routes and answers 405 with `Allow`. What they lack is added here, once each (`HttpProtocol`):
a deadline for a request's headers (neither has one; encode/uvicorn#157), answered 408; a connection limit of its own,
answered 503 with `Retry-After` (uvicorn's `limit_concurrency` counts requests in flight against the same bound and
answers plain text); an answer to a client that half-closes its side after its request (uvicorn closes the
connection unanswered); a body size and read-time limit, 413 and 408 (`read_body`); and a lingering close
(`LingeringTransport`). Every error, theirs included, is TF Serving's `{"error": message}`. Model work runs on a pool
of `num_threads` threads, admitted through the core's queue bound (503 with `Retry-After` when full).
"""

import asyncio
import functools
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from tfglm.errors import TfglmError
from tfglm.serving.checks import RequestError

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
        self._transport, self._loop, self.lingering, self.eof = transport, loop, False, False

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
        if self.eof:  # the client has sent all it will: nothing to drain
            return self._transport.close()
        try:
            self._transport.write_eof()
        except (OSError, NotImplementedError):  # the client is gone, or the transport cannot half-close
            return self._transport.close()
        self._transport.resume_reading()
        self._loop.call_later(LINGER_S, self._transport.close)


class HttpProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus a deadline for each request's headers (`header_timeout_s`, from the
    connection's first byte or the request's), answered 408; at most `max_connections` connections, more answered
    503 as they open; a request answered though its client half-closed after sending it; h11's rejections of
    malformed requests answered as TF Serving's JSON rather than uvicorn's plain text; connections closed lingering."""

    def __init__(self, *args, header_timeout_s, max_connections, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.max_connections, self._timer = header_timeout_s, max_connections, None

    def connection_made(self, transport):
        super().connection_made(LingeringTransport(transport, self.loop))
        if len(self.connections) > self.max_connections:
            self.connections.discard(self)  # a refused connection, lingering, takes no place
            return self._reject(503, f"too many connections (this server takes {self.max_connections}: "
                                     "--max_connections); retry later", ["retry-after: 1"])
        self._arm()

    def eof_received(self):
        """The client half-closed (SHUT_WR, as `nc -N` and some proxies do): a whole request is still answered (then
        the connection closed), one cut short gets 400; True keeps the connection open to write the answer."""
        self.transport.eof = True
        self._disarm()
        cycle = self.cycle if self.cycle and not self.cycle.response_complete else None
        if self.transport.lingering or (cycle is None and not self.conn.trailing_data[0]):
            return None  # nothing to answer: close
        if cycle and self.conn.their_state is h11.DONE:
            cycle.keep_alive = False
            return True
        if cycle and cycle.response_started:
            return True  # the answer is under way; it closes the connection
        declared = dict(self.headers or []).get(b"content-length", b"?").decode() if cycle else None
        self._reject(400, "the client half-closed the connection before its request was whole"
                     + (f" (a body of fewer than the declared {declared} bytes)" if cycle else ""))
        if cycle:  # the app stops waiting for the body
            cycle.disconnected = True
            cycle.message_event.set()
        return True

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

    def _reject(self, status, message, headers=()):
        self.transport.write(error_bytes(status, message, headers))
        self.transport.close()


class HttpFront:
    """uvicorn serving the routes of the fronts on a thread of its own; `stop` ends it."""

    def __init__(self, core, sock, fronts):
        self.pool = ThreadPoolExecutor(core.num_threads, thread_name_prefix="tfglm-rest")
        config = uvicorn.Config(
            app(core, self.pool, fronts), http=functools.partial(HttpProtocol, header_timeout_s=core.read_timeout_s,
                                                                 max_connections=core.max_connections),
            loop="asyncio", ws="none", lifespan="off", log_config=None, access_log=False, server_header=False,
            timeout_keep_alive=5, timeout_graceful_shutdown=5)
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


def start(core, host, port, fronts):
    """(the running HTTP front serving `fronts`, its port); `fronts` are functions (core, pool) -> Starlette routes,
    each front's `routes`."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        raise TfglmError(f"--rest_api_port {port}: cannot bind {host}:{port} ({e.strerror})") from None
    return HttpFront(core, sock, fronts), sock.getsockname()[1]


def app(core, pool, fronts):
    """The Starlette app of the fronts' routes, with TF Serving's JSON errors
    for Starlette's own: an unknown path (404), a method no route takes (405)."""

    async def http_error(request, exc):
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.scope['path']}",
                              exc.headers)

    return Starlette(routes=[route for routes in fronts for route in routes(core, pool)],
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
