"""SavedModel export for TF Serving: `base_path/<version>/` with the signatures of what the run's task serves
(`tfglm.serving.signatures`: a language model's generate, score, tokenize and detokenize; a classifier's predict and
classify; a translation model's translate), and a warmup request.

The graph holds TensorFlow core and tensorflow-text ops only (both are linked into TF Serving's model server). With
`jit_compile=True` decode loops are XLA functions, which TF Serving runs only when started with
`--xla_cpu_compilation_enabled=true`.
"""

import logging
import os
import shutil
import tempfile

import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from tfglm.errors import TfglmError
from tfglm.serving import signatures
from tfglm.serving.signatures import WARMUP
from tfglm.tasks.registry import load_run

log = logging.getLogger("tfglm")


def _next_version(base_path):
    versions = [int(name) for name in os.listdir(base_path) if name.isdigit()]
    return max(versions, default=0) + 1


def write_warmup(export_dir, signature, inputs):
    """assets.extra/tf_serving_warmup_requests: one `signature` PredictRequest of `inputs` ({name: value}, the
    options it leaves out taking their defaults), so the server compiles the decode loop while loading rather than on
    the first request (`tfglm serve` replays it at every batch size it takes)."""
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=signature))
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    os.makedirs(os.path.dirname(os.path.join(export_dir, WARMUP)), exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(export_dir, WARMUP)) as writer:
        writer.write(log.SerializeToString())


def export_run(run_dir, base_path, version=None, jit_compile=True):
    """Exports the run in `run_dir` to `base_path/<version>/` (default: the next free version); returns that path.

    The SavedModel is written to a temporary directory in `base_path` (a non-numeric name, which TF Serving
    ignores) and renamed into place, so a server polling `base_path` never sees a half-written version.

    Examples:
    ```python
    import tensorflow as tf
    import tfglm

    path = tfglm.export_run("runs/example", "models/example", jit_compile=False)  # models/example/1
    served = tf.saved_model.load(path)  # TF Serving fills in the options' defaults; a Python caller names them
    options = dict(max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0, seed=0)
    served.signatures["generate"](prompts=tf.constant(["abc"]), **{k: tf.constant(v) for k, v in options.items()})
    ```
    """
    if os.path.exists(base_path) and not os.path.isdir(base_path):
        raise TfglmError(f"{base_path}: --out names a file, not a directory")
    if version is not None and version < 1:
        raise TfglmError(f"--version: must be a positive integer, got {version}")
    run = load_run(run_dir)
    export = signatures.build(run.task.exported(run.model, jit_compile), run.config.generate)
    os.makedirs(base_path, exist_ok=True)
    version = version or _next_version(base_path)
    target = os.path.join(base_path, str(version))
    if os.path.exists(target):
        raise TfglmError(f"{target}: version {version} already exists (omit --version for the next free one)")
    tmp = tempfile.mkdtemp(prefix=f"tmp-{version}-", dir=base_path)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the version from a server running as another user
    try:
        write_warmup(tmp, *export.warmup)
        log.info("writing %s", target)
        tf.saved_model.save(export.module, tmp, signatures=export.signatures)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
