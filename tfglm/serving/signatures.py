"""The signatures `tfglm export` writes, built from what a task serves (`Task.exported`): a `Generator`, a
`Translator` or a `TextClassifier`.

A language model's export holds generate (also serving_default), score, tokenize and detokenize signatures, and a
chat model's (a chat tokenizer) also `chat` (then serving_default; a grounded chat's holds its retrieval: the
encoder, its tokenizer and the knowledge base); for streaming, `generate_start` (and `chat_start`) and `advance`,
which pass the decode state between calls as named tensors (the per-layer caches stacked into one, `caches`;
`handed_off`, the rows a grounded chat answers with its hand-off message rather than decodes); for `tfglm serve`'s
continuous batching, the ENGINE signatures. `generate` and `chat` take
`prompts` (or `roles` and `contents`) plus the optional generation options (`tfglm.config.GENERATE_OPTIONS`), each
with the run's `generate` config as its default, recorded in the SignatureDef's `defaults`, which TF Serving fills in
for inputs a request leaves out. The model's context is saved as the variable `context`, so `tfglm serve` can reject
a `max_new_tokens` above `context - 1` by name, the vocabulary's size as `vocab_size`, so it can name a `detokenize`
id outside it, and `eot_id`, where the engine ends a sequence. A translation model's export holds
`translate`; a classifier's `predict` and `classify` (TF Serving's Classify API); a sentence embedding model's `embed`.

Every exported object tracks the `tf.Variable`s inside the Keras variables rather than the Keras model: the saved
functions read those, and a Keras model would be saved as copies that TF1-style loaders (TF Serving) restore instead.
"""

import collections
import os

import numpy as np
import tensorflow as tf

from tfglm.generation.beam import Translator
from tfglm.generation.decode import CHAT_SIGNATURE, OPTIONS, SIGNATURE, Generator
from tfglm.preprocessors import ChatPreprocessor
from tfglm.preprocessors.grounded import GroundedChatPreprocessor
from tfglm.tasks.base import TextClassifier
from tfglm.tasks.embed import TextEmbedder

# The export's warm-up requests, which a server replays while loading a version (TF Serving's path).
WARMUP = os.path.join("assets.extra", "tf_serving_warmup_requests")
# The streaming signatures pass the decode state (caches included) between calls: `tfglm serve` runs them for its
# OpenAI-compatible endpoints and does not take them over Predict, where a client would send the state back.
STREAMING = ("generate_start", "chat_start", "advance")
# The continuous-batching engine's signatures (`tfglm.serving.engine`): its preprocessing, the prefill and step of its
# pool of KV-cache slots, and the output matrix the step takes; `tfglm serve` runs them, never over Predict.
ENGINE = ("prompt_ids", "conversation_ids", "slot_prefill", "slot_step", "output_projection")
TEXTS = tf.TensorSpec([None], tf.string, name="texts")
SOURCES = tf.TensorSpec([None], tf.string, name="sources")

Export = collections.namedtuple("Export", "module signatures warmup")
Export.__doc__ = """What `tfglm export` saves: the object to save, {signature name: function}, and the warm-up
request (signature name, {input name: value}; the options a request leaves out take their defaults)."""


def build(served, settings):
    """The Export of what a task serves; `settings` is the run's `generate` config (the options' defaults, and the
    warm-up prompt)."""
    if isinstance(served, Generator):
        return language_model(served, settings)
    if isinstance(served, Translator):
        return translation(served, settings.prompt)
    if isinstance(served, TextClassifier):
        return classifier(served, settings.prompt)
    if isinstance(served, TextEmbedder):
        return embedding(served, settings.prompt)
    raise TypeError(f"nothing to export for a {type(served).__name__}")


def language_model(generator, settings):
    """A language model's Export; a chat model's serves `chat` by default and warms up with a conversation."""
    module = language_module(generator, settings)
    chat = hasattr(module, "chat")
    names = ("chat",) * chat + ("generate", "score", "tokenize", "detokenize")
    signatures = {name: getattr(module, name) for name in names}
    signatures.update({name: getattr(module, name) for name in STREAMING + ENGINE if hasattr(module, name)},
                      serving_default=module.chat if chat else module.generate)
    if chat:
        conversation = {"roles": [["user"]], "contents": [[settings.prompt or "Hello"]]}
        return Export(module, signatures, ("chat", {**conversation, "max_new_tokens": np.int32(
            warmup_max_new_tokens(generator, conversation, settings.max_new_tokens))}))
    return Export(module, signatures, ("generate", {"prompts": [settings.prompt]}))


