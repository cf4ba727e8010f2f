"""A conversation with a chat run, turn by turn, for `tfglm chat`."""

import logging

import tensorflow as tf

from tfglm.config import generate_options

log = logging.getLogger("tfglm")


class ChatSession:
    """One conversation with a chat run: the system message and the turns so far, forgetting (with one warning) the
    oldest turns once they no longer fit the context, as the chat template's encoding drops them anyway."""

    def __init__(self, generator, system, settings):
        self.generator, self.system, self.settings = generator, system, settings
        self.turns = []  # (role, text)
        self.warned = False

    def reset(self):
        self.turns, self.warned = [], False

    def ask(self, message):
        """(roles, contents), strings [1, messages]: the conversation to answer once `message` joins it."""
        self.turns.append(("user", message))
        dropped = int(self.generator.preprocessor.dropped_turns(*map(tf.constant, self.conversation()),
                                                                self.settings.max_new_tokens)[0])
        if dropped:
            if not self.warned:
                log.warning("the conversation outgrew the context (%d tokens minus %d new): its oldest turns are "
                            "forgotten from now on", self.generator.context, self.settings.max_new_tokens)
                self.warned = True
            self.turns = self.turns[dropped:]
        return self.conversation()

    def conversation(self):
        messages = ([("system", self.system)] if self.system else []) + self.turns
        return [[role for role, _ in messages]], [[text for _, text in messages]]

    def answered(self, reply):
        self.turns.append(("assistant", reply))

    def reply(self, message):
        """The whole reply to `message` and its token count."""
        roles, contents = self.ask(message)
        out = self.generator.chat(tf.constant(roles), tf.constant(contents), *generate_options(self.settings))
        reply = out["completions"].numpy()[0].decode("utf-8", errors="replace")
        self.answered(reply)
        return reply, int(out["num_tokens"].numpy()[0])

    def stream(self, message):
        """Yields the reply to `message` piece by piece as it is generated. Stopped early (Ctrl-C in it, or closed),
        the conversation keeps the part of the reply already yielded, or forgets `message` when none was."""
        reply, finished = [], False
        try:
            conversation = self.ask(message)
            for pieces in self.generator.stream(None, *generate_options(self.settings), conversations=conversation):
                reply.append(pieces[0])
                yield pieces[0]
            finished = True
        finally:
            if finished or "".join(reply):
                self.answered("".join(reply))
            elif self.turns[-1:] == [("user", message)]:
                self.turns.pop()
