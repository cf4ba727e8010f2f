"""BERT pretraining: a WordPiece vocabulary trained on the corpus, sentence-pair examples with dynamic masking built
in `tf.data`, and Keras `fit` with the GPT's optimizer, schedule, checkpoints and metrics log.

Segments are the non-empty lines of each text file (one document a file) and the texts of labelled files (TSV, CSV,
JSONL: `classify.text_column`, one document a row). Example i is a pure function of (seed, i): a random segment A
and, with probability 1/2, the segment after it in its document (NSP label 1; the last segment of a document is cut
in two halves instead), else a random segment (label 0). `[CLS] A [SEP] B [SEP]` is packed to `model.max_length`
(the longer segment trimmed first); examples of similar length are batched together, each batch cut to its longest
row (most pairs are far shorter than the context), and each time a batch is drawn 15% of its non-special tokens are
selected anew for prediction: 80% become [MASK], 10% a random token, 10% stay. The last `data.val_fraction` of the
documents (in a seeded order) is validation, masked once and cached; metrics.jsonl reports `val_mlm_accuracy` and
`val_nsp_accuracy`.
"""

import dataclasses
import logging
import math
import os
import sys

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from tfglm.data import corpus as data
from tfglm.data import labelled
from tfglm.tasks import runs
from tfglm.tasks import trainer as train
from tfglm.errors import TfglmError
from tfglm.data.tokenizers import train_wordpiece

log = logging.getLogger("tfglm")
MASK_RATE = 0.15
NEXT_RATE = 0.5


def read_documents(files, text_column):
    """Documents as lists of segments (non-empty lines; one segment a row of a labelled file)."""
    docs = []
    for path in files:
        if labelled.is_labelled(path):
            docs += [[text] for text in labelled.read_texts(path, text_column)]
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                docs.append([line.strip() for line in f if line.strip()])
    return [doc for doc in docs if doc]


@dataclasses.dataclass
class Segments:
    tokens: np.ndarray  # int32: every segment's ids, back to back
    splits: np.ndarray  # int64 [n + 1]: segment i is tokens[splits[i]:splits[i + 1]]
    has_next: np.ndarray  # bool [n]: segment i + 1 follows segment i in the same document


def tokenize_documents(docs, tokenizer):
    """Tokenizes every segment in the graph."""
    ds = tf.data.Dataset.from_tensor_slices([s for doc in docs for s in doc]).batch(1024).map(tokenizer.tokenize)
    batches = list(ds)
    lengths = np.concatenate([b.row_lengths().numpy() for b in batches])
    return Segments(tokens=np.concatenate([b.flat_values.numpy() for b in batches]).astype(np.int32),
                    splits=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                    has_next=np.concatenate([np.arange(len(doc)) < len(doc) - 1 for doc in docs]))