def warmup_max_new_tokens(generator, conversation, max_new_tokens):
    """The run's `max_new_tokens` for the chat warm-up, or fewer where its `conversation` would not fit beside them:
    the chat signature refuses a conversation it would have to cut, and a default near the context leaves no room."""
    ids = generator.preprocessor.chat_ids(tf.constant(conversation["roles"]), tf.constant(conversation["contents"]),
                                          1)  # as the signature encodes it: a grounded chat's context included
    return max(1, min(max_new_tokens, generator.context - int(ids.row_lengths()[0])))


def language_module(generator, settings):
    """The exported object of a language model: the signature functions, the tokenizer and the weights they read."""
    tokenizer, model, preprocessor = generator.tokenizer, generator.model, generator.preprocessor
    default_max_new = min(settings.max_new_tokens, generator.context - 1)

    @tf.function(input_signature=SIGNATURE)
    def generate(prompts, max_new_tokens=tf.constant(default_max_new), temperature=tf.constant(settings.temperature),
                 top_k=tf.constant(settings.top_k), top_p=tf.constant(settings.top_p),
                 seed=tf.constant(settings.seed)):
        """`Generator.generate`; the tensor defaults become the SignatureDef's `defaults`, so every input but
        `prompts` is optional (a plain Python default would not be)."""
        return generator.generate(prompts, max_new_tokens, temperature, top_k, top_p, seed)

    def encode(roles, contents, max_new_tokens):
        """The preprocessor's `encode` of conversations, refusing one that does not fit."""
        return preprocessor.encode(roles, contents, tf.clip_by_value(max_new_tokens, 1, generator.context - 1),
                                   whole=True)

    @tf.function(input_signature=CHAT_SIGNATURE)
    def chat(roles, contents, max_new_tokens=tf.constant(default_max_new),
             temperature=tf.constant(settings.temperature), top_k=tf.constant(settings.top_k),
             top_p=tf.constant(settings.top_p), seed=tf.constant(settings.seed)):
        """`Generator.chat` (a chat model only): the assistant's `replies` to conversations given as `roles` and
        `contents` [batch, messages] (role "" pads), their `num_tokens`, and how many of each conversation's oldest
        messages did not fit the context (`dropped_turns`: whole exchanges); a conversation whose last message does
        not fit beside `max_new_tokens` is an error, not a reply to a fragment of it. A grounded chat's also says
        which rows were `handed_off` (their reply is the hand-off message) and each row's best retrieval `score`."""
        out = generator.reply(encode(roles, contents, max_new_tokens), max_new_tokens, temperature, top_k, top_p, seed)
        return {"replies": out.pop("completions"), **out}

    max_new = tf.TensorSpec([], tf.int32, name="max_new_tokens")

    @tf.function(input_signature=[SIGNATURE[0], max_new])
    def generate_start(prompts, max_new_tokens=tf.constant(default_max_new)):
        """The decode state of `prompts` (`advance`'s input): `generate`, streamed."""
        ids = preprocessor.prompt_ids(prompts, tf.clip_by_value(max_new_tokens, 1, generator.context - 1))
        return as_tensors(generator.start(ids, max_new_tokens))

    @tf.function(input_signature=CHAT_SIGNATURE[:2] + [max_new])
    def chat_start(roles, contents, max_new_tokens=tf.constant(default_max_new)):
        """The decode state of conversations (`advance`'s input): `chat`, streamed, with `chat`'s `dropped_turns`
        (and a grounded chat's `score`); the rows `handed_off` are not decoded, and `advance` gives them the hand-off
        message."""
        encoded = encode(roles, contents, max_new_tokens)
        state = generator.start(encoded.pop("ids"), max_new_tokens, encoded.get("handed_off"))
        return {**encoded, **as_tensors(state)}

    layer = model.init_cache(1, 1)[0].shape  # [batch, 2, heads, length, head_dim]
    state_specs = [tf.TensorSpec([None, None], tf.int32, name="tokens"),
                   tf.TensorSpec([None], tf.int32, name="lengths"),
                   tf.TensorSpec([len(model.blocks), None, *layer[1:3], None, *layer[4:]], model.compute_dtype,
                                 name="caches"),
                   tf.TensorSpec([None], tf.int32, name="limit"), tf.TensorSpec([], tf.int32, name="index"),
                   tf.TensorSpec([None], tf.bool, name="done"), tf.TensorSpec([], tf.int32, name="rows"),
                   tf.TensorSpec([None], tf.bool, name="handed_off")]

    @tf.function(input_signature=state_specs + [tf.TensorSpec([], tf.int32, name="steps")] + OPTIONS[1:])
    def advance(tokens, lengths, caches, limit, index, done, rows, handed_off, steps=tf.constant(8),
                temperature=tf.constant(settings.temperature), top_k=tf.constant(settings.top_k),
                top_p=tf.constant(settings.top_p), seed=tf.constant(settings.seed)):
        """Up to `steps` more tokens from a `*_start` or `advance` state: the new state, and the text so far
        (`completions`: a row `handed_off` has the hand-off message), `num_tokens` and `finished`. `limit` and
        `steps` are clipped to the buffer, so a state sent by a client cannot make the loop run longer than its
        tokens."""
        total = tf.shape(tokens)[1]
        state = {"tokens": tokens, "lengths": lengths, "caches": tf.unstack(caches, len(model.blocks)),
                 "limit": tf.minimum(limit, total), "index": index, "done": done, "rows": rows,
                 "handed_off": handed_off}
        state, out = generator.advance(state, tf.clip_by_value(steps, 0, total), temperature, top_k, top_p, seed)
        return {**as_tensors(state), **out}

    cache_spec = tf.TensorSpec([len(model.blocks), None, *layer[1:3], generator.context, *layer[4:]],
                               model.compute_dtype, name="caches")
    buffer_spec = tf.TensorSpec([None, generator.context], tf.int32, name="tokens")
    slot_options = [tf.TensorSpec([None], spec.dtype, name=spec.name) for spec in OPTIONS[1:]]

    @tf.function(input_signature=[SIGNATURE[0], max_new])
    def prompt_ids(prompts, max_new_tokens):
        """The engine's prompt ids (`generate`'s preprocessing): {"ids" [batch, longest], "lengths"}."""
        return padded(preprocessor.prompt_ids(prompts, tf.clip_by_value(max_new_tokens, 1, generator.context - 1)))

    @tf.function(input_signature=CHAT_SIGNATURE[:2] + [max_new])
    def conversation_ids(roles, contents, max_new_tokens):
        """The engine's ids of conversations (`chat`'s preprocessing, an error for one that does not fit), and
        `chat`'s other outputs but its generated ones: `dropped_turns`, a grounded chat's `handed_off` rows (their
        `replies` the hand-off message, not decoded) and `score`."""
        encoded = encode(roles, contents, max_new_tokens)
        batch = tf.shape(roles)[0]
        return {**padded(encoded["ids"]),
                **preprocessor.served(encoded, tf.fill([batch], ""), tf.zeros([batch], tf.int32))}

    @tf.function(input_signature=[cache_spec, buffer_spec, tf.TensorSpec([None], tf.int32, name="slots"),
                                  tf.TensorSpec([None, None], tf.int32, name="ids"),
                                  tf.TensorSpec([], tf.int32, name="start")])
    def slot_prefill(caches, tokens, slots, ids, start):
        """`Generator.slot_prefill`: prompt ids into engine slots."""
        return generator.slot_prefill(caches, tokens, slots, ids, start)

    @tf.function(input_signature=[cache_spec, buffer_spec, tf.TensorSpec([None], tf.int32, name="positions"),
                                  tf.TensorSpec([None], tf.int32, name="limits"), *slot_options,
                                  tf.TensorSpec([], tf.int32, name="steps"),
                                  tf.TensorSpec([model.hidden_dim, tokenizer.vocab_size], model.compute_dtype,
                                                name="projection")])
    def slot_step(caches, tokens, positions, limits, temperature, top_k, top_p, seed, steps, projection):
        """`Generator.slot_step`: `steps` tokens for every engine slot; `limits` clipped to the context."""
        return generator.slot_step(caches, tokens, positions, tf.minimum(limits, generator.context), temperature,
                                   top_k, top_p, seed, tf.clip_by_value(steps, 0, generator.context), projection)

    @tf.function(input_signature=[])
    def output_projection():
        """The model's output matrix [hidden, vocab], `slot_step`'s `projection`, made once by an engine."""
        return {"projection": model.output_projection()}

    @tf.function(input_signature=[TEXTS])
    def score(texts):
        """Total log-likelihood of each text's tokens after the leading `<eot>`, their count and perplexity.
        Texts longer than the context are scored on their first `context - 1` tokens (`num_tokens` says how many)."""
        ids = preprocessor.document_ids(texts)
        num_tokens = tf.cast(ids.row_lengths(), tf.int32) - 1
        tokens = ids.to_tensor(default_value=tokenizer.eot_id)
        log_probs = tf.nn.log_softmax(model(tokens, training=False)[:, :-1], axis=-1)
        targets = tokens[:, 1:]
        token_log_probs = tf.gather(log_probs, targets, batch_dims=2)
        scored = tf.sequence_mask(num_tokens, tf.shape(targets)[1])
        log_likelihood = tf.reduce_sum(tf.where(scored, token_log_probs, 0.0), axis=1)
        perplexity = tf.exp(-log_likelihood / tf.cast(tf.maximum(num_tokens, 1), tf.float32))
        return {"log_likelihood": log_likelihood, "num_tokens": num_tokens, "perplexity": perplexity}

    @tf.function(input_signature=[TEXTS])
    def tokenize(texts):
        """Token ids [batch, longest] (0 past each row's `lengths`), without the leading `<eot>`."""
        ids = tokenizer.tokenize(texts)
        return {"token_ids": ids.to_tensor(default_value=0), "lengths": tf.cast(ids.row_lengths(), tf.int32)}

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids"),
                                  tf.TensorSpec([None], tf.int32, name="lengths")])
    def detokenize(token_ids, lengths):
        """Texts from the first `lengths` ids of each row of `token_ids`."""
        return {"texts": tokenizer.detokenize(tf.RaggedTensor.from_tensor(token_ids, lengths=lengths))}

    module = saved_module(tokenizer, model, generate=generate, score=score, tokenize=tokenize, detokenize=detokenize,
                          generate_start=generate_start, advance=advance, prompt_ids=prompt_ids,
                          slot_prefill=slot_prefill, slot_step=slot_step, output_projection=output_projection)
    module.context = tf.Variable(generator.context, trainable=False, name="context")  # read by `tfglm serve`
    module.vocab_size = tf.Variable(tokenizer.vocab_size, trainable=False, name="vocab_size")  # likewise
    module.eot_id = tf.Variable(tokenizer.eot_id, trainable=False, name="eot_id")  # where the engine stops a slot
    if isinstance(preprocessor, ChatPreprocessor):
        module.chat, module.chat_start, module.conversation_ids = chat, chat_start, conversation_ids
    if isinstance(preprocessor, GroundedChatPreprocessor):  # the retrieval's encoder, read by `chat` and `chat_start`
        module.encoder_tokenizer = preprocessor.embedder.tokenizer
        module.encoder_weights = [variable.value for variable in preprocessor.embedder.encoder.variables]
    return module


