"""A client for tfglm models served by `tfglm serve` or TF Serving, over REST or gRPC (TF Serving's APIs).

    client = Client("http://localhost:8501", "tiny")            # or Client("localhost:8500", "tiny", "grpc")
    client.generate(["ROMEO:"], max_new_tokens=20, temperature=0)  # {"completions": [...], "num_tokens": [...]}
    client.generate(["ROMEO:"], stop=["\n\n"])   # ends each completion before a blank line (tfglm serve, REST)
    client.translate(["A dog runs."])   # ["Ein Hund rennt."] from a translation export
    client.classify(["a great film"])  # {"labels": ["pos"], "scores": [[0.1, 0.9]]} from a classifier export

Options left as None are not sent, so the server fills in the model's defaults (its run's `generate` config).
"""

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tfglm.config import GENERATE_OPTIONS, stop_sequences
from tfglm.errors import TfglmError
from tfglm.serving.codec import to_json

DTYPES = {"prompts": "string", "texts": "string", "sources": "string", "token_ids": "int32", "lengths": "int32",
          **{o.name: {int: "int32", float: "float32"}[o.type] for o in GENERATE_OPTIONS}}


class Client:
    """Calls one model's signatures; `url_or_target` is `http://host:8501` (REST) or `host:8500` (gRPC)."""

    def __init__(self, url_or_target, model_name, protocol="rest", version=None, timeout=60.0):
        if protocol not in ("rest", "grpc"):
            raise TfglmError(f"protocol: 'rest' or 'grpc', got {protocol!r}")
        self.target, self.model_name, self.protocol = url_or_target, model_name, protocol
        self.version, self.timeout = version, timeout
        if protocol == "grpc":
            self._stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(url_or_target))

    def generate(self, prompts, max_new_tokens=None, temperature=None, top_k=None, top_p=None, seed=None,
                 stop=None):
        """{"completions": [str], "num_tokens": [int]} for `prompts`. With `stop` (a string or a list of up to 4),
        each completion ends before the first of them its text completes: the prompts go to `tfglm serve`'s
        `/v1/completions` (the served model's latest version), all at once, since TF Serving's Predict takes no stop
        sequences (so REST only)."""
        options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                   "seed": seed}
        if stop is None:
            return self.predict("generate", prompts=list(prompts), **options)
        try:
            stop = list(stop_sequences(stop))
        except ValueError as e:
            raise TfglmError(f"stop: {e}") from None
        if self.protocol != "rest":
            raise TfglmError("stop: needs REST (tfglm serve's /v1/completions); gRPC's Predict takes no stop sequences")
        body = {"model": self.model_name, "stop": stop, "max_tokens": options.pop("max_new_tokens"), **options}
        body = {k: v for k, v in body.items() if v is not None}
        url = f"{self.target.rstrip('/')}/v1/completions"
        with ThreadPoolExecutor(min(len(prompts), 16) or 1) as pool:
            out = list(pool.map(lambda prompt: self._post(url, {**body, "prompt": prompt}), prompts))
        return {"completions": [o["choices"][0]["text"] for o in out],
                "num_tokens": [o["usage"]["completion_tokens"] for o in out]}

    def score(self, texts):
        """{"log_likelihood": [float], "num_tokens": [int], "perplexity": [float]} for `texts`."""
        return self.predict("score", texts=list(texts))

    def translate(self, sources):
        """The translations [str] of `sources` (a translation export)."""
        out = self.predict("translate", sources=list(sources))
        return out["translations"] if isinstance(out, dict) else out  # REST gives a signature's only output bare

    def classify(self, texts):
        """{"labels": [str], "scores": [[float] per label]} for `texts` (a classifier export's `predict`)."""
        return self.predict("predict", texts=list(texts))

    def predict(self, signature_name, **inputs):
        """The outputs (name -> nested lists) of `signature_name` for `inputs`; None values are not sent."""
        inputs = {k: v for k, v in inputs.items() if v is not None}
        return self._rest(signature_name, inputs) if self.protocol == "rest" else self._grpc(signature_name, inputs)

    def _rest(self, signature_name, inputs):
        version = f"/versions/{self.version}" if self.version else ""
        url = f"{self.target.rstrip('/')}/v1/models/{self.model_name}{version}:predict"
        return self._post(url, {"signature_name": signature_name, "inputs": inputs})["outputs"]

    def _post(self, url, body):
        request = urllib.request.Request(url, json.dumps(body).encode("utf-8"), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            raise TfglmError(f"{url}: HTTP {e.code}: {_error(e.read())}") from None
        except OSError as e:
            raise TfglmError(f"{url}: {e}") from None

    def _grpc(self, signature_name, inputs):
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = self.model_name, signature_name
        if self.version:
            request.model_spec.version.value = self.version
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=DTYPES.get(name)))
        try:
            response = self._stub.Predict(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise TfglmError(f"{self.target}: {e.code().name}: {e.details()}") from None
        return {k: to_json(k, tf.make_ndarray(v)) for k, v in response.outputs.items()}


def _error(body):
    try:
        error = json.loads(body)["error"]
        return error["message"] if isinstance(error, dict) else error  # OpenAI's error object, or TF Serving's
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", errors="replace")[:200]
