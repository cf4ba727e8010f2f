"""The causal LM and chat preprocessors: strings (or conversations) to the token ids a GPT reads, in the graph.

One path encodes a prompt for the `Generator`, the export signatures and the server alike: tokenize, prepend `<eot>`
(the start-of-document context seen in training), truncate from the left to leave room for the new tokens, and pad
into a decode buffer whose batch, prompt and total lengths are bucketed (`tfglm.preprocessors.buckets`).
"""

import keras
import tensorflow as tf

from tfglm.preprocessors.buckets import bucket

CHAT_TOO_LONG = "messages: the conversation does not fit the context"


class CausalLMPreprocessor(keras.layers.Layer):
    """Texts to a GPT's token ids: `<eot>` + tokens, truncated to `sequence_length` (from the left for a prompt,
    which keeps its end, from the right for a document scored or classified whole: a GPT classifier reads the last
    of each row's `lengths` tokens). Holds the tokenizer; its config holds the rest (the tokenizer is saved with the
    run, in tokenizer/).

    Examples:
    ```python
    import tensorflow as tf
    from tfglm import CharTokenizer
    from tfglm.preprocessors import CausalLMPreprocessor

    tokenizer = CharTokenizer("abc")
    preprocessor = CausalLMPreprocessor(tokenizer, sequence_length=4)
    inputs = preprocessor(tf.constant(["abcabc"]))  # <eot> (0) first, cut from the right
    assert inputs["token_ids"].numpy().tolist() == [[0, 2, 3, 4]] and inputs["lengths"].numpy().tolist() == [4]
    assert preprocessor.prompt_ids(tf.constant(["abcabc"]), 1).to_list() == [[2, 3, 4]]  # room for 1 new token
    ```
    """

    def __init__(self, tokenizer, sequence_length, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length

    def with_eot(self, texts):
        """Ragged ids: `<eot>` + each text's tokens, untruncated."""
        ids = self.tokenizer.tokenize(texts)
        return tf.concat([tf.fill([tf.shape(texts)[0], 1], self.tokenizer.eot_id), ids], axis=1)

    def document_ids(self, texts):
        """Ragged ids of `texts` read whole: `<eot>` + tokens, cut from the right to `sequence_length`."""
        return self.with_eot(texts)[:, :self.sequence_length]

    def call(self, texts):
        """{"token_ids": int32 [batch, sequence_length] right-padded with `<eot>`, "lengths": int32 [batch]}."""
        ids = self.document_ids(texts)
        return {"token_ids": ids.to_tensor(default_value=self.tokenizer.eot_id, shape=[None, self.sequence_length]),
                "lengths": tf.cast(ids.row_lengths(), tf.int32)}

    def prompt_ids(self, prompts, max_new_tokens):
        """Ragged prompt ids: `<eot>` + tokens, truncated from the left to `sequence_length - max_new_tokens`."""
        return self.with_eot(prompts)[:, -(self.sequence_length - max_new_tokens):]

    def truncations(self, prompts, max_new_tokens):
        """(kept, had): each prompt's token count with `<eot>` after and before `prompt_ids` truncates it."""
        full = self.with_eot(prompts).row_lengths()
        return self.prompt_ids(prompts, max_new_tokens).row_lengths(), full

    def replies(self, texts, handed_off):
        """What to answer for generated `texts` (strings [rows]): the texts (a grounded chat's preprocessor gives
        its rows `handed_off`, bool [rows], its hand-off message)."""
        return texts

    def decode_buffer(self, ids, max_new_tokens):
        """Ragged prompt `ids` as a decode buffer: {"tokens": int32 [padded batch, total] right-padded with `<eot>`,
        "lengths": int32 [padded batch], "prefill_length", "rows"}. The batch is padded to a power of two (rows of
        length 1); `total` is the bucket of the longest prompt plus `max_new_tokens`, at most `sequence_length`;
        `prefill_length` the longest prompt's bucket, at most `total`."""
        batch = ids.nrows(out_type=tf.int32)
        padded_batch = bucket(batch, minimum=1)
        lengths = tf.pad(tf.cast(ids.row_lengths(), tf.int32), [[0, padded_batch - batch]], constant_values=1)
        longest = tf.reduce_max(lengths)
        total = bucket(longest + max_new_tokens, limit=self.sequence_length)
        tokens = ids.to_tensor(default_value=self.tokenizer.eot_id, shape=[padded_batch, total])
        return {"tokens": tokens, "lengths": lengths, "prefill_length": tf.minimum(bucket(longest), total),
                "rows": batch}

    def get_config(self):
        return {**super().get_config(), "sequence_length": self.sequence_length}


class ChatPreprocessor(CausalLMPreprocessor):
    """Conversations to a chat model's token ids (`tfglm.data.chat.ChatTokenizer`'s template), besides plain texts.

    Examples:
    ```python
    import tensorflow as tf
    from tfglm import CharTokenizer
    from tfglm.data.chat import ChatTokenizer
    from tfglm.preprocessors import ChatPreprocessor

    preprocessor = ChatPreprocessor(ChatTokenizer(CharTokenizer("abhi")), sequence_length=16)
    ids = preprocessor.chat_ids(tf.constant([["user"]]), tf.constant([["hi"]]), 4)
    assert len(ids.to_list()[0]) == 6  # <eot> <|user|> h i <eot> <|assistant|>: the assistant's turn opened
    ```
    """

    def encode(self, roles, contents, max_new_tokens, whole=False):
        """Conversations `roles`, `contents` (strings [batch, messages]; role "" pads) as a reply to them starts:
        {"ids": ragged ids with the assistant's turn opened, older exchanges dropped and then tokens cut from the left
        to fit `sequence_length - max_new_tokens`, "dropped_turns": how many of each conversation's oldest messages
        were dropped (int32 [batch])}. With `whole`, a conversation whose last message (and system message) does not
        fit is an InvalidArgumentError starting CHAT_TOO_LONG rather than cut, as OpenAI's API answers it
        (`context_length_exceeded`) rather than reply to a fragment."""
        budget = self.sequence_length - max_new_tokens
        ids, _, dropped = self.tokenizer.encode_chat(roles, contents, budget, generation_prompt=True)
        if whole:
            sizes = tf.cast(ids.row_lengths(), tf.int32)
            row = tf.argmax(sizes, output_type=tf.int32)
            message = tf.strings.format(
                CHAT_TOO_LONG + ": conversation {} needs {} tokens for its last message (with the system message "
                f"and the template's markers); the model's context of {self.sequence_length} less {{}} new tokens "
                "leaves {}: ask for fewer new tokens or send a shorter message", (row, sizes[row], max_new_tokens,
                                                                                  budget))
            with tf.control_dependencies([tf.debugging.Assert(tf.reduce_all(sizes <= budget), [message])]):
                ids = tf.identity(ids)
        return {"ids": ids[:, -budget:], "dropped_turns": dropped}

    def chat_ids(self, roles, contents, max_new_tokens, whole=False):
        """The ids of `encode`."""
        return self.encode(roles, contents, max_new_tokens, whole)["ids"]

    def served(self, encoded, replies, num_tokens):
        """The answer to conversations `encode`d as `encoded`, given the generated `replies` and their `num_tokens`:
        {"replies", "num_tokens", "dropped_turns"} (a grounded preprocessor hands some rows off)."""
        return {"replies": replies, "num_tokens": num_tokens, "dropped_turns": encoded["dropped_turns"]}
