"""`tf.distribute` strategies and the distributed training loop for where Keras `fit` cannot go.

Keras 3 `fit` runs under the default strategy, MirroredStrategy and TPUStrategy, but not under
MultiWorkerMirroredStrategy (keras-team/keras#20585). There `fit_distributed` takes its place: the same model, loss,
optimizer, datasets and Keras callbacks (progress bar, RunLogger, TensorBoard), with `strategy.run` over per-worker
input pipelines and several steps per `tf.function` call.
"""

import contextlib
import json
import logging
import os
import subprocess
import sys

import keras
import tensorflow as tf

from tfglm.errors import TfglmError

log = logging.getLogger("tfglm")

def _tf_config():
    try:
        return json.loads(os.environ.get("TF_CONFIG") or "{}")
    except json.JSONDecodeError as e:
        raise TfglmError(f"TF_CONFIG: invalid JSON ({e.msg} at column {e.colno})") from None


def is_chief(strategy):
    """True on the one worker that writes checkpoints and logs (the only worker outside multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0
                                    and "chief" not in resolver.cluster_spec().as_dict())


def make_strategy(name, tpu=None, connect_timeout_s=60):
    """The strategy for `train.strategy`; `auto` picks TPU, then multi-worker (TF_CONFIG), then GPUs, then default."""
    tf_config = _tf_config()
    if name == "auto":
        if tpu or os.environ.get("TPU_NAME") or os.path.exists("/dev/accel0"):
            name = "tpu"
        elif sum(len(tf_config.get("cluster", {}).get(job, [])) for job in ("chief", "worker")) > 1:
            name = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy(), name
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(), name
    if name == "multiworker":
        if not tf_config.get("cluster"):
            raise TfglmError("train.strategy=multiworker needs TF_CONFIG with a cluster and this task "
                             "(see README, 'Several machines')")
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=connect_timeout_s)
        with _join_deadline(tf_config, connect_timeout_s):
            strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        return strategy, name
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as e:
        raise TfglmError(f"train.strategy=tpu: no TPU found ({str(e).splitlines()[0]})") from None
    return tf.distribute.TPUStrategy(resolver), name


# The watchdog of `_join_deadline`, run as `python -c WATCHDOG PID SECONDS MESSAGE PEER...`: if its stdin is still open
# after SECONDS, it names the peers that accept no connection, prints MESSAGE and ends process PID.
WATCHDOG = """
import os, select, signal, socket, sys
pid, seconds, message, peers = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
if select.select([sys.stdin], [], [], seconds)[0]:
    sys.exit(0)
def accepts(address):
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        return True
    except (OSError, ValueError):
        return False
missing = [peer.split("@")[0] + " at " + peer.split("@")[1] for peer in peers if not accepts(peer.split("@")[1])]
print(message.format(", ".join(missing) or "a peer"), file=sys.stderr, flush=True)
os.kill(pid, signal.SIGTERM)
select.select([sys.stdin], [], [], 3)  # TensorFlow may hold on to SIGTERM: then SIGKILL
try:
    os.kill(pid, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


@contextlib.contextmanager
def _join_deadline(tf_config, seconds):
    """Ends this process with a one-line error if the block has not finished within `seconds`.

    MultiWorkerMirroredStrategy's constructor waits, in C++, holding the GIL and without a timeout, until every
    worker in TF_CONFIG has joined: no Python thread or exception can interrupt it, so the deadline is kept by a
    small watchdog process. Nothing has been trained or saved yet at that point, so ending the process loses nothing.
    """
    me = tf_config.get("task", {})
    peers = [f"{job} {i}@{address}" for job, addresses in tf_config["cluster"].items()
             for i, address in enumerate(addresses) if (job, i) != (me.get("type"), me.get("index"))]
    message = (f"tfglm: error: TF_CONFIG: {{}} did not join within {seconds} s (train.connect_timeout_s); "
               "start every task in the cluster, or fix its address")
    watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(seconds), message, *peers],
                                stdin=subprocess.PIPE, stderr=sys.stderr)  # the real stderr under `tfglm.cli.run`
    try:
        yield
    finally:
        watchdog.stdin.close()
        watchdog.wait()


def check_batch(strategy, global_batch_size):
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise TfglmError(f"train.batch_size: the global batch ({global_batch_size}) must divide evenly over "
                         f"{replicas} replicas")
    return global_batch_size // replicas


