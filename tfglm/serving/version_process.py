"""A served version in a process of its own: `VersionProcess` loads a `Servable` (`tfglm.serving.servable`, its
decode engine and warm-up included) in a child process and stands in for it in the server, with the methods the
fronts and `tfglm.serving.versions` call.

Why a process: what XLA compiles stays in the process for good (its compilation cache has no eviction,
tensorflow/tensorflow#64170, and a loaded function's name is unique to its load, so versions share nothing), about
100 MB a redeploy of even the tiny model. A child that ends with its version returns all of it to the operating
system, as TF Serving returns an unloaded version's memory; the server's RSS stays flat across redeploys
(`bench/speed/serve_soak.py`).

The child is started with `spawn` (TensorFlow's threads do not survive a fork) and dies with the server. One pipe
carries everything, each call and stream under an id, so concurrent requests and streams share it: a stream's text
comes as the engine makes it, and a cancel (a client gone) reaches the engine by its next step. Arrays cross as NumPy.
The request checks (`signature`, `check_input_names`, `prepare`) are Servable's own, run here on the version's
SignatureDefs, so a bad request never crosses. Errors cross as their own types (RequestError with its status,
TfglmError); a child that dies answers its requests 503 (UNAVAILABLE) and is reloaded at the next poll. The engine's
metrics and the child's log lines come back over the pipe.
"""

import contextlib
import itertools
import logging
import logging.handlers
import multiprocessing
import os
import queue
import signal
import threading
import traceback

import prometheus_client
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2

from tfglm.errors import TfglmError
from tfglm.serving.checks import RequestError
from tfglm.serving.servable import Servable

log = logging.getLogger("tfglm")
FINAL = ("result", "error", "end")  # the last message of a call or a stream


