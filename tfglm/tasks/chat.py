"""Chat fine-tuning: a GPT (a `tfglm train` run, an imported GPT-2, or a new one) taught to answer as the assistant of
conversations (`tfglm.data.chat`: files, template, encoding), with the loss on the assistant's tokens only.

Each conversation is one example of template ids padded to the context + 1, so every batch has one static shape (one XLA
program); one longer than the context is split at turn boundaries into several, each reply kept with the question it
answers. The validation loss (which picks the best checkpoint and stops early) is per assistant token; `tfglm
evaluate` adds the replies generated for held-out conversations, scored against theirs.

A chat run grounded in a knowledge base (`chat.knowledge`, an index from `tfglm index`; `Grounding`): the index and
its embed run copied into the run, the entries retrieved for each training conversation as they are at serving
time, the hand-off threshold calibrated on the validation conversations, and the `GroundedChatPreprocessor`
(`tfglm.preprocessors.grounded`) that serves it. Training sees what serving will give: the entries nearest the
conversation's last user message, by the same encoder and the same exact search, except the conversation's own entry
(one whose questions hold that message and whose answer is the reply learnt), so a run whose index was built from
its training file does not learn to copy an answer retrieval never hands it for a new question.

The run keeps `knowledge/`: the index's files, `encoder/` (the embed run) and grounding.json (top_k,
context_tokens, the threshold, the hand-off message, the index it was copied from).
"""

import dataclasses
import logging
import math
import os
import shutil
import time

import numpy as np
import tensorflow as tf

from tfglm.config import generate_settings
from tfglm.data.chat import (CONTEXT, ChatTokenizer, as_batch, pinned_count, read_conversations,
                             read_intents)
from tfglm.data import epochs
from tfglm.data.corpus import per_token_weights
from tfglm.data.knowledge import ENTRIES, INDEX, VECTORS, KnowledgeBase
from tfglm.data.tokenizers import load_tokenizer, new_tokenizer
from tfglm.errors import TfglmError
from tfglm.generation.chat import answer
from tfglm.generation.decode import Generator
from tfglm.generation.scores import intent_accuracy, reply_scores
from tfglm.models.gpt import GPT
from tfglm.preprocessors.grounded import SEPARATOR, GroundedChatPreprocessor
from tfglm.tasks.base import Evaluation, Task, epoch_checks, epoch_schedule, held_out
from tfglm.tasks.registry import load_run
from tfglm.training import runs

log = logging.getLogger("tfglm")
KNOWLEDGE, ENCODER, GROUNDING = "knowledge", "encoder", "grounding.json"


@dataclasses.dataclass
class ChatConfig:
    train_file: str = ""  # conversations (JSONL messages, or a question/answer TSV/CSV; `tfglm.data.chat`): training,
    val_file: str = ""  # validation (default: val_fraction of the training conversations) and those scored into
    eval_file: str = ""  # eval.json after training
    question_column: str = "question"  # TSV/CSV columns (JSONL fields) of a single-turn conversation
    answer_column: str = "answer"
    intent_column: str = "intent"  # the conversation's intent, where the data has one (`tfglm evaluate` scores it)
    long: str = "cut"  # an exchange longer than the context: "cut" keeps its question and cuts the reply from the
    # right; "drop" leaves it out. Neither learns a reply without the question it answers.
    val_fraction: float = 0.1
    epochs: int = 3
    patience: int = 2  # epochs without a lower validation loss before stopping
    batch_size: int = 16
    learning_rate: float = 3e-4
    system: str = ""  # the system message `tfglm chat` starts a conversation with ("" none)
    knowledge: str = ""  # a knowledge base (`tfglm index --out DIR`) the replies are grounded in (--knowledge)
    top_k: int = 1  # its entries retrieved into the context slot
    context_tokens: int = 128  # the retrieved entries' tokens kept in the context slot (the rest cut)
    own_entry_share: float = 0.5  # the share of training conversations whose context slot holds their own entry
    # first (the rest: the nearest others only, as a new question gets): copying from the slot pays at once, so a
    # small model learns to read it rather than only the replies' common template
    own_entry_epochs: int = 0  # the first epochs in which every training conversation's slot holds its own entry
    # first (then own_entry_share): a reply copied whole from the slot is the cheapest signal for the copy circuit
    # a small model needs before it can take a neighbour's wording and the customer's entities
    handoff_rate: float = 0.02  # the share of validation conversations whose best match the hand-off threshold
    # falls under (calibrated when training starts on val_file, else eval_file, else the held-out training
    # conversations; 0: never hand off)
    handoff_message: str = ("I'm sorry, I can't help with that here. Let me pass you to a member of our support "
                            "team.")  # the reply to a conversation handed off