def per_worker(dataset, global_batch_size):
    """A `distribute_datasets_from_function` dataset_fn: each worker takes its slice of every global batch of
    `dataset` (any structure: inputs, targets, sample weights) and splits it into per-replica batches, so N workers
    see exactly the batches one worker would. Batches of different widths (length buckets) stay whole. `dataset` may
    also be a function of the `tf.distribute.InputContext` that returns only that worker's slices (a worker then
    reads only its share of a prepared corpus)."""

    def dataset_fn(context):
        share = global_batch_size // context.num_input_pipelines
        source, start = (dataset(context), 0) if callable(dataset) else (dataset, context.input_pipeline_id * share)
        rows = share if callable(dataset) else global_batch_size
        per_replica = context.get_per_replica_batch_size(global_batch_size)

        replicas = share // per_replica

        def stack(t):  # [global batch, ...] -> this worker's [replicas, per_replica, ...], shapes kept static
            part = tf.reshape(t[start:start + share], tf.concat([[replicas, per_replica], tf.shape(t)[1:]], 0))
            part.set_shape([replicas, per_replica, *t.shape[1:]])
            return part

        def split(*batch):
            if all(t.shape[0] == rows for t in tf.nest.flatten(batch)):
                return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(stack, batch))
            # A batch of unknown size (validation's last, short one): each replica gets what there is of its share.
            return tf.data.Dataset.range(replicas).map(lambda i: tf.nest.map_structure(
                lambda t: t[start + i * per_replica:start + (i + 1) * per_replica], batch))

        return source.flat_map(split).prefetch(tf.data.AUTOTUNE)

    return dataset_fn


def fit_distributed(model, strategy, train_fn, val_fn, epochs, initial_epoch, steps_per_epoch, steps_per_execution,
                    callbacks, verbose, jit_compile=True):
    """Keras `fit` semantics under any strategy, for the model's compiled loss, metrics and optimizer: `train_fn` and
    `val_fn` are dataset_fns (see `per_worker`). Callbacks see the logs `fit` gives them (`loss`, `val_loss`,
    `val_<metric>`)."""
    train_iter = iter(strategy.distribute_datasets_from_function(train_fn))

    def unpack(batch):
        return batch if len(batch) == 3 else (*batch, None)

    # The compiled loss and metrics build their state on first use: do it here, eagerly, on one replica's batch.
    context = tf.distribute.InputContext(1, 0, strategy.num_replicas_in_sync)
    x, y, weights = unpack(next(iter(val_fn(context))))
    y_pred = model(x, training=False)
    model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=weights)
    model.compute_metrics(x, y, y_pred, sample_weight=weights)

    @tf.function(jit_compile=jit_compile)
    def loss_and_grads(x, y, weights):  # XLA on the per-replica computation; the all-reduce stays outside it
        with tf.GradientTape() as tape:
            # This replica's share of the global mean loss: Keras losses divide by the number of replicas.
            loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True), sample_weight=weights)
            scaled = model.optimizer.scale_loss(loss)
        return loss, tape.gradient(scaled, model.trainable_variables)

    def train_step(batch):
        loss, grads = loss_and_grads(*unpack(batch))
        model.optimizer.apply(grads, model.trainable_variables)
        return loss

    @tf.function
    def train_steps(iterator):
        total = tf.constant(0.0)
        for _ in tf.range(steps_per_execution):
            total += strategy.reduce("SUM", strategy.run(train_step, args=(next(iterator),)), axis=None)
        return total / steps_per_execution

    @tf.function
    def eval_step(batch):
        strategy.run(model.test_step, args=(batch,))

    callback_list = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=verbose != 0,
                                                 model=model, verbose=verbose, epochs=epochs, steps=steps_per_epoch)
    model.stop_training = False
    logs = {}
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        callback_list.on_epoch_begin(epoch)
        losses = []
        for step in range(0, steps_per_epoch, steps_per_execution):
            callback_list.on_train_batch_begin(step)
            losses.append(float(train_steps(train_iter)))
            callback_list.on_train_batch_end(step + steps_per_execution - 1, {"loss": sum(losses) / len(losses)})
        callback_list.on_test_begin()
        for metric in model.metrics:
            metric.reset_state()
        for batch in strategy.distribute_datasets_from_function(val_fn):
            eval_step(batch)
        val_logs = {k: float(v) for k, v in model.get_metrics_result().items()}
        logs = {"loss": sum(losses) / len(losses), **{f"val_{k}": v for k, v in val_logs.items()}}
        callback_list.on_test_end(val_logs)
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
