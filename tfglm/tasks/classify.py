"""Fine-tuning a classifier: a head on an encoder's pooled [CLS] (model.kind bert) or on a GPT's last token (gpt),
optional balanced class weights, early stopping on validation accuracy, and accuracy, macro-F1 and the confusion
matrix of the best model in eval.json.

A classifier run directory holds config.json, tokenizer/, labels.json (the label set, in class-index order),
best.weights.h5 (the best validation accuracy so far), metrics.jsonl (one line an epoch) and eval.json.
"""

import dataclasses
import json
import logging
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from tfglm.data import corpus as data
from tfglm.data import labelled
from tfglm.tasks import runs
from tfglm.tasks import trainer as train
from tfglm.models.encoder import Encoder, dummy_inputs
from tfglm.errors import TfglmError
from tfglm.models.gpt import GPT
from tfglm.models.heads import EncoderClassifier, GPTClassifier
from tfglm.tasks.masked_lm import packer
from tfglm.data.tokenizers import (CharTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece,
                              train_wordpiece)

log = logging.getLogger("tfglm")
LABELS = "labels.json"
EVAL = "eval.json"


def encode(tokenizer, model_config):
    """strings [batch] -> classifier inputs, tokenized in the graph: for an encoder packed as [CLS] text [SEP]; for a
    GPT `<eot>` + text (its training context), truncated to the context and right-padded, with each row's length."""
    length = model_config.max_length
    if model_config.kind == "gpt":
        def fn(texts):
            ids = tokenizer.tokenize(texts)
            ids = tf.concat([tf.fill([tf.shape(texts)[0], 1], tokenizer.eot_id), ids], axis=1)[:, :length]
            return {"token_ids": ids.to_tensor(default_value=tokenizer.eot_id, shape=[None, length]),
                    "lengths": tf.cast(ids.row_lengths(), tf.int32)}
        return fn
    pack = packer(tokenizer, length)

    def fn(texts):
        token_ids, segment_ids = pack(tokenizer.tokenize(texts))
        return {"token_ids": token_ids, "segment_ids": segment_ids, "padding_mask": token_ids != tokenizer.pad_id}

    return fn


def text_dataset(texts, tokenizer, model_config, batch_size, targets=None, seed=None):
    """Batches of classifier inputs (and targets), in order, each cut to its longest row (`data.trim_padding`);
    with `seed`, shuffled anew each epoch, repeated, and full batches of texts of similar length
    (`data.bucket_by_length`)."""
    ds = tf.data.Dataset.from_tensor_slices(texts if targets is None else (texts, np.asarray(targets, np.int32)))
    encode_texts = encode(tokenizer, model_config)

    def on_texts(fn):
        return fn if targets is None else lambda x, y: (fn(x), y)

    if seed is None:
        trimmed = lambda texts: data.trim_padding(encode_texts(texts), model_config.max_length)  # noqa: E731
        ds = ds.batch(batch_size).map(on_texts(trimmed), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)
    # Tokenized a thousand at a time, then regrouped by length.
    ds = ds.shuffle(len(texts), seed=seed, reshuffle_each_iteration=True).repeat().batch(1024)
    ds = ds.map(on_texts(encode_texts), num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return data.bucket_by_length(ds, batch_size, model_config.max_length).prefetch(tf.data.AUTOTUNE)


def build_classifier(config, vocab_size, num_classes, backbone=None):
    """A classifier on `backbone` (a pretrained encoder or GPT), or on a new one with random weights."""
    length = config.model.max_length
    if config.model.kind == "gpt":
        model = GPTClassifier(backbone or GPT.from_config_tree(config.model, vocab_size), num_classes,
                              config.classify.dropout)
        model({"token_ids": np.zeros((1, length), "int32"), "lengths": np.ones((1,), "int32")})
        return model
    model = EncoderClassifier(backbone or Encoder.from_config_tree(config.model, vocab_size), num_classes,
                              config.classify.dropout)
    model(dummy_inputs(length))
    return model


def new_tokenizer(config, texts):
    """The vocabulary of a classifier trained from scratch, learnt from its training texts."""
    if config.model.kind == "bert":
        return train_wordpiece(texts, config.tokenizer.vocab_size)
    if config.tokenizer.kind == "char":
        return CharTokenizer("".join(texts))
    return SentencePieceTokenizer(train_sentencepiece(texts, config.tokenizer.vocab_size))


def balanced_class_weights(ids, num_classes):
    """{class: total / (classes * count)}, as scikit-learn's "balanced"."""
    counts = np.bincount(ids, minlength=num_classes)
    return {i: len(ids) / (num_classes * count) if count else 0.0 for i, count in enumerate(counts)}


def finetune_schedule(config, num_rows):
    """The `train` settings of a fine-tune: `classify` values, warmup over the first 10%, decay to zero."""
    c = config.classify
    steps_per_epoch = num_rows // c.batch_size
    if steps_per_epoch < 1:
        raise TfglmError(f"classify.batch_size: {c.batch_size} is more than the {num_rows} training rows")
    per_execution = min(config.train.steps_per_execution, steps_per_epoch)
    steps_per_epoch -= steps_per_epoch % per_execution
    steps = c.epochs * steps_per_epoch
    return dataclasses.replace(config.train, steps=steps, batch_size=c.batch_size, learning_rate=c.learning_rate,
                               min_learning_rate=0.0, warmup_steps=steps // 10, eval_interval=steps_per_epoch,
                               steps_per_execution=per_execution)


class BestKeeper(keras.callbacks.Callback):
    """Each epoch: a metrics.jsonl line, and best.weights.h5 when validation accuracy improves."""

    def __init__(self, run_dir):
        super().__init__()
        self.run_dir = run_dir
        self.best = -1.0

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, "step": int(self.model.optimizer.iterations.numpy()),
               **{k: round(float(v), 5) for k, v in logs.items()}}
        if logs["val_accuracy"] > self.best:
            self.best = logs["val_accuracy"]
            runs.atomic_write(runs.path(self.run_dir, runs.BEST), self.model.save_weights)
        with open(runs.path(self.run_dir, runs.METRICS), "a") as f:
            f.write(json.dumps(row) + "\n")


