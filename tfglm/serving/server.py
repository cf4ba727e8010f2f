"""`tfglm serve`: TF Serving's REST and gRPC APIs over `tfglm export` directories, for development and small
deployments.

Each model is a base path of numbered versions; the newest is loaded with `tf.saved_model.load`, its warmup requests
replayed, and only then swapped in, by a thread polling the base paths every `poll_s` seconds. Signatures are called
with every input, the SignatureDef's `defaults` filling in those a request leaves out, as TF Serving does.
REST: `GET /v1/models/NAME[/versions/V][/metadata]`, `POST /v1/models/NAME[/versions/V]:predict` (row and
columnar formats) and `:classify` (tf.Example features as JSON). gRPC: `PredictionService.Predict`, `Classify` and
`GetModelMetadata`. A bad request gets a TF Serving-style
error (HTTP 400 / 404, gRPC INVALID_ARGUMENT / NOT_FOUND) and the server carries on.
"""

import base64
import collections
import json
import logging
import os
import queue
import re
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  (registers the tokenizer ops exported graphs use)
from google.protobuf import json_format, text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, predict_pb2, prediction_log_pb2,
                                     prediction_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2

from tfglm.errors import TfglmError

log = logging.getLogger("tfglm")
GENERATE_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
WARMUP = os.path.join("assets.extra", "tf_serving_warmup_requests")
ROUTE = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata|:predict|:classify)?")