LONG = ("cut", "drop")
ANSWER_BATCH = 32  # conversations answered at once when scoring


@dataclasses.dataclass
class ChatEvaluation(Evaluation):
    """A chat run is scored on a conversations file (`data`), the last reply of each generated greedily."""
    max_new_tokens: int = dataclasses.field(default=None, metadata={
        "help": "chat: the longest reply generated (default generate.max_new_tokens)"})
    batch_size: int = dataclasses.field(default=None, metadata={
        "help": f"chat: conversations answered at once (default {ANSWER_BATCH})"})


class Chat(Task):
    """Conversations in (`chat.train_file`, `chat.val_file` or a held-out share), a GPT that answers out;
    `train.init_from` names the GPT run to start from. With `chat.knowledge`, each conversation is grounded in the
    knowledge base's entries retrieved for it (`Grounding`)."""

    name = "chat"
    model_kinds = ("gpt",)
    perplexity = True
    counts_epochs = True
    generates = True
    section = ChatConfig
    Evaluation = ChatEvaluation
    finetune = "conversations (JSONL messages, or a question/answer TSV/CSV)"

    @classmethod
    def checks(cls, c, config):
        return epoch_checks("chat", c) + [
            (c.long in LONG, "chat.long", f"must be {' or '.join(LONG)}"),
            (c.top_k >= 1, "chat.top_k", "must be >= 1"),
            (not c.knowledge or 1 <= c.context_tokens < config.model.max_length, "chat.context_tokens",
             f"must be >= 1 and below model.max_length ({config.model.max_length})"),
            (0.0 <= c.own_entry_share <= 1.0, "chat.own_entry_share", "must be in [0, 1]"),
            (0 <= c.own_entry_epochs <= c.epochs, "chat.own_entry_epochs", f"must be in [0, chat.epochs ({c.epochs})]"),
            (0.0 <= c.handoff_rate < 1.0, "chat.handoff_rate", "must be in [0, 1)")]

    def __init__(self, config, run_dir):
        super().__init__(config, run_dir)
        self.patience = config.chat.patience
        self.grounding = None
        self.own_train = None  # (ids, weights) of the own-entry examples of chat.own_entry_epochs

    def load_vocabulary(self):
        self.tokenizer = load_tokenizer(runs.path(self.run_dir, runs.TOKENIZER))
        if not isinstance(self.tokenizer, ChatTokenizer):
            raise TfglmError(f"{self.run_dir}: its tokenizer has no chat markers (not a chat run)")
        self.grounding = Grounding.load(self.run_dir)

    def chat_preprocessor(self):
        """A grounded run's `GroundedChatPreprocessor`; None (the tokenizer's own) for one without knowledge."""
        return self.grounding and self.grounding.preprocessor(self.tokenizer, self.config.model.max_length)

    def prepare(self, resume, chief):
        c = self.config.chat
        if not c.train_file:
            raise TfglmError("chat.train_file: no training conversations (--train)")
        if c.knowledge and not resume:
            Grounding.check(c.knowledge)
        train = read_conversations(c.train_file, c.question_column, c.answer_column)
        if c.val_file:
            val = read_conversations(c.val_file, c.question_column, c.answer_column)
        else:
            rows = held_out(len(train), c.val_fraction, self.config.train.seed, "chat", "conversations")
            train, val = ([train[i] for i in part] for part in rows)
        if resume:
            self.load_vocabulary()
        else:
            if self.config.train.init_from:
                base = load_tokenizer(runs.path(self.config.train.init_from, runs.TOKENIZER))
            else:
                texts = [text for _, contents in train for text in contents]
                base = new_tokenizer(self.config, texts + [SEPARATOR] * bool(c.knowledge))  # the separator of the
                # entries in the context, whatever the texts hold
            self.tokenizer = base if isinstance(base, ChatTokenizer) else ChatTokenizer(base)
            if chief:
                runs.save_tokenizer(self.run_dir, self.tokenizer)
            if c.knowledge and chief:
                Grounding.copy(c.knowledge, self.run_dir, {"top_k": c.top_k, "context_tokens": c.context_tokens,
                                                           "handoff_message": c.handoff_message})
            self.grounding = Grounding.load(self.run_dir)
        own = None
        if self.grounding:
            preprocessor = self.chat_preprocessor()
            scores = retrieval_scores(self.grounding.knowledge, train, preprocessor)  # once for both shares
            if c.own_entry_epochs:
                own, _ = self.grounding.retrieve(train, preprocessor, 1.0, self.config.train.seed, scores)
            train, _ = self.grounding.retrieve(train, preprocessor, c.own_entry_share, self.config.train.seed, scores)
            val, scores = self.grounding.retrieve(val, preprocessor)
            if not resume and chief:
                self.grounding.calibrate(self.calibration_scores(scores, preprocessor), c.handoff_rate, self.run_dir)
        length = self.config.model.max_length + 1
        self.train = encode(self.tokenizer, train, length, c.train_file, c.long)
        self.own_train = own and encode(self.tokenizer, own, length, f"{c.train_file} (own entries)", c.long)
        self.val = encode(self.tokenizer, val, length, c.val_file or f"{c.train_file} (validation share)", c.long)
        self.sample_message = next((contents[roles.index("user")] for roles, contents in val if "user" in roles),
                                   "Hello")
        replies = [text for roles, contents in train for role, text in zip(roles, contents) if role == "assistant"]
        advice = length_advice(token_counts(self.tokenizer, replies) + 1, self.config.generate.max_new_tokens,
                               self.config.model.max_length)
        if advice:
            log.warning("%s", advice)
        log.info("chat fine-tuning on %d examples (%d for validation), %d assistant tokens", len(self.train[0]),
                 len(self.val[0]), int(self.train[1].sum()))

    def calibration_scores(self, val_scores, preprocessor):
        """The best retrieval scores the hand-off threshold is calibrated on: `chat.val_file`'s conversations
        (`val_scores`), else `chat.eval_file`'s. Held-out training conversations are the last resort: their
        paraphrases stay in the index, so their best matches are nearer than a new question's and more than
        `chat.handoff_rate` of new in-domain questions would be handed off."""
        c = self.config.chat
        if c.val_file:
            return val_scores
        if c.eval_file:
            return self.grounding.retrieve(read_conversations(c.eval_file, c.question_column, c.answer_column),
                                           preprocessor)[1]
        log.warning("hand-off threshold calibrated on held-out training conversations, whose paraphrases stay in "
                    "the index: new in-domain questions may be handed off more often than chat.handoff_rate; name "
                    "separate validation conversations (--val or --eval) to calibrate on")
        return val_scores

    def schedule(self):
        return epoch_schedule(self.config.train, self.config.chat, len(self.train[0]))

    def build_model(self):
        return GPT.from_config_tree(self.config.model, self.tokenizer.vocab_size)

    def initialize(self, model):
        """The `train.init_from` GPT's weights; the role markers' new embedding rows start as its rows' mean."""
        if not self.config.train.init_from:
            return
        pretrained = load_run(self.config.train.init_from)
        if not isinstance(pretrained.model, GPT):
            raise TfglmError(f"train.init_from: {self.config.train.init_from} is a {pretrained.task.name} run; a "
                             f"chat model starts from a GPT (a causal_lm or chat run)")
        weights = []
        for new, old in zip(model.get_weights(), pretrained.model.get_weights()):
            if new.shape != old.shape and new.shape[1:] == old.shape[1:]:  # the token embedding gains the markers
                old = np.concatenate([old, np.repeat(old.mean(0, keepdims=True), len(new) - len(old), 0)])
            weights.append(old)
        model.set_weights(weights)

    def trained_with_lora(self, model):
        """The token embeddings: the role markers' rows are new (as PEFT's `modules_to_save` for added tokens)."""
        return [model.token_embedding.embeddings]

    def datasets(self, step):
        t = self.schedule()
        c = self.config.chat
        batches = epochs.epoch_batches(len(self.train[0]), t.batch_size, c.epochs, t.seed)
        ids, weights = self.train
        if self.own_train:  # the first chat.own_entry_epochs' steps from the own-entry examples, placed first
            first = c.own_entry_epochs * epochs.steps_per_epoch(len(ids), t.batch_size)
            own = epochs.epoch_batches(len(self.own_train[0]), t.batch_size, c.own_entry_epochs, t.seed)
            batches = np.concatenate([np.resize(own, (first, t.batch_size)), batches[first:] + len(self.own_train[0])])
            ids, weights = (np.concatenate(pair) for pair in zip(self.own_train, self.train))
        train = examples(ids, weights, t.batch_size, batches=batches[step:])
        if len(self.val[0]) < t.batch_size:
            raise TfglmError(f"chat: {len(self.val[0])} validation conversations, fewer than one batch of "
                             f"{t.batch_size}; lower chat.batch_size or give more")
        return train, examples(*self.val, t.batch_size).cache()

    def tokens_per_step(self):
        return self.config.chat.batch_size * self.config.model.max_length

    def samples(self, model):
        """The reply to the first validation conversation's first message (greedy, no XLA)."""
        if not hasattr(self, "_sampler"):
            self._sampler = Generator(model, self.tokenizer, jit_compile=False, preprocessor=self.chat_preprocessor())
        first = self.sample_message
        out = self._sampler.chat(tf.constant([["user"]]), tf.constant([[first]]), 64, 0.0, 0, 1.0, 0)
        return {"chat": f"user: {first}\nassistant: {out['completions'].numpy()[0].decode(errors='replace')}"}

    def generator(self, model):
        return Generator(model, self.tokenizer, preprocessor=self.chat_preprocessor())

    def chat_session(self, model, settings, system=None):
        """As `Task.chat_session`, the system message `chat.system` unless given."""
        return super().chat_session(model, settings, self.config.chat.system if system is None else system)

    def evaluate(self, model, inputs):
        """On the conversations file `--data`: the assistant-token loss and perplexity, and the last reply of each
        conversation generated greedily from the turns before it, scored against the file's: BLEU and chrF
        (sacrebleu), ROUGE-L, and intent accuracy where the file has intents (`chat.intent_column`;
        `tfglm.generation.scores.intent_accuracy`)."""
        if not inputs.data:
            raise TfglmError("--data: a chat model is scored on a conversations file (JSONL, or question/answer "
                             "TSV/CSV)")
        if inputs.batch_size is not None and inputs.batch_size < 1:
            raise TfglmError(f"--batch-size: must be >= 1, got {inputs.batch_size}")
        settings = generate_settings(self.config, {"max_new_tokens": inputs.max_new_tokens, "temperature": 0.0})
        c = self.config.chat
        conversations = read_conversations(inputs.data, c.question_column, c.answer_column)
        grounded, handoff = conversations, {}
        if self.grounding:
            grounded, scores = self.grounding.retrieve(conversations, self.chat_preprocessor())
            handoff = {"handoff_rate": round(float(np.mean(scores < self.grounding.settings["threshold"])), 4)}
        ids, weights = encode(self.tokenizer, grounded, self.config.model.max_length + 1, inputs.data, c.long)
        loss, tokens = assistant_loss(model, ids, weights, c.batch_size)
        return {"data": inputs.data, "conversations": len(conversations), "examples": len(ids),
                "assistant_tokens": tokens, "loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50.0)), 4),
                **handoff, **scored_replies(self.generator(model), conversations,
                                            read_intents(inputs.data, c.intent_column), settings,
                                            inputs.batch_size or ANSWER_BATCH)}

    def exported(self, model, jit_compile):
        return Generator(model, self.tokenizer, jit_compile=jit_compile, preprocessor=self.chat_preprocessor())