def split_validation(texts, targets, fraction, seed):
    order = np.random.RandomState(seed).permutation(len(texts))
    n_val = int(len(texts) * fraction)
    if n_val < 1:
        raise TfglmError(f"classify.val_fraction: {fraction} of {len(texts)} rows leaves no validation rows; "
                         f"raise it or pass --val")
    return [([texts[i] for i in part], [targets[i] for i in part]) for part in (order[n_val:], order[:n_val])]


def finetune(config, run_dir, train_file, eval_file, pretrained=None, val_file=None, verbose=None):
    """Fine-tunes a classifier into `run_dir`: from the pretrained run's encoder or GPT, or from scratch when
    `pretrained` is None (a vocabulary is then trained on the training texts). Returns the eval.json scores."""
    if os.path.exists(runs.path(run_dir, runs.CONFIG)):
        raise TfglmError(f"{run_dir}: already holds a run; choose another --out (or --overwrite)")
    c = config.classify
    texts, targets = labelled.read_labelled(train_file, c.text_column, c.label_column)
    labels = labelled.label_set(train_file, targets)
    index = {label: i for i, label in enumerate(labels)}
    ids = [index[t] for t in targets]
    if val_file:
        val_texts, val_targets = labelled.read_labelled(val_file, c.text_column, c.label_column, labels)
        val = val_texts, [index[t] for t in val_targets]
    else:
        (texts, ids), val = split_validation(texts, ids, c.val_fraction, config.train.seed)
    eval_texts, eval_targets = labelled.read_labelled(eval_file, c.text_column, c.label_column, labels)

    os.makedirs(run_dir, exist_ok=True)
    keras.utils.set_random_seed(config.train.seed)
    if pretrained:
        _, tokenizer, pretrained_model = runs.load_run(pretrained)
        backbone = pretrained_model if isinstance(pretrained_model, GPT) else pretrained_model.encoder
        model = build_classifier(config, tokenizer.vocab_size, len(labels), backbone)
    else:
        tokenizer = new_tokenizer(config, texts)
        model = build_classifier(config, tokenizer.vocab_size, len(labels))
    tokenizer_dir = runs.path(run_dir, runs.TOKENIZER)
    os.makedirs(tokenizer_dir, exist_ok=True)
    tokenizer.save(tokenizer_dir)
    labelled.save_labels(runs.path(run_dir, LABELS), labels)
    runs.atomic_write(runs.path(run_dir, runs.CONFIG), config.save)

    t = finetune_schedule(config, len(texts))
    train.compile_model(model, t, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    train_ds = text_dataset(texts, tokenizer, config.model, t.batch_size, ids, seed=t.seed)
    val_ds = text_dataset(val[0], tokenizer, config.model, t.batch_size, val[1]).cache()
    class_weight = balanced_class_weights(ids, len(labels)) if c.class_weights == "balanced" else None
    log.info("fine-tuning on %d rows (%d for validation), %d labels, %d steps an epoch", len(texts), len(val[0]),
             len(labels), t.eval_interval)
    callbacks = [BestKeeper(run_dir), keras.callbacks.EarlyStopping("val_accuracy", patience=c.patience, mode="max"),
                 keras.callbacks.TensorBoard(runs.path(run_dir, runs.LOGS))]
    model.fit(train_ds, validation_data=val_ds, epochs=c.epochs, steps_per_epoch=t.eval_interval,
              callbacks=callbacks, shuffle=False, class_weight=class_weight,
              verbose=(1 if sys.stdout.isatty() else 2) if verbose is None else verbose)
    model.load_weights(runs.path(run_dir, runs.BEST))
    result = {"file": eval_file, **score(model, tokenizer, config, labels, eval_texts, eval_targets)}
    with open(runs.path(run_dir, EVAL), "w") as f:
        json.dump(result, f, indent=1)
    return result


def load_classifier(run_dir):
    """(config, tokenizer, labels, model) of a fine-tuned run, with its best weights."""
    config = runs.read_config(run_dir)
    labels = labelled.load_labels(runs.path(run_dir, LABELS))
    tokenizer = load_tokenizer(runs.path(run_dir, runs.TOKENIZER))
    model = build_classifier(config, tokenizer.vocab_size, len(labels))
    model.load_weights(runs.path(run_dir, runs.BEST))
    return config, tokenizer, labels, model


def probabilities(model, tokenizer, config, texts):
    ds = text_dataset(texts, tokenizer, config.model, config.classify.batch_size)
    return keras.ops.convert_to_numpy(keras.ops.softmax(model.predict(ds, verbose=0), axis=-1))


def score(model, tokenizer, config, labels, texts, targets):
    predicted = probabilities(model, tokenizer, config, texts).argmax(-1)
    index = {label: i for i, label in enumerate(labels)}
    return labelled.scores(np.array([index[t] for t in targets]), predicted, labels)


def evaluate(run_dir, path):
    """Scores of the fine-tuned run on a labelled file (columns as in its config)."""
    config, tokenizer, labels, model = load_classifier(run_dir)
    c = config.classify
    texts, targets = labelled.read_labelled(path, c.text_column, c.label_column, labels)
    return {"file": path, **score(model, tokenizer, config, labels, texts, targets)}


def predict(run_dir, texts):
    """[{"text", "label", "probabilities": {label: p}}] for each text."""
    config, tokenizer, labels, model = load_classifier(run_dir)
    if not all(t.strip() for t in texts):
        raise TfglmError("predict: empty text")
    probs = probabilities(model, tokenizer, config, texts)
    return [{"text": text, "label": labels[int(p.argmax())],
             "probabilities": {label: round(float(q), 5) for label, q in zip(labels, p)}}
            for text, p in zip(texts, probs)]


def serving_module(model, tokenizer, config, labels):
    """The exported object of a classifier (as in `tfglm.export.serving_module`): `predict` takes `texts` and gives
    each one's `labels` and `scores` (the probability of every label, in labels.json order); `classify` is TF
    Serving's Classify API: serialized `tf.Example`s with the text in the feature `classify.text_column` in, `classes`
    (the label names) and `scores` [batch, num_labels] out."""
    encode_texts = encode(tokenizer, config.model)
    names = tf.constant(labels)
    feature = config.classify.text_column

    def scores(texts):
        return tf.nn.softmax(model(encode_texts(texts), training=False), axis=-1)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="texts")])
    def predict(texts):
        """{"labels": the most probable label of each text, "scores": [batch, num_labels]}."""
        probs = scores(texts)
        return {"labels": tf.gather(names, tf.argmax(probs, axis=-1)), "scores": probs}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(inputs):
        """TF Serving's Classify API: {"classes": [batch, num_labels] label names, "scores": their probabilities}."""
        texts = tf.io.parse_example(inputs, {feature: tf.io.FixedLenFeature([], tf.string)})[feature]
        probs = scores(texts)
        return {"classes": tf.tile(names[None], [tf.shape(probs)[0], 1]), "scores": probs}

    module = tf.Module()
    module.tokenizer = tokenizer
    module.weights = [variable.value for variable in model.variables]
    module.predict, module.classify = predict, classify
    return module

