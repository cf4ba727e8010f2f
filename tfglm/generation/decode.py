"""Generation: one KV-cached, XLA-compiled decode loop behind a strings-in, strings-out `Generator`.

`Generator` is the single entry point used by `tfglm generate` and `tfglm chat`, the exported SavedModel and the server,
whole (`generate`, `chat`) or streamed in chunks of a few tokens (`stream`, the export's `*_start` and `advance`
signatures); and the two functions of `tfglm serve`'s continuous-batching engine (`slot_prefill`, `slot_step`:
`tfglm.serving.engine`), which decode a fixed pool of slots, each sequence at its own position. Prompts are encoded
in the graph by the causal LM (or chat) preprocessor (`tfglm.preprocessors`): `<eot>` first, truncated from the left
to fit the context, right-padded into a buffer whose batch, prompt and total lengths are bucketed, and decoded. XLA
compiles once per such shape bucket, never per call or prompt length.
"""

import codecs
import logging

import tensorflow as tf

from tfglm.config import GENERATE_OPTIONS, generate_options
from tfglm.generation.sampling import sample
from tfglm.preprocessors import language_model_preprocessor

log = logging.getLogger("tfglm")
DTYPES = {int: tf.int32, float: tf.float32}
OPTIONS = [tf.TensorSpec([], DTYPES[o.type], name=o.name) for o in GENERATE_OPTIONS]
SIGNATURE = [tf.TensorSpec([None], tf.string, name="prompts")] + OPTIONS
CHAT_SIGNATURE = [tf.TensorSpec([None, None], tf.string, name="roles"),
                  tf.TensorSpec([None, None], tf.string, name="contents")] + OPTIONS


def option_tensors(*values):
    """The generation options' `values` (in `GENERATE_OPTIONS` order) as tensors: a decode function called eagerly
    is traced once for all their values, not once per value."""
    return [tf.convert_to_tensor(value, DTYPES[o.type]) for o, value in zip(GENERATE_OPTIONS, values)]


def prefill(model, tokens, lengths, prefill_length, max_new_tokens):
    """Starts decoding right-padded prompts `tokens` [batch, total] (true lengths `lengths`): the first
    `prefill_length` positions fill the per-layer caches in one pass. Returns the decode state (`advance`'s input)."""
    batch, total = tf.shape(tokens)[0], tf.shape(tokens)[1]
    _, caches = model.forward(tokens[:, :prefill_length], model.init_cache(batch, total), 0)
    return {"tokens": tokens, "lengths": lengths, "caches": caches,
            "limit": tf.minimum(lengths + max_new_tokens, total),  # exclusive end of each row's generation
            "index": tf.reduce_min(lengths) - 1, "done": tf.zeros([batch], tf.bool)}


def advance(model, state, steps, temperature, top_k, top_p, seed, eot_id, projection):
    """Runs up to `steps` decode steps from `state`, one token a step from the shortest prompt on, keeping prompt
    tokens where a row's prompt is longer; a row stops after `max_new_tokens` or at `<eot>`. Returns the new state.
    `projection` is `model.output_projection()`.

    Decoding all at once is one `advance` with `steps` >= the context; streaming is several with a few steps each.
    Sampling is keyed on (seed, position), so both give the same tokens.
    """
    tokens, lengths, limit = state["tokens"], state["lengths"], state["limit"]
    batch = tf.shape(tokens)[0]
    end = state["index"] + steps

    def step(i, tokens, caches, done):
        hidden, caches = model.forward(tf.slice(tokens, [0, i], [-1, 1]), caches, i)
        sampled = sample(model.logits(hidden[:, 0], projection), temperature, top_k, top_p, seed, i)
        position = i + 1
        in_prompt = position < lengths
        prompt_token = tf.slice(tokens, [0, position], [-1, 1])[:, 0]
        chosen = tf.where(in_prompt, prompt_token, tf.where(done, eot_id, sampled))
        tokens = tf.tensor_scatter_nd_update(
            tokens, tf.stack([tf.range(batch), tf.fill([batch], position)], axis=1), chosen)
        done = done | (~in_prompt & (chosen == eot_id)) | (position + 1 >= limit)
        return i + 1, tokens, caches, done

    def go_on(i, tokens, caches, done):
        return (i < end) & unfinished(i, limit, done)

    index, tokens, caches, done = tf.while_loop(go_on, step, (state["index"], tokens, state["caches"],
                                                              state["done"]))
    return {**state, "tokens": tokens, "caches": caches, "index": index, "done": done}


