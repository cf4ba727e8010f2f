"""`tfglm serve`: TF Serving's REST and gRPC APIs over `tfglm export` directories, for development and small
deployments.

This module holds what both fronts share: the models and their versions, the batcher, the limits and the metrics.
`tfglm.serving.rest` is the REST front (uvicorn + Starlette), `tfglm.serving.grpc_api` the gRPC one; both turn a
`RequestError` into TF Serving's error (HTTP 4xx/503 with `{"error": ...}`, gRPC INVALID_ARGUMENT, NOT_FOUND, ...).

Each model is a base path of numbered versions. A thread polls the base paths every `poll_s` seconds and serves the
versions the model's version policy asks for (TF Serving's: the latest N, default 1; all; or specific ones). A new
version is loaded with `tf.saved_model.load` and warmed up at every batch size a request can bring before it takes
traffic; a version that leaves the policy is retired and freed at the next poll. (TensorFlow keeps what XLA compiled
for a freed version: its compilation cache has no eviction, tensorflow/tensorflow#64170, so each swap of an XLA
export still costs some tens of MB per compiled shape; exports without XLA swap with flat memory.) Signatures are
called with every input, the SignatureDef's `defaults` filling in those a request leaves out, as TF Serving does.
"""

import collections
import contextlib
import ctypes
import gc
import logging
import os
import queue
import shutil
import threading
import time
from concurrent import futures

import numpy as np
import prometheus_client
import tensorflow as tf
import tensorflow_text  # noqa: F401  (registers the tokenizer ops exported graphs use)
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_status_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from tfglm.config import GENERATE_OPTIONS
from tfglm.data.chat import ROLES
from tfglm.errors import TfglmError
from tfglm.generation.decode import stream_text

log = logging.getLogger("tfglm")
WARMUP = os.path.join("assets.extra", "tf_serving_warmup_requests")
# The streaming signatures pass the decode state (caches included) between calls: `tfglm serve` runs them for its
# OpenAI-compatible endpoints and does not take them over Predict, where a client would send the state back.
STREAMING = ("generate_start", "chat_start", "advance")
STALE_EXPORT_S = 600  # a `tmp-*` export directory untouched this long is left over from a killed `tfglm export`
# gRPC status names of the HTTP statuses a request can end with (metrics use them for both protocols).
CODES = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "UNIMPLEMENTED", 408: "DEADLINE_EXCEEDED",
         413: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 500: "INTERNAL"}


class RequestError(Exception):
    """A request the server will not serve; `status` is the HTTP status (CODES has the gRPC code of each), `headers`
    any HTTP headers the answer needs."""

    def __init__(self, message, status=400, headers=None):
        super().__init__(message)
        self.status, self.headers = status, headers


def check_generate_options(arrays, context):
    """Rejects the generation options in `arrays` a model cannot honour, naming the option and its range
    (`GENERATE_OPTIONS`)."""
    for option in GENERATE_OPTIONS:
        problem = option.check(arrays[option.name].item(), context) if option.name in arrays else None
        if problem:
            raise RequestError(f"{option.name}: {problem}")


def check_conversations(roles, contents):
    """Rejects conversations the chat template cannot encode, naming the role, rather than leaving it to the
    graph's assertion."""
    if roles.shape != contents.shape:
        raise RequestError(f"roles and contents: one role a message, got shapes {list(roles.shape)} and "
                           f"{list(contents.shape)}")
    unknown = sorted(set(roles.flat) - {r.encode() for r in ROLES + ("",)})
    if unknown:
        raise RequestError(f"roles: unknown role {unknown[0].decode('utf-8', errors='replace')!r} (expected "
                           f"{', '.join(ROLES)}, or '' for no message)")
    empty = [i for i, row in enumerate(roles.reshape(len(roles), -1)) if not any(row)]
    if empty:
        raise RequestError(f"roles: conversation {empty[0]} has no message (every role is '')")


