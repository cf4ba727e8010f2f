"""Parallel text for translation: two aligned files (plain or .gz) or a TSV of source<TAB>target lines, read into a
`tf.data` pipeline that tokenizes in the graph and batches pairs of similar length into static-shape buckets.

Policy: files with different line counts are rejected, naming both counts; a pair with an empty side is skipped,
counted and reported with its first line; sources over `max_length` tokens are truncated and targets over
`max_length - 1` tokens (one position is `<eot>`) dropped, both counted and warned about. Padding is id 0,
SentencePiece's `<unk>`, which a byte-fallback model never emits.
"""

import gzip
import logging
import os

import numpy as np
import tensorflow as tf

from tfglm.data.corpus import per_token_weights
from tfglm.errors import TfglmError

log = logging.getLogger("tfglm")
PAD = 0


def _lines(path):
    """A file's lines (split on \\n only, so a stray \\r or U+2028 never shifts the alignment)."""
    if not os.path.isfile(path):
        raise TfglmError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def read_pairs(source="", target="", pairs=""):
    """(sources, targets): the non-empty pairs of aligned files `source` and `target`, or of the TSV `pairs`."""
    if pairs:
        rows = []
        for line, text in enumerate(_lines(pairs), 1):
            fields = text.split("\t") if text.strip() else ["", ""]
            if len(fields) != 2:
                raise TfglmError(f"{pairs}:{line}: {len(fields)} tab-separated fields, expected 2 (source, target)")
            rows.append(fields)
        where = pairs
    else:
        if not (source and target):
            raise TfglmError("config: translate.source and translate.target (or translate.pairs): no parallel data")
        sources, targets = _lines(source), _lines(target)
        if len(sources) != len(targets):
            raise TfglmError(f"{source} has {len(sources)} lines but {target} has {len(targets)}: parallel files "
                             f"must be aligned line by line")
        rows, where = zip(sources, targets), f"{source}, {target}"
    kept, empty, first_empty = [], 0, None
    for line, (s, t) in enumerate(rows, 1):
        s, t = s.strip(), t.strip()
        if not (s and t):
            empty += 1
            first_empty = first_empty or line
            continue
        kept.append((s, t))
    if empty:
        log.warning("%s: skipped %d pair(s) with an empty side (the first on line %d)", where, empty, first_empty)
    if not kept:
        raise TfglmError(f"{where}: no sentence pairs")
    return [s for s, _ in kept], [t for _, t in kept]


def report_lengths(sources, targets, tokenizer, max_length, where):
    """Warns about the sources that will be truncated and the targets that will be dropped; returns the mean kept
    target length in tokens (with `<eot>`)."""
    source_lengths = tokenizer.tokenize(tf.constant(sources)).row_lengths().numpy()
    target_lengths = tokenizer.tokenize(tf.constant(targets)).row_lengths().numpy()
    truncated, dropped = int((source_lengths > max_length).sum()), int((target_lengths >= max_length).sum())
    if truncated:
        log.warning("%s: %d source(s) over model.max_length (%d tokens) truncated", where, truncated, max_length)
    if dropped:
        log.warning("%s: %d pair(s) dropped: target over model.max_length - 1 (%d tokens)", where, dropped,
                    max_length - 1)
    if dropped == len(targets):
        raise TfglmError(f"{where}: every target is longer than model.max_length - 1 ({max_length - 1}) tokens")
    return float(np.mean(target_lengths[target_lengths < max_length])) + 1


def bucket_lengths(max_length):
    """Padded lengths of the buckets: 8, 16, 24, 32, then x1.5, up to `max_length`."""
    lengths = [8, 16, 24, 32]
    while lengths[-1] < max_length:
        lengths.append(lengths[-1] * 3 // 2)
    return [n for n in lengths if n < max_length] + [max_length]


def dataset(sources, targets, tokenizer, max_length, batch_size, seed=None):
    """Endless batches of ({"source_ids", "target_ids"}, labels, weights) for teacher forcing: target_ids is `<eot>`
    + target, labels is target + `<eot>`, weights mask the padding (`corpus.per_token_weights`). Pairs are bucketed
    by length and every tensor of a bucket is padded to its length, so there are few static shapes. With `seed`,
    shuffled anew on each pass."""
    eot = tokenizer.eot_id
    ds = tf.data.Dataset.from_tensor_slices((sources, targets))
    if seed is not None:
        ds = ds.shuffle(len(sources), seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat().batch(256)
    ds = ds.map(lambda s, t: (tokenizer.tokenize(s)[:, :max_length], tokenizer.tokenize(t))).unbatch()
    ds = ds.filter(lambda s, t: tf.size(t) < max_length)
    ds = ds.map(lambda s, t: ({"source_ids": s, "target_ids": tf.concat([[eot], t], 0)}, tf.concat([t, [eot]], 0)))
    lengths = bucket_lengths(max_length)
    ds = ds.bucket_by_sequence_length(
        lambda x, y: tf.maximum(tf.size(x["source_ids"]), tf.size(y)), [n + 1 for n in lengths],
        [batch_size] * (len(lengths) + 1), pad_to_bucket_boundary=True, drop_remainder=True)
    return ds.map(lambda x, y: (x, y, per_token_weights(y != PAD))).prefetch(tf.data.AUTOTUNE)
