"""Fine-tuning a classifier: a head on an encoder's pooled [CLS] or mean token (model.kind bert, `model.pooling`)
or on a GPT's last token (gpt), optional balanced class weights, early stopping on validation accuracy, and
accuracy, macro-F1 and the confusion matrix of the best model in eval.json.

A classifier run directory holds what every run does (`tfglm.training.runs`; best.weights.h5 has the best validation
accuracy so far, metrics.jsonl one line an epoch), plus labels.json (the label set, in class-index order) and
eval.json.
"""

import dataclasses
import logging

import keras
import numpy as np
import tensorflow as tf

from tfglm.data import epochs, labelled
from tfglm.data.tokenizers import load_tokenizer, new_tokenizer
from tfglm.errors import TfglmError
from tfglm.models.encoder import Encoder, dummy_inputs
from tfglm.models.gpt import GPT
from tfglm.models.heads import EncoderClassifier, GPTClassifier
from tfglm.preprocessors import CausalLMPreprocessor, EncoderPreprocessor
from tfglm.preprocessors.buckets import trim_padding
from tfglm.tasks.base import Evaluation, Task, TextClassifier, epoch_checks, epoch_schedule, held_out
from tfglm.tasks.registry import load_run
from tfglm.training import runs
from tfglm.training.trainer import train

log = logging.getLogger("tfglm")
LABELS = "labels.json"


@dataclasses.dataclass
class ClassifyConfig:
    text_column: str = ""  # column (TSV/CSV header) or field (JSONL) holding the text; "": text, sentence or review
    label_column: str = ""  # "": label, labels or category
    val_fraction: float = 0.1  # of the training rows, held out for early stopping when no --val file is given
    epochs: int = 10
    patience: int = 2  # epochs without a better validation `monitor` before stopping
    monitor: str = "accuracy"  # what picks best.weights.h5 and stops early: validation "accuracy" or "loss" (finer
    # on a small validation set, where accuracy moves by whole rows)
    batch_size: int = 32
    learning_rate: float = 1e-4
    dropout: float = 0.1  # before the classification head
    class_weights: str = "none"  # "balanced": weight each class's loss by total / (classes * its count)
    train_file: str = ""  # labelled files: training rows, validation rows (default: val_fraction of the training
    val_file: str = ""  # rows) and rows scored into eval.json after training
    eval_file: str = ""


def gpt_classifier(config, vocab_size, num_classes, backbone):
    """A head on a GPT's last token."""
    model = GPTClassifier(backbone or GPT.from_config_tree(config.model, vocab_size), num_classes,
                          config.classify.dropout)
    model({"token_ids": np.zeros((1, config.model.max_length), "int32"), "lengths": np.ones((1,), "int32")})
    return model


def encoder_classifier(config, vocab_size, num_classes, backbone):
    """A head on an encoder's pooled [CLS] or mean token (`model.pooling`)."""
    model = EncoderClassifier(backbone or Encoder.from_config_tree(config.model, vocab_size), num_classes,
                              config.classify.dropout, config.model.pooling)
    model(dummy_inputs(config.model.max_length))
    return model


# model.kind -> (its preprocessor, its classifier)
FAMILIES = {"gpt": (CausalLMPreprocessor, gpt_classifier), "bert": (EncoderPreprocessor, encoder_classifier)}


def preprocessor(tokenizer, model_config):
    """The preprocessor of `model_config.kind`: strings [batch] -> its classifier's inputs, in the graph."""
    return FAMILIES[model_config.kind][0](tokenizer, model_config.max_length)


