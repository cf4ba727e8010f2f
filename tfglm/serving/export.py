"""SavedModel export for TF Serving: `base_path/<version>/` with generate, score, tokenize and detokenize signatures.

Generation goes through `tfglm.generate.Generator`, the one decode loop. The graph holds TensorFlow core and
tensorflow-text ops only (both are linked into TF Serving's model server). With `jit_compile=True` the decode loop is
an XLA function, which TF Serving runs only when started with `--xla_cpu_compilation_enabled=true`.

A translation run (model.kind translate) exports one `translate` signature instead (also `serving_default`):
`sources` strings in, `translations` strings out, decoded with the run's `translate.beam_width`.

`generate` and `serving_default` take `prompts` plus optional `max_new_tokens`, `temperature`, `top_k`, `top_p` and
`seed`: each optional input has a default (the run's `generate` config) recorded in the SignatureDef's `defaults`,
which TF Serving fills in for inputs a request leaves out. The model's context is saved as the variable `context`
(not a signature), so `tfglm serve` can reject a `max_new_tokens` above `context - 1` by name.
"""

import os
import shutil
import tempfile

import tensorflow as tf

from tfglm.tasks import runs
from tfglm.tasks.classify import LABELS, load_classifier
from tfglm.tasks.classify import serving_module as classifier_module
from tfglm.errors import TfglmError
from tfglm.generation.decode import SIGNATURE, Generator
from tfglm.models.gpt import GPT

WARMUP = os.path.join("assets.extra", "tf_serving_warmup_requests")
SIGNATURES = ("generate", "score", "tokenize", "detokenize")  # plus serving_default, the same as generate
TEXTS = tf.TensorSpec([None], tf.string, name="texts")


def serving_module(generator, settings):
    """The exported object: the signature functions, the tokenizer and the weights they read.

    It tracks the `tf.Variable`s inside the Keras variables rather than the Keras model: the saved functions read
    those, and a Keras model would be saved as copies that TF1-style loaders (TF Serving) restore instead.
    """
    tokenizer, model = generator.tokenizer, generator.model

    @tf.function(input_signature=SIGNATURE)
    def generate(prompts, max_new_tokens=tf.constant(min(settings.max_new_tokens, generator.context - 1)),
                 temperature=tf.constant(settings.temperature), top_k=tf.constant(settings.top_k),
                 top_p=tf.constant(settings.top_p), seed=tf.constant(settings.seed)):
        """`Generator.generate`; the tensor defaults become the SignatureDef's `defaults`, so every input but
        `prompts` is optional (a plain Python default would not be)."""
        return generator.generate(prompts, max_new_tokens, temperature, top_k, top_p, seed)

    @tf.function(input_signature=[TEXTS])
    def score(texts):
        """Total log-likelihood of each text's tokens after the leading `<eot>`, their count and perplexity.
        Texts longer than the context are scored on their first `context - 1` tokens (`num_tokens` says how many)."""
        ids = tokenizer.tokenize(texts)
        ids = tf.concat([tf.fill([tf.shape(texts)[0], 1], tokenizer.eot_id), ids], axis=1)[:, :generator.context]
        num_tokens = tf.cast(ids.row_lengths(), tf.int32) - 1
        tokens = ids.to_tensor(default_value=tokenizer.eot_id)
        log_probs = tf.nn.log_softmax(model(tokens, training=False)[:, :-1], axis=-1)
        targets = tokens[:, 1:]
        token_log_probs = tf.gather(log_probs, targets, batch_dims=2)
        scored = tf.sequence_mask(num_tokens, tf.shape(targets)[1])
        log_likelihood = tf.reduce_sum(tf.where(scored, token_log_probs, 0.0), axis=1)
        perplexity = tf.exp(-log_likelihood / tf.cast(tf.maximum(num_tokens, 1), tf.float32))
        return {"log_likelihood": log_likelihood, "num_tokens": num_tokens, "perplexity": perplexity}

    @tf.function(input_signature=[TEXTS])
    def tokenize(texts):
        """Token ids [batch, longest] (0 past each row's `lengths`), without the leading `<eot>`."""
        ids = tokenizer.tokenize(texts)
        return {"token_ids": ids.to_tensor(default_value=0), "lengths": tf.cast(ids.row_lengths(), tf.int32)}

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids"),
                                  tf.TensorSpec([None], tf.int32, name="lengths")])
    def detokenize(token_ids, lengths):
        """Texts from the first `lengths` ids of each row of `token_ids`."""
        return {"texts": tokenizer.detokenize(tf.RaggedTensor.from_tensor(token_ids, lengths=lengths))}

    module = tf.Module()
    module.context = tf.Variable(generator.context, trainable=False, name="context")  # read by `tfglm serve`
    module.tokenizer = tokenizer
    module.weights = [variable.value for variable in model.variables]
    module.generate, module.score, module.tokenize, module.detokenize = generate, score, tokenize, detokenize
    return module