def token_counts(tokenizer, texts, batch_size=4096):
    """The number of tokens of each text (int array [texts])."""
    counts = [tokenizer.tokenize(tf.constant(texts[start:start + batch_size])).row_lengths().numpy()
              for start in range(0, len(texts), batch_size)]
    return np.concatenate(counts) if counts else np.zeros([0], np.int64)


def pieces(roles, sizes, room):
    """The examples one conversation makes (lists of its message indices): its exchanges (a user message and the
    messages after it up to the next; any before the first user message are one more), the most recent that fit
    `room` tokens together, then the most recent of those left, and so on, the leading context and system messages
    in each. An exchange longer than `room` on its own is an example of its own. `sizes`: each message's template
    tokens."""
    system = list(range(pinned_count(roles)))  # the leading context and system messages
    room -= sum(sizes[i] for i in system)
    starts = [i for i in range(len(system), len(roles)) if i == len(system) or roles[i] == "user"]
    found, piece, used = [], [], 0
    for first, end in reversed(list(zip(starts, starts[1:] + [len(roles)]))):
        size = sum(sizes[first:end])
        if piece and used + size > room:
            found.append(system + piece)
            piece, used = [], 0
        piece, used = list(range(first, end)) + piece, used + size
    return [system + piece] + found[::-1]