class RequestError(Exception):
    """A bad request; `status` is the HTTP status, 400 (gRPC INVALID_ARGUMENT) or 404 (NOT_FOUND)."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def check_generate_options(arrays, context):
    """Rejects generation options a model cannot honour, naming the option and its limit."""
    n, temperature, top_k, top_p = (arrays[k].item() for k in GENERATE_OPTIONS[:4])
    if n < 1 or (context and n > context - 1):
        limit = f"[1, {context - 1}] for this model (context {context})" if context else ">= 1"
        raise RequestError(f"max_new_tokens: {n} is out of range; it must be in {limit}")
    if temperature < 0:
        raise RequestError(f"temperature: must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise RequestError(f"top_k: must be >= 0 (0 disables top-k), got {top_k}")
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p: must be in (0, 1], got {top_p}")


class Batcher:
    """Runs concurrent greedy `generate` requests as one batch.

    Callers queue their request and wait. One worker thread takes the oldest request, then keeps taking queued ones
    for up to `timeout_s` or until `max_batch_size` prompts are collected; requests with the same options
    (max_new_tokens, temperature, ...) as the oldest join its batch, the others wait for a later one. The batch's
    prompts are concatenated, run in one call, and the outputs split back by request. Greedy completions do not
    depend on the rest of the batch (tests/test_export.py checks it); sampled ones do (a row's random numbers depend
    on its place), so requests with temperature > 0, like those of `max_batch_size` prompts or more, run alone on
    the caller's thread, and a seeded request gets the same text whatever other clients send.
    """

    Request = collections.namedtuple("Request", "arrays key future")

    def __init__(self, run, max_batch_size=8, timeout_s=0.005):
        self._run, self.max_batch_size, self.timeout_s = run, max_batch_size, timeout_s
        self._queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._work, daemon=True, name="tfglm-batcher").start()

    def __call__(self, arrays):
        if arrays["temperature"] > 0 or len(arrays["prompts"]) >= self.max_batch_size:
            return self._run(arrays)
        request = self.Request(arrays, tuple(arrays[k].item() for k in GENERATE_OPTIONS), futures.Future())
        with self._lock:
            if self._closed:
                return self._run(arrays)
            self._queue.put(request)
        return request.future.result()

    def close(self):
        """Ends the worker after the requests already queued."""
        with self._lock:
            self._closed = True
            self._queue.put(None)

    def _work(self):
        pending = []
        while True:
            if not pending:
                pending.append(self._queue.get())
            if pending[0] is None:
                return
            deadline = time.monotonic() + self.timeout_s
            while self._size(pending) < self.max_batch_size and time.monotonic() < deadline:
                try:
                    pending.append(self._queue.get(timeout=max(deadline - time.monotonic(), 0)))
                except queue.Empty:
                    break
                if pending[-1] is None:
                    break
            batch, size = [], 0
            for request in list(pending):
                if request is not None and request.key == pending[0].key:
                    if size + len(request.arrays["prompts"]) > self.max_batch_size:
                        break
                    batch.append(request)
                    size += len(request.arrays["prompts"])
                    pending.remove(request)
            self._execute(batch)

    def _size(self, pending):
        return sum(len(r.arrays["prompts"]) for r in pending if r is not None and r.key == pending[0].key)

    def _execute(self, batch):
        arrays = dict(batch[0].arrays, prompts=np.concatenate([r.arrays["prompts"] for r in batch]))
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
    """One loaded version: signature functions, their SignatureDefs (with input defaults) and the model's context."""

    def __init__(self, name, version, path, max_prompt_bytes, enable_batching):
        self.name, self.version, self.max_prompt_bytes = name, version, max_prompt_bytes
        self.loaded = tf.saved_model.load(path)
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            self.signature_defs = saved_model_pb2.SavedModel.FromString(f.read()).meta_graphs[0].signature_def
        context = getattr(self.loaded, "context", None)  # absent from exports older than `tfglm serve`
        self.context = int(context.numpy()) if context is not None else None
        self.batcher = Batcher(self._generate) if enable_batching else None
        self._warm_up(os.path.join(path, WARMUP))

    def _warm_up(self, path):
        """Replays the export's warmup requests, as TF Serving does while loading."""
        if not os.path.exists(path):
            return
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            self.predict(request.model_spec.signature_name or "serving_default", inputs)

    def signature(self, name):
        if name not in self.loaded.signatures:
            raise RequestError(f'Serving signature name: "{name}" not found in signature def')
        return self.signature_defs[name]

    def predict(self, signature_name, inputs):
        """Outputs (name -> numpy array) of a signature for `inputs` (name -> numpy array), defaults filled in."""
        signature = self.signature(signature_name)
        unknown = sorted(set(inputs) - set(signature.inputs))
        missing = sorted(set(signature.inputs) - set(inputs) - set(signature.defaults))
        if unknown or missing:
            raise RequestError(f"signature {signature_name!r} takes inputs {sorted(signature.inputs)}"
                               + (f"; unknown: {unknown}" if unknown else "")
                               + (f"; missing: {missing}" if missing else ""))
        arrays = {k: tf.make_ndarray(v) for k, v in signature.defaults.items()}
        for name, array in inputs.items():
            arrays[name] = self._check(name, array, signature.inputs[name])
        if set(GENERATE_OPTIONS) <= set(arrays):
            check_generate_options(arrays, self.context)
            if self.batcher:
                return self.batcher(arrays)
        return self._call(signature_name, arrays)

    def classify(self, signature_name, examples):
        """(classes, scores) [batch, num_classes] (either may be None) of a classification signature for serialized
        tf.Examples, as TF Serving's Classify API computes them."""
        signature = self.signature(signature_name)
        if list(signature.inputs) != ["inputs"] or not {"classes", "scores"} & set(signature.outputs):
            raise RequestError(f"signature {signature_name!r} is not a classification signature (one input "
                               "'inputs'; outputs 'classes' and/or 'scores')")
        if not examples:
            raise RequestError("examples: empty batch")
        outputs = self._call(signature_name, {"inputs": np.array(examples, dtype=object)})
        return outputs.get("classes"), outputs.get("scores")

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
        if dtype == tf.string and any(len(s) > self.max_prompt_bytes for s in array.flat):
            raise RequestError(f"{name}: a text of more than {self.max_prompt_bytes} bytes (the server's "
                               f"--max_prompt_bytes)")
        return array

    def _generate(self, arrays):
        return self._call("generate", arrays)

    def _call(self, signature_name, arrays):
        try:
            outputs = self.loaded.signatures[signature_name](**{k: tf.constant(v) for k, v in arrays.items()})
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            raise RequestError(str(e).strip().splitlines()[0]) from None
        return {k: v.numpy() for k, v in outputs.items()}

    def close(self):
        if self.batcher:
            self.batcher.close()


