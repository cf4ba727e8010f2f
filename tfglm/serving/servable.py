"""A served version: a loaded `tfglm export` SavedModel, its signatures called with checked inputs and their
SignatureDef's `defaults` filled in (as TF Serving does), warmed up before it takes traffic.

A language model exported with the engine's signatures (`tfglm.serving.signatures.ENGINE`) generates through its
decode engine (`tfglm.serving.engine`): every `generate` and `chat` request, whole or streamed, shares its slots.
An export written before them runs each request alone through its `generate`/`chat` (`*_start` and `advance` when
streamed).
"""

import contextlib
import logging
import os
import re

import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  (registers the tokenizer ops exported graphs use)
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from tfglm.config import GENERATE_OPTIONS
from tfglm.generation.decode import stream_text
from tfglm.serving.checks import RequestError, check_conversations, check_generate_options, check_token_ids
from tfglm.serving.engine import Engine, Request, default_slots
from tfglm.serving.signatures import ENGINE, STREAMING, WARMUP

log = logging.getLogger("tfglm")
OPTION_NAMES = [o.name for o in GENERATE_OPTIONS]


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

    Every input whose first dimension is the batch may hold at most `max_batch_size` rows. Loading warms up every
    shape a request can bring before the version takes traffic: the engine's (`Engine.warm_up`), then the export's
    warmup requests through it; for an export without the engine, those requests at every power-of-two batch size
    up to `max_batch_size`. `max_slots` sizes the engine (None: `engine.default_slots`); `engine_metrics` are its
    metrics (`Engine`'s `metrics`).
    """

    def __init__(self, name, version, path, max_prompt_bytes=64 * 1024, max_batch_size=32, max_slots=None,
                 engine_metrics=None):
        self.name, self.version = name, version
        self.max_prompt_bytes, self.max_batch_size = max_prompt_bytes, max_batch_size
        self.loaded = tf.saved_model.load(path)
        self.signature_names = list(self.loaded.signatures)
        self.created = int(os.path.getmtime(path))  # the export's time, for OpenAI's model list
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            self.signature_defs = saved_model_pb2.SavedModel.FromString(f.read()).meta_graphs[0].signature_def
        self.defaults = {name: {k: tf.make_ndarray(v) for k, v in signature.defaults.items()}  # read once
                         for name, signature in self.signature_defs.items()}
        # The model's context and vocabulary size (`tfglm.serving.signatures`), absent from older exports.
        self.context, self.vocab_size = (int(v.numpy()) if v is not None else None
                                         for v in (getattr(self.loaded, k, None) for k in ("context", "vocab_size")))
        self.engine = self._engine(max_slots, engine_metrics) if "slot_step" in self.signature_defs else None
        self._warm_up(os.path.join(path, WARMUP))

    def _engine(self, max_slots, metrics):
        """The decode engine over the export's `slot_prefill` and `slot_step`."""
        signatures = self.loaded.signatures
        caches = self.signature_defs["slot_prefill"].inputs["caches"]
        shape = [d.size for d in caches.tensor_shape.dim]
        per_slot = [shape[0], *shape[2:]]
        dtype = tf.as_dtype(caches.dtype)
        max_slots = max_slots or default_slots(int(np.prod(per_slot)) * dtype.size)
        projection = signatures["output_projection"]()["projection"]

        def prefill(caches, tokens, slots, ids, start):
            out = signatures["slot_prefill"](caches=caches, tokens=tokens, slots=tf.constant(slots),
                                             ids=tf.constant(ids), start=tf.constant(start))
            return out["caches"], out["tokens"]

        def step(caches, tokens, positions, limits, temperature, top_k, top_p, seed, steps):
            out = signatures["slot_step"](caches=caches, tokens=tokens, positions=tf.constant(positions),
                                          limits=tf.constant(limits), temperature=tf.constant(temperature),
                                          top_k=tf.constant(top_k), top_p=tf.constant(top_p), seed=tf.constant(seed),
                                          steps=tf.constant(steps), projection=projection)
            return out["caches"], out["tokens"]

        log.info("%s: version %d decodes in %d slots of %d tokens (%.1f MiB of KV cache)", self.name, self.version,
                 max_slots, shape[4], max_slots * np.prod(per_slot) * dtype.size / (1 << 20))
        return Engine(prefill, step, lambda rows: self.detokenize(rows).tolist(), per_slot, dtype,
                      int(self.loaded.eot_id.numpy()), max_slots, metrics=metrics)

    def _warm_up(self, path):
        """Warms up the engine, then replays the export's warmup requests (TF Serving's path): through the engine
        once, streamed too; without an engine at batch sizes 1, 2, 4, ..., `max_batch_size` (the request's rows
        repeated), streamed when the signature has a `_start`."""
        if self.engine:
            log.info("%s: version %d: engine warm-up took %.1f s", self.name, self.version, self.engine.warm_up())
        if not os.path.exists(path):
            return
        sizes = [1] if self.engine else sorted({min(1 << i, self.max_batch_size)
                                                for i in range(self.max_batch_size.bit_length())})
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
                for _ in self.stream(signature_name, self.prepare(signature_name, inputs)):
                    pass

    def signature(self, name):
        if not isinstance(name, str) or name not in self.signature_names:
            raise RequestError(f'Serving signature name: "{name}" not found in signature def')
        return self.signature_defs[name]

    def predict(self, signature_name, inputs):
        """Outputs (name -> numpy array) of a signature for `inputs` (name -> numpy array), defaults filled in."""
        arrays = self.prepare(signature_name, inputs)
        kind = self.generation_kind(signature_name)
        if self.engine and kind:
            return self._engine_predict(signature_name, kind, arrays)
        return self._call(signature_name, arrays)

    def generation_kind(self, signature_name):
        """"generate" or "chat" for a signature the engine runs (`serving_default` is one of them), else None."""
        inputs = self.signature_defs[signature_name].inputs
        if {"prompts", *OPTION_NAMES} <= set(inputs):
            return "generate"
        if {"roles", "contents", *OPTION_NAMES} <= set(inputs):
            return "chat"
        return None

    def _engine_predict(self, signature_name, kind, arrays):
        """`generate` or `chat` outputs, each row decoded in the engine (or handed off: see `submit`)."""
        requests, out = self.submit(kind, arrays)
        try:
            texts = np.array([b"".join(request) for request in requests], object)
        finally:
            for request in requests:
                request.cancel()
        outputs = self.signature_defs[signature_name].outputs
        text_output = "replies" if kind == "chat" else "completions"
        if "handed_off" in out:
            texts = np.where(out["handed_off"], out["replies"], texts)
        return {text_output: texts, "num_tokens": np.array([len(r.tokens) for r in requests], np.int32),
                **{name: value for name, value in out.items() if name in outputs and name not in (text_output,
                                                                                                  "num_tokens")}}

    def submit(self, kind, arrays, stop=(), streamed=False):
        """Engine requests (`Request`, with `stop` sequences, `streamed` or not), one per row of `prepare`d
        `generate` or `chat` arrays, submitted, and the ids signature's outputs. A row a grounded chat hands off
        (`handed_off`: its reply is the hand-off message) gets a request that is already finished, with no
        tokens."""
        max_new = arrays["max_new_tokens"]
        if kind == "chat":
            out = self._call("conversation_ids", {"roles": arrays["roles"], "contents": arrays["contents"],
                                                  "max_new_tokens": max_new})
        else:
            out = self._call("prompt_ids", {"prompts": arrays["prompts"], "max_new_tokens": max_new})
        room = min(max(int(max_new), 1), self.context - 1)
        options = [arrays[name].item() for name in OPTION_NAMES[1:]]
        handed_off = out.get("handed_off", np.zeros(len(out["lengths"]), bool))
        return [Request.finished(ids[:n]) if off else self.engine.submit(Request(ids[:n], room, *options, stop,
                                                                                 streamed))
                for ids, n, off in zip(out["ids"], out["lengths"], handed_off)], out

    def detokenize(self, rows):
        """Texts (a [rows] object array of bytes) of lists of token ids."""
        lengths = np.array([len(r) for r in rows], np.int32)
        ids = np.zeros([len(rows), max(lengths.max(initial=0), 1)], np.int32)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        return self._call("detokenize", {"token_ids": ids, "lengths": lengths})["texts"]

    def stream(self, signature_name, arrays, stop=(), streamed=True):
        """A Stream of the first row of `prepare`d `generate` or `chat` arrays, ending before any of the `stop`
        sequences (strings): through the engine, or, with no stop sequences, through the `_start` signature and
        `advance` every few tokens (SignatureStream). Not `streamed`: read whole, with `text`."""
        if self.engine:
            requests, out = self.submit(self.generation_kind(signature_name), arrays, stop, streamed)
            return EngineStream(requests[0], out["replies"][0] if out.get("handed_off", [False])[0] else None)
        if stop:
            raise RequestError("stop: this export has no decode engine (its slot signatures); re-export it with this "
                               "tfglm to stop at a stop sequence")
        return SignatureStream(self, signature_name, arrays)

    def prepare(self, signature_name, inputs):
        """A signature's inputs checked (names, dtypes, shapes, sizes, roles, generation options), defaults filled
        in."""
        self.check_input_names(signature_name, inputs)
        signature, arrays = self.signature(signature_name), dict(self.defaults[signature_name])
        for name, array in inputs.items():
            arrays[name] = self._check(name, array, signature.inputs[name])
        if "roles" in arrays:
            check_conversations(arrays["roles"], arrays["contents"])
        if "token_ids" in arrays:
            check_token_ids(arrays["token_ids"], arrays["lengths"], self.vocab_size)
        check_generate_options(arrays, self.context)
        return arrays

    def check_input_names(self, signature_name, names):
        """Rejects the streaming and engine signatures (STREAMING, ENGINE), unknown inputs and missing ones without
        a default, naming them."""
        signature = self.signature(signature_name)
        if signature_name in STREAMING + ENGINE:
            raise RequestError(f"signature {signature_name!r} is tfglm serve's own (streaming or its decode engine); "
                               "it is not served over Predict (use generate or chat)")
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

    def _call(self, signature_name, arrays):
        return {k: v.numpy() for k, v in self.run(signature_name, arrays).items()}

    def run(self, signature_name, inputs):
        """A signature's output tensors for `inputs` (arrays or tensors); its errors as RequestErrors."""
        try:
            return self.loaded.signatures[signature_name](**{k: tf.convert_to_tensor(v) for k, v in inputs.items()})
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            raise RequestError(graph_message(str(e))) from None

    def close(self):
        if self.engine:
            self.engine.close()


class EngineStream:
    """A row decoded in the engine, as text: iterating yields the text it gains as its tokens come; once ended,
    `finish_reason` ("stop" or "length") and `usage`. `cancel` frees its slot."""

    def __init__(self, request, handoff=None):
        self.request = request
        self.handoff = handoff  # a handed-off row's reply (bytes), sent whole in place of decoded text
        self._pieces = iter([handoff.decode("utf-8", errors="replace")]) if handoff is not None else request.texts()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._pieces)

    def text(self):
        """The whole text, decoded to the end."""
        return "".join(self)

    @property
    def finish_reason(self):
        return self.request.finish_reason

    @property
    def usage(self):
        prompt, completion = len(self.request.ids), len(self.request.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def cancel(self):
        self.request.cancel()


class SignatureStream:
    """A row decoded by an export without the engine: its `_start` signature, then `advance` every STEPS tokens
    (to the end at once for `text`); the same interface as EngineStream."""

    STEPS = 4

    def __init__(self, servable, signature_name, arrays):
        start = servable.signature_defs[f"{signature_name}_start"].inputs
        advance = servable.signature_defs["advance"].inputs
        options = {k: v for k, v in arrays.items() if k in advance}
        self.outputs = {}
        started = servable.run(f"{signature_name}_start", {k: v for k, v in arrays.items() if k in start})
        state = {k: v for k, v in started.items() if k in advance}  # the decode state, without `chat`'s other outputs

        def step(state):
            self.outputs.update(servable.run("advance", {**state, **options, "steps": np.int32(self.steps)}))
            return {k: v for k, v in self.outputs.items() if k in advance}, self.outputs

        self.steps = self.STEPS
        self._pieces = (pieces[0] for pieces in stream_text(step, state))

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._pieces)

    def text(self):
        self.steps = 1 << 30  # to the end in one `advance`
        return "".join(self)

    @property
    def finish_reason(self):
        """"length" when it used every token it was allowed, "stop" when it ended at `<eot>`."""
        usage = self.usage
        return "length" if usage["total_tokens"] >= int(self.outputs["limit"][0]) else "stop"

    @property
    def usage(self):
        prompt, completion = int(self.outputs["lengths"][0]), int(self.outputs["num_tokens"][0])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def cancel(self):
        with contextlib.suppress(ValueError):  # running on another thread: it ends with its `advance`
            self._pieces.close()
