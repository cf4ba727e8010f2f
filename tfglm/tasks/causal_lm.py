"""Causal language modelling: a GPT trained on text files packed into blocks, generating free text.

Its export holds generate (also serving_default), score, tokenize and detokenize signatures, and a chat run's
(`tfglm.tasks.chat`) also `chat`; for streaming, `generate_start` (and `chat_start`) and `advance`, which pass the
decode state between calls as named tensors (the per-layer caches stacked into one, `caches`). `generate` and `chat`
take `prompts` (or `roles` and `contents`) plus the optional generation options (`tfglm.config.GENERATE_OPTIONS`),
each with the run's `generate` config as its default, recorded in the SignatureDef's `defaults`, which TF Serving
fills in for inputs a request leaves out. The model's context is saved as the variable `context`, so `tfglm serve`
can reject a `max_new_tokens` above `context - 1` by name.
"""

import logging
import math
import os

import numpy as np
import tensorflow as tf

from tfglm.data import corpus
from tfglm.data.chat import ChatTokenizer
from tfglm.data.tokenizers import CharTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece
from tfglm.errors import TfglmError
from tfglm.generation.decode import CHAT_SIGNATURE, OPTIONS, SIGNATURE, Generator
from tfglm.models.gpt import GPT
from tfglm.tasks.base import Task
from tfglm.tasks.registry import load_run
from tfglm.training import runs

log = logging.getLogger("tfglm")
TEXTS = tf.TensorSpec([None], tf.string, name="texts")
STREAMING = ("generate_start", "chat_start", "advance")


