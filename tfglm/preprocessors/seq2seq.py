"""The encoder-decoder preprocessor: source texts to the padded, bucketed source ids a translation model encodes."""

import keras
import tensorflow as tf

from tfglm.data.parallel import PAD
from tfglm.preprocessors.buckets import bucket


class Seq2SeqPreprocessor(keras.layers.Layer):
    """Sources to an encoder-decoder's `source_ids`: tokens cut to `sequence_length` and padded with `PAD` into a
    buffer whose batch and length are bucketed (powers of two, lengths from 8), so XLA compiles once per bucket.

    Examples:
    ```python
    import tensorflow as tf
    from tfglm import CharTokenizer
    from tfglm.preprocessors import Seq2SeqPreprocessor

    preprocessor = Seq2SeqPreprocessor(CharTokenizer(" abc"), sequence_length=16)
    out = preprocessor(tf.constant(["abc", "a b c"]))  # source_ids [2, 8], lengths [3, 5]
    ```
    """

    def __init__(self, tokenizer, sequence_length, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length

    def source_ids(self, sources):
        """Ragged ids of `sources`, cut from the right to `sequence_length`."""
        return self.tokenizer.tokenize(sources)[:, :self.sequence_length]

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
