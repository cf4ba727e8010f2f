"""Task heads on the backbones: a classifier on a GPT's last token, a classifier on an encoder's [CLS], and the
encoder's masked-LM + next-sentence pretraining heads."""

import keras
import keras_hub
from keras import ops

from tfglm.models.encoder import INIT, Encoder, dummy_inputs, gelu


class GPTClassifier(keras.Model):
    """A GPT with dropout and a linear head on the final hidden state of each text's last token (the one position
    that has seen the whole text). Inputs: {"token_ids": [batch, length] (right-padded), "lengths": [batch]};
    `call` returns [batch, num_classes] logits."""

    def __init__(self, gpt, num_classes, dropout=0.1, **kwargs):
        super().__init__(**kwargs)
        self.gpt = gpt
        self.head_dropout = keras.layers.Dropout(dropout, dtype=gpt.dtype_policy)
        self.head = keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.02),
                                       dtype=gpt.dtype_policy, name="classifier_head")

    def call(self, inputs, training=None):
        hidden, _ = self.gpt.forward(inputs["token_ids"], training=training)
        last = ops.one_hot(inputs["lengths"] - 1, ops.shape(hidden)[1], dtype=hidden.dtype)
        pooled = ops.einsum("bl,blh->bh", last, hidden)
        return ops.cast(self.head(self.head_dropout(pooled, training=training)), "float32")


class EncoderPretrainer(keras.Model):
    """Masked-LM head (output projection tied to the token embeddings) and next-sentence head on the pooled [CLS].
    `call` returns {"mlm": [batch, predictions, vocab], "nsp": [batch, 2]} logits (NSP class 1: B follows A)."""

    def __init__(self, encoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.mlm_head = keras_hub.layers.MaskedLMHead(token_embedding=encoder.token_embedding,
                                                      intermediate_activation=gelu, kernel_initializer=INIT,
                                                      dtype=encoder.dtype_policy, name="mlm_head")
        self.nsp_head = keras.layers.Dense(2, kernel_initializer=INIT, dtype=encoder.dtype_policy, name="nsp_head")

    def call(self, inputs, training=None):
        out = self.encoder(inputs, training=training)
        mlm = self.mlm_head(out["sequence_output"], mask_positions=inputs["mask_positions"])
        return {"mlm": ops.cast(mlm, "float32"), "nsp": ops.cast(self.nsp_head(out["pooled_output"]), "float32")}


class EncoderClassifier(keras.Model):
    """Dropout and a linear layer over the pooled [CLS]; `call` returns [batch, num_classes] logits."""

    def __init__(self, encoder, num_classes, dropout=0.1, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.head_dropout = keras.layers.Dropout(dropout, dtype=encoder.dtype_policy)
        self.head = keras.layers.Dense(num_classes, kernel_initializer=INIT, dtype=encoder.dtype_policy,
                                       name="classifier_head")

    def call(self, inputs, training=None):
        pooled = self.encoder(inputs, training=training)["pooled_output"]
        return ops.cast(self.head(self.head_dropout(pooled, training=training)), "float32")


def build_pretrainer(model_config, vocab_size):
    """The built `EncoderPretrainer` a `tfglm.config.ModelConfig` (kind "bert") describes."""
    model = EncoderPretrainer(Encoder.from_config_tree(model_config, vocab_size))
    model(dummy_inputs(model_config.max_length, predictions=1))
    return model