def text_dataset(texts, tokenizer, model_config, batch_size, targets=None, batches=None, class_weights=None):
    """Batches of classifier inputs (and targets, and with `class_weights` each row's weight), each cut to its longest
    row (`buckets.trim_padding`): in order, or the rows `batches` names (row indices [steps, batch_size], as
    `epochs.epoch_batches` gives them)."""
    columns = [texts]
    if targets is not None:
        columns.append(np.asarray(targets, np.int32))
        if class_weights is not None:
            columns.append(np.asarray(class_weights, np.float32)[columns[1]])
    encode = preprocessor(tokenizer, model_config)

    def encoded(texts, *rest):
        inputs = trim_padding(encode(texts), model_config.max_length)
        return (inputs, *rest) if rest else inputs

    if batches is None:
        ds = tf.data.Dataset.from_tensor_slices(tuple(columns)).batch(batch_size)
    else:
        table = [tf.constant(column) for column in columns]
        ds = tf.data.Dataset.from_tensor_slices(batches).map(lambda ids: tuple(tf.gather(c, ids) for c in table))
    return ds.map(encoded, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def build_classifier(config, vocab_size, num_classes, backbone=None):
    """A classifier on `backbone` (a pretrained encoder or GPT), or on a new one with random weights."""
    return FAMILIES[config.model.kind][1](config, vocab_size, num_classes, backbone)


def balanced_class_weights(ids, num_classes):
    """Each class's weight, total / (classes * count), as scikit-learn's "balanced"."""
    counts = np.bincount(ids, minlength=num_classes)
    return [len(ids) / (num_classes * count) if count else 0.0 for count in counts]


class Classify(Task):
    """Sequence classification: a head on an encoder's [CLS] or mean token or a GPT's last token, trained on a
    labelled file (`classify.train_file`), validated each epoch (`classify.val_file`, or a held-out share of the
    training rows), with early stopping on validation accuracy (or loss: `classify.monitor`). `train.init_from` names
    a pretrained run to start from."""

    name = "classify"
    model_kinds = ("bert", "gpt")
    counts_epochs = True
    section = ClassifyConfig
    finetune = "labelled texts (a TSV, CSV or JSONL file)"

    @classmethod
    def checks(cls, c, config):
        return epoch_checks("classify", c) + [
            (c.monitor in ("accuracy", "loss"), "classify.monitor",
             f"must be 'accuracy' or 'loss', got {c.monitor!r}"),
            (0.0 <= c.dropout < 1.0, "classify.dropout", "must be in [0, 1)"),
            (c.class_weights in ("none", "balanced"), "classify.class_weights", "must be 'none' or 'balanced'"),
        ]

    def __init__(self, config, run_dir):
        super().__init__(config, run_dir)
        self.patience = config.classify.patience
        self.monitor = ("val_loss", "min") if config.classify.monitor == "loss" else ("val_accuracy", "max")

    def load_vocabulary(self):
        self.tokenizer = load_tokenizer(runs.path(self.run_dir, runs.TOKENIZER))
        self.labels = labelled.load_labels(runs.path(self.run_dir, LABELS))

    def prepare(self, resume, chief):
        config, c = self.config, self.config.classify
        if not c.train_file:
            raise TfglmError("classify.train_file: no training file (--train)")
        text_column, label_column = labelled.find_columns(c.train_file, c.text_column, c.label_column)
        c = dataclasses.replace(c, text_column=text_column, label_column=label_column)
        self.config = config = config.replace(classify=c)  # config.json keeps the columns found
        texts, targets = labelled.read_labelled(c.train_file, c.text_column, c.label_column)
        if resume:
            self.load_vocabulary()
        else:
            self.labels = labelled.label_set(c.train_file, targets)
        index = {label: i for i, label in enumerate(self.labels)}
        ids = [index[t] for t in targets]
        if c.val_file:
            val_texts, val_targets = labelled.read_labelled(c.val_file, c.text_column, c.label_column, self.labels)
            self.val = val_texts, [index[t] for t in val_targets]
        else:
            train, val = held_out(len(texts), c.val_fraction, config.train.seed, "classify", "rows")
            (texts, ids), self.val = ([[column[i] for i in part] for column in (texts, ids)] for part in (train, val))
        self.texts, self.ids = texts, ids
        if not resume:
            if config.train.init_from:
                self.tokenizer = load_tokenizer(runs.path(config.train.init_from, runs.TOKENIZER))
            else:
                self.tokenizer = new_tokenizer(config, texts)
            if chief:
                runs.save_tokenizer(self.run_dir, self.tokenizer)
                labelled.save_labels(runs.path(self.run_dir, LABELS), self.labels)
        log.info("fine-tuning on %d rows (%d for validation), %d labels", len(texts), len(self.val[0]),
                 len(self.labels))

    def schedule(self):
        return epoch_schedule(self.config.train, self.config.classify, len(self.texts))

    def build_model(self):
        return build_classifier(self.config, self.tokenizer.vocab_size, len(self.labels))

    def backbone(self, model):
        return model.gpt if isinstance(model, GPTClassifier) else model.encoder

    def initialize(self, model):
        if self.config.train.init_from:
            pretrained = load_run(self.config.train.init_from)
            self.backbone(model).set_weights(pretrained.task.backbone(pretrained.model).get_weights())

    def compile_options(self):
        return {"weighted_metrics": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]}

    def datasets(self, step):
        t, c = self.schedule(), self.config.classify
        weights = balanced_class_weights(self.ids, len(self.labels)) if c.class_weights == "balanced" else None
        batches = epochs.epoch_batches(len(self.texts), t.batch_size, c.epochs, t.seed,
                                       lengths=[len(text) for text in self.texts])  # characters: a proxy for tokens
        train = text_dataset(self.texts, self.tokenizer, self.config.model, t.batch_size, self.ids,
                             batches=batches[step:], class_weights=weights)
        val = text_dataset(self.val[0], self.tokenizer, self.config.model, t.batch_size, self.val[1])
        return train, val.cache()

    def tokens_per_step(self):
        return self.config.classify.batch_size * self.config.model.max_length

    def evaluate(self, model, inputs):
        """Accuracy, macro-F1 and the confusion matrix on the labelled file `--data`."""
        if not inputs.data:
            raise TfglmError("--data: a classifier is scored on a labelled TSV, CSV or JSONL file")
        c = self.config.classify
        texts, targets = labelled.read_labelled(inputs.data, c.text_column, c.label_column, self.labels)
        log.info("scoring %d rows of %s", len(texts), inputs.data)
        return {"file": inputs.data, **score(model, self.tokenizer, self.config, self.labels, texts, targets)}

    def predict(self, model, texts):
        """[{"text", "label", "probabilities": {label: p}}] for each text."""
        if not all(t.strip() for t in texts):
            raise TfglmError("predict: empty text")
        probs = probabilities(model, self.tokenizer, self.config, texts)
        return [{"text": text, "label": self.labels[int(p.argmax())],
                 "probabilities": {label: round(float(q), 5) for label, q in zip(self.labels, p)}}
                for text, p in zip(texts, probs)]

    def exported(self, model, jit_compile):
        return TextClassifier(model, self.tokenizer, preprocessor(self.tokenizer, self.config.model), self.labels,
                              self.config.classify.text_column)