class Model:
    """A model name served from a base path: its newest version, replaced when a newer one appears."""

    def __init__(self, name, base_path, **servable_options):
        self.name, self.base_path, self.servable_options = name, base_path, servable_options
        self.servable = None
        self._failed = set()

    def poll(self):
        """Loads the newest version if it is not the one served; a version that fails to load is not retried."""
        try:
            versions = [int(v) for v in os.listdir(self.base_path)
                        if v.isdigit() and os.path.exists(os.path.join(self.base_path, v, "saved_model.pb"))]
        except OSError as e:
            log.warning("%s: %s", self.name, e)
            return
        newest = max(versions, default=None)
        if newest is None or newest in self._failed or (self.servable and self.servable.version == newest):
            return
        try:
            servable = Servable(self.name, newest, os.path.join(self.base_path, str(newest)), **self.servable_options)
        except Exception:
            log.exception("%s: version %d failed to load; still serving the previous one", self.name, newest)
            self._failed.add(newest)
            return
        old, self.servable = self.servable, servable
        if old:
            old.close()
        log.info("%s: serving version %d from %s", self.name, newest, self.base_path)

    def get(self, version=None):
        servable = self.servable
        if servable is None or version not in (None, servable.version):
            spec = f"Specific({self.name}, {version})" if version is not None else f"Latest({self.name})"
            raise RequestError(f"Servable not found for request: {spec}", 404)
        return servable


def read_model_config(path):
    """{name: base_path} from a TF Serving ModelServerConfig text proto (`--model_config_file`)."""
    try:
        with open(path) as f:
            config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    except (OSError, text_format.ParseError) as e:
        raise TfglmError(f"--model_config_file {path}: {e}") from None
    models = {c.name: c.base_path for c in config.model_config_list.config}
    if not models:
        raise TfglmError(f"--model_config_file {path}: no model_config_list entries")
    return models


def to_array(name, value, info):
    """A JSON value (nested lists; strings as text or {"b64": ...}) as a numpy array of the input's dtype."""
    dtype = tf.as_dtype(info.dtype)
    try:
        if dtype == tf.string:
            return np.array(_bytes(name, value), dtype=object)
        array = np.array(value)
    except ValueError:
        raise RequestError(f"{name}: not a rectangular list") from None
    kinds = "iu" if dtype.is_integer else "iuf" if dtype.is_floating else "b"
    if array.dtype.kind not in kinds:
        raise RequestError(f"{name}: expected {dtype.name}, got {json.dumps(value)[:80]}")
    if dtype.is_integer and array.size and (array.min() < dtype.min or array.max() > dtype.max):
        raise RequestError(f"{name}: out of range for {dtype.name}")
    return array.astype(dtype.as_numpy_dtype)


def _bytes(name, value):
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_bytes(name, v) for v in value]
    raise RequestError(f"{name}: expected a string or {{\"b64\": ...}}, got {json.dumps(value)[:80]}")


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


