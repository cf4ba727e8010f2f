"""Grounded chat: a conversation starts with the knowledge base's entries retrieved for the customer's last turn(s)
(the chat template's context slot, `tfglm.data.chat`), before the template encodes it. All in the graph, so an export
answers from its knowledge base with TensorFlow and tensorflow-text alone, and every path that turns a conversation
into ids (`encode`: the CLI, the export's `chat`, `chat_start` and `conversation_ids`, the server) retrieves the same
way, once per call: what `encode` retrieved also decides the hand-off.

Retrieval is exact, as `tfglm.data.knowledge.KnowledgeBase.search`: a query's unit vector times the [questions, dim]
matrix of the entries' question vectors, each entry scored by its best question, the `top_k` best entries' answers
joined into the context and cut to `context_tokens` tokens. The queries (`queries`) are the customer's last message
and, for a follow-up, that message after the one before it: a follow-up such as "and how long does that take?" means
little alone, and a new request stands alone, so each entry is scored by the better of the two (as by its best
question). Training retrieves with the same queries (`tfglm.tasks.chat.Grounding.retrieve`). A conversation whose
best score is below `threshold` is handed off: it is not decoded, and its reply is `handoff_message` (`replies`).
"""

import numpy as np
import tensorflow as tf

from tfglm.data.chat import CONTEXT
from tfglm.preprocessors.causal_lm import ChatPreprocessor

SEPARATOR = "\n\n"  # between the answers of the entries in the context


class GroundedChatPreprocessor(ChatPreprocessor):
    """A `ChatPreprocessor` whose conversations are grounded in a knowledge base.

    `embedder.embed` maps strings [n] to {"embeddings": float32 [n, dim] unit vectors} in the graph (a
    `TextEmbedder`);
    `vectors` (float32 [questions, dim]) and `question_entries` (int [questions], each question's entry) are the
    index; `answers` (strings [entries]) the entries' answers.

    Examples:
    ```python
    import types

    import numpy as np
    import tensorflow as tf
    from tfglm import CharTokenizer
    from tfglm.data.chat import ChatTokenizer
    from tfglm.preprocessors.grounded import GroundedChatPreprocessor

    def embed(texts):  # a stand-in embedder: the first letter, one-hot over a and b
        return {"embeddings": tf.cast(tf.strings.substr(texts, 0, 1)[:, None] == ["a", "b"], tf.float32)}

    tokenizer = ChatTokenizer(CharTokenizer("abxyz "))
    preprocessor = GroundedChatPreprocessor(
        tokenizer, 64, types.SimpleNamespace(embed=embed), vectors=np.eye(2, dtype=np.float32),
        question_entries=[0, 1], answers=["xx", "yy"], top_k=1, context_tokens=8, threshold=0.5,
        handoff_message="ask a person")
    retrieved = preprocessor.retrieve(tf.constant([["user"], ["user"]]), tf.constant([["b"], ["z"]]))
    assert retrieved["context"].numpy().tolist() == [b"yy", b"xx"]  # z matches no entry: its best scores 0
    assert retrieved["handed_off"].numpy().tolist() == [False, True]

    # A follow-up is read with the customer's turn before it: "z" alone matches nothing, "b x z" entry 1.
    roles, contents = tf.constant([["user", "assistant", "user"]]), tf.constant([["b x", "yy", "z"]])
    assert preprocessor.queries(roles, contents).numpy().tolist() == [[b"z", b"b x z"]]
    retrieved = preprocessor.retrieve(roles, contents)
    assert retrieved["context"].numpy().tolist() == [b"yy"] and not retrieved["handed_off"].numpy()[0]
    ```
    """

    def __init__(self, tokenizer, sequence_length, embedder, vectors, question_entries, answers, top_k, context_tokens,
                 threshold, handoff_message, **kwargs):
        super().__init__(tokenizer, sequence_length, **kwargs)
        self.embedder = embedder
        self.vectors = tf.constant(np.asarray(vectors, np.float32))
        self.question_entries = tf.constant(np.asarray(question_entries, np.int32))
        self.answers = tf.constant(list(answers))
        self.top_k = min(int(top_k), len(answers))
        self.context_tokens = int(context_tokens)
        self.threshold = float(threshold)
        self.handoff_message = handoff_message

    def context(self, entries):
        """The context message of each row of entry indices `entries` (int [batch, k], best first): their answers
        joined, cut to `context_tokens` tokens."""
        joined = tf.strings.reduce_join(tf.gather(self.answers, entries), axis=1, separator=SEPARATOR)
        base = self.tokenizer.base
        return base.detokenize(base.tokenize(joined)[:, :self.context_tokens])

    def queries(self, roles, contents):
        """The texts retrieval embeds for conversations `roles`, `contents` (strings [batch, messages]): strings
        [batch, 2], the last user message ("" without one) and, where a user message comes before it, the two
        joined (else the last alone again)."""
        users = roles == "user"
        positions = tf.range(tf.shape(roles)[1])
        last = tf.reduce_max(tf.where(users, positions, -1), axis=1)
        before = tf.reduce_max(tf.where(users & (positions < last[:, None]), positions, -1), axis=1)
        latest = tf.where(last >= 0, tf.gather(contents, tf.maximum(last, 0), batch_dims=1), "")
        previous = tf.gather(contents, tf.maximum(before, 0), batch_dims=1)
        return tf.stack([latest, tf.where(before >= 0, previous + " " + latest, latest)], axis=1)

    def retrieve(self, roles, contents):
        """For conversations `roles`, `contents` (strings [batch, messages]): {"context": the context message,
        "score": the best entry's cosine with its better query, "handed_off": whether it is below the
        threshold}."""
        queries = self.queries(roles, contents)
        vectors = self.embedder.embed(tf.reshape(queries, [-1]))["embeddings"]
        scores = tf.matmul(vectors, self.vectors, transpose_b=True)  # [batch * 2, questions]
        per_entry = tf.math.unsorted_segment_max(tf.transpose(scores), self.question_entries,
                                                 tf.shape(self.answers)[0])  # [entries, batch * 2]: best question
        per_entry = tf.reduce_max(tf.reshape(tf.transpose(per_entry), [-1, 2, tf.shape(self.answers)[0]]), axis=1)
        best, entries = tf.math.top_k(per_entry, self.top_k)
        return {"context": self.context(entries), "score": best[:, 0], "handed_off": best[:, 0] < self.threshold}

    def encode(self, roles, contents, max_new_tokens, whole=False):
        """`ChatPreprocessor.encode` of the conversations with their context message first, and what retrieval
        found: each row's best `score` and whether it is `handed_off`."""
        retrieved = self.retrieve(roles, contents)
        batch = tf.shape(roles)[0]
        encoded = super().encode(tf.concat([tf.fill([batch, 1], CONTEXT), roles], axis=1),
                                 tf.concat([retrieved["context"][:, None], contents], axis=1), max_new_tokens, whole)
        return {**encoded, "handed_off": retrieved["handed_off"], "score": retrieved["score"]}

    def replies(self, texts, handed_off):
        """The hand-off message in the rows `handed_off`, else the generated `texts`."""
        return tf.where(handed_off, self.handoff_message, texts)

    def served(self, encoded, replies, num_tokens):
        """As `ChatPreprocessor.served`, with the hand-off message (and 0 tokens) in the rows handed off, and
        `handed_off` and `score` (the best entry's) for each row."""
        handed_off = encoded["handed_off"]
        return {**super().served(encoded, self.replies(replies, handed_off), tf.where(handed_off, 0, num_tokens)),
                "handed_off": handed_off, "score": encoded["score"]}
