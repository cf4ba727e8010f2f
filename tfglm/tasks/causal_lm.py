"""Causal language modelling: a GPT trained on text files packed into blocks, generating free text.

It exports its `Generator` (`tfglm.serving.signatures.language_model`: generate, score, tokenize, detokenize and the
streaming signatures).
"""

import functools
import logging
import math

import numpy as np
import tensorflow as tf

from tfglm.data import corpus, shards
from tfglm.data.tokenizers import CharTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece
from tfglm.errors import TfglmError
from tfglm.generation.decode import Generator
from tfglm.models.gpt import GPT
from tfglm.tasks.base import Task
from tfglm.tasks.registry import load_run
from tfglm.training import runs

log = logging.getLogger("tfglm")


class CausalLM(Task):
    name = "causal_lm"
    model_kinds = ("gpt",)
    perplexity = True
    default_for = ("gpt",)
    generates = True
    prepared = None  # the `shards.Prepared` corpus when data.files names one

    def load_vocabulary(self):
        self.tokenizer = load_tokenizer(runs.path(self.run_dir, runs.TOKENIZER))

    def prepare(self, resume, chief):
        """Reads and checks the corpus, trains (or reloads) the tokenizer and splits the token stream; or opens the
        corpus `tfglm prepare` wrote, whose tokenizer the run takes."""
        if shards.is_prepared(self.config.data.files):
            self.prepared = self.open_prepared(resume, chief)
            return
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
                runs.save_tokenizer(self.run_dir, self.tokenizer)
        else:
            self.tokenizer = self.learn_vocabulary(files, stats)
            if chief:
                runs.save_tokenizer(self.run_dir, self.tokenizer)
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
        if self.prepared:
            train = functools.partial(self.prepared.train_dataset, length, t.batch_size, t.seed, step, t.steps - step)
            val = self.prepared.validation_tokens(t.batch_size * t.eval_batches * length + 1)
            return train, corpus.eval_dataset(val, length, t.batch_size, t.eval_batches)
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
        """Perplexity of the model over consecutive blocks of its context: of the text files `--data` names, or of
        the validation split of a corpus `tfglm prepare` wrote (`--data DIR`), read from its shards a batch at a time,
        so memory does not grow with the split."""
        if not inputs.data:
            raise TfglmError("--data: a language model is scored on text files or a prepared corpus (perplexity)")
        if shards.is_prepared([inputs.data]):
            prepared = shards.Prepared(inputs.data, reader=self.name)
            prepared.check_tokenizer(runs.path(self.run_dir, runs.TOKENIZER))
            stream = prepared.streams["validation"]
            window, num_tokens, split = stream.window, stream.num_tokens, {"split": "validation"}
        else:
            files = corpus.resolve_files([inputs.data])
            corpus.scan_files(files)
            tokens = corpus.tokenize_files(files, self.tokenizer)
            window, num_tokens, split = (lambda start, count: tokens[start:start + count]), len(tokens), {}
        length, batch = self.config.model.max_length, self.config.train.batch_size
        blocks = (num_tokens - 1) // length
        if blocks < 1:
            raise TfglmError(f"{inputs.data}: {num_tokens} tokens, fewer than one block of {length} + 1")
        log.info("scoring %s: %d blocks of %d tokens", inputs.data, blocks, length)
        total = 0.0
        for first in range(0, blocks, batch):
            rows = min(batch, blocks - first)
            chunk = window(first * length, rows * length + 1)
            block = chunk[np.arange(rows)[:, None] * length + np.arange(length + 1)]
            logits = model(block[:, :-1], training=False)
            total += float(tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(block[:, 1:], logits)))
        loss = total / (blocks * length)
        return {"data": inputs.data, **split, "tokens": int(blocks * length), "loss": round(loss, 5),
                "perplexity": round(math.exp(min(loss, 50.0)), 4)}

    def exported(self, model, jit_compile):
        return Generator(model, self.tokenizer, jit_compile=jit_compile)