def decode(model, tokens, lengths, prefill_length, max_new_tokens, temperature, top_k, top_p, seed, eot_id):
    """`prefill` and `advance` to the end in one function: the tokens and the mask of the generated ones."""
    state = prefill(model, tokens, lengths, prefill_length, max_new_tokens)
    state = advance(model, state, tf.shape(tokens)[1], temperature, top_k, top_p, seed, eot_id,
                    model.output_projection())
    return state["tokens"], generated_mask(state, eot_id)


def slot_prefill(model, caches, tokens, slots, ids, start):
    """A decode engine's prefill: rows `ids` [k, width] written into the engine's `slots` [k] at positions start..
    of its per-layer `caches` ([slots, 2, heads, context, head_dim] each) and sequence buffer `tokens` [slots,
    context]. Returns both, updated. Every slot of the k may be one slot repeated with its own ids (padding rows)."""
    rows = [tf.gather(cache, slots) for cache in caches]
    _, rows = model.forward(ids, rows, start)
    caches = [tf.tensor_scatter_nd_update(cache, slots[:, None], row) for cache, row in zip(caches, rows)]
    k, width = tf.shape(ids)[0], tf.shape(ids)[1]
    where = tf.stack([tf.repeat(slots, width), tf.tile(start + tf.range(width), [k])], axis=1)
    return caches, tf.tensor_scatter_nd_update(tokens, where, tf.reshape(ids, [-1]))


def slot_step(model, caches, tokens, positions, limits, temperature, top_k, top_p, seed, steps, projection):
    """A decode engine's step: `steps` tokens for every slot at once. Slot b reads its token at `positions[b]` in
    `tokens` [slots, context] and writes the next one after it while that stays below `limits[b]` (a slot at its
    limit, or an idle one with limit 0, stands still: it rewrites its cache entry at its position). The options,
    `seed` and `positions` are vectors [slots]: sampling is keyed on each slot's (seed, position), so a slot's text
    does not depend on the others. Returns (caches, tokens, positions)."""
    rows = tf.range(tf.shape(tokens)[0])

    def step(i, caches, tokens, positions):
        current = tf.gather_nd(tokens, tf.stack([rows, positions], axis=1))
        hidden, caches = model.forward(current[:, None], caches, positions)
        sampled = sample(model.logits(hidden[:, 0], projection), temperature, top_k, top_p, seed, positions)
        moving = positions + 1 < limits
        positions = tf.where(moving, positions + 1, positions)
        tokens = tf.tensor_scatter_nd_update(tokens, tf.stack([rows, positions], axis=1),
                                             tf.where(moving, sampled, current))
        return i + 1, caches, tokens, positions

    _, caches, tokens, positions = tf.while_loop(lambda i, *_: i < steps, step, (0, caches, tokens, positions))
    return caches, tokens, positions


def unfinished(index, limit, done):
    return (index + 1 < tf.reduce_max(limit)) & ~tf.reduce_all(done)


def generated_mask(state, eot_id):
    """[batch, total]: the tokens generated so far, up to (not including) `<eot>`."""
    tokens, lengths, limit = state["tokens"], state["lengths"], state["limit"]
    positions = tf.range(tf.shape(tokens)[1])[None, :]
    generated = (positions >= lengths[:, None]) & (positions < tf.minimum(limit, state["index"] + 1)[:, None])
    before_eot = tf.cumsum(tf.cast(generated & (tokens == eot_id), tf.int32), axis=1) == 0
    return generated & before_eot