def finetune(config, run_dir, train_file, eval_file, pretrained=None, val_file=None, verbose=None):
    """Fine-tunes a classifier into `run_dir` (from the `pretrained` run, or from scratch) and scores its best
    weights on `eval_file` into eval.json; returns the scores."""
    config = config.replace(
        classify=dataclasses.replace(config.classify, train_file=train_file, val_file=val_file or "",
                                     eval_file=eval_file),
        train=dataclasses.replace(config.train, init_from=pretrained or ""))
    train(config, run_dir, task="classify", verbose=verbose)
    return evaluate_run(run_dir, eval_file)


def evaluate_run(run_dir, path):
    """The run's scores on the labelled file `path`, written to its eval.json."""
    run = load_run(run_dir)
    result = run.task.evaluate(run.model, Evaluation(data=path))
    runs.write_json(runs.path(run_dir, runs.EVAL), result)
    return result


def predict(run_dir, texts):
    """`Classify.predict` with the run's best weights."""
    run = load_run(run_dir)
    return run.task.predict(run.model, texts)


def probabilities(model, tokenizer, config, texts):
    ds = text_dataset(texts, tokenizer, config.model, config.classify.batch_size)
    return keras.ops.convert_to_numpy(keras.ops.softmax(model.predict(ds, verbose=0), axis=-1))


def score(model, tokenizer, config, labels, texts, targets):
    predicted = probabilities(model, tokenizer, config, texts).argmax(-1)
    index = {label: i for i, label in enumerate(labels)}
    return labelled.scores(np.array([index[t] for t in targets]), predicted, labels)
