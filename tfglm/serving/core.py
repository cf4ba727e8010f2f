"""The serving core: the models and their versions (`tfglm.serving.versions`), polled on a thread of its own, the
limits and the metrics that every front (REST, gRPC, OpenAI) shares. The fronts import this module; it imports none
of them.
"""

import contextlib
import gc
import logging
import os
import threading
import time
import types

import prometheus_client
from tensorflow_serving.config import model_server_config_pb2

from tfglm.errors import TfglmError
from tfglm.serving.checks import CODES, RequestError
from tfglm.serving.versions import Model, remove_stale_exports

log = logging.getLogger("tfglm")


class Metrics:
    """Prometheus metrics (`/monitoring/prometheus/metrics`): requests and their latency by model, signature and
    status (a gRPC status name, for both protocols), and the decode engines': slots in use, queue length, time to
    first token and tokens generated."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        labels = ("model", "signature", "status")
        self.requests = prometheus_client.Counter("tfglm_requests", "Requests served", labels,
                                                  registry=self.registry)
        self.latency = prometheus_client.Histogram("tfglm_request_latency_seconds", "Request latency", labels,
                                                   registry=self.registry)
        model = ["model"]
        self.slots = prometheus_client.Gauge("tfglm_engine_slots_in_use", "Decode engine slots in use", model,
                                             registry=self.registry)
        self.queue = prometheus_client.Gauge("tfglm_engine_queue_length", "Sequences waiting for a decode slot",
                                             model, registry=self.registry)
        self.ttft = prometheus_client.Histogram("tfglm_time_to_first_token_seconds", "From a sequence's submission "
                                                "to its first token", model, registry=self.registry)
        self.tokens = prometheus_client.Counter("tfglm_generated_tokens", "Tokens the decode engines generated "
                                                "(their rate is tokens/s)", model, registry=self.registry)

    @contextlib.contextmanager
    def request(self):
        """Counts and times the request run in its body; the body names the model and signature in the dict it
        gets once it knows them to be served ones (so a client cannot add label values)."""
        labels, status, start = {"model": "", "signature": ""}, "OK", time.perf_counter()
        try:
            yield labels
        except RequestError as e:
            status = CODES.get(e.status, "UNKNOWN")
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self.requests.labels(labels["model"], labels["signature"], status).inc()
            self.latency.labels(labels["model"], labels["signature"], status).observe(time.perf_counter() - start)

    def engine(self, model):
        """The decode engine metrics of `model` (`tfglm.serving.engine.Engine`'s `metrics`)."""
        return types.SimpleNamespace(**{name: getattr(self, name).labels(model)
                                        for name in ("slots", "queue", "ttft", "tokens")})

    def exposition(self):
        return prometheus_client.generate_latest(self.registry)


class Admission:
    """The queue bound: at most `limit` requests in the server (running or waiting to), over both protocols."""

    def __init__(self, limit):
        self.limit, self._count, self._lock = limit, 0, threading.Lock()

    @contextlib.contextmanager
    def __call__(self):
        with self._lock:
            if self._count >= self.limit:
                raise RequestError(f"the server is busy ({self.limit} requests queued: --max_enqueued_requests); "
                                   "retry later", 503)
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1


class ServerCore:
    """Models, each polled for new versions, behind the limits and metrics every front shares (TF Serving's
    ServerCore); `Server` (`tfglm.serving.serve`) puts the fronts before it.

    `models` maps each name to its base path or to a ModelConfig (`read_model_config`). Limits: a request holds at
    most `max_batch_size` prompts of `max_prompt_bytes` each and
    `max_request_bytes` in all (REST body, gRPC message); at most `max_enqueued_requests` requests wait or run (more get
    503 / UNAVAILABLE), `num_threads` of them at a time per protocol; REST takes at most `max_connections`
    connections, idle or busy (more get 503 as they open), and gives each request `read_timeout_s` to send its
    headers and as long again for its body (then 408 and the connection closed). Every limit must be positive.
    `max_slots`: the slots of each language model version's decode engine (None: `engine.default_slots`).
    """

    def __init__(self, models, max_prompt_bytes=64 * 1024, poll_s=1.0, max_batch_size=32, max_enqueued_requests=64,
                 max_connections=256, max_request_bytes=4 << 20, read_timeout_s=10.0, num_threads=16, max_slots=None):
        limits = {"--max_prompt_bytes": max_prompt_bytes, "--file_system_poll_wait_seconds": poll_s,
                  **({"--max_slots": max_slots} if max_slots is not None else {}),
                  "--max_batch_size": max_batch_size, "--max_enqueued_requests": max_enqueued_requests,
                  "--max_connections": max_connections, "--max_request_bytes": max_request_bytes,
                  "--read_timeout_seconds": read_timeout_s, "num_threads": num_threads}
        for flag, value in limits.items():
            if not 0 < value < float("inf"):  # NaN too
                raise TfglmError(f"{flag}: must be a positive number, got {value}")
        configs = {name: model_server_config_pb2.ModelConfig(name=name, base_path=c) if isinstance(c, str) else c
                   for name, c in models.items()}
        for name, config in configs.items():
            if not os.path.isdir(config.base_path):
                raise TfglmError(f"model {name}: base path {config.base_path} is not a directory")
        self.metrics = Metrics()
        self.models = {name: Model(config, max_prompt_bytes=max_prompt_bytes, max_batch_size=max_batch_size,
                                   max_slots=max_slots, engine_metrics=self.metrics.engine(name),
                                   threads=max(num_threads, os.cpu_count() or 1))
                       for name, config in configs.items()}
        self.poll_s = poll_s
        self.admission = Admission(max_enqueued_requests)
        self.max_connections, self.max_request_bytes = max_connections, max_request_bytes
        self.read_timeout_s, self.num_threads = read_timeout_s, num_threads
        self._stop = threading.Event()

    def load(self):
        """Removes stale exports, loads every model's versions, then starts polling."""
        gc.collect()
        gc.freeze()  # the objects alive now (TensorFlow's, mostly) stay: later collections, a swap's too, skip them
        for model in self.models.values():
            remove_stale_exports(model.base_path)
            model.poll()
            if not model.servables:
                log.warning("%s: no loadable version under %s yet; waiting for one", model.name, model.base_path)
        threading.Thread(target=self._poll, daemon=True, name="tfglm-poll").start()

    def _poll(self):
        while not self._stop.wait(self.poll_s):
            for model in self.models.values():
                model.poll()

    def close(self):
        """Stops polling and closes every model's versions."""
        self._stop.set()
        for model in self.models.values():
            model.close()

    def model(self, name):
        if name not in self.models:
            raise RequestError(f"Servable not found for request: Latest({name})", 404)
        return self.models[name]

    def servable(self, name, version=None, label=None, labels=None):
        """The servable a request names; `labels` (from `Metrics.request`) gets its model's name."""
        servable = self.model(name).get(version, label)
        if labels is not None:
            labels["model"] = name
        return servable
