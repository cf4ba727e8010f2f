"""`tf.distribute` strategies and the distributed training loop for where Keras `fit` cannot go.

Keras 3 `fit` runs under the default strategy, MirroredStrategy and TPUStrategy, but not under
MultiWorkerMirroredStrategy (keras-team/keras#20585). There `fit_distributed` takes its place: the same model, loss,
optimizer, datasets and Keras callbacks (progress bar, RunLogger, TensorBoard), with `strategy.run` over per-worker
input pipelines and several steps per `tf.function` call.
"""

import json
import logging
import os

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


def make_strategy(kind, tpu=None, connect_timeout_s=60):
    """The strategy for `train.strategy`; `auto` picks TPU, then multi-worker (TF_CONFIG), then GPUs, then default."""
    tf_config = _tf_config()
    if kind == "auto":
        if tpu or os.environ.get("TPU_NAME") or os.path.exists("/dev/accel0"):
            kind = "tpu"
        elif sum(len(tf_config.get("cluster", {}).get(job, [])) for job in ("chief", "worker")) > 1:
            kind = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            kind = "mirrored"
        else:
            kind = "default"
    if kind == "default":
        return tf.distribute.get_strategy(), kind
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy(), kind
    if kind == "multiworker":
        if not tf_config.get("cluster"):
            raise TfglmError("train.strategy=multiworker needs TF_CONFIG with a cluster and this task "
                             "(see README, 'Several machines')")
        # Note: creating the strategy blocks until every worker in TF_CONFIG has joined.
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=connect_timeout_s)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options), kind
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as e:
        raise TfglmError(f"train.strategy=tpu: no TPU found ({str(e).splitlines()[0]})") from None
    return tf.distribute.TPUStrategy(resolver), kind


def check_batch(strategy, global_batch_size):
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise TfglmError(f"train.batch_size: the global batch ({global_batch_size}) must divide evenly over "
                         f"{replicas} replicas")
    return global_batch_size // replicas


def per_worker(dataset, global_batch_size):
    """A `distribute_datasets_from_function` dataset_fn: each worker takes its slice of every global batch of
    `dataset`, split into per-replica batches, so N workers see exactly the batches one worker would."""

    def dataset_fn(context):
        share = global_batch_size // context.num_input_pipelines
        start = context.input_pipeline_id * share
        return (dataset.map(lambda x, y: (x[start:start + share], y[start:start + share]))
                .unbatch().batch(context.get_per_replica_batch_size(global_batch_size), drop_remainder=True)
                .prefetch(tf.data.AUTOTUNE))

    return dataset_fn


def fit_distributed(model, strategy, train_fn, val_fn, epochs, initial_epoch, steps_per_epoch, steps_per_execution,
                    callbacks, verbose, jit_compile=True):
    """Keras `fit` semantics under any strategy, for the model's own loss and optimizer: `train_fn`/`val_fn` are
    dataset_fns (see `per_worker`). Callbacks see the logs `fit` gives them (`loss`, `val_loss`)."""
    train_iter = iter(strategy.distribute_datasets_from_function(train_fn))

    def replica_loss(x, y, training):
        """This replica's share of the global mean loss: Keras losses divide by the number of replicas."""
        return model.loss(y, model(x, training=training))

    @tf.function(jit_compile=jit_compile)
    def loss_and_grads(x, y):  # XLA on the per-replica computation; the all-reduce stays outside it
        with tf.GradientTape() as tape:
            loss = replica_loss(x, y, True)
            scaled = model.optimizer.scale_loss(loss)
        return loss, tape.gradient(scaled, model.trainable_variables)

    def train_step(x, y):
        loss, grads = loss_and_grads(x, y)
        model.optimizer.apply(grads, model.trainable_variables)
        return loss

    @tf.function
    def train_steps(iterator):
        total = tf.constant(0.0)
        for _ in tf.range(steps_per_execution):
            x, y = next(iterator)
            total += strategy.reduce("SUM", strategy.run(train_step, args=(x, y)), axis=None)
        return total / steps_per_execution

    @tf.function
    def eval_step(x, y):
        return strategy.reduce("SUM", strategy.run(replica_loss, args=(x, y, False)), axis=None)

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
        val_losses = [float(eval_step(x, y)) for x, y in strategy.distribute_datasets_from_function(val_fn)]
        logs = {"loss": sum(losses) / len(losses), "val_loss": sum(val_losses) / len(val_losses)}
        callback_list.on_test_end({"loss": logs["val_loss"]})
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
