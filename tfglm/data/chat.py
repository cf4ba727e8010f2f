"""Conversations: the files they come in, the chat template, and turning a batch of them into token ids in the
graph (for training, and for the export's `chat` signature alike).

A conversation is a list of messages, each a role ("system", "user" or "assistant") and a text. Files:
- JSONL, one conversation a line: `{"messages": [{"role": "user", "content": "Hi"}, ...]}`;
- TSV or CSV with a header row: one single-turn conversation a row, a question and an answer column
  (`chat.question_column`, `chat.answer_column`); a JSONL object with those fields and no "messages" reads the same.
A row may carry an intent (`chat.intent_column`), which `tfglm evaluate` scores replies by.

The template: the role markers `<|system|>`, `<|user|>`, `<|assistant|>` and `<|context|>` are special tokens
appended to the run's tokenizer (ids after its own vocabulary), so no text a user types can produce one. A
conversation reads

    <eot> <|system|> text <eot> <|user|> text <eot> <|assistant|> text <eot> <|user|> ...

and the prompt for the next reply ends with `<|assistant|>`; the model writes the reply and ends it with `<eot>`,
where decoding stops. Training weights the assistant's text tokens and the `<eot>` that ends them, nothing else. A
grounded chat (`tfglm.preprocessors.grounded`) starts the conversation with a `context` message, the knowledge base's
entries retrieved for the customer's last turn: `<eot> <|context|> entries <eot> <|system|> ...`; the leading context
and system messages are kept whole when older turns are dropped.
"""

import json
import os

import tensorflow as tf

from tfglm.data import labelled
from tfglm.errors import TfglmError

ROLES = ("system", "user", "assistant")  # the roles of a conversation's messages
CONTEXT = "context"  # the role of the retrieved entries a grounded chat's prompt starts with
MARKERS = tuple(f"<|{role}|>" for role in ROLES + (CONTEXT,))


class ChatTokenizer(tf.Module):
    """A run's tokenizer with the chat template's role markers added after its vocabulary.

    Examples:
    ```python
    import tensorflow as tf
    from tfglm import CharTokenizer
    from tfglm.data.chat import ChatTokenizer

    tokenizer = ChatTokenizer(CharTokenizer("abcdefgh hi"))
    ids, weights, dropped = tokenizer.encode_chat(tf.constant([["user", "assistant"]]), tf.constant([["hi", "ab"]]),
                                                  budget=64)
    # ids: <eot> <|user|> h i <eot> <|assistant|> a b <eot>; weights 1.0 on a, b and the last <eot>
    assert weights.to_list() == [[0, 0, 0, 0, 0, 0, 1, 1, 1]]
    ```
    """

    def __init__(self, base, markers=MARKERS):
        """`markers`: the template's markers, in id order (a run saved with fewer keeps its own)."""
        super().__init__()
        self.base = base
        self.kind = base.kind
        self.markers = list(markers)
        self.vocab_size = base.vocab_size + len(self.markers)
        self.eot_id = base.eot_id
        self.role_ids = {marker[2:-2]: base.vocab_size + i for i, marker in enumerate(self.markers)}
        self._roles = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(list(self.role_ids)),
                                                tf.constant(list(self.role_ids.values()))),
            default_value=-1)

    def tokenize(self, strings):
        return self.base.tokenize(strings)

    def detokenize(self, ids):
        """Text of `ids`; role markers write nothing."""
        ids = ids if isinstance(ids, tf.RaggedTensor) else tf.RaggedTensor.from_tensor(ids)
        return self.base.detokenize(tf.ragged.boolean_mask(ids, ids < self.base.vocab_size))

    def save(self, directory):
        """The base tokenizer's files, with the markers recorded in tokenizer.json (`load_tokenizer` reads them)."""
        self.base.save(directory)
        path = os.path.join(directory, "tokenizer.json")
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**spec, "chat_markers": self.markers}, f, ensure_ascii=False)

    def encode_chat(self, roles, contents, budget, generation_prompt=False):
        """Token ids of conversations `roles`, `contents` (strings [batch, messages]; role "" pads a shorter one).

        Each conversation keeps its leading context and system messages and then its most recent messages that fit
        `budget` tokens with the leading `<eot>` (and, with `generation_prompt`, the closing `<|assistant|>`),
        starting with a user's: older ones are dropped whole exchanges at a time, oldest first, so no reply is kept
        without the turn it answers. The last message is always kept, so a row can still exceed `budget`: the
        caller cuts or drops it. Returns (ids, weights, dropped): ragged int32 and float32 [batch, None] (weights 1
        on the assistant's tokens and their closing `<eot>`), and the number of messages dropped from each row
        (int32 [batch]).
        """
        role_ids = self._roles.lookup(roles)
        present = roles != ""
        tf.debugging.assert_equal(
            tf.reduce_all((role_ids >= 0) | ~present), True,
            message="roles: each role must be system, user, assistant, context or '' (no message)")
        shape = tf.shape(roles)
        flat_roles = tf.reshape(role_ids, [-1, 1])
        text = self.base.tokenize(tf.reshape(contents, [-1]))
        ones = tf.ones_like(flat_roles)
        messages = tf.concat([flat_roles, text, ones * self.eot_id], axis=1)  # [batch * messages, None]
        assistant = tf.cast(flat_roles == self.role_ids["assistant"], tf.float32)
        # Each text token's weight gathered from its message's row, found by searchsorted: `ones_like(text) *
        # assistant` and `value_rowids()` (tf.repeat) both go through a dense [messages, longest message] tensor.
        token_rows = tf.searchsorted(text.row_splits[1:], tf.range(tf.size(text.flat_values, tf.int64)), side="right")
        text_weights = text.with_values(tf.gather(assistant[:, 0], token_rows))
        weights = tf.concat([tf.zeros_like(assistant), text_weights, assistant], axis=1)

        sizes = tf.where(present, tf.reshape(tf.cast(messages.row_lengths(), tf.int32), shape), 0)
        leading = tf.cast((roles == "system") | (roles == CONTEXT), tf.int32)
        pinned = tf.math.cumprod(leading, axis=1) == 1  # the leading context and system messages
        pinned_size = tf.reduce_sum(tf.where(pinned, sizes, 0), axis=1, keepdims=True)
        room = budget - 1 - tf.cast(generation_prompt, tf.int32) - pinned_size
        from_here = tf.cumsum(tf.where(pinned, 0, sizes), axis=1, reverse=True)  # tokens from each message on
        fits = ~pinned & (from_here <= room)
        from_a_user = tf.cumsum(tf.cast(fits & (roles == "user"), tf.int32), axis=1) > 0  # from the first that fits
        last = tf.cumsum(tf.cast(present, tf.int32), axis=1, reverse=True) == 1
        keep = present & (pinned | (fits & from_a_user) | last)
        dropped = tf.reduce_sum(tf.cast(present & ~keep, tf.int32), axis=1)

        def join(parts, first, final):
            kept = tf.gather(parts, tf.where(tf.reshape(keep, [-1]))[:, 0])  # boolean_mask would tile, as above
            rows = tf.RaggedTensor.from_row_lengths(kept, tf.reduce_sum(tf.cast(keep, tf.int64), axis=1))
            joined = rows.merge_dims(1, 2)
            pieces = [tf.fill([shape[0], 1], first), joined]
            if generation_prompt:
                pieces.append(tf.fill([shape[0], 1], final))
            return tf.concat(pieces, axis=1)

        ids = join(messages, self.eot_id, self.role_ids["assistant"])
        return ids, join(weights, 0.0, 0.0), dropped


