"""Causal-LM training with Keras `fit`: XLA, steps_per_execution, AdamW with warmup + cosine decay and clipping,
validation every `eval_interval` steps, best/last checkpoints, exact resume, TensorBoard and metrics.jsonl."""

import json
import logging
import math
import os
import shutil
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from tfglm.data import corpus as data
from tfglm.tasks import distribute
from tfglm.tasks import runs
from tfglm.errors import TfglmError
from tfglm.models.gpt import GPT
from tfglm.data.tokenizers import CharTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

log = logging.getLogger("tfglm")


def build_tokenizer(config, files, stats):
    if config.tokenizer.kind == "char":
        return CharTokenizer(stats.chars)
    return SentencePieceTokenizer(train_sentencepiece(data.iter_lines(files), config.tokenizer.vocab_size))


def learning_rate_schedule(train):
    """Linear warmup to `learning_rate`, then cosine decay to `min_learning_rate` at `steps`."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, warmup_target=train.learning_rate, warmup_steps=train.warmup_steps,
        decay_steps=train.steps - train.warmup_steps, alpha=train.min_learning_rate / train.learning_rate)


def compile_model(model, train, jit_compile=None, loss=None, weighted_metrics=None):
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
                  weighted_metrics=weighted_metrics, jit_compile=train.jit_compile if jit_compile is None else jit_compile,
                  steps_per_execution=train.steps_per_execution)
    optimizer.build(model.trainable_variables)


class RunLogger(keras.callbacks.Callback):
    """At each validation point: save last (and best) checkpoint atomically, append a metrics.jsonl line."""

    def __init__(self, run_dir, train, tokens_per_step, best_val_loss):
        super().__init__()
        self.run_dir = run_dir
        self.train = train
        self.tokens_per_step = tokens_per_step
        self.best_val_loss = best_val_loss
        self.start = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.time()

    def on_test_begin(self, logs=None):
        self.train_seconds = time.time() - self.epoch_start

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        runs.atomic_write(runs.path(self.run_dir, runs.LAST), self.model.save_weights)
        val_loss = float(logs["val_loss"])
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            runs.atomic_write(runs.path(self.run_dir, runs.BEST),
                              lambda tmp: shutil.copyfile(runs.path(self.run_dir, runs.LAST), tmp))
        row = {"step": step, "train_loss": round(float(logs["loss"]), 5), "val_loss": round(val_loss, 5),
               "val_perplexity": round(math.exp(min(val_loss, 50.0)), 4),
               "learning_rate": float(self.model.optimizer.learning_rate.numpy()),
               "tokens_per_s": round(self.train.eval_interval * self.tokens_per_step / self.train_seconds, 1),
               "wall_s": round(time.time() - self.start, 2)}
        row.update({k: round(float(v), 5) for k, v in logs.items() if k.startswith("val_") and k not in row})
        with open(runs.path(self.run_dir, runs.METRICS), "a") as f:
            f.write(json.dumps(row) + "\n")


def run_callbacks(run_dir, train_config, tokens_per_step, step):
    """RunLogger and TensorBoard for a run starting (or resuming) at `step`: metrics.jsonl keeps the rows up to
    `step` (a crashed run may have logged past its last checkpoint) and the best validation loss among them."""
    rows = runs.read_metrics(run_dir, up_to_step=step)
    with open(runs.path(run_dir, runs.METRICS), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    best = min([r["val_loss"] for r in rows], default=np.inf)
    return [RunLogger(run_dir, train_config, tokens_per_step, best),
            keras.callbacks.TensorBoard(runs.path(run_dir, runs.LOGS))]


def resumed_step(model, run_dir):
    """Loads the run's last checkpoint (weights and optimizer state) into the compiled `model`; returns its step.
    (Keras checkpoints hold no seed-generator state: with dropout, a resumed run draws other masks.)"""
    model.load_weights(runs.path(run_dir, runs.LAST))
    step = int(model.optimizer.iterations.numpy())
    log.info("resuming %s at step %d", run_dir, step)
    return step


def prepare_tokens(config, run_dir, resume, chief=True):
    """Reads and checks the corpus, trains (or reloads) the tokenizer and returns (tokenizer, train, val) tokens."""
    files = data.resolve_files(config.data.files) if config.data.files else data.embedded_corpus_files()
    stats = data.scan_files(files)
    log.info("corpus: %d file(s), %.1f MB, %d characters", stats.files, stats.bytes / 1e6, stats.characters)
    tokenizer_dir = runs.path(run_dir, runs.TOKENIZER)
    if resume:
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = build_tokenizer(config, files, stats)
        if chief:
            os.makedirs(tokenizer_dir, exist_ok=True)
            tokenizer.save(tokenizer_dir)
    if chief:
        runs.atomic_write(runs.path(run_dir, runs.CONFIG), config.save)
    train_tokens, val_tokens = data.split_tokens(data.tokenize_files(files, tokenizer), config.data.val_fraction)
    log.info("tokens: %d train, %d validation, vocabulary %d", len(train_tokens), len(val_tokens),
             tokenizer.vocab_size)
    return tokenizer, train_tokens, val_tokens


def set_precision(policy):
    if policy == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
        raise TfglmError("train.mixed_precision: mixed_float16 needs a GPU (CPUs have no fast float16); "
                         "use mixed_bfloat16 or float32")
    keras.mixed_precision.set_global_policy(policy)


def train(config, run_dir, resume=False, verbose=None, tpu=None):
    """Trains `config` into `run_dir` (or continues the run there) under `train.strategy`."""
    if resume:
        if not os.path.exists(runs.path(run_dir, runs.LAST)):
            raise TfglmError(f"{run_dir}: nothing to resume (no {runs.LAST})")
    elif os.path.exists(runs.path(run_dir, runs.CONFIG)):
        raise TfglmError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    t = config.train
    strategy, kind = distribute.make_strategy(t.strategy, tpu, t.connect_timeout_s)
    distribute.check_batch(strategy, t.batch_size)
    chief = distribute.is_chief(strategy)
    set_precision(t.mixed_precision)
    jit_compile = t.jit_compile
    os.makedirs(run_dir, exist_ok=True)
    tokenizer, train_tokens, val_tokens = prepare_tokens(config, run_dir, resume, chief)

    keras.utils.set_random_seed(t.seed)
    with strategy.scope():
        model = GPT.from_config_tree(config.model, tokenizer.vocab_size)
        compile_model(model, t, jit_compile)
        step = resumed_step(model, run_dir) if resume else 0

    callbacks = run_callbacks(run_dir, t, t.batch_size * config.model.max_length, step) if chief else []
    if step >= t.steps:
        return model, tokenizer
    seq_len = config.model.max_length
    train_ds = data.train_dataset(train_tokens, seq_len, t.batch_size, t.seed, step, t.steps - step)
    val_ds = data.eval_dataset(val_tokens, seq_len, t.batch_size, t.eval_batches)
    schedule = dict(epochs=t.steps // t.eval_interval, initial_epoch=step // t.eval_interval,
                    steps_per_epoch=t.eval_interval, callbacks=callbacks,
                    verbose=(1 if sys.stdout.isatty() else 2) if verbose is None else verbose)
    if kind != "default":  # Keras fit fails under multi-worker (keras-team/keras#20585) and mirrored CPU replicas
        distribute.fit_distributed(model, strategy, distribute.per_worker(train_ds, t.batch_size),
                                   distribute.per_worker(val_ds, t.batch_size),
                                   steps_per_execution=t.steps_per_execution, jit_compile=jit_compile, **schedule)
    else:
        model.fit(train_ds, validation_data=val_ds, shuffle=False, **schedule)
    return model, tokenizer