def padded(ids):
    """Ragged ids as {"ids": int32 [batch, longest] padded with 0, "lengths": int32 [batch]}."""
    return {"ids": ids.to_tensor(default_value=0), "lengths": tf.cast(ids.row_lengths(), tf.int32)}


def as_tensors(state):
    """A decode state as the streaming signatures' named tensors: its caches stacked into one."""
    return {**state, "caches": tf.stack(state["caches"])}


def saved_module(tokenizer, model, **functions):
    """The object `tfglm export` saves: the tokenizer, the `tf.Variable`s of `model`'s weights and the signature
    `functions`, as attributes."""
    module = tf.Module()
    module.tokenizer = tokenizer
    module.weights = [variable.value for variable in model.variables]
    for name, function in functions.items():
        setattr(module, name, function)
    return module


def translation(translator, prompt):
    """A translation model's Export: `translate` (sources in, translations out)."""

    @tf.function(input_signature=[SOURCES])
    def translate(sources):
        """`Translator.translate`: {"translations": strings}."""
        return translator.translate(sources)

    module = saved_module(translator.tokenizer, translator.model, translate=translate)
    return Export(module, {"translate": translate, "serving_default": translate}, ("translate", {"sources": [prompt]}))


def classifier(served, prompt):
    """A classifier's Export: `predict` takes `texts` and gives each one's `labels` and `scores` (the probability of
    every label, in the run's label order); `classify` is TF Serving's Classify API: serialized `tf.Example`s with
    the text in the feature `served.text_feature` in, `classes` (the label names) and `scores` [batch, num_labels]
    out."""
    names = tf.constant(served.labels)

    def scores(texts):
        return tf.nn.softmax(served.model(served.encode(texts), training=False), axis=-1)

    @tf.function(input_signature=[TEXTS])
    def predict(texts):
        """{"labels": the most probable label of each text, "scores": [batch, num_labels]}."""
        probs = scores(texts)
        return {"labels": tf.gather(names, tf.argmax(probs, axis=-1)), "scores": probs}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(inputs):
        """TF Serving's Classify API: {"classes": [batch, num_labels] label names, "scores": their probabilities}."""
        texts = tf.io.parse_example(inputs, {served.text_feature: tf.io.FixedLenFeature([], tf.string)})
        probs = scores(texts[served.text_feature])
        return {"classes": tf.tile(names[None], [tf.shape(probs)[0], 1]), "scores": probs}

    module = saved_module(served.tokenizer, served.model, predict=predict, classify=classify)
    return Export(module, {"predict": predict, "classify": classify, "serving_default": predict},
                  ("predict", {"texts": [prompt or "a"]}))


def embedding(embedder, prompt):
    """A sentence embedding model's Export: `embed` takes `texts` and gives their `embeddings` (float32 [batch, dim]
    unit vectors) and `num_tokens` (`TextEmbedder.embed`)."""

    @tf.function(input_signature=[TEXTS])
    def embed(texts):
        """`TextEmbedder.embed`: {"embeddings", "num_tokens"}."""
        return embedder.embed(texts)

    module = saved_module(embedder.tokenizer, embedder.encoder, embed=embed)
    return Export(module, {"embed": embed, "serving_default": embed}, ("embed", {"texts": [prompt or "a"]}))
