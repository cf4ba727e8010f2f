"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus) sampling, in the graph, with options
and random numbers of each row its own, so a row's token never depends on the other rows of its batch."""

import tensorflow as tf

INF = float("inf")
MASK32 = 0xFFFFFFFF


def sample(logits, temperature, top_k, top_p, seed, position):
    """Next token ids [batch] from logits [batch, vocab]: greedy for a row whose temperature is 0, else sampled from
    its temperature-scaled distribution restricted to the top-k tokens (0 = all) and then to the top-p nucleus. The
    options, `seed` and `position` are scalars or vectors [batch]; a row's draw is keyed on (its seed, its position)
    alone (`uniform`). The sort that top-k and top-p need is skipped when no row filters, and sampling when every row
    is greedy."""
    batch, vocab = tf.shape(logits)[0], tf.shape(logits)[1]
    temperature, top_k, top_p, seed, position = (tf.broadcast_to(v, [batch])
                                                 for v in (temperature, top_k, top_p, seed, position))
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)

    def filtered(scaled):
        ranked = tf.sort(scaled, axis=-1, direction="DESCENDING")
        k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
        ranked = tf.where(tf.range(vocab)[None, :] < k[:, None], ranked, -INF)
        mass_before = tf.math.cumsum(tf.nn.softmax(ranked, axis=-1), axis=-1, exclusive=True)
        threshold = tf.reduce_min(tf.where(mass_before < top_p[:, None], ranked, INF), axis=-1, keepdims=True)
        return tf.where(scaled >= threshold, scaled, -INF)

    def stochastic():
        scaled = logits / tf.where(temperature > 0, temperature, 1.0)[:, None]
        kept = tf.cond(tf.reduce_any((top_k > 0) | (top_p < 1.0)), lambda: filtered(scaled), lambda: scaled)
        gumbel = -tf.math.log(-tf.math.log(uniform(seed, position, vocab)))  # Gumbel-max: a categorical draw
        return tf.where(temperature > 0, tf.argmax(kept + gumbel, axis=-1, output_type=tf.int32), greedy)

    return tf.cond(tf.reduce_any(temperature > 0), stochastic, lambda: greedy)


def uniform(seed, position, n):
    """[batch, n] numbers in (0, 1), a pure function of each row's (seed, position) and the column: a counter-based
    hash (in int64, 32 bits kept), so rows with their own seeds need no loop over the batch."""
    key = mix(tf.bitwise.bitwise_xor(mix(tf.cast(seed, tf.int64)), tf.cast(position, tf.int64)))
    columns = tf.bitwise.bitwise_and(tf.range(n, dtype=tf.int64) * 0x9E3779B1, MASK32)
    bits = mix(tf.bitwise.bitwise_xor(key[:, None], columns[None, :]))
    return (tf.cast(tf.bitwise.right_shift(bits, tf.constant(8, tf.int64)), tf.float32) + 0.5) / float(1 << 24)


def mix(x):
    """A 32-bit integer hash (two multiply-xorshift rounds) of int64 values below 2**32."""
    sixteen = tf.constant(16, tf.int64)
    for _ in range(2):
        x = tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, sixteen)) * 0x45D9F3B, MASK32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, sixteen))