class Batcher:
    """Runs concurrent greedy `generate` requests with identical options as one batch.

    Callers queue their request and wait. One worker thread takes the oldest waiting request and, for up to
    `timeout_s` or until `max_batch_size` prompts are collected, more from the queue; the batch is the oldest request
    plus every other waiting one whose options (max_new_tokens, temperature, top_k, top_p, seed) are the same, in
    arrival order; the others wait for a later batch. The batch's prompts are concatenated, run in one call, and the
    outputs split back by request. Greedy completions do not depend on the rest of the batch (tests/test_export.py
    checks it); sampled ones do (a row's random numbers depend on its place), so requests with temperature > 0, like
    those of `max_batch_size` prompts or more, run alone on the caller's thread, and a seeded request gets the same
    text whatever other clients send. `on_batch(size)` is called with the number of prompts of every batch run.
    """

    Request = collections.namedtuple("Request", "arrays key future")

    def __init__(self, run, max_batch_size=8, timeout_s=0.005, on_batch=None):
        self._run, self.max_batch_size, self.timeout_s = run, max_batch_size, timeout_s
        self._on_batch = on_batch or (lambda size: None)
        self._queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._work, daemon=True, name="tfglm-batcher").start()

    def __call__(self, arrays):
        if arrays["temperature"] > 0 or len(arrays["prompts"]) >= self.max_batch_size:
            self._on_batch(len(arrays["prompts"]))
            return self._run(arrays)
        request = self.Request(arrays, tuple(arrays[o.name].item() for o in GENERATE_OPTIONS), futures.Future())
        with self._lock:
            if self._closed:
                return self._run(arrays)
            self._queue.put(request)
        return request.future.result()

    def close(self):
        """Ends the worker once the requests already queued have run."""
        with self._lock:
            self._closed = True
            self._queue.put(None)

    def _work(self):
        waiting, closing = [], False  # requests taken from the queue, oldest first
        while waiting or not closing:
            if not waiting:
                request = self._queue.get()
                if request is None:
                    return
                waiting.append(request)
            key, deadline = waiting[0].key, time.monotonic() + self.timeout_s
            while not closing and self._size(waiting, key) < self.max_batch_size:
                try:
                    request = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if request is None:
                    closing = True
                else:
                    waiting.append(request)
            batch, rest, size = [], [], 0
            for request in waiting:
                n = len(request.arrays["prompts"])
                if request.key == key and size + n <= self.max_batch_size:
                    batch.append(request)
                    size += n
                else:
                    rest.append(request)
            waiting = rest
            self._execute(batch)

    @staticmethod
    def _size(waiting, key):
        return sum(len(r.arrays["prompts"]) for r in waiting if r.key == key)

    def _execute(self, batch):
        arrays = dict(batch[0].arrays, prompts=np.concatenate([r.arrays["prompts"] for r in batch]))
        self._on_batch(len(arrays["prompts"]))
        try:
            outputs = self._run(arrays)
        except Exception as e:  # every waiting caller gets the error
            for request in batch:
                request.future.set_exception(e)
            return
        start = 0
        for request in batch:
            end = start + len(request.arrays["prompts"])
            request.future.set_result({k: v[start:end] for k, v in outputs.items()})
            start = end


