"""Conversations with a chat run, for `tfglm chat`: one turn by turn, or many independent ones answered in batches."""

import logging

import tensorflow as tf

from tfglm.config import generate_options
from tfglm.data.chat import as_batch

log = logging.getLogger("tfglm")


class ChatSession:
    """One conversation with a chat run: the system message and the turns so far, forgetting (with one warning) the
    oldest exchanges once they no longer fit the context, as the chat template's encoding drops them anyway (whole
    exchanges: what is left starts with a user's turn, as every example of the fine-tune does). A grounded run's
    turn retrieves once, and a turn it hands off is answered with its hand-off message."""

    def __init__(self, generator, system, settings):
        self.generator, self.system, self.settings = generator, system, settings
        self.turns = []  # (role, text)
        self.warned = False

    def reset(self):
        self.turns, self.warned = [], False

    def ask(self, message):
        """The conversation once `message` joins it, as the preprocessor `encode`s it; the exchanges it drops are
        forgotten."""
        self.turns.append(("user", message))
        encoded = self.generator.preprocessor.encode(*map(tf.constant, self.conversation()),
                                                     self.settings.max_new_tokens)
        dropped = int(encoded["dropped_turns"][0])
        if dropped:
            if not self.warned:
                log.warning("the conversation outgrew the context (%d tokens minus %d new): its oldest turns are "
                            "forgotten from now on", self.generator.context, self.settings.max_new_tokens)
                self.warned = True
            self.turns = self.turns[dropped:]
        return encoded

    def conversation(self):
        messages = ([("system", self.system)] if self.system else []) + self.turns
        return [[role for role, _ in messages]], [[text for _, text in messages]]

    def answered(self, reply):
        self.turns.append(("assistant", reply))

    def answer_all(self, conversations, batch_size):
        """`answer` to independent `conversations`, each opened with the session's system message unless it has
        one."""
        if self.system:
            conversations = [(roles, contents) if roles[0] == "system" else
                             (["system"] + roles, [self.system] + contents) for roles, contents in conversations]
        return answer(self.generator, conversations, self.settings, batch_size)

    def reply(self, message):
        """The whole reply to `message` and its token count."""
        out = self.generator.reply(self.ask(message), *generate_options(self.settings))
        reply = out["completions"].numpy()[0].decode("utf-8", errors="replace")
        self.answered(reply)
        return reply, int(out["num_tokens"].numpy()[0])

    def stream(self, message):
        """Yields the reply to `message` piece by piece as it is generated. Stopped early (Ctrl-C in it, or closed),
        the conversation keeps the part of the reply already yielded, or forgets `message` when none was."""
        reply, finished = [], False
        try:
            encoded = self.ask(message)
            for pieces in self.generator.stream(None, *generate_options(self.settings), encoded=encoded):
                reply.append(pieces[0])
                yield pieces[0]
            finished = True
        finally:
            if finished or "".join(reply):
                self.answered("".join(reply))
            elif self.turns[-1:] == [("user", message)]:
                self.turns.pop()


def answer(generator, conversations, settings, batch_size):
    """(replies, token counts) of the `generator`'s next reply to each of the independent `conversations`
    [(roles, contents)], generated with `settings` (a GenerateConfig) `batch_size` at a time, conversations of
    similar length together (less padding). One warning counts those whose oldest turns did not fit the context."""
    order = sorted(range(len(conversations)), key=lambda i: sum(map(len, conversations[i][1])))
    replies, counts, forgotten = [None] * len(order), [0] * len(order), 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        roles, contents = map(tf.constant, as_batch([conversations[i] for i in rows]))
        out = generator.chat(roles, contents, *generate_options(settings))
        forgotten += int(tf.math.count_nonzero(out["dropped_turns"]))
        for i, reply, count in zip(rows, out["completions"].numpy(), out["num_tokens"].numpy()):
            replies[i], counts[i] = reply.decode("utf-8", errors="replace"), int(count)
    if forgotten:
        log.warning("%d of %d conversations outgrew the context (%d tokens minus %d new): their oldest turns were "
                    "left out", forgotten, len(order), generator.context, settings.max_new_tokens)
    return replies, counts
