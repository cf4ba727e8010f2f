"""A served version: a loaded `tfglm export` SavedModel, its signatures called with checked inputs and their
SignatureDef's `defaults` filled in (as TF Serving does), warmed up before it takes traffic."""

import os
import re

import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  (registers the tokenizer ops exported graphs use)
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from tfglm.config import GENERATE_OPTIONS
from tfglm.generation.decode import stream_text
from tfglm.serving.batching import Batcher
from tfglm.serving.checks import RequestError, check_conversations, check_generate_options, check_token_ids
from tfglm.serving.signatures import STREAMING, WARMUP


def graph_message(error):
    """The line of a signature's error message that says what was wrong: an in-graph assertion's own message (its
    first data item), or else the first line that is not TensorFlow's preamble."""
    asserted = re.search(r"assertion failed: \[(.*?)\]\s*$", error, re.MULTILINE)
    if asserted:
        return asserted.group(1)
    preamble = ("Graph execution error", "Detected at node", "<stack traces unavailable>")
    lines = [line.strip() for line in error.strip().splitlines()]
    return next((line for line in lines if line and not line.startswith(preamble)), lines[0])


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
        # The model's context and vocabulary size (`tfglm.serving.signatures`), absent from older exports.
        self.context, self.vocab_size = (int(v.numpy()) if v is not None else None
                                         for v in (getattr(self.loaded, k, None) for k in ("context", "vocab_size")))
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
        if "token_ids" in arrays:
            check_token_ids(arrays["token_ids"], arrays["lengths"], self.vocab_size)
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
            raise RequestError(graph_message(str(e))) from None

    def close(self):
        if self.batcher:
            self.batcher.close()