class Servable:
    """One loaded version: signature functions, their SignatureDefs (with input defaults) and the model's context.

    Every input whose first dimension is the batch may hold at most `max_batch_size` rows. Loading replays the
    export's warmup requests at every power-of-two batch size up to `max_batch_size`, so that each batch shape a
    request or the batcher can bring is compiled (XLA) before the version takes traffic.
    """

    def __init__(self, name, version, path, max_prompt_bytes=64 * 1024, max_batch_size=32, enable_batching=False,
                 on_batch=None):
        self.name, self.version = name, version
        self.max_prompt_bytes, self.max_batch_size = max_prompt_bytes, max_batch_size
        self.loaded = tf.saved_model.load(path)
        self.created = int(os.path.getmtime(path))  # the export's time, for OpenAI's model list
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            self.signature_defs = saved_model_pb2.SavedModel.FromString(f.read()).meta_graphs[0].signature_def
        context = getattr(self.loaded, "context", None)  # absent from exports older than `tfglm serve`
        self.context = int(context.numpy()) if context is not None else None
        self.batcher = Batcher(self._generate, max_batch_size, on_batch=on_batch) if enable_batching else None
        self._warm_up(os.path.join(path, WARMUP))

    def _warm_up(self, path):
        """Replays the export's warmup requests, as TF Serving does while loading, at batch sizes 1, 2, 4, ...,
        `max_batch_size` (the request's rows repeated), and streamed when the signature has a `_start`."""
        if not os.path.exists(path):
            return
        sizes = sorted({min(1 << i, self.max_batch_size) for i in range(self.max_batch_size.bit_length())})
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
            signature_name = request.model_spec.signature_name or "serving_default"
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            batched = [k for k, info in self.signature_defs[signature_name].inputs.items()
                       if k in inputs and info.tensor_shape.dim and info.tensor_shape.dim[0].size == -1]
            for size in sizes:
                self.predict(signature_name, {k: np.resize(v, (size,) + v.shape[1:]) if k in batched else v
                                              for k, v in inputs.items()})
            if f"{signature_name}_start" in self.loaded.signatures:  # the OpenAI endpoints' one-row streaming
                for _ in self.stream(signature_name, self.prepare(signature_name, inputs), steps=1 << 30):
                    pass

    def signature(self, name):
        if not isinstance(name, str) or name not in self.loaded.signatures:
            raise RequestError(f'Serving signature name: "{name}" not found in signature def')
        return self.signature_defs[name]

    def predict(self, signature_name, inputs):
        """Outputs (name -> numpy array) of a signature for `inputs` (name -> numpy array), defaults filled in."""
        arrays = self.prepare(signature_name, inputs)
        if self.batcher and "prompts" in arrays and {o.name for o in GENERATE_OPTIONS} <= set(arrays):
            return self.batcher(arrays)
        return self._call(signature_name, arrays)

    def prepare(self, signature_name, inputs):
        """A signature's inputs checked (names, dtypes, shapes, sizes, roles, generation options), defaults filled
        in."""
        signature = self.signature(signature_name)
        self.check_input_names(signature_name, inputs)
        arrays = {k: tf.make_ndarray(v) for k, v in signature.defaults.items()}
        for name, array in inputs.items():
            arrays[name] = self._check(name, array, signature.inputs[name])
        if "roles" in arrays:
            check_conversations(arrays["roles"], arrays["contents"])
        check_generate_options(arrays, self.context)
        return arrays

    def stream(self, signature_name, arrays, steps):
        """`signature_name` ("generate" or "chat") for its `prepare`d `arrays`, run through its `_start` signature
        and `advance` every `steps` tokens: yields each row's new text per chunk and the `advance` outputs so far
        (`tfglm.generation.decode.stream_text`)."""
        start = self.signature_defs[f"{signature_name}_start"].inputs
        advance = self.signature_defs["advance"].inputs
        options = {k: v for k, v in arrays.items() if k in advance}
        state = self.run(f"{signature_name}_start", {k: v for k, v in arrays.items() if k in start})
        outputs = {}

        def step(state):
            outputs.update(self.run("advance", {**state, **options, "steps": np.int32(steps)}))
            return {k: v for k, v in outputs.items() if k in advance}, outputs

        for pieces in stream_text(step, state):
            yield pieces, outputs

    def check_input_names(self, signature_name, names):
        """Rejects the streaming signatures (STREAMING), unknown inputs and missing ones without a default, naming
        them."""
        signature = self.signature(signature_name)
        if signature_name in STREAMING:
            raise RequestError(f"signature {signature_name!r} carries the decode state of tfglm serve's streaming "
                               "endpoints; it is not served over Predict (use generate or chat)")
        unknown = sorted(set(names) - set(signature.inputs))
        missing = sorted(set(signature.inputs) - set(names) - set(signature.defaults))
        if unknown or missing:
            raise RequestError(f"signature {signature_name!r} takes inputs {sorted(signature.inputs)}"
                               + (f"; unknown: {unknown}" if unknown else "")
                               + (f"; missing: {missing}" if missing else ""))

    def classify(self, signature_name, examples):
        """[[(label, score), ...] per example], TF Serving's Classify result, for serialized tf.Examples."""
        outputs = self._examples(signature_name, examples, "classification", {"classes", "scores"})
        classes, scores = outputs.get("classes"), outputs.get("scores")
        batch, num_classes = (classes if classes is not None else scores).shape
        return [[(classes[i, j].decode("utf-8", errors="replace") if classes is not None else "",
                  float(scores[i, j]) if scores is not None else 0.0) for j in range(num_classes)]
                for i in range(batch)]

    def regress(self, signature_name, examples):
        """[value per example], TF Serving's Regress result, for serialized tf.Examples."""
        outputs = self._examples(signature_name, examples, "regression", {"outputs"})
        return [float(v) for v in outputs["outputs"].reshape(len(examples), -1)[:, 0]]

    def _examples(self, signature_name, examples, kind, outputs):
        """Runs a Classify or Regress signature: one string input `inputs`, and one or more of `outputs`."""
        signature = self.signature(signature_name)
        if list(signature.inputs) != ["inputs"] or not outputs & set(signature.outputs):
            raise RequestError(f"signature {signature_name!r} is not a {kind} signature (one input 'inputs'; "
                               f"outputs {' and/or '.join(repr(o) for o in sorted(outputs))})")
        examples = self._check("examples", np.array(examples, dtype=object), signature.inputs["inputs"])
        return self._call(signature_name, {"inputs": examples})

    def _check(self, name, array, info):
        dtype = tf.as_dtype(info.dtype)
        if array.dtype != dtype.as_numpy_dtype and not (dtype == tf.string and array.dtype == object):
            raise RequestError(f"{name}: expected {dtype.name}, got {array.dtype}")
        dims = [d.size for d in info.tensor_shape.dim]
        if not info.tensor_shape.unknown_rank and (
                len(dims) != array.ndim or any(d not in (-1, n) for d, n in zip(dims, array.shape))):
            expected = [d if d >= 0 else None for d in dims]
            raise RequestError(f"{name}: expected shape {expected}, got {list(array.shape)}")
        if dims and dims[0] == -1 and array.shape[0] == 0:
            raise RequestError(f"{name}: empty batch")
        if dims and dims[0] == -1 and array.shape[0] > self.max_batch_size:
            raise RequestError(f"{name}: a batch of {array.shape[0]}; this server takes at most {self.max_batch_size} "
                               "(--max_batch_size)")
        if dtype == tf.string and any(len(s) > self.max_prompt_bytes for s in array.flat):
            raise RequestError(f"{name}: a text of more than {self.max_prompt_bytes} bytes (the server's "
                               f"--max_prompt_bytes)")
        return array

    def _generate(self, arrays):
        return self._call("generate", arrays)

    def _call(self, signature_name, arrays):
        return {k: v.numpy() for k, v in self.run(signature_name, arrays).items()}

    def run(self, signature_name, inputs):
        """A signature's output tensors for `inputs` (arrays or tensors); its errors as RequestErrors."""
        try:
            return self.loaded.signatures[signature_name](**{k: tf.convert_to_tensor(v) for k, v in inputs.items()})
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            raise RequestError(str(e).strip().splitlines()[0]) from None

    def close(self):
        if self.batcher:
            self.batcher.close()


