"""Length buckets: the few static shapes that padded batches are cut or padded to, so XLA compiles one program per
bucket rather than one per length. Widths are powers of two from a minimum, capped at the model's context."""

import tensorflow as tf


def bucket(n, minimum=16, limit=None):
    """The next power of two >= n (at least `minimum`; at most `limit`, when given), in the graph."""
    n = tf.maximum(n, minimum)
    width = tf.cast(2 ** tf.math.ceil(tf.math.log(tf.cast(n, tf.float32)) / tf.math.log(2.0) - 1e-6), tf.int32)
    return width if limit is None else tf.minimum(width, limit)


def bucket_widths(max_length, minimum=16):
    """Every width `bucket` gives up to `max_length`: the powers of two from `minimum` below it, then it."""
    widths = [minimum]
    while widths[-1] < max_length:
        widths.append(widths[-1] * 2)
    return widths[:-1] + [max_length]


def real_lengths(inputs):
    """Each row's count of non-pad tokens: `lengths`, or the sum of `padding_mask`."""
    if "lengths" in inputs:
        return inputs["lengths"]
    return tf.reduce_sum(tf.cast(inputs["padding_mask"], tf.int32), axis=-1)


def trim_padding(inputs, max_length):
    """Cuts the [batch, max_length] tensors of `inputs` to the bucket width that holds the batch's longest row.
    Short texts padded to the full length spend most of the model's compute on [PAD] (on SST-2, 4 tokens in 5)."""
    width = bucket(tf.cast(tf.reduce_max(real_lengths(inputs)), tf.int32), limit=max_length)
    return {name: value[:, :width] if value.shape.rank == 2 and value.shape[1] == max_length else value
            for name, value in inputs.items()}


def bucket_by_length(ds, batch_size, max_length):
    """Full batches of (inputs, ...) examples of similar length (by `bucket_widths`), each trimmed."""
    widths = bucket_widths(max_length)
    ds = ds.bucket_by_sequence_length(lambda inputs, *rest: real_lengths(inputs), [w + 1 for w in widths[:-1]],
                                      [batch_size] * len(widths), drop_remainder=True)
    return ds.map(lambda inputs, *rest: (trim_padding(inputs, max_length), *rest),
                  num_parallel_calls=tf.data.AUTOTUNE)
