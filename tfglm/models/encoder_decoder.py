"""Encoder-decoder Transformer for translation, from the same `tfglm.layers` blocks as the GPT (decoded by
`tfglm.generation.beam`)."""

import keras
import keras_hub

from tfglm.data.parallel import PAD
from tfglm.layers import TransformerBlock
from tfglm.models.gpt import GPT


class EncoderDecoder(GPT):
    """A bidirectional encoder over the source (padded keys masked), and a GPT decoder whose blocks also cross-attend
    to the encoder output. One token embedding serves source, target and the output projection.

    `call({"source_ids", "target_ids"})` returns next-token logits [batch, target_length, vocab] (teacher forcing);
    source padding is id 0.
    """

    def __init__(self, vocab_size, num_layers=4, num_heads=4, hidden_dim=128, intermediate_dim=0, max_length=64,
                 dropout=0.0, **kwargs):
        super().__init__(vocab_size, num_layers, num_heads, hidden_dim, intermediate_dim, max_length, dropout,
                         cross_attention=True, **kwargs)
        init = keras.initializers.RandomNormal(stddev=0.02)
        self.source_position_embedding = keras_hub.layers.PositionEmbedding(
            max_length, initializer=init, dtype=self.dtype_policy, name="source_position_embedding")
        self.encoder_blocks = [TransformerBlock(num_heads, self.intermediate_dim, dropout, causal=False,
                                                dtype=self.dtype_policy, name=f"encoder_block_{i}")
                               for i in range(num_layers)]
        self.encoder_norm = keras.layers.LayerNormalization(epsilon=1e-5, dtype=self.dtype_policy, name="encoder_norm")

    def build(self, input_shape=None):
        super().build()
        hidden_shape = (None, None, self.hidden_dim)
        self.source_position_embedding.build(hidden_shape)
        for block in self.encoder_blocks:
            block.build(hidden_shape)
        self.encoder_norm.build(hidden_shape)

    def encode(self, source_ids, training=None):
        """The encoder output [batch, source_length, hidden]."""
        x = self.token_embedding(source_ids)
        x = self.embedding_dropout(x + self.source_position_embedding(x), training=training)
        for block in self.encoder_blocks:
            x, _ = block(x, padding_mask=source_ids != PAD, training=training)
        return self.encoder_norm(x)

    def call(self, inputs, training=None):
        source_ids = inputs["source_ids"]
        hidden, _ = self.forward(inputs["target_ids"], context=self.encode(source_ids, training),
                                 context_mask=source_ids != PAD, training=training)
        return self.logits(hidden)

    def cross_caches(self, context):
        """Each decoder layer's cross-attention keys and values of `context`."""
        return [block.cross_attention_layer.key_values(context) for block in self.blocks]