def read_model_config(path):
    """{name: ModelConfig} from a TF Serving ModelServerConfig text proto (`--model_config_file`): each model's
    base path, version policy and version labels."""
    try:
        with open(path) as f:
            config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    except (OSError, text_format.ParseError) as e:
        raise TfglmError(f"--model_config_file {path}: {e}") from None
    models = {}
    for model in config.model_config_list.config:
        if not model.name or not model.base_path or model.name in models:
            raise TfglmError(f"--model_config_file {path}: every config needs a name and a base_path, and names "
                             f"must differ ({model.name!r})")
        policy = model.model_version_policy
        if policy.WhichOneof("policy_choice") == "specific" and not policy.specific.versions:
            raise TfglmError(f"--model_config_file {path}: model {model.name}: a specific version policy needs "
                             "versions")
        models[model.name] = model
    if not models:
        raise TfglmError(f"--model_config_file {path}: no model_config_list entries")
    return models


class Model:
    """A model name served from a base path: the versions its version policy asks for, and its version labels."""

    def __init__(self, config, **servable_options):
        self.name, self.base_path = config.name, config.base_path
        self.policy, self.labels = config.model_version_policy, dict(config.version_labels)
        self.servable_options = servable_options
        self.servables = {}  # version -> Servable; replaced as a whole, so readers need no lock
        self._failed, self._retired = set(), []

    def wanted(self, versions):
        """The versions to serve among those on disk, by the version policy (TF Serving's default: the latest)."""
        choice = self.policy.WhichOneof("policy_choice")
        if choice == "all":
            return set(versions)
        if choice == "specific":
            return set(versions) & set(self.policy.specific.versions)
        return set(sorted(versions)[-max(self.policy.latest.num_versions, 1):])

    def poll(self):
        """Loads and warms up the versions the policy wants that are not served yet, then swaps them in and retires
        the versions it no longer wants; their memory is released at the next poll, once the requests they were
        serving are done (freeing a version pauses Python's threads for about 0.1 s: TensorFlow's teardown runs under
        the GIL). A version that fails to load is not retried (nor counted as on disk)."""
        if self._retired:
            self._retired.clear()
            release_memory()
        try:
            on_disk = [int(v) for v in os.listdir(self.base_path)
                       if v.isdigit() and os.path.exists(os.path.join(self.base_path, v, "saved_model.pb"))]
        except OSError as e:
            log.warning("%s: %s", self.name, e)
            return
        wanted = self.wanted([v for v in on_disk if v not in self._failed])
        loaded = {}
        for version in sorted(wanted - set(self.servables)):
            try:
                loaded[version] = Servable(self.name, version, os.path.join(self.base_path, str(version)),
                                           **self.servable_options)
            except Exception:
                log.exception("%s: version %d failed to load; not serving it", self.name, version)
                self._failed.add(version)
            else:
                log.info("%s: serving version %d from %s", self.name, version, self.base_path)
        kept = {v: s for v, s in self.servables.items() if v in wanted}
        if loaded or len(kept) < len(self.servables):
            old, self.servables = self.servables, {**kept, **loaded}
            for version in sorted(set(old) - set(kept)):
                old[version].close()
                self._retired.append(old[version])
                log.info("%s: version %d unloaded", self.name, version)

    def get(self, version=None, label=None):
        servables = self.servables
        if label is not None:
            if label not in self.labels:
                raise RequestError(f"Unrecognized servable version label: {label}", 404)
            version = self.labels[label]
        if version is None and servables:
            return servables[max(servables)]
        if version not in servables:
            spec = f"Specific({self.name}, {version})" if version is not None else f"Latest({self.name})"
            raise RequestError(f"Servable not found for request: {spec}", 404)
        return servables[version]

    def status(self, version=None, label=None):
        """GetModelStatusResponse: every served version (or the one asked for) AVAILABLE."""
        versions = sorted(self.servables) if version is None and label is None else [self.get(version, label).version]
        if not versions:
            raise RequestError(f"Servable not found for request: Latest({self.name})", 404)
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in versions:
            status = response.model_version_status.add(version=v)
            status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            status.status.SetInParent()  # error_code OK, error_message ""
        return response

    def close(self):
        for servable in self.servables.values():
            servable.close()