def pair_dataset(segments, seed, start):
    """Endless examples (A ids, B ids, is_next) numbered from `start`, each a pure function of (seed, index)."""
    tokens, splits = tf.constant(segments.tokens), tf.constant(segments.splits)
    has_next = tf.constant(segments.has_next)
    n = len(segments.has_next)

    def example(i):
        key = tf.stack([tf.constant(seed, tf.int64), i])
        s = tf.random.stateless_uniform([], key, 0, n, tf.int64)
        a_start, end = splits[s], splits[s + 1]
        follows = has_next[s]
        a_end = tf.where(follows, end, (a_start + end + 1) // 2)
        b_end = tf.where(follows, splits[tf.minimum(s + 2, n)], end)
        is_next = tf.random.stateless_uniform([], key + 1) < NEXT_RATE
        r = tf.random.stateless_uniform([], key + 2, 0, n, tf.int64)
        b_start, b_end = tf.where(is_next, a_end, splits[r]), tf.where(is_next, b_end, splits[r + 1])
        return tokens[a_start:a_end], tokens[b_start:b_end], tf.cast(is_next, tf.int32)

    return tf.data.Dataset.counter(start).map(example, num_parallel_calls=tf.data.AUTOTUNE)


def packer(tokenizer, length):
    """Packs one or two segments as [CLS] A [SEP] (B [SEP]), padded with [PAD] to `length`."""
    return keras_hub.layers.MultiSegmentPacker(length, start_value=tokenizer.cls_id, end_value=tokenizer.sep_id,
                                               pad_value=tokenizer.pad_id)


def mask_generator(tokenizer, length):
    """BERT's dynamic masking; [PAD], [CLS] and [SEP] are never selected."""
    return keras_hub.layers.MaskedLMMaskGenerator(
        vocabulary_size=tokenizer.vocab_size, mask_selection_rate=MASK_RATE, mask_token_id=tokenizer.mask_id,
        mask_selection_length=math.ceil(MASK_RATE * (length - 3)),
        unselectable_token_ids=[tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id])


def pretraining_dataset(segments, tokenizer, length, batch_size, seed, num_batches):
    """`num_batches` batches (inputs, targets, sample weights) for `EncoderPretrainer`, of examples of similar length,
    each cut to its longest row (`data.bucket_by_length`)."""
    pack = packer(tokenizer, length)
    masker = mask_generator(tokenizer, length)

    def example(a, b, is_next):
        token_ids, segment_ids = pack((a, b))
        inputs = {"token_ids": token_ids, "segment_ids": segment_ids, "padding_mask": token_ids != tokenizer.pad_id}
        return inputs, is_next

    def mask(inputs, is_next):
        masked = masker(inputs["token_ids"])
        # A row of width w has at most w - 3 selectable tokens, so at most ceil(15% of them) are selected: the slots
        # beyond are always empty, and their logits over the whole vocabulary would cost as much as the encoder.
        width = tf.cast(tf.shape(inputs["token_ids"])[1] - 3, tf.float32)
        slots = tf.cast(tf.math.ceil(width * MASK_RATE), tf.int32)
        positions, ids, mask_weights = (masked[k][:, :slots] for k in ("mask_positions", "mask_ids", "mask_weights"))
        inputs = {**inputs, "token_ids": masked["token_ids"], "mask_positions": positions}
        weights = {"mlm": mask_weights, "nsp": tf.ones_like(is_next, tf.float32)}
        return inputs, {"mlm": ids, "nsp": is_next}, weights

    examples = pair_dataset(segments, seed, 0).map(example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = data.bucket_by_length(examples, batch_size, length)
    return ds.take(num_batches).map(mask, num_parallel_calls=tf.data.AUTOTUNE)


def split_documents(docs, val_fraction, seed):
    order = np.random.RandomState(seed).permutation(len(docs))
    n_val = int(len(docs) * val_fraction)
    if n_val < 1 or n_val == len(docs):
        raise TfglmError(f"data: {len(docs)} document(s) cannot be split into training and validation by "
                         f"data.val_fraction {val_fraction}; add text")
    return [docs[i] for i in order[:-n_val]], [docs[i] for i in order[-n_val:]]


def compile_pretrainer(model, train_config):
    # MLM: the mean over the selected tokens only; the default would divide by every prediction slot, most of them
    # empty in short segments, and so shrink the MLM loss against NSP's.
    mlm = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")
    nsp = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    train.compile_model(model, train_config, loss={"mlm": mlm, "nsp": nsp},
                        weighted_metrics={"mlm": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                                          "nsp": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]})


def pretrain(config, run_dir, verbose=None):
    """Pretrains the encoder `config` describes into `run_dir`; returns the model and tokenizer."""
    from tfglm.models.heads import build_pretrainer

    if config.model.kind != "bert":
        raise TfglmError(f"config: model.kind: pretrain needs 'bert', got {config.model.kind!r}")
    if os.path.exists(runs.path(run_dir, runs.CONFIG)):
        raise TfglmError(f"{run_dir}: already holds a run; choose another --out (or --overwrite)")
    os.makedirs(run_dir, exist_ok=True)
    files = data.resolve_files(config.data.files) if config.data.files else data.embedded_corpus_files()
    data.scan_files(files)
    docs = read_documents(files, config.classify.text_column)
    tokenizer = train_wordpiece([s for doc in docs for s in doc], config.tokenizer.vocab_size)
    tokenizer_dir = runs.path(run_dir, runs.TOKENIZER)
    os.makedirs(tokenizer_dir, exist_ok=True)
    tokenizer.save(tokenizer_dir)
    runs.atomic_write(runs.path(run_dir, runs.CONFIG), config.save)
    t = config.train
    train_docs, val_docs = split_documents(docs, config.data.val_fraction, t.seed)
    train_segments, val_segments = tokenize_documents(train_docs, tokenizer), tokenize_documents(val_docs, tokenizer)
    log.info("corpus: %d documents, %d segments, %d tokens for training; %d documents for validation; "
             "vocabulary %d", len(train_docs), len(train_segments.has_next), len(train_segments.tokens),
             len(val_docs), tokenizer.vocab_size)

    keras.utils.set_random_seed(t.seed)
    model = build_pretrainer(config.model, tokenizer.vocab_size)
    compile_pretrainer(model, t)
    length = config.model.max_length
    train_ds = pretraining_dataset(train_segments, tokenizer, length, t.batch_size, t.seed, t.steps)
    val_ds = pretraining_dataset(val_segments, tokenizer, length, t.batch_size, t.seed + 1, t.eval_batches).cache()
    callbacks = [train.RunLogger(run_dir, t, t.batch_size * length, np.inf),
                 keras.callbacks.TensorBoard(runs.path(run_dir, runs.LOGS))]
    model.fit(train_ds.prefetch(tf.data.AUTOTUNE), validation_data=val_ds, epochs=t.steps // t.eval_interval,
              steps_per_epoch=t.eval_interval, callbacks=callbacks, shuffle=False,
              verbose=(1 if sys.stdout.isatty() else 2) if verbose is None else verbose)
    return model, tokenizer