def encode(tokenizer, conversations, length, where, long="cut", batch_size=256):
    """(ids, weights): int32 and float32 [examples, `length`], the template ids and assistant-token weights of the
    conversations, right-padded with `<eot>` (weight 0).

    A conversation longer than `length` is split at turn boundaries into several examples (`pieces`), each reply
    with the user message it answers and the leading context and system messages in every piece, so that every reply
    is learnt once. An exchange longer than `length` on its own is cut from the right (`long` "cut": the question
    kept, the reply's start learnt) or left out ("drop"); a piece with no assistant token teaches nothing and is left
    out. Splits, cuts and drops are counted and reported."""
    flat = [text for _, contents in conversations for text in contents]
    sizes = token_counts(tokenizer, flat) + 2  # <|role|> text <eot>
    planned, split, split_pieces, offset = [], 0, 0, 0
    for roles, contents in conversations:
        found = pieces(roles, sizes[offset:offset + len(roles)], length - 1)  # after the leading <eot>
        if len(found) > 1:
            split, split_pieces = split + 1, split_pieces + len(found)
        planned += [([roles[i] for i in piece], [contents[i] for i in piece],
                     1 + sum(sizes[offset + i] for i in piece)) for piece in found]
        offset += len(roles)
    long_pieces = [piece for piece in planned if piece[2] > length]
    if long == "drop":
        planned = [piece for piece in planned if piece[2] <= length]
    ids, weights, empty = [], [], 0
    for start in range(0, len(planned), batch_size):
        chunk = planned[start:start + batch_size]
        roles, contents = as_batch([(r, c) for r, c, _ in chunk])
        batch_ids, batch_weights, _ = tokenizer.encode_chat(tf.constant(roles), tf.constant(contents),
                                                            max(size for *_, size in chunk))
        for row_ids, row_weights in zip(batch_ids.numpy(), batch_weights.numpy()):
            row_ids, row_weights = row_ids[:length], row_weights[:length]
            if not row_weights.any():
                empty += 1
                continue
            ids.append(np.pad(row_ids, (0, length - len(row_ids)), constant_values=tokenizer.eot_id))
            weights.append(np.pad(row_weights, (0, length - len(row_weights))))
    context = f"the context ({length - 1} tokens)"
    if split:
        log.info("%s: %d of %d conversations longer than %s, split at turn boundaries into %d examples", where,
                 split, len(conversations), context, split_pieces)
    if long_pieces:
        log.warning("%s: %d exchange(s) longer than %s on their own: %s (chat.long=%s)", where, len(long_pieces),
                    context, "left out" if long == "drop" else "the question kept, the reply cut from the right",
                    long)
    if empty:
        log.info("%s: %d example(s) with no reply within %s left out", where, empty, context)
    if not ids:
        raise TfglmError(f"{where}: no conversation has an assistant token within {context}")
    return np.stack(ids).astype(np.int32), np.stack(weights).astype(np.float32)