class Generator(tf.Module):
    """Strings in, strings out, for a GPT and its tokenizer; `generate` (and, for a chat run's tokenizer, `chat`) is
    a `tf.function` with a fixed signature.

    Every path runs the same two XLA-compiled functions: `start` (tokenize, bucket, prefill) and `advance` (up to
    `steps` decode steps). `generate` and `chat` advance once to the end; `stream` advances a few tokens at a time
    and yields the text as it grows, token for token the same text.

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
    pieces = list(generator.stream(["abc"], 5, 0.0, 0, 1.0, 0, steps=2))  # [["ab"], ["c"], ...]: text per chunk
    ```
    """

    def __init__(self, model, tokenizer, jit_compile=True, preprocessor=None):
        """`preprocessor`: the one a chat run's conversations need (default: `language_model_preprocessor`'s)."""
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.context = model.max_length
        self.preprocessor = preprocessor or language_model_preprocessor(tokenizer, self.context)
        self._prefill = tf.function(self._prefill_tokens, jit_compile=jit_compile)
        self._advance = tf.function(self._advance_tokens, jit_compile=jit_compile)
        # `stream`'s chunks as one graph call each: run eagerly, the string and mask ops around the decode loop cost
        # about 2 ms a token at 8 tokens a chunk. One trace for every buffer shape after the second (the XLA function
        # inside still compiles once per shape).
        self._stream_advance = tf.function(self.advance, reduce_retracing=True)
        self.slot_prefill = tf.function(self._slot_prefill, jit_compile=jit_compile, reduce_retracing=True)
        self.slot_step = tf.function(self._slot_step, jit_compile=jit_compile)

    def _slot_prefill(self, caches, tokens, slots, ids, start):
        """`slot_prefill` on an engine's caches stacked into one tensor [layers, slots, 2, heads, context,
        head_dim]: {"caches", "tokens"}."""
        caches, tokens = slot_prefill(self.model, tf.unstack(caches, len(self.model.blocks)), tokens, slots, ids,
                                      start)
        return {"caches": tf.stack(caches), "tokens": tokens}

    def _slot_step(self, caches, tokens, positions, limits, temperature, top_k, top_p, seed, steps, projection):
        """`slot_step` on stacked caches: {"caches", "tokens", "positions"}."""
        caches, tokens, positions = slot_step(self.model, tf.unstack(caches, len(self.model.blocks)), tokens,
                                              positions, limits, temperature, top_k, top_p, seed, steps, projection)
        return {"caches": tf.stack(caches), "tokens": tokens, "positions": positions}

    def _prefill_tokens(self, tokens, lengths, prefill_length, max_new_tokens):
        return prefill(self.model, tokens, lengths, prefill_length, max_new_tokens)

    def _advance_tokens(self, state, projection, steps, temperature, top_k, top_p, seed):
        return advance(self.model, state, steps, temperature, top_k, top_p, seed, self.tokenizer.eot_id, projection)

    def start(self, ids, max_new_tokens, handed_off=None):
        """The decode state of ragged prompt `ids` (the preprocessor's `prompt_ids` or `encode`): its decode
        buffer (`decode_buffer`), the prompts' bucketed first tokens prefilled. The rows `handed_off` (bool [rows]; a
        grounded chat's, whose reply is not generated) are done from the start."""
        max_new_tokens = tf.clip_by_value(max_new_tokens, 1, self.context - 1)
        buffer = self.preprocessor.decode_buffer(ids, max_new_tokens)
        rows = buffer["rows"]
        if handed_off is None:
            handed_off = tf.zeros([rows], tf.bool)
        state = self._prefill(buffer["tokens"], buffer["lengths"], buffer["prefill_length"], max_new_tokens)
        return {**state, "done": state["done"] | tf.pad(handed_off, [[0, tf.shape(state["done"])[0] - rows]]),
                "rows": rows, "handed_off": handed_off}

    def advance(self, state, steps, temperature, top_k, top_p, seed, projection=None):
        """`state` after up to `steps` more tokens, with `completions` (the text so far, strings [rows]),
        `num_tokens` (int32 [rows]) and `finished` (a bool: nothing is left to generate). `projection`: the model's
        `output_projection()`, if the caller already has it."""
        rows, handed_off = state["rows"], state["handed_off"]
        if projection is None:
            # Made here by TensorFlow's own transpose kernel, not inside the XLA function: XLA's CPU transpose of a
            # 50,257 x 384 matrix takes 35-47 ms against 14, once per call (per chunk of a stream: 4 tokens in
            # `tfglm serve`).
            projection = self.model.output_projection()
        state = {**self._advance({k: v for k, v in state.items() if k not in ("rows", "handed_off")}, projection,
                                 steps, temperature, top_k, top_p, seed), "rows": rows, "handed_off": handed_off}
        generated = generated_mask(state, self.tokenizer.eot_id)
        texts = self.tokenizer.detokenize(tf.ragged.boolean_mask(state["tokens"], generated)[:rows])
        return state, {"completions": self.preprocessor.replies(texts, handed_off),
                       "num_tokens": tf.reduce_sum(tf.cast(generated, tf.int32), axis=1)[:rows],
                       "finished": ~unfinished(state["index"], state["limit"], state["done"])}

    def complete(self, ids, max_new_tokens, temperature, top_k, top_p, seed, handed_off=None):
        """Completions of ragged prompt `ids`, decoded to the end in one `advance` (`start`'s `handed_off` rows
        not at all)."""
        _, out = self.advance(self.start(ids, max_new_tokens, handed_off), tf.constant(self.context), temperature,
                              top_k, top_p, seed)
        return {"completions": out["completions"], "num_tokens": out["num_tokens"]}

    @tf.function(input_signature=SIGNATURE)
    def generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed):
        """Completions (strings [batch]) and their token counts (int32 [batch]) for `prompts`."""
        room = tf.clip_by_value(max_new_tokens, 1, self.context - 1)
        return self.complete(self.preprocessor.prompt_ids(prompts, room), max_new_tokens, temperature, top_k, top_p,
                             seed)

    @tf.function(input_signature=CHAT_SIGNATURE)
    def chat(self, roles, contents, max_new_tokens, temperature, top_k, top_p, seed):
        """The assistant's next reply (strings [batch]) to conversations given as `roles` and `contents` (strings
        [batch, messages]; role "" pads a shorter conversation), and its token counts (int32 [batch]); with what
        else the preprocessor's `served` says (`dropped_turns`; a grounded chat's `handed_off` and `score`)."""
        room = tf.clip_by_value(max_new_tokens, 1, self.context - 1)
        return self.reply(self.preprocessor.encode(roles, contents, room), max_new_tokens, temperature, top_k, top_p,
                          seed)

    def reply(self, encoded, max_new_tokens, temperature, top_k, top_p, seed):
        """`chat` of conversations the preprocessor has `encode`d (for `max_new_tokens`) as `encoded`."""
        options = option_tensors(max_new_tokens, temperature, top_k, top_p, seed)
        out = self.complete(encoded["ids"], *options, encoded.get("handed_off"))
        served = self.preprocessor.served(encoded, out["completions"], out["num_tokens"])
        return {"completions": served.pop("replies"), **served}

    def stream(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, steps=8, encoded=None):
        """Yields, every `steps` tokens, the text each prompt gained; with `encoded` (conversations the
        preprocessor has `encode`d for `max_new_tokens`) instead of prompts, each conversation's reply (a row handed
        off: the hand-off message, at once)."""
        if encoded is None:
            encoded = {"ids": self.preprocessor.prompt_ids(tf.constant(prompts),
                                                           min(max(max_new_tokens, 1), self.context - 1))}
        max_new_tokens, *options = option_tensors(max_new_tokens, temperature, top_k, top_p, seed)
        state = self.start(encoded["ids"], max_new_tokens, encoded.get("handed_off"))
        projection = self.model.output_projection()  # once per stream, not per chunk
        return stream_text(lambda state: self._stream_advance(state, tf.constant(steps), *options, projection),
                           state)