class CausalLM(Task):
    name = "causal_lm"
    model_kinds = ("gpt",)
    default_for = ("gpt",)
    generates = True

    def load_vocabulary(self):
        self.tokenizer = load_tokenizer(runs.path(self.run_dir, runs.TOKENIZER))

    def prepare(self, resume, chief):
        """Reads and checks the corpus, trains (or reloads) the tokenizer and splits the token stream."""
        files = corpus.resolve_files(self.config.data.files) if self.config.data.files else \
            corpus.embedded_corpus_files()
        stats = corpus.scan_files(files)
        log.info("corpus: %d file(s), %.1f MB, %d characters", stats.files, stats.bytes / 1e6, stats.characters)
        init_from = self.config.train.init_from
        if resume:
            self.load_vocabulary()
        elif init_from:
            self.tokenizer = load_tokenizer(runs.path(init_from, runs.TOKENIZER))
            if chief:
                os.makedirs(runs.path(self.run_dir, runs.TOKENIZER), exist_ok=True)
                self.tokenizer.save(runs.path(self.run_dir, runs.TOKENIZER))
        else:
            self.tokenizer = self.learn_vocabulary(files, stats)
            if chief:
                os.makedirs(runs.path(self.run_dir, runs.TOKENIZER), exist_ok=True)
                self.tokenizer.save(runs.path(self.run_dir, runs.TOKENIZER))
        self.train_tokens, self.val_tokens = corpus.split_tokens(corpus.tokenize_files(files, self.tokenizer),
                                                                 self.config.data.val_fraction)
        log.info("tokens: %d train, %d validation, vocabulary %d", len(self.train_tokens), len(self.val_tokens),
                 self.tokenizer.vocab_size)

    def learn_vocabulary(self, files, stats):
        """A new run's tokenizer, of `tokenizer.kind`: the corpus's characters, or a SentencePiece vocabulary."""
        size = self.config.tokenizer.vocab_size

        def sentencepiece():
            log.info("training a %d-token SentencePiece vocabulary", size)
            return SentencePieceTokenizer(train_sentencepiece(corpus.iter_lines(files), size))

        learn = {"char": lambda: CharTokenizer(stats.chars), "sentencepiece": sentencepiece}
        if self.config.tokenizer.kind not in learn:
            raise TfglmError(f"tokenizer.kind: {self.config.tokenizer.kind!r} vocabularies come from `tfglm import`; "
                             f"tfglm trains 'char' or 'sentencepiece'")
        return learn[self.config.tokenizer.kind]()

    def build_model(self):
        return GPT.from_config_tree(self.config.model, self.tokenizer.vocab_size)

    def initialize(self, model):
        """Continues from the `train.init_from` GPT (a trained or imported causal LM run of the same shape)."""
        init_from = self.config.train.init_from
        if init_from:
            pretrained = load_run(init_from).model
            shapes = [w.shape for w in pretrained.weights]
            if not isinstance(pretrained, GPT) or shapes != [w.shape for w in model.weights]:
                raise TfglmError(f"train.init_from: {init_from} is not a GPT of this config's shape (train with its "
                                 f"config: --config {runs.path(init_from, runs.CONFIG)})")
            model.set_weights(pretrained.get_weights())

    def datasets(self, step):
        t, length = self.config.train, self.config.model.max_length
        return (corpus.train_dataset(self.train_tokens, length, t.batch_size, t.seed, step, t.steps - step),
                corpus.eval_dataset(self.val_tokens, length, t.batch_size, t.eval_batches))

    def tokens_per_step(self):
        return self.config.train.batch_size * self.config.model.max_length

    def samples(self, model):
        """The run's `generate` prompt, continued with its settings (no XLA: one compile a run is not worth it)."""
        if not hasattr(self, "_sampler"):
            self._sampler = Generator(model, self.tokenizer, jit_compile=False)
        g = self.config.generate
        out = self._sampler.generate(tf.constant([g.prompt]), g.max_new_tokens, g.temperature, g.top_k, g.top_p,
                                     g.seed)
        return {"generate": g.prompt + out["completions"].numpy()[0].decode("utf-8", errors="replace")}

    def generator(self, model):
        return Generator(model, self.tokenizer)

    def evaluate(self, model, inputs):
        """Perplexity of the model on the text files `--data` names, over consecutive blocks of its context."""
        if not inputs.data:
            raise TfglmError("--data: a language model is scored on text files (perplexity)")
        files = corpus.resolve_files([inputs.data])
        corpus.scan_files(files)
        tokens = corpus.tokenize_files(files, self.tokenizer)
        length, batch = self.config.model.max_length, self.config.train.batch_size
        blocks = (len(tokens) - 1) // length
        if blocks < 1:
            raise TfglmError(f"{inputs.data}: {len(tokens)} tokens, fewer than one block of {length} + 1")
        log.info("scoring %s: %d blocks of %d tokens", inputs.data, blocks, length)
        starts = np.arange(blocks) * length
        block = tokens[starts[:, None] + np.arange(length + 1)]
        total = 0.0
        for i in range(0, blocks, batch):
            logits = model(block[i:i + batch, :-1], training=False)
            total += float(tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(block[i:i + batch, 1:],
                                                                                        logits)))
        loss = total / (blocks * length)
        return {"data": inputs.data, "tokens": int(blocks * length), "loss": round(loss, 5),
                "perplexity": round(math.exp(min(loss, 50.0)), 4)}

    def serving(self, model, jit_compile):
        module = serving_module(Generator(model, self.tokenizer, jit_compile=jit_compile), self.config.generate)
        signatures = {name: getattr(module, name) for name in ("generate", "score", "tokenize", "detokenize")}
        signatures.update(streaming_signatures(module), serving_default=module.generate)
        return module, signatures, ("generate", {"prompts": [self.config.generate.prompt]})