def release_memory():
    """Frees a dropped version's memory: Python's cycles (a loaded SavedModel has many), then glibc's free lists,
    which otherwise keep the freed tensors' pages and grow the process a little at every swap."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def remove_stale_exports(base_path):
    """Removes `tmp-*` directories a killed `tfglm export` left in `base_path` (untouched for STALE_EXPORT_S)."""
    for entry in os.scandir(base_path):
        if not (entry.name.startswith("tmp-") and entry.is_dir(follow_symlinks=False)):
            continue
        newest = max((os.path.getmtime(os.path.join(root, name)) for root, dirs, files in os.walk(entry.path)
                      for name in dirs + files), default=entry.stat().st_mtime)
        if time.time() - max(newest, entry.stat().st_mtime) > STALE_EXPORT_S:
            log.info("removing %s, left over from an interrupted export", entry.path)
            shutil.rmtree(entry.path, ignore_errors=True)


class Metrics:
    """Prometheus metrics (`/monitoring/prometheus/metrics`): requests and their latency by model, signature and
    status (a gRPC status name, for both protocols), and the size of every batch a batcher runs."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        labels = ("model", "signature", "status")
        self.requests = prometheus_client.Counter("tfglm_requests", "Requests served", labels,
                                                  registry=self.registry)
        self.latency = prometheus_client.Histogram("tfglm_request_latency_seconds", "Request latency", labels,
                                                   registry=self.registry)
        self.batch_size = prometheus_client.Histogram("tfglm_batch_size", "Prompts per generate call", ["model"],
                                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)

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