def warn_truncated(generator, prompts, settings, first=1):
    """Warns about prompts (numbered from `first`) truncated from the left to fit the context."""
    lengths, full = generator.preprocessor.truncations(tf.constant(prompts), settings.max_new_tokens)
    for i, (kept, had) in enumerate(zip(lengths.numpy(), full.numpy()), first):
        if kept < had:
            log.warning("prompt %d: %d tokens, truncated from the left to the last %d (context %d minus %d new)",
                        i, had, kept, generator.context, settings.max_new_tokens)


def generate_texts(generator, prompts, settings):
    """Runs the shared decode function; warns about prompts truncated to fit the context."""
    warn_truncated(generator, prompts, settings)
    out = generator.generate(tf.constant(prompts), *generate_options(settings))
    return [c.decode("utf-8", errors="replace") for c in out["completions"].numpy()], out["num_tokens"].numpy()


def stream_text(advance_fn, state):
    """Drives `advance_fn(state) -> (state, outputs)` to the end, yielding each row's new text per call. The text so
    far is detokenized whole each time (a token's text can depend on its neighbours) and emitted as it grows; bytes
    of an unfinished UTF-8 character wait for the next call."""
    decoders, sent = None, None
    finished = False
    while not finished:
        state, out = advance_fn(state)
        texts = out["completions"].numpy()
        if decoders is None:
            decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in texts]
            sent = [0] * len(texts)
        finished = bool(out["finished"])
        pieces = []
        for i, text in enumerate(texts):
            pieces.append(decoders[i].decode(text[sent[i]:], final=finished))
            sent[i] = len(text)
        yield pieces
