"""Grounded chat: a conversation starts with the knowledge base's entries retrieved for the customer's last turn (the
chat template's context slot, `tfglm.data.chat`), before the template encodes it. All in the graph, so an export
answers from its knowledge base with TensorFlow and tensorflow-text alone, and every path that turns a conversation
into ids (`chat_ids`: the CLI, the export's `chat` and `chat_start`, the server) retrieves the same way.

Retrieval is exact, as `tfglm.data.knowledge.KnowledgeBase.search`: the last user message's unit vector times the
[questions, dim] matrix of the entries' question vectors, each entry scored by its best question, the `top_k` best
entries' answers joined into the context and cut to `context_tokens` tokens. A conversation whose best score is below
`threshold` is handed off: its reply is `handoff_message`, not what the model generates (`served`).
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

    def retrieve(self, roles, contents):
        """For conversations `roles`, `contents` (strings [batch, messages]): {"context": the context message,
        "score": the best entry's cosine with the last user message, "handed_off": whether it is below the
        threshold}."""
        users = tf.cast(roles == "user", tf.int32)
        last = tf.shape(roles)[1] - 1 - tf.argmax(tf.reverse(users, axis=[1]), axis=1, output_type=tf.int32)
        queries = tf.gather(contents, last, batch_dims=1)
        vectors = self.embedder.embed(queries)["embeddings"]
        scores = tf.matmul(vectors, self.vectors, transpose_b=True)  # [batch, questions]
        per_entry = tf.math.unsorted_segment_max(tf.transpose(scores), self.question_entries,
                                                 tf.shape(self.answers)[0])  # [entries, batch]: best question
        best, entries = tf.math.top_k(tf.transpose(per_entry), self.top_k)
        return {"context": self.context(entries), "score": best[:, 0], "handed_off": best[:, 0] < self.threshold}

    def grounded(self, roles, contents):
        """The conversations with their context message first."""
        batch = tf.shape(roles)[0]
        return (tf.concat([tf.fill([batch, 1], CONTEXT), roles], axis=1),
                tf.concat([self.retrieve(roles, contents)["context"][:, None], contents], axis=1))

    def chat_ids(self, roles, contents, max_new_tokens, whole=False):
        """`ChatPreprocessor.chat_ids` of the grounded conversations."""
        return super().chat_ids(*self.grounded(roles, contents), max_new_tokens, whole)

    def dropped_turns(self, roles, contents, max_new_tokens):
        return super().dropped_turns(*self.grounded(roles, contents), max_new_tokens)

    def served(self, roles, contents, replies, num_tokens):
        """As `ChatPreprocessor.served`, with the hand-off message (and 0 tokens) in the rows handed off, and
        `handed_off` and `score` (the best entry's) for each row."""
        retrieved = self.retrieve(roles, contents)
        handed_off = retrieved["handed_off"]
        return {"replies": tf.where(handed_off, self.handoff_message, replies),
                "num_tokens": tf.where(handed_off, 0, num_tokens), "handed_off": handed_off,
                "score": retrieved["score"]}

