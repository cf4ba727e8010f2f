"""The encoder preprocessor: texts to an encoder's inputs, `[CLS] text [SEP]` packed by keras-hub's
`MultiSegmentPacker`, in the graph, for a classifier's training, `predict` and export and for sentence embeddings."""

import keras

from tfglm.data.tokenizers import packer


class EncoderPreprocessor(keras.layers.Layer):
    """Texts to an encoder's inputs: `[CLS] text [SEP]`, cut to `sequence_length` and padded with [PAD].

    Examples:
    ```python
    import tensorflow as tf
    from tfglm.data.tokenizers import train_wordpiece
    from tfglm.preprocessors import EncoderPreprocessor

    tokenizer = train_wordpiece(["the cat sat", "a dog ran"], 64)
    preprocessor = EncoderPreprocessor(tokenizer, sequence_length=16)
    inputs = preprocessor(tf.constant(["the cat"]))  # [CLS] the cat [SEP] [PAD] ...
    tokens = tokenizer.tokenize(tf.constant(["the cat"]))[0]
    assert inputs["token_ids"].shape == (1, 16) and inputs["padding_mask"].numpy().sum() == len(tokens) + 2
    ```
    """

    def __init__(self, tokenizer, sequence_length, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.packer = packer(tokenizer, sequence_length)

    def call(self, texts):
        """{"token_ids", "segment_ids": int32 [batch, sequence_length], "padding_mask": bool, the same shape}."""
        token_ids, segment_ids = self.packer(self.tokenizer.tokenize(texts))
        return {"token_ids": token_ids, "segment_ids": segment_ids, "padding_mask": token_ids != self.tokenizer.pad_id}

    def get_config(self):
        return {**super().get_config(), "sequence_length": self.sequence_length}
