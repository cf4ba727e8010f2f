"""Generation: one KV-cached, XLA-compiled decode loop behind a strings-in, strings-out `Generator`.

`Generator.generate` is the single entry point used by `tfglm generate`, the exported SavedModel and the server.
Prompts are tokenized in the graph, prefixed with `<eot>` (the start-of-document context seen in training),
truncated from the left to fit the context, right-padded into a buffer whose batch, prompt and total lengths are
rounded up to powers of two, and decoded. XLA compiles once per such shape bucket, never per call or prompt length.
"""

import tensorflow as tf

from tfglm.config import GENERATE_OPTIONS
from tfglm.generation.sampling import sample

DTYPES = {int: tf.int32, float: tf.float32}
SIGNATURE = [tf.TensorSpec([None], tf.string, name="prompts")] + [
    tf.TensorSpec([], DTYPES[o.type], name=o.name) for o in GENERATE_OPTIONS]


def decode(model, tokens, lengths, prefill_length, max_new_tokens, temperature, top_k, top_p, seed, eot_id):
    """Extends right-padded prompts `tokens` [batch, total] (true lengths `lengths`) in place.

    The first `prefill_length` positions fill the cache in one pass; then one token a step from the shortest prompt
    on, keeping prompt tokens where a row's prompt is longer. A row stops after `max_new_tokens` or at `<eot>`.
    Returns the tokens and a mask [batch, total] of the generated tokens (up to, not including, `<eot>`).
    """
    batch, total = tf.shape(tokens)[0], tf.shape(tokens)[1]
    caches = model.init_cache(batch, total)
    projection = model.output_projection()
    _, caches = model.forward(tokens[:, :prefill_length], caches, 0)
    limit = tf.minimum(lengths + max_new_tokens, total)  # exclusive end of each row's generation

    def step(i, tokens, caches, done):
        hidden, caches = model.forward(tf.slice(tokens, [0, i], [-1, 1]), caches, i)
        sampled = sample(model.logits(hidden[:, 0], projection), temperature, top_k, top_p, tf.stack([seed, i]))
        position = i + 1
        in_prompt = position < lengths
        prompt_token = tf.slice(tokens, [0, position], [-1, 1])[:, 0]
        chosen = tf.where(in_prompt, prompt_token, tf.where(done, eot_id, sampled))
        tokens = tf.tensor_scatter_nd_update(
            tokens, tf.stack([tf.range(batch), tf.fill([batch], position)], axis=1), chosen)
        done = done | (~in_prompt & (chosen == eot_id)) | (position + 1 >= limit)
        return i + 1, tokens, caches, done

    def not_finished(i, tokens, caches, done):
        return (i + 1 < tf.reduce_max(limit)) & ~tf.reduce_all(done)

    _, tokens, _, _ = tf.while_loop(not_finished, step, (tf.reduce_min(lengths) - 1, tokens, caches,
                                                         tf.zeros([batch], tf.bool)))
    positions = tf.range(total)[None, :]
    generated = (positions >= lengths[:, None]) & (positions < limit[:, None])
    before_eot = tf.cumsum(tf.cast(generated & (tokens == eot_id), tf.int32), axis=1) == 0
    return tokens, generated & before_eot


def bucket(n, minimum=16):
    """The next power of two >= n (at least `minimum`)."""
    n = tf.maximum(n, minimum)
    return tf.cast(2 ** tf.math.ceil(tf.math.log(tf.cast(n, tf.float32)) / tf.math.log(2.0) - 1e-6), tf.int32)


class Generator(tf.Module):
    """Strings in, strings out, for a GPT and its tokenizer; `generate` is a `tf.function` with a fixed signature.

    Examples:
    ```python
    import tensorflow as tf
    from tfglm import GPT, CharTokenizer, Generator

    tokenizer = CharTokenizer("abcdefgh")
    model = GPT(tokenizer.vocab_size, num_layers=1, num_heads=2, hidden_dim=16, max_length=32)
    model.build()
    generator = Generator(model, tokenizer, jit_compile=False)
    # prompts, max_new_tokens, temperature (0: greedy), top_k (0: off), top_p (1: off), seed
    out = generator.generate(tf.constant(["abc", "h"]), 5, 0.8, 4, 0.9, 7)
    out["completions"], out["num_tokens"]  # strings [2], int32 [2]
    ```
    """

    def __init__(self, model, tokenizer, jit_compile=True):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.context = model.max_length
        self._decode = tf.function(self._decode_tokens, jit_compile=jit_compile)

    def _decode_tokens(self, tokens, lengths, prefill_length, max_new_tokens, temperature, top_k, top_p, seed):
        return decode(self.model, tokens, lengths, prefill_length, max_new_tokens, temperature, top_k, top_p, seed,
                      self.tokenizer.eot_id)

    def prompt_ids(self, prompts, max_new_tokens):
        """Ragged prompt ids: `<eot>` + tokens, truncated from the left to `context - max_new_tokens`."""
        ids = self.tokenizer.tokenize(prompts)
        eot = tf.fill([tf.shape(prompts)[0], 1], self.tokenizer.eot_id)
        ids = tf.concat([eot, ids], axis=1)
        return ids[:, -(self.context - max_new_tokens):]

    @tf.function(input_signature=SIGNATURE)
    def generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed):
        """Completions (strings [batch]) and their token counts (int32 [batch]) for `prompts`."""
        max_new_tokens = tf.clip_by_value(max_new_tokens, 1, self.context - 1)
        ids = self.prompt_ids(prompts, max_new_tokens)
        batch = tf.shape(prompts)[0]
        padded_batch = bucket(batch, minimum=1)
        lengths = tf.pad(tf.cast(ids.row_lengths(), tf.int32), [[0, padded_batch - batch]], constant_values=1)
        longest = tf.reduce_max(lengths)
        total = tf.minimum(bucket(longest + max_new_tokens), self.context)
        prefill = tf.minimum(bucket(longest), total)
        tokens = ids.to_tensor(default_value=self.tokenizer.eot_id, shape=[padded_batch, total])
        tokens, generated = self._decode(tokens, lengths, prefill, max_new_tokens, temperature, top_k, top_p, seed)
        completions = self.tokenizer.detokenize(tf.ragged.boolean_mask(tokens, generated)[:batch])
        num_tokens = tf.reduce_sum(tf.cast(generated, tf.int32), axis=1)[:batch]
        return {"completions": completions, "num_tokens": num_tokens}