class VersionProcess:
    """A version served by a child process: Servable's arguments (`engine_metrics` stay here, updated from the
    child), and `threads`, the child's TensorFlow inter-op threads (request calls that can run at once). Returns once
    the version is loaded and warmed up; raises if it failed to. `alive` is False once the child has ended."""

    signature, generation_kind = Servable.signature, Servable.generation_kind
    prepare, check_input_names, _check = Servable.prepare, Servable.check_input_names, Servable._check

    def __init__(self, name, version, path, max_prompt_bytes=64 * 1024, max_batch_size=32, max_slots=None,
                 engine_metrics=None, threads=None):
        self.name, self.version = name, version
        self.max_prompt_bytes, self.max_batch_size = max_prompt_bytes, max_batch_size
        self.engine_metrics = engine_metrics
        self._closing, self._ids = False, itertools.count(1)
        self._lock, self._send_lock = threading.Lock(), threading.Lock()  # the replies; the pipe (never both held)
        self._ended = threading.Event()  # the child has ended, and its requests are answered
        self._replies = {0: queue.SimpleQueue()}  # id -> the messages of a call or stream in flight; 0: the load
        self._gauges = {}  # the child's net increments of each engine gauge, taken back if it dies
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        options = {"max_prompt_bytes": max_prompt_bytes, "max_batch_size": max_batch_size, "max_slots": max_slots}
        self.process = context.Process(target=serve_version, daemon=True, name=f"tfglm-{name}-{version}",
                                       args=(child_end, name, version, path, options, engine_metrics is not None,
                                             threads, log.getEffectiveLevel()))
        self.process.start()
        child_end.close()
        threading.Thread(target=self._read, daemon=True, name=f"tfglm-{name}-{version}-pipe").start()
        try:
            metadata = self._reply(self._replies[0])
        except Exception:
            self._closing = True  # the load's failure is reported by the caller
            raise
        self.signature_defs = {k: meta_graph_pb2.SignatureDef.FromString(v)
                               for k, v in metadata["signature_defs"].items()}
        self.signature_names, self.defaults = metadata["signature_names"], metadata["defaults"]
        self.context, self.vocab_size, self.created = metadata["context"], metadata["vocab_size"], metadata["created"]

    @property
    def alive(self):
        return not self._ended.is_set()

    def join(self, timeout=None):
        """Waits for the child to end (after `close`, once its requests are done); whether it has."""
        return self._ended.wait(timeout)

    def predict(self, signature_name, inputs):
        return self._call("predict", signature_name, inputs)

    def classify(self, signature_name, examples):
        return self._call("classify", signature_name, examples)

    def regress(self, signature_name, examples):
        return self._call("regress", signature_name, examples)

    def detokenize(self, rows):
        return self._call("detokenize", rows)

    def stream(self, signature_name, arrays, stop=(), streamed=True):
        """A RemoteStream of Servable's `stream`: errors of its start are raised here."""
        return RemoteStream(self, signature_name, arrays, stop, streamed)

    def close(self):
        """Retires the version: the child ends once the requests it is serving are done."""
        with self._lock:
            self._closing, idle = True, len(self._replies) == 0
        if idle:
            self._send(("exit",))

    def _call(self, method, *args):
        id, replies = self._open()
        self._send(("call", id, method, args))
        return self._reply(replies)

    def _open(self):
        """A new id and the queue its replies arrive on; 503 once the child has ended."""
        with self._lock:
            if self._ended.is_set():
                raise self._gone()
            id = next(self._ids)
            self._replies[id] = replies = queue.SimpleQueue()
        return id, replies

    @staticmethod
    def _reply(replies):
        kind, *values = replies.get()
        if kind == "error":
            raise values[0]
        return values[0] if len(values) == 1 else values

    def _send(self, message):
        with self._send_lock, contextlib.suppress(OSError, ValueError):  # a child gone: its reader answers 503
            self._connection.send(message)

    def _read(self):
        """Hands each message of the child to its call or stream, the log lines to the log and the metrics to
        `engine_metrics`, until the child ends; then every request in flight gets 503."""
        with contextlib.suppress(EOFError, OSError):
            while True:
                kind, id, *values = self._connection.recv()
                if kind == "log":
                    logging.getLogger(id.name).handle(id)
                elif kind == "metric":
                    self._metric(id, *values)
                else:
                    with self._lock:
                        replies = self._replies.pop(id, None) if kind in FINAL else self._replies.get(id)
                        exit = self._closing and not self._replies
                    if replies is not None:  # else a stream already ended (a cancelled one that nobody read)
                        replies.put((kind, *values))
                    if exit:  # sent aside: this thread never waits on the pipe, so the child's sends never block
                        threading.Thread(target=self._send, args=(("exit",),), daemon=True).start()
        self.process.join()
        with self._lock:
            pending, self._replies = list(self._replies.values()), {}
            self._ended.set()
        if not self._closing:
            log.warning("%s: the process of version %d ended (exit code %s)", self.name, self.version,
                        self.process.exitcode)
        for replies in pending:
            replies.put(("error", self._gone()))
        for name, total in self._gauges.items():
            getattr(self.engine_metrics, name).inc(-total)

    def _metric(self, name, method, value):
        metric = getattr(self.engine_metrics, name)
        getattr(metric, method)(value)
        if isinstance(metric, prometheus_client.Gauge):
            self._gauges[name] = self._gauges.get(name, 0) + value

    def _gone(self):
        return RequestError(f"version {self.version} of model {self.name} is not running (its process ended); "
                            "retry", 503)


class RemoteStream:
    """Servable's `stream` (an EngineStream or SignatureStream) in the child: iterating yields the text it gains, sent
    as the child makes it; `text`, `finish_reason`, `usage` and `cancel` as there."""

    def __init__(self, version, signature_name, arrays, stop, streamed):
        self.version, self.finish_reason, self.usage = version, None, None
        self.id, self._replies = version._open()
        self._started = self._ended = False
        version._send(("stream", self.id, signature_name, arrays, list(stop), streamed))
        version._reply(self._replies)

    def __iter__(self):
        return self

    def __next__(self):
        if self._ended:
            raise StopIteration
        if not self._started:
            self._started = True
            self.version._send(("iterate", self.id))
        kind, *values = self._replies.get()
        if kind == "piece":
            return values[0]
        self._ended = True
        if kind == "error":
            raise values[0]
        self.finish_reason, self.usage, _ = values
        raise StopIteration

    def text(self):
        """The whole text, decoded to the end in the child."""
        self._started = self._ended = True
        self.version._send(("text", self.id))
        self.finish_reason, self.usage, text = self.version._reply(self._replies)
        return text

    def cancel(self):
        if not self._ended:
            self.version._send(("cancel", self.id))