class Server:
    """Models behind a REST and a gRPC front end, with a thread polling for new versions.

    `models` maps each name to its base path or to a ModelConfig (`read_model_config`). A port of 0 binds a free one
    (read `rest_port` / `grpc_port` after `start`); `rest_api_port=None` disables REST. Limits: a request holds at
    most `max_batch_size` prompts (also the batcher's largest batch) of `max_prompt_bytes` each and
    `max_request_bytes` in all (REST body, gRPC message); at most `max_enqueued_requests` requests wait or run (more get
    503 / UNAVAILABLE), `num_threads` of them at a time per protocol; REST takes at most `max_connections`
    connections (more get uvicorn's 503) and gives each request `read_timeout_s` to send its headers and as long
    again for its body (then 408 and the connection closed).
    """

    def __init__(self, models, host="127.0.0.1", port=8500, rest_api_port=8501, enable_batching=False,
                 max_prompt_bytes=64 * 1024, poll_s=1.0, max_batch_size=32, max_enqueued_requests=64,
                 max_connections=256, max_request_bytes=4 << 20, read_timeout_s=10.0, num_threads=16):
        configs = {name: model_server_config_pb2.ModelConfig(name=name, base_path=c) if isinstance(c, str) else c
                   for name, c in models.items()}
        for name, config in configs.items():
            if not os.path.isdir(config.base_path):
                raise TfglmError(f"model {name}: base path {config.base_path} is not a directory")
        self.metrics = Metrics()
        self.models = {name: Model(config, max_prompt_bytes=max_prompt_bytes, max_batch_size=max_batch_size,
                                   enable_batching=enable_batching,
                                   on_batch=self.metrics.batch_size.labels(name).observe)
                       for name, config in configs.items()}
        self.host, self.port, self.rest_api_port, self.poll_s = host, port, rest_api_port, poll_s
        self.admission = Admission(max_enqueued_requests)
        self.max_connections, self.max_request_bytes = max_connections, max_request_bytes
        self.read_timeout_s, self.num_threads = read_timeout_s, num_threads
        self._stop = threading.Event()
        self._rest = self._grpc = None

    def start(self):
        """Removes stale exports, loads every model's versions, then starts polling and both front ends."""
        from tfglm.serving import grpc_api, rest  # they import this module

        # TensorFlow's inter-op pool (one thread a core by default) runs every request's function call; a new
        # version's XLA compilation holds one of its threads for seconds, which stalled the serving version's
        # requests. Settable only before TensorFlow starts, as under `tfglm serve`.
        with contextlib.suppress(RuntimeError):
            tf.config.threading.set_inter_op_parallelism_threads(max(self.num_threads, os.cpu_count() or 1))
        gc.collect()
        gc.freeze()  # the objects alive now (TensorFlow's, mostly) stay: later collections, a swap's too, skip them
        for model in self.models.values():
            remove_stale_exports(model.base_path)
            model.poll()
            if not model.servables:
                log.warning("%s: no loadable version under %s yet; waiting for one", model.name, model.base_path)
        threading.Thread(target=self._poll, daemon=True, name="tfglm-poll").start()
        try:
            self._grpc, self.grpc_port = grpc_api.start(self, self.host, self.port)
            if self.rest_api_port is not None:
                self._rest, self.rest_port = rest.start(self, self.host, self.rest_api_port)
        except TfglmError:
            self.stop()
            raise
        return self

    def _poll(self):
        while not self._stop.wait(self.poll_s):
            for model in self.models.values():
                model.poll()

    def stop(self):
        self._stop.set()
        if self._rest:
            self._rest.stop()
        if self._grpc:
            self._grpc.stop(grace=1).wait()
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
