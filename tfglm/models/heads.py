"""Task heads on the backbones: a classifier on a GPT's last token, a classifier on an encoder's [CLS] or mean token,
and the encoder's masked-LM + next-sentence pretraining heads.

Each takes its backbone as a constructor argument; `get_config` holds the backbone's serialized config, and
`from_config` rebuilds it from there.
"""

import keras
import keras_hub
from keras import ops

from tfglm.layers import ACTIVATIONS, init
from tfglm.models.encoder import Encoder, dummy_inputs


@keras.saving.register_keras_serializable(package="tfglm")
class GPTClassifier(keras.Model):
    """A GPT with dropout and a linear head on the final hidden state of each text's last token (the one position
    that has seen the whole text). Inputs: {"token_ids": [batch, length] (right-padded), "lengths": [batch]};
    `call` returns [batch, num_classes] logits.

    Examples:
    ```python
    import numpy as np
    from tfglm.models.gpt import GPT
    from tfglm.models.heads import GPTClassifier

    gpt = GPT(vocab_size=100, num_layers=2, num_heads=2, hidden_dim=32, max_length=16)
    classifier = GPTClassifier(gpt, num_classes=3)
    logits = classifier({"token_ids": np.array([[5, 17, 42, 0], [8, 9, 0, 0]]), "lengths": np.array([3, 2])})
    ```
    """

    def __init__(self, gpt, num_classes, dropout=0.1, **kwargs):
        super().__init__(**kwargs)
        self.gpt = gpt
        self.num_classes = num_classes
        self.dropout = dropout
        self.head_dropout = keras.layers.Dropout(dropout, dtype=gpt.dtype_policy)
        self.head = keras.layers.Dense(num_classes, kernel_initializer=init(),
                                       dtype=gpt.dtype_policy, name="classifier_head")

    def build(self, input_shape=None):
        if not self.gpt.built:  # the head calls `gpt.forward`, which would build its layers but not the GPT
            self.gpt.build()
        self.head.build((None, self.gpt.hidden_dim))

    def call(self, inputs, training=None):
        hidden, _ = self.gpt.forward(inputs["token_ids"], training=training)
        last = ops.one_hot(inputs["lengths"] - 1, ops.shape(hidden)[1], dtype=hidden.dtype)
        pooled = ops.einsum("bl,blh->bh", last, hidden)
        return ops.cast(self.head(self.head_dropout(pooled, training=training)), "float32")

    def get_config(self):
        return {**super().get_config(), "gpt": keras.saving.serialize_keras_object(self.gpt),
                "num_classes": self.num_classes, "dropout": self.dropout}

    @classmethod
    def from_config(cls, config):
        return cls(**{**config, "gpt": keras.saving.deserialize_keras_object(config["gpt"])})


@keras.saving.register_keras_serializable(package="tfglm")
class EncoderPretrainer(keras.Model):
    """Masked-LM head (output projection tied to the token embeddings) and next-sentence head on the pooled [CLS].
    `call` returns {"mlm": [batch, predictions, vocab], "nsp": [batch, 2]} logits (NSP class 1: B follows A).

    Examples:
    ```python
    from tfglm.models.encoder import Encoder, dummy_inputs
    from tfglm.models.heads import EncoderPretrainer

    pretrainer = EncoderPretrainer(Encoder(vocab_size=100, num_layers=2, num_heads=2, hidden_dim=32, max_length=16))
    inputs = dummy_inputs(length=8, predictions=2)  # token_ids, segment_ids, padding_mask, mask_positions
    out = pretrainer(inputs)
    out["mlm"].shape, out["nsp"].shape  # (1, 2, 100), (1, 2)
    ```
    """

    def __init__(self, encoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.mlm_head = keras_hub.layers.MaskedLMHead(token_embedding=encoder.token_embedding,
                                                      intermediate_activation=ACTIVATIONS[encoder.activation],
                                                      layer_norm_epsilon=encoder.layer_norm_epsilon,
                                                      kernel_initializer=init(),
                                                      dtype="float32", name="mlm_head")
        self.nsp_head = keras.layers.Dense(2, kernel_initializer=init(), dtype=encoder.dtype_policy, name="nsp_head")

    def call(self, inputs, training=None):
        # The MLM head computes in float32: keras-hub's MaskedLMHead adds its bias unconverted, which fails under
        # mixed_bfloat16.
        out = self.encoder(inputs, training=training)
        mlm = self.mlm_head(out["sequence_output"], mask_positions=inputs["mask_positions"])
        return {"mlm": ops.cast(mlm, "float32"), "nsp": ops.cast(self.nsp_head(out["pooled_output"]), "float32")}

    def get_config(self):
        return {**super().get_config(), "encoder": keras.saving.serialize_keras_object(self.encoder)}

    @classmethod
    def from_config(cls, config):
        return cls(**{**config, "encoder": keras.saving.deserialize_keras_object(config["encoder"])})


@keras.saving.register_keras_serializable(package="tfglm")
class EncoderClassifier(keras.Model):
    """Dropout and a linear layer over the text's vector: with `pooling` "cls" the encoder's pooled [CLS], with "mean"
    the mean of its last hidden states over the unpadded tokens (what a sentence-transformers model was trained to
    give); `call` returns [batch, num_classes] logits.

    Examples:
    ```python
    from tfglm.models.encoder import Encoder, dummy_inputs
    from tfglm.models.heads import EncoderClassifier

    encoder = Encoder(vocab_size=100, num_layers=2, num_heads=2, hidden_dim=32, max_length=16)
    logits = EncoderClassifier(encoder, num_classes=3)(dummy_inputs(length=8))  # [1, 3]
    ```
    """

    def __init__(self, encoder, num_classes, dropout=0.1, pooling="cls", **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.num_classes = num_classes
        self.dropout = dropout
        self.pooling = pooling
        if pooling == "mean":
            encoder.pooler.trainable = False  # unread: no gradient would reach it
        self.head_dropout = keras.layers.Dropout(dropout, dtype=encoder.dtype_policy)
        self.head = keras.layers.Dense(num_classes, kernel_initializer=init(), dtype=encoder.dtype_policy,
                                       name="classifier_head")

    def call(self, inputs, training=None):
        out = self.encoder(inputs, training=training)
        if self.pooling == "mean":
            pooled = mean_pool(out["sequence_output"], inputs["padding_mask"])
        else:
            pooled = out["pooled_output"]
        return ops.cast(self.head(self.head_dropout(pooled, training=training)), "float32")

    def get_config(self):
        return {**super().get_config(), "encoder": keras.saving.serialize_keras_object(self.encoder),
                "num_classes": self.num_classes, "dropout": self.dropout, "pooling": self.pooling}

    @classmethod
    def from_config(cls, config):
        return cls(**{**config, "encoder": keras.saving.deserialize_keras_object(config["encoder"])})


def mean_pool(hidden, padding_mask):
    """The mean of `hidden` [batch, length, dim] over each row's unpadded tokens (a sentence-transformers model's
    text vector)."""
    mask = ops.cast(padding_mask, hidden.dtype)[..., None]
    return ops.sum(hidden * mask, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1)


def build_pretrainer(model_config, vocab_size):
    """The built `EncoderPretrainer` a `tfglm.config.ModelConfig` (kind "bert") describes."""
    model = EncoderPretrainer(Encoder.from_config_tree(model_config, vocab_size))
    model(dummy_inputs(model_config.max_length, predictions=1))
    return model