def last_reply(roles):
    """The index of the conversation's last assistant message."""
    return len(roles) - 1 - roles[::-1].index("assistant")


def scored_replies(generator, conversations, intents, settings, batch_size):
    """The last reply of each conversation [(roles, contents)] that answers a user's turn, generated by `generator`
    from the turns before it with `settings`, `batch_size` at a time, and scored against the conversation's own:
    {"replies", "bleu", "chrf", "rouge_l", "signature", "max_new_tokens", "replies_at_limit", "answer_s", "samples"},
    and with `intents` (one per conversation, or None) the `intent_accuracy` figures."""
    rows = [(i, last_reply(roles)) for i, (roles, _) in enumerate(conversations)]
    rows = [(i, j) for i, j in rows if "user" in conversations[i][0][:j]]
    if not rows:
        return {"replies": 0}
    prompts = [(conversations[i][0][:j], conversations[i][1][:j]) for i, j in rows]
    references = [conversations[i][1][j] for i, j in rows]
    start = time.time()
    log.info("answering %d conversations (at most %d new tokens)", len(rows), settings.max_new_tokens)
    replies, counts = answer(generator, prompts, settings, batch_size)
    at_limit = sum(count >= settings.max_new_tokens for count in counts)
    if at_limit > len(rows) // 20:
        log.warning("%d of %d replies stopped at %d new tokens: they are scored cut (--max-new-tokens)", at_limit,
                    len(rows), settings.max_new_tokens)
    result = {"replies": len(rows), **reply_scores(replies, references), "max_new_tokens": settings.max_new_tokens,
              "replies_at_limit": at_limit, "answer_s": round(time.time() - start, 1)}
    if intents:
        result.update(intent_accuracy(replies, references, [intents[i] for i, _ in rows]))
    result["samples"] = [{"conversation": contents, "reply": reply, "reference": reference}
                         for (_, contents), reply, reference in zip(prompts[:3], replies, references)]
    return result


