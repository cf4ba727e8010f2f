"""Classifier preprocessors: texts to the inputs of a classification head, in the graph, for training, `predict` and
the export alike. An encoder reads `[CLS] text [SEP]` (keras-hub's `MultiSegmentPacker`); a GPT reads `<eot>` + text
and is classified on its last token (`CausalLMPreprocessor`'s inputs)."""

import keras

from tfglm.data.tokenizers import packer
from tfglm.preprocessors.causal_lm import CausalLMPreprocessor


class EncoderClassifierPreprocessor(keras.layers.Layer):
    """Texts to an encoder classifier's inputs: `[CLS] text [SEP]`, cut to `sequence_length` and padded with [PAD].

    Examples:
    ```python
    import tensorflow as tf
    from tfglm.data.tokenizers import train_wordpiece
    from tfglm.preprocessors import EncoderClassifierPreprocessor

    tokenizer = train_wordpiece(["the cat sat", "a dog ran"], 64)
    preprocessor = EncoderClassifierPreprocessor(tokenizer, sequence_length=8)
    inputs = preprocessor(tf.constant(["the cat"]))  # [CLS] the cat [SEP] [PAD] ...
    assert inputs["token_ids"].shape == (1, 8) and inputs["padding_mask"].numpy().sum() == 4
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


class DecoderClassifierPreprocessor(CausalLMPreprocessor):
    """Texts to a GPT classifier's inputs: `<eot>` + text (its training context) cut to `sequence_length`, padded
    with `<eot>`, and each row's length, whose last token the head reads (`CausalLMPreprocessor.call`)."""