def serve_version(connection, name, version, path, options, metrics, threads, log_level):
    """The child: loads the version, sends its metadata (or why it failed to load), then serves the parent's
    messages, each call and stream on a thread of its own, until told to exit or the parent is gone."""
    threading.Thread(target=lambda: multiprocessing.parent_process().join() or os._exit(0), daemon=True,
                     name="tfglm-parent-watch").start()  # the server gone (even killed): end at once
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    lock = threading.Lock()

    def send(message):
        with lock:
            connection.send(message)

    handler = logging.handlers.QueueHandler(None)
    handler.enqueue = lambda record: send(("log", record))
    log.addHandler(handler)
    log.setLevel(log_level)
    log.propagate = False
    if threads:
        with contextlib.suppress(RuntimeError):
            tf.config.threading.set_inter_op_parallelism_threads(threads)
    try:
        engine_metrics = Forwarded(send) if metrics else None
        servable = Servable(name, version, path, engine_metrics=engine_metrics, **options)
    except Exception:
        send(("error", 0, RuntimeError(traceback.format_exc())))
        os._exit(1)
    send(("result", 0, {"signature_defs": {k: v.SerializeToString() for k, v in servable.signature_defs.items()},
                        "signature_names": list(servable.signature_names), "defaults": servable.defaults,
                        "context": servable.context, "vocab_size": servable.vocab_size, "created": servable.created}))
    streams, consumed = {}, set()

    def finish(id, text=None):
        stream = streams.pop(id)
        send(("end", id, stream.finish_reason, stream.usage, text))

    def handle(kind, id, *args):
        try:
            if kind == "call":
                method, arguments = args
                send(("result", id, getattr(servable, method)(*arguments)))
            elif kind == "stream":
                streams[id] = servable.stream(*args)
                send(("started", id))
            elif kind == "iterate":
                for piece in streams[id]:
                    send(("piece", id, piece))
                finish(id)
            elif kind == "text":
                finish(id, streams[id].text())
        except Exception as e:
            streams.pop(id, None)
            send(("error", id, crossing(e)))

    with contextlib.suppress(EOFError, OSError):
        while (message := connection.recv())[0] != "exit":
            kind, id = message[:2]
            if kind == "cancel":
                if id in streams:
                    streams[id].cancel()
                    if id not in consumed:  # nobody reads it: it ends here
                        finish(id)
                continue
            if kind in ("iterate", "text"):
                consumed.add(id)
            threading.Thread(target=handle, args=message, daemon=True).start()
    servable.close()
    os._exit(0)  # what the version compiled goes back to the operating system


class Forwarded:
    """Engine metrics in the child: each update sent to the parent's (`VersionProcess.engine_metrics`)."""

    def __init__(self, send):
        for name in ("slots", "queue", "ttft", "tokens"):
            setattr(self, name, ForwardedMetric(send, name))


class ForwardedMetric:
    def __init__(self, send, name):
        self._send, self._name = send, name

    def inc(self, amount=1):
        self._send(("metric", self._name, "inc", amount))

    def observe(self, value):
        self._send(("metric", self._name, "observe", value))


def crossing(error):
    """`error` as the parent raises it: a RequestError or TfglmError as itself, anything else as a RuntimeError
    naming it (the front answers 500 and logs it)."""
    if isinstance(error, (RequestError, TfglmError)):
        return error
    return RuntimeError(f"{type(error).__name__}: {error}")