class Server:
    """Models (name -> base path) behind a REST and a gRPC front end, with a thread polling for new versions.

    A port of 0 binds a free one (read `rest_port` / `grpc_port` after `start`); `rest_api_port=None` disables REST.
    """

    def __init__(self, models, host="127.0.0.1", port=8500, rest_api_port=8501, enable_batching=False,
                 max_prompt_bytes=64 * 1024, poll_s=1.0):
        for name, base_path in models.items():
            if not os.path.isdir(base_path):
                raise TfglmError(f"model {name}: base path {base_path} is not a directory")
        self.models = {name: Model(name, base_path, max_prompt_bytes=max_prompt_bytes,
                                   enable_batching=enable_batching) for name, base_path in models.items()}
        self.host, self.port, self.rest_api_port, self.poll_s = host, port, rest_api_port, poll_s
        self._stop = threading.Event()
        self._http = self._grpc = None

    def start(self):
        """Loads every model's newest version, then starts polling and both front ends."""
        for model in self.models.values():
            model.poll()
            if model.servable is None:
                log.warning("%s: no loadable version under %s yet; waiting for one", model.name, model.base_path)
        threading.Thread(target=self._poll, daemon=True, name="tfglm-poll").start()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(self), self._grpc)
        try:
            self.grpc_port = self._grpc.add_insecure_port(f"{self.host}:{self.port}")
        except RuntimeError:
            self.stop()
            raise TfglmError(f"--port {self.port}: cannot bind {self.host}:{self.port} (in use?)") from None
        self._grpc.start()
        if self.rest_api_port is not None:
            try:
                self._http = ThreadingHTTPServer((self.host, self.rest_api_port), RestHandler)
            except OSError as e:
                self.stop()
                raise TfglmError(f"--rest_api_port {self.rest_api_port}: cannot bind {self.host}:"
                                 f"{self.rest_api_port} ({e.strerror})") from None
            self._http.daemon_threads = True
            self._http.app = self
            self.rest_port = self._http.server_address[1]
            threading.Thread(target=self._http.serve_forever, daemon=True, name="tfglm-rest").start()
        return self

    def _poll(self):
        while not self._stop.wait(self.poll_s):
            for model in self.models.values():
                model.poll()

    def stop(self):
        self._stop.set()
        if self._http:
            self._http.shutdown()
            self._http.server_close()
        if self._grpc:
            self._grpc.stop(grace=1).wait()
        for model in self.models.values():
            if model.servable:
                model.servable.close()

    def servable(self, name, version=None):
        if name not in self.models:
            raise RequestError(f"Servable not found for request: Latest({name})", 404)
        return self.models[name].get(version)

    def rest_predict(self, name, version, body):
        """The JSON response to a REST predict request `body` (bytes)."""
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"JSON Parse error: {e}") from None
        if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
            raise RequestError('Missing \'inputs\' or \'instances\' key (give one: {"instances": [...]} or '
                               '{"inputs": ...})')
        servable = self.servable(name, version)
        signature_name = request.get("signature_name") or "serving_default"
        signature = servable.signature(signature_name)
        row = "instances" in request
        columns = _rows_to_columns(request["instances"], signature) if row else _columns(request["inputs"], signature)
        inputs = {k: to_array(k, v, signature.inputs[k]) if k in signature.inputs else np.array(v)
                  for k, v in columns.items()}
        outputs = {k: to_json(k, v) for k, v in servable.predict(signature_name, inputs).items()}
        if not row:
            return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}
        sizes = {len(v) for v in outputs.values()}
        if len(sizes) != 1:
            raise RequestError("row format (instances) needs outputs of one batch size; use columnar (inputs)")
        if len(outputs) == 1:
            return {"predictions": next(iter(outputs.values()))}
        return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(sizes.pop())]}


    def rest_classify(self, name, version, body):
        """The JSON response to a REST classify request: {"result": [[[label, score], ...] per example]}."""
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"JSON Parse error: {e}") from None
        if not isinstance(request, dict) or not isinstance(request.get("examples"), list):
            raise RequestError("Missing 'examples' key (a list of {feature: value} objects)")
        context = request.get("context", {})
        examples = [to_example({**context, **features}, f"examples[{i}]").SerializeToString()
                    for i, features in enumerate(request["examples"])]
        servable = self.servable(name, version)
        classes, scores = servable.classify(request.get("signature_name") or "serving_default", examples)
        return {"result": classification_rows(classes, scores)}