def serving_module(generator, settings):
    """The exported object: the signature functions, the tokenizer and the weights they read.

    It tracks the `tf.Variable`s inside the Keras variables rather than the Keras model: the saved functions read
    those, and a Keras model would be saved as copies that TF1-style loaders (TF Serving) restore instead.
    """
    tokenizer, model = generator.tokenizer, generator.model

    @tf.function(input_signature=SIGNATURE)
    def generate(prompts, max_new_tokens=tf.constant(min(settings.max_new_tokens, generator.context - 1)),
                 temperature=tf.constant(settings.temperature), top_k=tf.constant(settings.top_k),
                 top_p=tf.constant(settings.top_p), seed=tf.constant(settings.seed)):
        """`Generator.generate`; the tensor defaults become the SignatureDef's `defaults`, so every input but
        `prompts` is optional (a plain Python default would not be)."""
        return generator.generate(prompts, max_new_tokens, temperature, top_k, top_p, seed)

    @tf.function(input_signature=CHAT_SIGNATURE)
    def chat(roles, contents, max_new_tokens=tf.constant(min(settings.max_new_tokens, generator.context - 1)),
             temperature=tf.constant(settings.temperature), top_k=tf.constant(settings.top_k),
             top_p=tf.constant(settings.top_p), seed=tf.constant(settings.seed)):
        """`Generator.chat` (a chat run's export only): the assistant's `replies` to conversations given as `roles`
        and `contents` [batch, messages] (role "" pads), and their `num_tokens`."""
        out = generator.chat(roles, contents, max_new_tokens, temperature, top_k, top_p, seed)
        return {"replies": out["completions"], "num_tokens": out["num_tokens"]}

    max_new = tf.TensorSpec([], tf.int32, name="max_new_tokens")
    default_max_new = tf.constant(min(settings.max_new_tokens, generator.context - 1))

    @tf.function(input_signature=[SIGNATURE[0], max_new])
    def generate_start(prompts, max_new_tokens=default_max_new):
        """The decode state of `prompts` (`advance`'s input): `generate`, streamed."""
        ids = generator.prompt_ids(prompts, tf.clip_by_value(max_new_tokens, 1, generator.context - 1))
        return as_tensors(generator.start(ids, max_new_tokens))

    @tf.function(input_signature=CHAT_SIGNATURE[:2] + [max_new])
    def chat_start(roles, contents, max_new_tokens=default_max_new):
        """The decode state of conversations (`advance`'s input): `chat`, streamed."""
        ids = generator.chat_ids(roles, contents, tf.clip_by_value(max_new_tokens, 1, generator.context - 1))
        return as_tensors(generator.start(ids, max_new_tokens))

    layer = model.init_cache(1, 1)[0].shape  # [batch, 2, heads, length, head_dim]
    state_specs = [tf.TensorSpec([None, None], tf.int32, name="tokens"),
                   tf.TensorSpec([None], tf.int32, name="lengths"),
                   tf.TensorSpec([len(model.blocks), None, *layer[1:3], None, *layer[4:]], model.compute_dtype,
                                 name="caches"),
                   tf.TensorSpec([None], tf.int32, name="limit"), tf.TensorSpec([], tf.int32, name="index"),
                   tf.TensorSpec([None], tf.bool, name="done"), tf.TensorSpec([], tf.int32, name="rows")]

    @tf.function(input_signature=state_specs + [tf.TensorSpec([], tf.int32, name="steps")] + OPTIONS[1:])
    def advance(tokens, lengths, caches, limit, index, done, rows, steps=tf.constant(8),
                temperature=tf.constant(settings.temperature), top_k=tf.constant(settings.top_k),
                top_p=tf.constant(settings.top_p), seed=tf.constant(settings.seed)):
        """Up to `steps` more tokens from a `*_start` or `advance` state: the new state, and the text so far
        (`completions`), `num_tokens` and `finished`. `limit` and `steps` are clipped to the buffer, so a state sent
        by a client cannot make the loop run longer than its tokens."""
        total = tf.shape(tokens)[1]
        state = {"tokens": tokens, "lengths": lengths, "caches": tf.unstack(caches, len(model.blocks)),
                 "limit": tf.minimum(limit, total), "index": index, "done": done, "rows": rows}
        state, out = generator.advance(state, tf.clip_by_value(steps, 0, total), temperature, top_k, top_p, seed)
        return {**as_tensors(state), **out}

    @tf.function(input_signature=[TEXTS])
    def score(texts):
        """Total log-likelihood of each text's tokens after the leading `<eot>`, their count and perplexity.
        Texts longer than the context are scored on their first `context - 1` tokens (`num_tokens` says how many)."""
        ids = tokenizer.tokenize(texts)
        ids = tf.concat([tf.fill([tf.shape(texts)[0], 1], tokenizer.eot_id), ids], axis=1)[:, :generator.context]
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

    module = tf.Module()
    module.context = tf.Variable(generator.context, trainable=False, name="context")  # read by `tfglm serve`
    module.tokenizer = tokenizer
    module.weights = [variable.value for variable in model.variables]
    module.generate, module.score, module.tokenize, module.detokenize = generate, score, tokenize, detokenize
    module.generate_start, module.advance = generate_start, advance
    if isinstance(tokenizer, ChatTokenizer):
        module.chat, module.chat_start = chat, chat_start
    return module


def streaming_signatures(module):
    """The module's streaming signatures (STREAMING), kept off `serving_default`."""
    return {name: getattr(module, name) for name in STREAMING if hasattr(module, name)}


def as_tensors(state):
    """A decode state as the streaming signatures' named tensors: its caches stacked into one."""
    return {**state, "caches": tf.stack(state["caches"])}
