"""The one trainer for every task: strategy (default, mirrored, multi-worker, TPU), XLA, mixed precision, AdamW with
warmup + cosine decay, clipping and gradient accumulation, LoRA (`train.lora_rank`), validation every `eval_interval`
steps, best/last atomic checkpoints, exact resume (step, optimizer state, data position), early stopping,
metrics.jsonl and TensorBoard.

Under the default strategy it trains with Keras `fit`; under every other with `distributed.fit_distributed`, the same
model, loss, optimizer, datasets and callbacks (Keras `fit` fails under MultiWorkerMirroredStrategy,
keras-team/keras#20585, and with `steps_per_execution > 1` under MirroredStrategy over CPU devices).
"""

import json
import logging
import math
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from tfglm.errors import TfglmError
from tfglm.layers import enable_lora, lora_variables
from tfglm.training import distributed, runs
from tfglm.tasks.registry import Run, default_task, get_task

log = logging.getLogger("tfglm")


def set_precision(policy):
    if policy == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
        raise TfglmError("train.mixed_precision: mixed_float16 needs a GPU (CPUs have no fast float16); "
                         "use mixed_bfloat16 or float32")
    keras.mixed_precision.set_global_policy(policy)


def learning_rate_schedule(train):
    """Linear warmup to `learning_rate`, then cosine decay to `min_learning_rate` at `steps`."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, warmup_target=train.learning_rate, warmup_steps=train.warmup_steps,
        decay_steps=train.steps - train.warmup_steps, alpha=train.min_learning_rate / train.learning_rate)


def compile_model(model, train, loss=None, weighted_metrics=None):
    """AdamW (no decay on biases and norms) with the schedule, clipping and accumulation of `train`; the loss is
    next-token cross-entropy unless given."""
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate_schedule(train), weight_decay=train.weight_decay, beta_1=train.beta_1,
        beta_2=train.beta_2, global_clipnorm=train.grad_clip or None,
        gradient_accumulation_steps=train.grad_accum_steps if train.grad_accum_steps > 1 else None)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=weighted_metrics, jit_compile=train.jit_compile,
                  steps_per_execution=train.steps_per_execution)
    optimizer.build(model.trainable_variables)


class RunLogger(keras.callbacks.Callback):
    """At each validation point: a metrics.jsonl row, best.weights.h5 when the task's monitored metric improved, then
    last.weights.h5 (in that order, so a kill at any point loses nothing: a resumed run drops the rows after its last
    checkpoint and redoes them). TensorBoard, with the optimizer step as x axis: the training loss and learning rate
    at every logged step, validation metrics and the task's samples at each validation point."""

    def __init__(self, task, schedule, best):
        super().__init__()
        self.task, self.schedule, self.best = task, schedule, best
        self.run_dir = task.run_dir
        self.monitor, self.mode = task.monitor
        self.writer = tf.summary.create_file_writer(runs.path(self.run_dir, runs.LOGS))
        self.start = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.time()

    def on_test_begin(self, logs=None):
        self.train_seconds = time.time() - self.epoch_start

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        with self.writer.as_default(step=step):
            tf.summary.scalar("train/loss", logs["loss"])
            tf.summary.scalar("train/learning_rate", float(self.model.optimizer.learning_rate.numpy()))

    def improved(self, value):
        return value < self.best if self.mode == "min" else value > self.best

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        val_loss = float(logs["val_loss"])
        row = {"step": step, "train_loss": round(float(logs["loss"]), 5), "val_loss": round(val_loss, 5),
               "learning_rate": float(self.model.optimizer.learning_rate.numpy()),
               "tokens_per_s": round(self.schedule.eval_interval * self.task.tokens_per_step() / self.train_seconds, 1),
               "wall_s": round(time.time() - self.start, 2)}
        if self.task.perplexity:
            row["val_perplexity"] = round(math.exp(min(val_loss, 50.0)), 4)
        row.update({k: round(float(v), 5) for k, v in logs.items() if k.startswith("val_") and k not in row})
        with open(runs.path(self.run_dir, runs.METRICS), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.improved(row[self.monitor]):
            self.best = row[self.monitor]
            runs.atomic_write(runs.path(self.run_dir, runs.BEST), self.model.save_weights)
        lora = lora_variables(self.model)
        if lora:  # before last.weights.h5: a kill between the two is seen as a step mismatch
            runs.atomic_write(runs.path(self.run_dir, runs.LAST_LORA), lambda p: save_lora_state(lora, step, p))
        runs.atomic_write(runs.path(self.run_dir, runs.LAST), self.model.save_weights)
        with self.writer.as_default(step=step):
            for key, value in row.items():
                if key.startswith("val_"):
                    tf.summary.scalar(f"validation/{key[4:]}", value)
            for name, text in self.task.samples(self.model).items():
                tf.summary.text(f"samples/{name}", text)
        self.writer.flush()


class ProgressLog(keras.callbacks.Callback):
    """Progress for logs, where Keras's bar is unreadable (stdout to a file, as under a job scheduler): a line at most
    every `every_s` seconds with the step (and epoch), the training loss, rows/s (within this epoch, so without
    validation and compilation) and the time left at that pace, and one at each validation point with its metrics."""

    def __init__(self, schedule, counts_epochs, every_s):
        super().__init__()
        self.schedule, self.counts_epochs, self.every_s = schedule, counts_epochs, every_s

    def on_train_begin(self, logs=None):
        self.last_line = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.first = None  # (time, step) after the epoch's first batches, whose time includes compiling the step

    def position(self, step):
        """'step 120/540 (epoch 1/2)': the steps done, and the epoch the last of them belongs to."""
        if not self.counts_epochs:
            return f"step {step}/{self.schedule.steps}"
        epoch = max(1, -(-step // self.schedule.eval_interval))
        return f"step {step}/{self.schedule.steps} (epoch {epoch}/{self.schedule.steps // self.schedule.eval_interval})"

    def on_train_batch_end(self, batch, logs=None):
        now, step = time.time(), int(self.model.optimizer.iterations.numpy())
        if self.first is None:
            self.first = now, step
            return
        if now - self.last_line < self.every_s:
            return
        self.last_line = now
        steps_per_s = (step - self.first[1]) / max(now - self.first[0], 1e-9)
        left = (self.schedule.steps - step) / steps_per_s if steps_per_s else float("inf")
        log.info("%s: loss %.4f, %.1f rows/s, %s left", self.position(step), float(logs["loss"]),
                 steps_per_s * self.schedule.batch_size, duration(left))

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        metrics = ", ".join(f"{k} {float(v):.4f}" for k, v in logs.items() if k.startswith("val_"))
        log.info("%s: loss %.4f, %s", self.position(step), float(logs["loss"]), metrics)


def duration(seconds):
    """'1h02m', '3m05s' or '12s'."""
    if not math.isfinite(seconds):
        return "unknown time"
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def run_callbacks(task, schedule, step):
    """RunLogger (and early stopping) for a run starting or resuming at `step`: metrics.jsonl keeps the rows up to
    `step` (a killed run may have logged past its last checkpoint), and the best monitored value among them."""
    rows = runs.read_metrics(task.run_dir, up_to_step=step)
    with open(runs.path(task.run_dir, runs.METRICS), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    monitor, mode = task.monitor
    values = [r[monitor] for r in rows]
    best = (min if mode == "min" else max)(values, default=np.inf if mode == "min" else -np.inf)
    callbacks = [RunLogger(task, schedule, best)]
    if task.patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor, patience=task.patience, mode=mode))
    return callbacks


def save_lora_state(variables, step, path):
    np.savez(path, step=step, **{str(i): v.numpy() for i, v in enumerate(variables)})


def resumed_step(model, run_dir):
    """Loads the run's last checkpoint (weights and optimizer state) into the compiled `model`; returns its step.
    A LoRA run gets its unmerged kernels and factors back from last.lora.npz; without a matching one, the factors
    restart from the merged kernels. (Keras checkpoints hold no seed-generator state: with dropout, a resumed run
    draws other masks.)"""
    last = runs.path(run_dir, runs.LAST)
    try:
        model.load_weights(last)
    except (OSError, ValueError) as e:
        raise TfglmError(f"{last}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
    step = int(model.optimizer.iterations.numpy())
    variables = lora_variables(model)
    if variables:
        restore_lora_state(variables, runs.path(run_dir, runs.LAST_LORA), step)
    log.info("resuming %s at step %d", run_dir, step)
    return step


def restore_lora_state(variables, path, step):
    try:
        with np.load(path) as state:
            saved = {k: state[k] for k in state.files}
    except (OSError, ValueError):
        saved = {}
    if int(saved.get("step", -1)) == step and len(saved) == len(variables) + 1 and all(
            saved[str(i)].shape == tuple(v.shape) for i, v in enumerate(variables)):
        for i, v in enumerate(variables):
            v.assign(saved[str(i)])
        return
    log.warning("%s: no LoRA factors saved at step %d; they restart from the merged weights", path, step)
    for a in variables[1::3]:  # each layer's lora_kernel_a: Keras loads a LoRA layer merged, both factors zeroed
        a.assign(keras.initializers.HeUniform()(a.shape))


def _check_run_dir(run_dir, resume):
    """Whether to resume: a run with a checkpoint continues with `resume` only; one stopped before its first
    checkpoint starts again (with `resume`, with a warning)."""
    started = os.path.exists(runs.path(run_dir, runs.LAST))
    if resume and not started:
        if not runs.is_run(run_dir):
            raise TfglmError(f"{run_dir}: nothing to resume (no {runs.CONFIG})")
        log.warning("%s: no checkpoint yet; starting the run from step 0", run_dir)
        return False
    if not resume and started:
        raise TfglmError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    return resume


def train(config, run_dir, task=None, resume=False, tpu=None, verbose=None):
    """Trains `config` into `run_dir` (or continues the run there) as `task` (by default the one for its
    model.kind) under `train.strategy`; returns the Run (config, tokenizer, model, task). `verbose` is Keras's; by
    default its progress bar in a terminal, and `ProgressLog`'s lines every `train.log_every_s` seconds elsewhere.

    Examples:
    ```python
    import tfglm

    with open("corpus.txt", "w") as f:
        f.write("abcdefgh\\n" * 300)
    config = tfglm.load_config(overrides=[
        "data.files=[corpus.txt]", "model.num_layers=1", "model.hidden_dim=32", "model.max_length=16",
        "train.steps=20", "train.batch_size=8", "train.jit_compile=false", "generate.max_new_tokens=4"])
    run = tfglm.train(config, "runs/example")  # run.json, config.json, tokenizer/, checkpoints, metrics, logs
    ```
    """
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise TfglmError(f"{run_dir}: --out names a file, not a directory")
    task = get_task(task or default_task(config.model.kind))(config, run_dir)
    resume = _check_run_dir(run_dir, resume)
    t = config.train
    strategy, strategy_name = distributed.make_strategy(t.strategy, tpu, t.connect_timeout_s)
    chief = distributed.is_chief(strategy)
    set_precision(t.mixed_precision)
    keras.utils.set_random_seed(t.seed)  # before any tokenizer: reseeding drops the eager kernels that hold one
    with runs.removed_on_failure(run_dir):
        task.prepare(resume, chief)
        config = task.config  # with what the data decided (a classifier's columns)
        if chief:
            runs.atomic_write(runs.path(run_dir, runs.CONFIG), config.save)
        schedule = task.schedule()
        distributed.check_batch(strategy, schedule.batch_size)
        with strategy.scope():
            model = task.build_model()
            if not resume:
                task.initialize(model)
            if t.lora_rank:
                enable_lora(task.backbone(model), t.lora_rank)
                for variable in task.trained_with_lora(model):
                    variable.trainable = True
            compile_model(model, schedule, **task.compile_options())
            step = resumed_step(model, run_dir) if resume else 0
    result = Run(config, task.tokenizer, model, task)
    if chief:
        runs.record_start(run_dir, task.name, step, strategy_name, strategy.num_replicas_in_sync, t.mixed_precision)
    callbacks = run_callbacks(task, schedule, step) if chief else []
    if step >= schedule.steps:
        return result
    train_ds, val_ds = task.datasets(step)
    if verbose is None:  # Keras's bar in a terminal; elsewhere (a log file) ProgressLog's lines
        verbose = 1 if sys.stdout.isatty() else 0
        if not verbose and chief:
            callbacks.append(ProgressLog(schedule, task.counts_epochs, t.log_every_s))
    loop = dict(epochs=schedule.steps // schedule.eval_interval, initial_epoch=step // schedule.eval_interval,
                steps_per_epoch=schedule.eval_interval, callbacks=callbacks, verbose=verbose)
    if strategy_name != "default":
        distributed.fit_distributed(model, strategy, distributed.per_worker(train_ds, schedule.batch_size),
                                   distributed.per_worker(val_ds, schedule.batch_size),
                                   steps_per_execution=schedule.steps_per_execution, jit_compile=schedule.jit_compile,
                                   **loop)
    else:
        whole = train_ds(tf.distribute.InputContext()) if callable(train_ds) else train_ds
        model.fit(whole, validation_data=val_ds, shuffle=False, **loop)
    return result