def length_advice(reply_tokens, max_new_tokens, context):
    """A warning when `generate.max_new_tokens` does not suit replies of `reply_tokens` (each reply's tokens with its
    closing `<eot>`), else None. The advice is the 95th percentile of those, rounded up to a multiple of 8 (at most
    the context less one): it lets typical replies end, and leaves the rest of the context to the conversation."""
    needed = int(np.percentile(reply_tokens, 95, method="higher"))
    advice = min(-(-needed // 8) * 8, context - 1)
    if max_new_tokens < needed:
        share = float(np.mean(np.asarray(reply_tokens) > max_new_tokens))
        return (f"generate.max_new_tokens {max_new_tokens} cuts {share:.0%} of the training replies short (95% end "
                f"within {needed} tokens); consider --set generate.max_new_tokens={advice}"
                + (f" and a longer model.max_length: such replies leave {context - advice} tokens of the context "
                   f"{context} to the conversation" if advice > context // 2 else ""))
    if max_new_tokens > max(advice, context // 2):
        return (f"generate.max_new_tokens {max_new_tokens} leaves a reply only {context - max_new_tokens} tokens of "
                f"the conversation before it (context {context}), and 95% of the training replies end within "
                f"{needed} tokens; consider --set generate.max_new_tokens={advice}")
    return None


def examples(ids, weights, batch_size, batches=None):
    """Batches (inputs, targets, per-token weights) of whole conversations: in order (the last partial batch left
    out), or the rows `batches` names (row indices [steps, batch_size], as `epochs.epoch_batches` gives them)."""
    if batches is None:
        ds = tf.data.Dataset.from_tensor_slices((ids, weights)).batch(batch_size, drop_remainder=True)
    else:
        ds = tf.data.Dataset.from_tensor_slices(batches).map(lambda rows: (tf.gather(ids, rows),
                                                                           tf.gather(weights, rows)))
    return ds.map(lambda x, w: (x[:, :-1], x[:, 1:], per_token_weights(w[:, 1:]))).prefetch(tf.data.AUTOTUNE)


def assistant_loss(model, ids, weights, batch_size):
    """(mean cross-entropy per assistant token, their count) of `model` on encoded conversations."""
    total, count = 0.0, 0.0
    for start in range(0, len(ids), batch_size):
        x, w = ids[start:start + batch_size], weights[start:start + batch_size, 1:]
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(x[:, 1:], model(x[:, :-1], training=False))
        total += float(tf.reduce_sum(losses * w))
        count += float(w.sum())
    return total / count, int(count)


class Grounding:
    """A run's knowledge base, its encoder and its grounding settings (grounding.json's fields)."""

    def __init__(self, knowledge, embedder, settings):
        self.knowledge, self.embedder, self.settings = knowledge, embedder, settings

    @staticmethod
    def check(index):
        """The embed run of the index in `index` (`chat.knowledge`); an error naming the problem if it is not a whole
        index or its embed run is gone."""
        try:
            meta, _, _ = KnowledgeBase.read(index)
        except TfglmError as e:
            raise TfglmError(f"chat.knowledge: {e}") from None
        except (OSError, ValueError) as e:  # a file missing or unreadable, invalid JSON
            raise TfglmError(f"chat.knowledge: {index}: not a whole index ({e}); rebuild it with tfglm index") \
                from None
        encoder = meta.get("model", "")
        if not runs.is_run(encoder):
            raise TfglmError(f"chat.knowledge: {index}: its embed run {encoder!r} is not there (rebuild the "
                             f"index with tfglm index --model RUN)")
        return encoder

    @classmethod
    def copy(cls, index, run_dir, settings):
        """Copies the index in `index` (`chat.knowledge`) and its embed run into `run_dir`; returns the Grounding
        with `settings` (top_k, context_tokens, handoff_message; the threshold comes with `calibrate`)."""
        encoder = cls.check(index)
        target = runs.path(run_dir, KNOWLEDGE)
        os.makedirs(target, exist_ok=True)
        for name in (INDEX, VECTORS, ENTRIES):
            shutil.copyfile(os.path.join(index, name), os.path.join(target, name))
        shutil.copytree(encoder, os.path.join(target, ENCODER), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(runs.LAST, runs.LOGS, "*.tmp"))
        grounding = cls.load(run_dir, {**settings, "index": os.path.abspath(index), "threshold": -1.0})
        grounding.save(run_dir)
        return grounding

    @classmethod
    def load(cls, run_dir, settings=None):
        """The Grounding kept in `run_dir` (its grounding.json unless `settings` are given); None for a chat run
        without a knowledge base."""
        directory = runs.path(run_dir, KNOWLEDGE)
        if not os.path.isdir(directory):
            return None
        _, entries, vectors = KnowledgeBase.read(directory)
        encoder = load_run(os.path.join(directory, ENCODER))
        embedder = encoder.task.embedder(encoder.model)
        settings = settings or runs.read_json(os.path.join(directory, GROUNDING))
        return cls(KnowledgeBase(entries, vectors, embedder, ENCODER), embedder, settings)

    def save(self, run_dir):
        runs.write_json(os.path.join(runs.path(run_dir, KNOWLEDGE), GROUNDING), self.settings)

    def preprocessor(self, tokenizer, sequence_length):
        """The `GroundedChatPreprocessor` of this knowledge base for a chat run's `tokenizer`."""
        s = self.settings
        return GroundedChatPreprocessor(tokenizer, sequence_length, self.embedder, self.knowledge.vectors,
                                        self.knowledge.question_entries(),
                                        [entry["answer"] for entry in self.knowledge.entries], s["top_k"],
                                        s["context_tokens"], s["threshold"], s["handoff_message"])

    def retrieve(self, conversations, preprocessor, own_share=0.0, seed=0, scores=None):
        """(the conversations with their context message first, each one's best score): retrieval for the last
        user message as `preprocessor` does it, leaving out the conversation's own entry (one whose questions hold
        that message and whose answer is its last reply), except in a random `own_share` of those that have one
        (by `seed`), whose own entry comes first. `scores`: the conversations' `retrieval_scores`, when already
        computed for another share."""
        queries = [last_user(roles, contents) for roles, contents in conversations]
        if scores is None:
            scores = retrieval_scores(self.knowledge, conversations, preprocessor)
        own = {}  # (question, answer) -> the entries holding both
        for i, entry in enumerate(self.knowledge.entries):
            for question in entry["questions"]:
                own.setdefault((question, entry["answer"]), []).append(i)
        first = np.random.default_rng(seed).random(len(conversations)) < own_share
        ranking = scores.copy()
        for row, ((roles, contents), query) in enumerate(zip(conversations, queries)):
            entries = own.get((query.strip(), contents[last_reply(roles)]), [])
            ranking[row, entries] = np.inf if first[row] else -np.inf
        k = preprocessor.top_k
        best = np.argsort(-ranking, axis=1, kind="stable")[:, :k]
        contexts = [text.decode("utf-8", errors="replace") for start in range(0, len(best), 256)
                    for text in preprocessor.context(tf.constant(best[start:start + 256])).numpy()]
        grounded = [([CONTEXT] + roles, [context] + contents)
                    for (roles, contents), context in zip(conversations, contexts)]
        return grounded, np.take_along_axis(scores, best[:, :1], axis=1)[:, 0]

    def calibrate(self, scores, rate, run_dir):
        """Sets the threshold to the `rate` quantile of in-domain best `scores` (the validation conversations'), so
        about that share of questions like them is handed off (none at rate 0), and saves it."""
        threshold = float(np.quantile(scores, rate)) if rate > 0 else -1.0
        self.settings["threshold"] = threshold
        self.save(run_dir)
        log.info("hand-off threshold %.4f: %.1f%% of the %d validation conversations' best matches are below it",
                 threshold, 100.0 * float(np.mean(scores < threshold)), len(scores))


def last_user(roles, contents):
    """The last user message of a conversation ("" without one), the question its own entry holds."""
    return next((text for role, text in zip(roles[::-1], contents[::-1]) if role == "user"), "")


def retrieval_scores(knowledge, conversations, preprocessor, batch_size=256):
    """float [conversations, entries]: each entry's score for each conversation as `preprocessor` retrieves, by the
    better of its `GroundedChatPreprocessor.queries` (the last user message, and it after the one before)."""
    rows = [row for start in range(0, len(conversations), batch_size) for row in preprocessor.queries(
        *map(tf.constant, as_batch(conversations[start:start + batch_size]))).numpy()]
    queries = [text.decode("utf-8") for row in rows for text in row]
    return knowledge.entry_scores(queries).reshape(len(conversations), 2, -1).max(axis=1)