def to_example(features, where):
    """A tf.Example from JSON features: strings (or {"b64": ...}) as bytes, integers as int64, numbers as float."""
    if not isinstance(features, dict):
        raise RequestError(f"{where}: expected an object of features")
    example = tf.train.Example()
    for key, value in features.items():
        values, feature = value if isinstance(value, list) else [value], example.features.feature[key]
        if all(isinstance(v, (str, dict)) for v in values):
            feature.bytes_list.value.extend(_bytes(f"{where}.{key}", values))
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            feature.int64_list.value.extend(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            feature.float_list.value.extend(values)
        else:
            raise RequestError(f"{where}.{key}: expected strings, integers or numbers, got {json.dumps(value)[:80]}")
    return example


def classification_rows(classes, scores):
    """[[(label, score), ...] per example], TF Serving's classification result, from either output or both."""
    batch, num_classes = (classes if classes is not None else scores).shape
    return [[[classes[i, j].decode("utf-8", errors="replace") if classes is not None else "",
              float(scores[i, j]) if scores is not None else 0.0] for j in range(num_classes)] for i in range(batch)]


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


class RestHandler(BaseHTTPRequestHandler):
    """TF Serving's REST API: model status, metadata and predict; errors as {"error": message}."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._respond(self._get)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._respond(lambda name, version, action: self._post(name, version, action, body))

    def _get(self, name, version, action):
        servable = self.server.app.servable(name, version)
        if action == "/metadata":
            return metadata(servable, as_json=True)
        if action is None:
            return {"model_version_status": [{"version": str(servable.version), "state": "AVAILABLE",
                                              "status": {"error_code": "OK", "error_message": ""}}]}
        raise RequestError(f"Malformed request: GET {self.path}", 404)

    def _post(self, name, version, action, body):
        if action == ":predict":
            return self.server.app.rest_predict(name, version, body)
        if action == ":classify":
            return self.server.app.rest_classify(name, version, body)
        raise RequestError(f"Malformed request: POST {self.path}", 404)

    def _respond(self, handle):
        match = ROUTE.fullmatch(self.path)
        try:
            if not match:
                raise RequestError(f"Malformed request: {self.command} {self.path}", 404)
            name, version, action = match.groups()
            status, response = 200, handle(name, int(version) if version else None, action)
        except RequestError as e:
            status, response = e.status, {"error": str(e)}
        except Exception as e:  # a server fault: report it, keep serving
            log.exception("REST %s %s", self.command, self.path)
            status, response = 500, {"error": f"{type(e).__name__}: {e}"}
        body = json.dumps(response, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        log.debug("REST " + format, *args)


def metadata(servable, as_json=False):
    """The model's SignatureDefMap, as a GetModelMetadataResponse or (as_json) TF Serving's REST metadata JSON."""
    signatures = get_model_metadata_pb2.SignatureDefMap(signature_def=servable.signature_defs)
    if as_json:
        return {"model_spec": {"name": servable.name, "signature_name": "", "version": str(servable.version)},
                "metadata": {"signature_def": json_format.MessageToDict(signatures, preserving_proto_field_name=True)}}
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    response.metadata["signature_def"].Pack(signatures)
    return response


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """TF Serving's gRPC PredictionService: Predict, Classify and GetModelMetadata (the rest are UNIMPLEMENTED)."""

    def __init__(self, app):
        self.app = app

    def _servable(self, model_spec):
        return self.app.servable(model_spec.name, model_spec.version.value if model_spec.HasField("version") else None)

    def Predict(self, request, context):
        try:
            servable = self._servable(request.model_spec)
            signature_name = request.model_spec.signature_name or "serving_default"
            try:
                inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            except (ValueError, TypeError) as e:
                raise RequestError(f"inputs: {e}") from None
            outputs = servable.predict(signature_name, inputs)
            unknown = set(request.output_filter) - set(outputs)
            if unknown:
                raise RequestError(f"output_filter: no outputs {sorted(unknown)} in signature {signature_name!r}")
        except RequestError as e:
            self._abort(context, e)
        response = predict_pb2.PredictResponse()
        response.model_spec.name, response.model_spec.signature_name = servable.name, signature_name
        response.model_spec.version.value = servable.version
        for name in request.output_filter or outputs:
            response.outputs[name].CopyFrom(tf.make_tensor_proto(outputs[name]))
        return response

    def Classify(self, request, context):
        try:
            servable = self._servable(request.model_spec)
            kind = request.input.WhichOneof("kind")
            if kind == "example_list":
                examples = list(request.input.example_list.examples)
            elif kind == "example_list_with_context":
                with_context = request.input.example_list_with_context
                examples = [_with_context(with_context.context, e) for e in with_context.examples]
            else:
                raise RequestError("Input is empty")
            signature_name = request.model_spec.signature_name or "serving_default"
            classes, scores = servable.classify(signature_name, [e.SerializeToString() for e in examples])
        except RequestError as e:
            self._abort(context, e)
        response = classification_pb2.ClassificationResponse()
        response.model_spec.name, response.model_spec.signature_name = servable.name, signature_name
        response.model_spec.version.value = servable.version
        for row in classification_rows(classes, scores):
            response.result.classifications.add().classes.extend(
                classification_pb2.Class(label=label, score=score) for label, score in row)
        return response

    def GetModelMetadata(self, request, context):
        try:
            servable = self._servable(request.model_spec)
            if list(request.metadata_field) != ["signature_def"]:
                raise RequestError(f"Metadata field {list(request.metadata_field)} is not supported "
                                   "(only ['signature_def'])")
        except RequestError as e:
            self._abort(context, e)
        return metadata(servable)

    @staticmethod
    def _abort(context, error):
        code = grpc.StatusCode.NOT_FOUND if error.status == 404 else grpc.StatusCode.INVALID_ARGUMENT
        context.abort(code, str(error))


def _with_context(context, example):
    merged = tf.train.Example()
    merged.CopyFrom(context)
    merged.MergeFrom(example)
    return merged
