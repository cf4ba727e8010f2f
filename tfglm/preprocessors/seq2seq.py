"""The encoder-decoder preprocessor: sentence pairs to a translation model's teacher-forcing batches, and sources to
the padded, bucketed source ids it translates.

Policy: sources over `sequence_length` tokens are truncated and targets over `sequence_length - 1` tokens (one
position is `<eot>`) dropped from training, both counted and warned about (`report_lengths`).
"""

import logging

import keras
import numpy as np
import tensorflow as tf

from tfglm.data.corpus import per_token_weights
from tfglm.data.parallel import PAD
from tfglm.errors import TfglmError
from tfglm.preprocessors.buckets import bucket

log = logging.getLogger("tfglm")


def pair_lengths(max_length):
    """Padded lengths of the training pairs' buckets: 8, 16, 24, 32, then x1.5, up to `max_length` (finer than
    the powers of two that translating pads sources to)."""
    lengths = [8, 16, 24, 32]
    while lengths[-1] < max_length:
        lengths.append(lengths[-1] * 3 // 2)
    return [n for n in lengths if n < max_length] + [max_length]


class Seq2SeqPreprocessor(keras.layers.Layer):
    """Sentence pairs to an encoder-decoder's training batches (`dataset`), and sources to the `source_ids` it
    translates: tokens cut to `sequence_length` and padded with `PAD` into a buffer whose batch and length are
    bucketed (powers of two, lengths from 8), so XLA compiles once per bucket.

    Examples:
    ```python
    import tensorflow as tf
    from tfglm import CharTokenizer
    from tfglm.preprocessors import Seq2SeqPreprocessor

    preprocessor = Seq2SeqPreprocessor(CharTokenizer(" abc"), sequence_length=16)
    out = preprocessor(tf.constant(["abc", "a b c"]))
    assert out["source_ids"].shape == (2, 8) and out["lengths"].numpy().tolist() == [3, 5]  # lengths bucket from 8
    ```
    """

    def __init__(self, tokenizer, sequence_length, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length

    def source_ids(self, sources):
        """Ragged ids of `sources`, cut from the right to `sequence_length`."""
        return self.tokenizer.tokenize(sources)[:, :self.sequence_length]

    def report_lengths(self, sources, targets, where):
        """Warns about the sources that will be truncated and the targets that will be dropped; returns the mean
        kept target length in tokens (with `<eot>`)."""
        max_length = self.sequence_length
        source_lengths = self.tokenizer.tokenize(tf.constant(sources)).row_lengths().numpy()
        target_lengths = self.tokenizer.tokenize(tf.constant(targets)).row_lengths().numpy()
        truncated, dropped = int((source_lengths > max_length).sum()), int((target_lengths >= max_length).sum())
        if truncated:
            log.warning("%s: %d source(s) over model.max_length (%d tokens) truncated", where, truncated, max_length)
        if dropped:
            log.warning("%s: %d pair(s) dropped: target over model.max_length - 1 (%d tokens)", where, dropped,
                        max_length - 1)
        if dropped == len(targets):
            raise TfglmError(f"{where}: every target is longer than model.max_length - 1 ({max_length - 1}) tokens")
        return float(np.mean(target_lengths[target_lengths < max_length])) + 1

    def dataset(self, sources, targets, batch_size, seed=None):
        """Endless batches of ({"source_ids", "target_ids"}, labels, weights) for teacher forcing: target_ids is
        `<eot>` + target, labels is target + `<eot>`, weights mask the padding (`corpus.per_token_weights`). Pairs
        are bucketed by length (`pair_lengths`) and every tensor of a bucket is padded to its length, so there are
        few static shapes. With `seed`, shuffled anew on each pass."""
        eot, max_length = self.tokenizer.eot_id, self.sequence_length
        ds = tf.data.Dataset.from_tensor_slices((sources, targets))
        if seed is not None:
            ds = ds.shuffle(len(sources), seed=seed, reshuffle_each_iteration=True)
        ds = ds.repeat().batch(256)
        ds = ds.map(lambda s, t: (self.source_ids(s), self.tokenizer.tokenize(t))).unbatch()
        ds = ds.filter(lambda s, t: tf.size(t) < max_length)
        ds = ds.map(lambda s, t: ({"source_ids": s, "target_ids": tf.concat([[eot], t], 0)},
                                  tf.concat([t, [eot]], 0)))
        lengths = pair_lengths(max_length)
        ds = ds.bucket_by_sequence_length(
            lambda x, y: tf.maximum(tf.size(x["source_ids"]), tf.size(y)), [n + 1 for n in lengths],
            [batch_size] * (len(lengths) + 1), pad_to_bucket_boundary=True, drop_remainder=True)
        return ds.map(lambda x, y: (x, y, per_token_weights(y != PAD))).prefetch(tf.data.AUTOTUNE)

    def call(self, sources):
        """{"source_ids": int32 [padded batch, length], "lengths": int32 [batch]}: the batch padded to a power of
        two, the length the bucket of the longest source (at least 8, at most `sequence_length`)."""
        ids = self.source_ids(sources)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        length = bucket(tf.reduce_max(lengths), minimum=8, limit=self.sequence_length)
        source_ids = ids.to_tensor(default_value=PAD, shape=[bucket(tf.shape(sources)[0], minimum=1), length])
        return {"source_ids": source_ids, "lengths": lengths}

    def get_config(self):
        return {**super().get_config(), "sequence_length": self.sequence_length}