def pinned_count(roles):
    """How many of a conversation's first `roles` (a list) are context and system messages, kept in every piece."""
    count = 0
    while count < len(roles) and roles[count] in ("system", CONTEXT):
        count += 1
    return count


def read_conversations(path, question_column="question", answer_column="answer", answered=True):
    """[(roles, contents)] of a JSONL conversations file or a question/answer TSV/CSV; every problem (invalid JSON,
    an unknown role, an empty conversation, one without an assistant message) is an error naming file and line.

    With `answered` False, the conversations to answer (`tfglm chat --input`): each ends with a user message, and a
    question alone makes one (no answer column)."""
    columns = (question_column, answer_column) if answered else (question_column,)
    conversations = []
    for line, row in labelled.rows(path):
        where = f"{path}:{line}"
        if path.lower().endswith(".jsonl") and (not isinstance(row.get(question_column), str) or "messages" in row):
            messages = row.get("messages")
            if not isinstance(messages, list) or not messages:
                raise TfglmError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}} "
                                 f"with at least one message, or a {question_column!r} string")
            roles, contents = [], []
            for i, message in enumerate(messages):
                if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                    raise TfglmError(f"{where}: message {i + 1}: expected {{\"role\": ..., \"content\": \"text\"}}")
                if message.get("role") not in ROLES:
                    raise TfglmError(f"{where}: message {i + 1}: unknown role {message.get('role')!r} "
                                     f"(expected {', '.join(ROLES)})")
                roles.append(message["role"])
                contents.append(message["content"])
        else:
            for column in columns:
                if column not in row:
                    raise TfglmError(f"{where}: no column {column!r} (has: {', '.join(row)}); set "
                                     f"chat.question_column / chat.answer_column")
                if not isinstance(row[column], str):
                    raise TfglmError(f"{where}: {column}: expected a string")
            roles, contents = ["user", "assistant"][:len(columns)], [row[column] for column in columns]
        if answered and "assistant" not in roles:
            raise TfglmError(f"{where}: the conversation has no assistant message (nothing to learn)")
        if not answered and roles[-1] != "user":
            raise TfglmError(f"{where}: the conversation's last message is the {roles[-1]}'s; expected the user's "
                             f"turn to answer")
        conversations.append((roles, contents))
    if not conversations:
        raise TfglmError(f"{path}: no conversations")
    return conversations


def read_intents(path, column="intent"):
    """Each conversation's intent (its row's `column`; None where it has none), in `read_conversations` order, or
    None when no conversation has one."""
    intents = [None if row.get(column) in (None, "") else str(row[column]) for _, row in labelled.rows(path)]
    return intents if any(intents) else None


def as_batch(conversations):
    """(roles, contents) string arrays [batch, longest], shorter conversations padded with role ""."""
    longest = max(len(roles) for roles, _ in conversations)
    return ([roles + [""] * (longest - len(roles)) for roles, _ in conversations],
            [contents + [""] * (longest - len(contents)) for _, contents in conversations])