def _next_version(base_path):
    versions = [int(name) for name in os.listdir(base_path) if name.isdigit()]
    return max(versions, default=0) + 1


def write_warmup(export_dir, prompt, signature="generate", input_name="prompts"):
    """assets.extra/tf_serving_warmup_requests: one `signature` PredictRequest (config defaults), so the server
    compiles the decode loop while loading rather than on the first request."""
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
    except ImportError:
        raise TfglmError("export needs tensorflow-serving-api for the warmup requests: "
                         "pip install 'tfglm[serve]'") from None
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=signature))
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto([prompt], dtype=tf.string))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    os.makedirs(os.path.dirname(os.path.join(export_dir, WARMUP)), exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(export_dir, WARMUP)) as writer:
        writer.write(log.SerializeToString())


def _serving(run_dir, jit_compile):
    """(module, signatures, (warmup signature, its input), warmup text) for the run's kind."""
    if os.path.exists(runs.path(run_dir, LABELS)):  # a classifier: `predict` (also serving_default) and `classify`
        config, tokenizer, labels, model = load_classifier(run_dir)
        module = classifier_module(model, tokenizer, config, labels)
        signatures = {"predict": module.predict, "classify": module.classify, "serving_default": module.predict}
        return module, signatures, ("predict", "texts"), config.generate.prompt or "a"
    config, tokenizer, model = runs.load_run(run_dir)
    if not isinstance(model, GPT):
        raise TfglmError(f"{run_dir}: a pretrained encoder has nothing to serve; fine-tune it with tfglm finetune "
                         "and export that run")
    if config.model.kind == "translate":  # one `translate` signature: source strings in, translations out
        from tfglm.generation.beam import Translator
        from tfglm.tasks.seq2seq import serving_module as translation_module

        module = translation_module(Translator(model, tokenizer, config.translate.beam_width,
                                               config.translate.length_penalty, jit_compile))
        signatures = {"translate": module.translate, "serving_default": module.translate}
        return module, signatures, ("translate", "sources"), config.generate.prompt
    module = serving_module(Generator(model, tokenizer, jit_compile=jit_compile), config.generate)
    signatures = {name: getattr(module, name) for name in SIGNATURES}
    signatures["serving_default"] = module.generate
    return module, signatures, ("generate", "prompts"), config.generate.prompt


def export_run(run_dir, base_path, version=None, jit_compile=True):
    """Exports the run in `run_dir` to `base_path/<version>/` (default: the next free version); returns that path.

    The SavedModel is written to a temporary directory in `base_path` (a non-numeric name, which TF Serving
    ignores) and renamed into place, so a server polling `base_path` never sees a half-written version.
    """
    if version is not None and version < 1:
        raise TfglmError(f"--version: must be a positive integer, got {version}")
    module, signatures, warmup, prompt = _serving(run_dir, jit_compile)
    os.makedirs(base_path, exist_ok=True)
    version = version or _next_version(base_path)
    target = os.path.join(base_path, str(version))
    if os.path.exists(target):
        raise TfglmError(f"{target}: version {version} already exists (omit --version for the next free one)")
    tmp = tempfile.mkdtemp(prefix=f"tmp-{version}-", dir=base_path)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the version from a server running as another user
    try:
        write_warmup(tmp, prompt, *warmup)
        tf.saved_model.save(module, tmp, signatures=signatures)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
