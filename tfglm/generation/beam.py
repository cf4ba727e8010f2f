"""Decoding an encoder-decoder: greedy through the shared `tfglm.generation.decode` loop, or beam search over the same
cached step, behind a strings-in, strings-out `Translator`.

While decoding, each decoder layer keeps its self-attention keys/values in a cache updated in place, and reads the
cross-attention keys/values of the encoded source from a second cache computed once per source batch.
"""

import logging

import numpy as np
import tensorflow as tf

from tfglm.data.parallel import PAD
from tfglm.generation.decode import decode
from tfglm.preprocessors import Seq2SeqPreprocessor

log = logging.getLogger("tfglm")
NEG = -1e9


class SourceDecoder:
    """The decoder bound to a batch of encoded sources, each repeated `repeats` times (once per beam): the
    `init_cache` / `forward` / `logits` / `output_projection` interface that `tfglm.generation.decode` and
    `beam_search` drive."""

    def __init__(self, model, source_ids, repeats=1):
        self.decoder = model.decoder
        self.context_mask = tf.repeat(source_ids != PAD, repeats, axis=0)
        self.cross_caches = [tf.repeat(c, repeats, axis=0) for c in model.cross_caches(model.encode(source_ids))]
        self.init_cache, self.logits = self.decoder.init_cache, self.decoder.logits
        self.output_projection = self.decoder.output_projection

    def forward(self, token_ids, caches, index):
        return self.decoder.forward(token_ids, caches, index, context_mask=self.context_mask,
                                    cross_caches=self.cross_caches)


def greedy_search(model, source_ids, total, eot_id):
    """Greedy decoding by the shared decode loop: tokens [batch, total] from `<eot>` at position 0, and the mask of
    generated tokens (up to, not including, `<eot>`)."""
    batch = tf.shape(source_ids)[0]
    tokens = tf.fill([batch, total], eot_id)
    return decode(SourceDecoder(model, source_ids), tokens, tf.ones([batch], tf.int32), 1, total - 1,
                  temperature=tf.constant(0.0), top_k=0, top_p=tf.constant(1.0), seed=0, eot_id=eot_id)


def beam_search(model, source_ids, total, eot_id, beam_width, length_penalty):
    """Beam search from `<eot>`: the best hypothesis of each source (tokens [batch, total] as `greedy_search`) and
    its mask of generated tokens. Hypotheses are ranked by log-probability / ((5 + length) / 6) ** length_penalty
    (GNMT); a finished one keeps its score and length, and can only be extended by `<eot>`.
    """
    batch, k, vocab = tf.shape(source_ids)[0], beam_width, model.vocab_size
    decoder = SourceDecoder(model, source_ids, repeats=k)
    is_eot = tf.range(vocab) == eot_id
    projection = decoder.output_projection()

    def step(i, tokens, log_probs, lengths, finished, caches):
        hidden, caches = decoder.forward(tf.reshape(tokens[:, :, i], [batch * k, 1]), caches, i)
        next_log_probs = tf.reshape(tf.nn.log_softmax(decoder.logits(hidden[:, 0], projection)), [batch, k, vocab])
        next_log_probs = tf.where(finished[:, :, None], tf.where(is_eot, 0.0, NEG), next_log_probs)
        scores = tf.reshape(log_probs[:, :, None] + next_log_probs, [batch, k * vocab])
        grown = lengths[:, :, None] + tf.cast(~finished[:, :, None] & ~is_eot, tf.int32)  # lengths, without <eot>
        grown = tf.reshape(grown, [batch, k * vocab])
        _, best = tf.math.top_k(scores / ((5.0 + tf.cast(grown, tf.float32)) / 6.0) ** length_penalty, k)
        beam, token = best // vocab, best % vocab
        tokens = tf.gather(tokens, beam, batch_dims=1)
        tokens = tf.where(tf.range(total) == i + 1, token[:, :, None], tokens)
        finished = tf.gather(finished, beam, batch_dims=1) | (token == eot_id)
        caches = [tf.reshape(tf.gather(tf.reshape(c, [batch, k, *c.shape[1:]]), beam, batch_dims=1), tf.shape(c))
                  for c in caches]
        return (i + 1, tokens, tf.gather(scores, best, batch_dims=1), tf.gather(grown, best, batch_dims=1), finished,
                caches)

    def not_finished(i, tokens, log_probs, lengths, finished, caches):
        return (i + 1 < total) & ~tf.reduce_all(finished)

    start = (0, tf.fill([batch, k, total], eot_id), tf.tile(tf.one_hot([0], k, 0.0, NEG), [batch, 1]),
             tf.zeros([batch, k], tf.int32), tf.zeros([batch, k], tf.bool), decoder.init_cache(batch * k, total))
    _, tokens, _, lengths, _, _ = tf.while_loop(not_finished, step, start)
    positions = tf.range(total)[None, :]
    return tokens[:, 0], (positions >= 1) & (positions <= lengths[:, :1])  # top_k ranks the best beam first


class Translator(tf.Module):
    """Strings in, strings out: sources are encoded in the graph (`Seq2SeqPreprocessor`: truncated to the model's
    context, padded into a buffer whose batch and length are bucketed) and decoded greedily (`beam_width` 1) or by beam
    search in one XLA function per such shape.

    Examples:
    ```python
    import tensorflow as tf
    from tfglm import CharTokenizer, EncoderDecoder, Translator

    tokenizer = CharTokenizer(" abcdefgh")
    model = EncoderDecoder(tokenizer.vocab_size, num_layers=1, num_heads=2, hidden_dim=16, max_length=16)
    model.build()
    translator = Translator(model, tokenizer, beam_width=2, jit_compile=False)
    translator.translate(tf.constant(["abc", "de f"]))["translations"]  # strings [2] (an untrained model's)
    ```
    """

    def __init__(self, model, tokenizer, beam_width=1, length_penalty=0.6, jit_compile=True):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessor = Seq2SeqPreprocessor(tokenizer, model.max_length)
        self.beam_width = beam_width
        self.length_penalty = length_penalty
        self._decode = tf.function(self._decode_tokens, jit_compile=jit_compile)

    def _decode_tokens(self, source_ids):
        eot, total = self.tokenizer.eot_id, self.model.max_length
        if self.beam_width == 1:
            return greedy_search(self.model, source_ids, total, eot)
        return beam_search(self.model, source_ids, total, eot, self.beam_width, self.length_penalty)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="sources")])
    def translate(self, sources):
        """{"translations": strings [batch]}; an empty source translates to an empty string."""
        inputs = self.preprocessor(sources)
        batch, lengths = tf.shape(sources)[0], inputs["lengths"]
        tokens, generated = self._decode(inputs["source_ids"])
        generated = generated[:batch] & (lengths > 0)[:, None]
        return {"translations": self.tokenizer.detokenize(tf.ragged.boolean_mask(tokens[:batch], generated))}


def translate_texts(translator, texts, batch_size=64):
    """Translations of `texts`, in batches of similar length; warns about sources truncated to the context."""
    context = translator.model.max_length
    lengths = translator.tokenizer.tokenize(tf.constant(texts)).row_lengths().numpy()
    if (lengths > context).any():
        log.warning("%d source(s) over the model's context (%d tokens) truncated", int((lengths > context).sum()),
                    context)
    order = np.argsort(lengths, kind="stable")
    out = [None] * len(texts)
    for start in range(0, len(texts), batch_size):
        chunk = order[start:start + batch_size]
        result = translator.translate(tf.constant([texts[i] for i in chunk]))["translations"].numpy()
        for i, text in zip(chunk, result):
            out[i] = text.decode("utf-8", errors="replace")
    return out
