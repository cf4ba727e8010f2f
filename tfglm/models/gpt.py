"""Transformer language models built from `tfglm.layers`."""

import keras
from keras import ops

from tfglm.layers import PositionEmbedding, TransformerBlock, init


@keras.saving.register_keras_serializable(package="tfglm")
class GPT(keras.Model):
    """Decoder-only Transformer: token + learned position embeddings, pre-norm causal blocks, final norm, and an
    output projection tied to the token embeddings.

    `call(token_ids)` returns next-token logits [batch, length, vocab] for training with `fit`; `forward` and
    `logits` are the cached path used by `tfglm.generation.decode`. `cross_attention=True` makes it the decoder of
    an `EncoderDecoder`: its blocks also attend to an encoded source (`forward`'s `context` or `cross_caches`).

    Examples:
    ```python
    import numpy as np
    from tfglm.models.gpt import GPT

    gpt = GPT(vocab_size=100, num_layers=2, num_heads=2, hidden_dim=32, max_length=16)
    logits = gpt(np.array([[5, 17, 42]]))  # [1, 3, 100]

    caches = gpt.init_cache(batch_size=1, length=16)  # the same logits, one token at a time
    hidden, caches = gpt.forward(np.array([[5, 17]]), caches, index=0)
    hidden, caches = gpt.forward(np.array([[42]]), caches, index=2)
    last = gpt.logits(hidden)  # logits[:, 2:] again, from the cache
    ```
    """

    def __init__(self, vocab_size, num_layers=4, num_heads=4, hidden_dim=128, intermediate_dim=0, max_length=64,
                 dropout=0.0, cross_attention=False, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim or 4 * hidden_dim
        self.max_length = max_length
        self.dropout = dropout
        self.cross_attention = cross_attention
        self.token_embedding = keras.layers.ReversibleEmbedding(vocab_size, hidden_dim, embeddings_initializer=init(),
                                                                dtype=self.dtype_policy, name="token_embedding")
        self.position_embedding = PositionEmbedding(max_length, initializer=init(), dtype=self.dtype_policy,
                                                    name="position_embedding")
        self.embedding_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.blocks = [TransformerBlock(num_heads, self.intermediate_dim, dropout, causal=True,
                                        cross_attention=cross_attention, dtype=self.dtype_policy, name=f"block_{i}")
                       for i in range(num_layers)]
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-5, dtype=self.dtype_policy, name="final_norm")

    def build(self, input_shape=(None, None)):
        self.token_embedding.build(input_shape)
        hidden_shape = (*input_shape, self.hidden_dim)
        self.position_embedding.build(hidden_shape)
        for block in self.blocks:
            block.build(hidden_shape)
        self.final_norm.build(hidden_shape)
        self.built = True

    def call(self, token_ids, training=None):
        hidden, _ = self.forward(token_ids, training=training)
        return self.logits(hidden)

    def forward(self, token_ids, caches=None, index=0, training=None, context=None, context_mask=None,
                cross_caches=None):
        """Hidden states [batch, length, hidden] for tokens at positions index.. (and the updated per-layer caches);
        `index` may be a vector [batch] of per-row positions for one token a row (with caches). Cross-attention blocks attend to `context` or its per-layer `cross_caches`."""
        x = self.token_embedding(token_ids)
        if len(getattr(index, "shape", ())) == 1:  # one token a row, each at its own position
            positions = ops.take(self.position_embedding.position_embeddings, index, axis=0)[:, None]
        else:
            positions = self.position_embedding(x, start_index=index)
        x = self.embedding_dropout(x + ops.cast(positions, x.dtype), training=training)
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, cache = block(x, cache=None if caches is None else caches[i], index=index, context=context,
                             context_mask=context_mask, cross_cache=None if cross_caches is None else cross_caches[i],
                             training=training)
            new_caches.append(cache)
        return self.final_norm(x), (None if caches is None else new_caches)

    def logits(self, hidden, projection=None):
        """Next-token logits (float32) of `hidden`, through the tied embeddings or a given `output_projection()`."""
        if projection is None:
            return ops.cast(self.token_embedding(hidden, reverse=True), "float32")
        return ops.cast(ops.matmul(hidden, projection), "float32")

    def output_projection(self):
        """The output matrix [hidden, vocab]: the token embeddings, transposed. Decode loops take it once, outside
        the loop: `hidden @ embeddingsᵀ` inside it costs twice as much at batch 8 (XLA re-reads the transpose)."""
        return ops.transpose(ops.cast(self.token_embedding.embeddings, self.compute_dtype))

    def init_cache(self, batch_size, length):
        """Empty key/value caches, one [batch, 2, heads, length, head_dim] tensor per layer."""
        shape = (batch_size, 2, self.num_heads, length, self.hidden_dim // self.num_heads)
        return [ops.zeros(shape, dtype=self.compute_dtype) for _ in self.blocks]

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim, "max_length": self.max_length, "dropout": self.dropout,
                "cross_attention": self.cross_attention}

    @classmethod
    def from_config_tree(cls, model_config, vocab_size):
        """Builds the model a `tfglm.config.ModelConfig` describes."""
        model = cls(vocab_size=vocab_size, num_layers=model_config.num_layers, num_heads=model_config.num_heads,
                    hidden_dim=model_config.hidden_dim, intermediate_dim=model_config.intermediate_dim,
                    max_length=model_config.max_length, dropout=model_config.dropout)
        model.build()
        return model
