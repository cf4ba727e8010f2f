"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus) sampling, in the graph."""

import tensorflow as tf

INF = float("inf")


def sample(logits, temperature, top_k, top_p, seed):
    """Next token ids [batch] from logits [batch, vocab]: greedy when temperature is 0, else sampling from the
    temperature-scaled distribution restricted to the top-k tokens (0 = all) and then to the top-p nucleus."""

    def greedy():
        return tf.argmax(logits, axis=-1, output_type=tf.int32)

    def stochastic():
        scaled = logits / temperature
        vocab = tf.shape(scaled)[-1]
        ranked = tf.sort(scaled, axis=-1, direction="DESCENDING")
        k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
        ranked = tf.where(tf.range(vocab) < k, ranked, -INF)
        mass_before = tf.math.cumsum(tf.nn.softmax(ranked, axis=-1), axis=-1, exclusive=True)
        threshold = tf.reduce_min(tf.where(mass_before < top_p, ranked, INF), axis=-1, keepdims=True)
        kept = tf.where(scaled >= threshold, scaled, -INF)
        return tf.random.stateless_categorical(kept, 1, seed=seed, dtype=tf.int32)[:, 0]

    return tf.cond(temperature > 0, stochastic, greedy)
