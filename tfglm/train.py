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

from tfglm import data, runs
from tfglm.errors import TfglmError
from tfglm.models import GPT
from tfglm.tokenizers import CharTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

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


def compile_model(model, train):
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate_schedule(train), weight_decay=train.weight_decay, beta_1=train.beta_1,
        beta_2=train.beta_2, global_clipnorm=train.grad_clip or None)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=train.jit_compile, steps_per_execution=train.steps_per_execution)
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
        with open(runs.path(self.run_dir, runs.METRICS), "a") as f:
            f.write(json.dumps(row) + "\n")


def train(config, run_dir, resume=False, verbose=None):
    """Trains `config` into `run_dir` (or continues the run there); returns the trained model and tokenizer."""
    if resume:
        if not os.path.exists(runs.path(run_dir, runs.LAST)):
            raise TfglmError(f"{run_dir}: nothing to resume (no {runs.LAST})")
    elif os.path.exists(runs.path(run_dir, runs.CONFIG)):
        raise TfglmError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    os.makedirs(run_dir, exist_ok=True)

    files = data.resolve_files(config.data.files) if config.data.files else data.embedded_corpus_files()
    stats = data.scan_files(files)
    log.info("corpus: %d file(s), %.1f MB, %d characters", stats.files, stats.bytes / 1e6, stats.characters)
    tokenizer_dir = runs.path(run_dir, runs.TOKENIZER)
    if resume:
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = build_tokenizer(config, files, stats)
        os.makedirs(tokenizer_dir, exist_ok=True)
        tokenizer.save(tokenizer_dir)
    runs.atomic_write(runs.path(run_dir, runs.CONFIG), config.save)
    tokens = data.tokenize_files(files, tokenizer)
    train_tokens, val_tokens = data.split_tokens(tokens, config.data.val_fraction)
    log.info("tokens: %d train, %d validation, vocabulary %d", len(train_tokens), len(val_tokens),
             tokenizer.vocab_size)

    t = config.train
    keras.utils.set_random_seed(t.seed)
    model = GPT.from_config_tree(config.model, tokenizer.vocab_size)
    compile_model(model, t)
    step = 0
    if resume:
        model.load_weights(runs.path(run_dir, runs.LAST))
        step = int(model.optimizer.iterations.numpy())
        keras.utils.set_random_seed(t.seed + step)  # dropout masks after a resume: deterministic per (seed, step)
        log.info("resuming %s at step %d", run_dir, step)
    rows = runs.read_metrics(run_dir, up_to_step=step)
    with open(runs.path(run_dir, runs.METRICS), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    best = min([r["val_loss"] for r in rows], default=np.inf)

    seq_len = config.model.max_length
    train_ds = data.train_dataset(train_tokens, seq_len, t.batch_size, t.seed, step, t.steps - step)
    val_ds = data.eval_dataset(val_tokens, seq_len, t.batch_size, t.eval_batches)
    callbacks = [RunLogger(run_dir, t, t.batch_size * seq_len, best),
                 keras.callbacks.TensorBoard(runs.path(run_dir, runs.LOGS))]
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    if step < t.steps:
        model.fit(train_ds, validation_data=val_ds, epochs=t.steps // t.eval_interval,
                  initial_epoch=step // t.eval_interval, steps_per_epoch=t.eval_interval, callbacks=callbacks,
                  shuffle=False, verbose=verbose)
    return model, tokenizer
