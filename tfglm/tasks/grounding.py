"""A chat run grounded in a knowledge base (`chat.knowledge`, an index from `tfglm index`): the index and its embed
run copied into the run, the entries retrieved for each training conversation as they are at serving time, the
hand-off threshold calibrated on the validation conversations, and the `GroundedChatPreprocessor` that serves it.

Training sees what serving will give: the entries nearest the conversation's last user message, by the same
encoder and the same exact search, except the conversation's own entry (one whose questions hold that message and
whose answer is the reply learnt), so a run whose index was built from its training file does not learn to copy an
answer retrieval never hands it for a new question.

The run keeps `knowledge/`: the index's files, `encoder/` (the embed run) and grounding.json (top_k, context_tokens,
the threshold, the hand-off message, the index it was copied from).
"""

import logging
import os
import shutil

import numpy as np
import tensorflow as tf

from tfglm.data.chat import CONTEXT
from tfglm.data.knowledge import ENTRIES, INDEX, VECTORS, KnowledgeBase
from tfglm.errors import TfglmError
from tfglm.preprocessors.grounded import GroundedChatPreprocessor
from tfglm.tasks.registry import load_run
from tfglm.training import runs

log = logging.getLogger("tfglm")
KNOWLEDGE, ENCODER, GROUNDING = "knowledge", "encoder", "grounding.json"


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

    def retrieve(self, conversations, preprocessor):
        """(the conversations with their context message first, each one's best score): retrieval for the last
        user message as `preprocessor` does it, leaving out the conversation's own entry."""
        queries = [last_user(roles, contents) for roles, contents in conversations]
        scores = self.knowledge.entry_scores(queries)
        own = {}  # (question, answer) -> the entries holding both
        for i, entry in enumerate(self.knowledge.entries):
            for question in entry["questions"]:
                own.setdefault((question, entry["answer"]), []).append(i)
        for row, ((roles, contents), query) in enumerate(zip(conversations, queries)):
            reply = contents[len(roles) - 1 - roles[::-1].index("assistant")]
            scores[row, own.get((query.strip(), reply), [])] = -np.inf
        k = preprocessor.top_k
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
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
    """The last user message of a conversation ("" without one), the query retrieval embeds."""
    return next((text for role, text in zip(roles[::-1], contents[::-1]) if role == "user"), "")
