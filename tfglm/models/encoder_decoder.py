"""Encoder-decoder Transformer for translation, from the same `tfglm.layers` blocks as the GPT (decoded by
`tfglm.generation.beam`)."""

import os
import shutil
import tempfile

import h5py
import keras

from tfglm.data.parallel import PAD
from tfglm.layers import PositionEmbedding, TransformerBlock, init
from tfglm.models.gpt import GPT

# Where a weight file of the EncoderDecoder that subclassed GPT (before the decoder was its own model) keeps each
# group, and where this class keeps it; applied in this order.
LEGACY_PATHS = {"blocks": "decoder/blocks", "final_norm": "decoder/final_norm",
                "layers/reversible_embedding": "decoder/layers/reversible_embedding",
                "layers/position_embedding": "decoder/layers/position_embedding",
                "layers/position_embedding_1": "layers/position_embedding"}


@keras.saving.register_keras_serializable(package="tfglm")
class EncoderDecoder(keras.Model):
    """A bidirectional encoder over the source (padded keys masked), and a `decoder`: a GPT whose blocks also
    cross-attend to the encoder output. The decoder's token embedding serves source, target and the output
    projection.

    `call({"source_ids", "target_ids"})` returns next-token logits [batch, target_length, vocab] (teacher forcing);
    source padding is id 0. `load_weights` also reads the weight files of the class before it owned its decoder.

    Examples:
    ```python
    import numpy as np
    from tfglm.generation.beam import greedy_search
    from tfglm.models.encoder_decoder import EncoderDecoder

    model = EncoderDecoder(vocab_size=100, num_layers=2, num_heads=2, hidden_dim=32, max_length=16)
    source_ids = np.array([[5, 17, 42, 0]])  # 0 pads
    logits = model({"source_ids": source_ids, "target_ids": np.array([[1, 8, 9]])})  # [1, 3, 100]
    tokens, generated = greedy_search(model, source_ids, total=16, eot_id=1)  # tokens [1, 16] from <eot> (id 1)
    ```
    """

    def __init__(self, vocab_size, num_layers=4, num_heads=4, hidden_dim=128, intermediate_dim=0, max_length=64,
                 dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim or 4 * hidden_dim
        self.max_length = max_length
        self.dropout = dropout
        policy = self.dtype_policy
        # First, so that its variables come first, as when this class was a GPT (the optimizer's slots follow them).
        self.decoder = GPT(vocab_size, num_layers, num_heads, hidden_dim, self.intermediate_dim, max_length, dropout,
                           cross_attention=True, dtype=policy, name="decoder")
        self.source_position_embedding = PositionEmbedding(
            max_length, initializer=init(), dtype=policy,
            name="source_position_embedding")
        self.embedding_dropout = keras.layers.Dropout(dropout, dtype=policy)
        self.encoder_blocks = [TransformerBlock(num_heads, self.intermediate_dim, dropout, causal=False, dtype=policy,
                                                name=f"encoder_block_{i}") for i in range(num_layers)]
        self.encoder_norm = keras.layers.LayerNormalization(epsilon=1e-5, dtype=policy, name="encoder_norm")

    def build(self, input_shape=None):
        self.decoder.build()
        hidden_shape = (None, None, self.hidden_dim)
        for layer in (self.source_position_embedding, *self.encoder_blocks, self.encoder_norm):
            layer.build(hidden_shape)

    def encode(self, source_ids, training=None):
        """The encoder output [batch, source_length, hidden]."""
        x = self.decoder.token_embedding(source_ids)
        x = self.embedding_dropout(x + self.source_position_embedding(x), training=training)
        for block in self.encoder_blocks:
            x, _ = block(x, padding_mask=source_ids != PAD, training=training)
        return self.encoder_norm(x)

    def call(self, inputs, training=None):
        source_ids = inputs["source_ids"]
        hidden, _ = self.decoder.forward(inputs["target_ids"], context=self.encode(source_ids, training),
                                         context_mask=source_ids != PAD, training=training)
        return self.decoder.logits(hidden)

    def cross_caches(self, context):
        """Each decoder layer's cross-attention keys and values of `context`."""
        return [block.cross_attention_layer.key_values(context) for block in self.decoder.blocks]

    def load_weights(self, filepath, *args, **kwargs):
        """`keras.Model.load_weights`; a legacy weight file (see `LEGACY_PATHS`) is read through a copy with its
        groups moved."""
        if not _is_legacy(filepath):
            return super().load_weights(filepath, *args, **kwargs)
        with tempfile.TemporaryDirectory() as tmp:
            moved = os.path.join(tmp, "moved.weights.h5")
            shutil.copyfile(filepath, moved)
            with h5py.File(moved, "r+") as f:
                for old, new in LEGACY_PATHS.items():
                    f.move(old, new)
            return super().load_weights(moved, *args, **kwargs)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim, "max_length": self.max_length, "dropout": self.dropout}

    @classmethod
    def from_config_tree(cls, model_config, vocab_size):
        """Builds the model a `tfglm.config.ModelConfig` (kind "translate") describes."""
        model = cls(vocab_size=vocab_size, num_layers=model_config.num_layers, num_heads=model_config.num_heads,
                    hidden_dim=model_config.hidden_dim, intermediate_dim=model_config.intermediate_dim,
                    max_length=model_config.max_length, dropout=model_config.dropout)
        model.build()
        return model


def _is_legacy(filepath):
    """Whether `filepath` is a weight file of the EncoderDecoder that subclassed GPT (its decoder blocks at the top)."""
    if not str(filepath).endswith(".weights.h5"):
        return False
    with h5py.File(filepath, "r") as f:
        return "blocks" in f
