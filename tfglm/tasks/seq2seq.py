"""Translation runs: train an `EncoderDecoder` on parallel text (a shared SentencePiece vocabulary, label smoothing,
teacher forcing), translate with it, score corpus BLEU with sacrebleu, and export a `translate` signature.

A translation run directory holds what a GPT run does (config.json, tokenizer/, last and best weights, metrics.jsonl
whose losses are label-smoothed, logs/), plus eval.json after `tfglm evaluate`.
"""

import json
import logging
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfglm.data import parallel
from tfglm.tasks import runs
from tfglm.tasks import trainer as train
from tfglm.errors import TfglmError
from tfglm.generation.beam import Translator
from tfglm.models.encoder_decoder import EncoderDecoder
from tfglm.data.tokenizers import SentencePieceTokenizer, load_tokenizer, train_sentencepiece

log = logging.getLogger("tfglm")
EVAL = "eval.json"
SOURCES = tf.TensorSpec([None], tf.string, name="sources")


class SmoothedCrossEntropy(keras.losses.Loss):
    """Token cross-entropy against labels smoothed by `smoothing`, averaged over the weighted (non-padding) tokens."""

    def __init__(self, vocab_size, smoothing, name="smoothed_cross_entropy"):
        super().__init__(name=name, reduction="mean_with_sample_weight")
        self.vocab_size = vocab_size
        self.smoothing = smoothing

    def call(self, labels, logits):
        one_hot = ops.one_hot(ops.cast(labels, "int32"), self.vocab_size)
        return keras.losses.categorical_crossentropy(one_hot, logits, from_logits=True,
                                                     label_smoothing=self.smoothing)


def train_translation(config, run_dir, resume=False, verbose=None):
    """Trains `config` (model.kind translate) into `run_dir`, or continues the run there; returns (model, tokenizer).
    A resumed run reloads its tokenizer, weights and optimizer state and skips the batches it has seen."""
    tr, t, length = config.translate, config.train, config.model.max_length
    if resume:
        if not os.path.exists(runs.path(run_dir, runs.LAST)):
            raise TfglmError(f"{run_dir}: nothing to resume (no {runs.LAST})")
    elif os.path.exists(runs.path(run_dir, runs.CONFIG)):
        raise TfglmError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    if not (tr.val_pairs or tr.val_source):
        raise TfglmError("config: translate.val_source and translate.val_target (or translate.val_pairs): "
                         "validation pairs are required")
    sources, targets = parallel.read_pairs(tr.source, tr.target, tr.pairs)
    val_sources, val_targets = parallel.read_pairs(tr.val_source, tr.val_target, tr.val_pairs)
    train.set_precision(t.mixed_precision)
    keras.utils.set_random_seed(t.seed)  # before the tokenizer: reseeding drops the eager kernels that hold its model
    if resume:
        tokenizer = load_tokenizer(runs.path(run_dir, runs.TOKENIZER))
    else:
        tokenizer = SentencePieceTokenizer(train_sentencepiece(sources + targets, config.tokenizer.vocab_size))
        os.makedirs(runs.path(run_dir, runs.TOKENIZER), exist_ok=True)
        tokenizer.save(runs.path(run_dir, runs.TOKENIZER))
    runs.atomic_write(runs.path(run_dir, runs.CONFIG), config.save)
    target_tokens = parallel.report_lengths(sources, targets, tokenizer, length, tr.pairs or tr.source)
    parallel.report_lengths(val_sources, val_targets, tokenizer, length, tr.val_pairs or tr.val_source)
    log.info("%d training and %d validation pairs, vocabulary %d", len(sources), len(val_sources),
             tokenizer.vocab_size)

    model = EncoderDecoder.from_config_tree(config.model, tokenizer.vocab_size)
    train.compile_model(model, t, loss=SmoothedCrossEntropy(tokenizer.vocab_size, tr.label_smoothing),
                        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    step = train.resumed_step(model, run_dir) if resume else 0
    callbacks = train.run_callbacks(run_dir, t, t.batch_size * target_tokens, step)
    if step >= t.steps:
        return model, tokenizer
    train_ds = parallel.dataset(sources, targets, tokenizer, length, t.batch_size, seed=t.seed).skip(step)
    val_ds = parallel.dataset(val_sources, val_targets, tokenizer, length, t.batch_size).take(t.eval_batches)
    model.fit(train_ds, validation_data=val_ds.cache(), epochs=t.steps // t.eval_interval,
              initial_epoch=step // t.eval_interval, steps_per_epoch=t.eval_interval, callbacks=callbacks,
              shuffle=False, verbose=(1 if sys.stdout.isatty() else 2) if verbose is None else verbose)
    return model, tokenizer


def load_translator(run_dir, beam_width=None, jit_compile=True):
    """A `Translator` for the run's best weights; beam width and length penalty from its config unless given."""
    config, tokenizer, model = runs.load_run(run_dir)
    if config.model.kind != "translate":
        raise TfglmError(f"{run_dir}: not a translation run (model.kind {config.model.kind!r})")
    if beam_width is not None and beam_width < 1:
        raise TfglmError(f"--beam: must be >= 1 (1 is greedy), got {beam_width}")
    return Translator(model, tokenizer, beam_width or config.translate.beam_width, config.translate.length_penalty,
                      jit_compile=jit_compile)


def translate_texts(translator, texts, batch_size=64):
    """Translations of `texts`, in batches of similar length; warns about sources truncated to the context."""
    context = translator.model.max_length
    lengths = translator.tokenizer.tokenize(tf.constant(texts)).row_lengths().numpy()
    if (lengths > context).any():
        log.warning("%d source(s) over the model's context (%d tokens) truncated", int((lengths > context).sum()),
                    context)
    order = np.argsort(lengths, kind="stable")
    out = [None] * len(texts)
    for start in range(0, len(texts), batch_size):
        chunk = order[start:start + batch_size]
        result = translator.translate(tf.constant([texts[i] for i in chunk]))["translations"].numpy()
        for i, text in zip(chunk, result):
            out[i] = text.decode("utf-8", errors="replace")
    return out


def evaluate(run_dir, source, reference, beam_width=None):
    """Corpus BLEU (sacrebleu, default 13a tokenization) of the run's translations of `source` against `reference`;
    written to the run's eval.json and returned."""
    import sacrebleu

    translator = load_translator(run_dir, beam_width)
    sources, references = parallel.read_pairs(source, reference)
    start = time.time()
    hypotheses = translate_texts(translator, sources)
    bleu = sacrebleu.metrics.BLEU()
    score = bleu.corpus_score(hypotheses, [references])
    result = {"source": source, "reference": reference, "sentences": len(sources), "bleu": round(score.score, 2),
              "signature": str(bleu.get_signature()), "beam_width": translator.beam_width,
              "length_penalty": translator.length_penalty, "translate_s": round(time.time() - start, 1)}
    with open(runs.path(run_dir, EVAL), "w") as f:
        json.dump(result, f, indent=1)
    return result


def serving_module(translator):
    """The exported object: a `translate` signature (sources in, translations out), the tokenizer and the weights
    (as in `tfglm.export.serving_module`)."""

    @tf.function(input_signature=[SOURCES])
    def translate(sources):
        """`Translator.translate`: {"translations": strings}."""
        return translator.translate(sources)

    module = tf.Module()
    module.tokenizer = translator.tokenizer
    module.weights = [variable.value for variable in translator.model.variables]
    module.translate = translate
    return module
