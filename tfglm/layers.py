"""Transformer building blocks shared by every tfglm model: attention (with a KV cache), the block (pre-norm, or
post-norm as BERT), the position embedding, the feed-forward activations and LoRA on the blocks' projections.

Owned here rather than taken from keras-hub's `TransformerDecoder`: one fused QKV projection instead of three, and a
per-layer cache updated in place at one position (keras-hub restacks the whole cache of all layers every step).

Every layer and the feed-forward activation are registered under the package "tfglm", so `.keras` files of the models
built from them load without `custom_objects`.
"""

import keras
import keras_hub
from keras import ops


def init():
    """A new N(0, 0.02) initializer for one layer's weights. An unseeded Keras initializer takes its seed when made and
    draws the same stream on every call, so a shared one made the feed-forward output weights a reshaped copy of the
    input weights (and the attention output a slice of the QKV weights)."""
    return keras.initializers.RandomNormal(stddev=0.02)


@keras.saving.register_keras_serializable(package="tfglm")
def gelu(x):
    """GELU (tanh approximation), the default feed-forward activation (GPT-2's)."""
    return keras.activations.gelu(x, approximate=True)


@keras.saving.register_keras_serializable(package="tfglm")
def gelu_exact(x):
    """GELU with the exact error function, BERT's."""
    return keras.activations.gelu(x, approximate=False)


ACTIVATIONS = {"gelu_tanh": gelu, "gelu": gelu_exact}  # the values of `model.activation`


@keras.saving.register_keras_serializable(package="tfglm")
class PositionEmbedding(keras_hub.layers.PositionEmbedding):
    """keras-hub's learned position embedding, fixed for `Model.summary()`: that passes `build`'s argument
    (`inputs_shape`) by name to `compute_output_shape`, which keras-hub names `input_shape` (a TypeError)."""

    def compute_output_shape(self, inputs_shape):
        return inputs_shape


@keras.saving.register_keras_serializable(package="tfglm")
class MultiHeadAttention(keras.layers.Layer):
    """Scaled dot-product attention over `num_heads` heads with a fused QKV projection.

    `causal=True` masks future positions (decoders); an optional `padding_mask` [batch, keys] masks padded keys.
    With `cache` ([batch, 2, heads, max_length, head_dim]) the new keys/values are written at `index` and the query
    attends to every cached position up to its own; the updated cache is returned. `index` is a scalar (every row at
    the same positions) or, for one token a row, a vector [batch] of each row's position (a decode engine's slots).

    `cross=True` makes it cross-attention: queries from `x`, keys and values (a fused KV projection) from `context`
    [batch, keys, hidden], or from `cache` when given: `key_values(context)`, computed once per source for decoding.

    Keys and values are kept heads-major ([batch, heads, length, head_dim]), the layout the attention matmuls read:
    decoding then reads the cache as it is, where a [length, heads] layout made XLA transpose the whole cache of
    every layer at every step (2.5x the cost of the blocks at batch 8).
    """

    def __init__(self, num_heads, dropout=0.0, causal=True, cross=False, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.dropout = dropout
        self.causal = causal and not cross
        self.cross = cross

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        self.head_dim = hidden_dim // self.num_heads
        if self.cross:
            self.query = keras.layers.Dense(hidden_dim, kernel_initializer=init(), dtype=self.dtype_policy,
                                            name="query")
            self.key_value = keras.layers.Dense(2 * hidden_dim, kernel_initializer=init(), dtype=self.dtype_policy,
                                                name="key_value")
            self.query.build(input_shape)
            self.key_value.build(input_shape)
        else:
            self.qkv = keras.layers.Dense(3 * hidden_dim, kernel_initializer=init(), dtype=self.dtype_policy,
                                          name="qkv")
            self.qkv.build(input_shape)
        self.output_dense = keras.layers.Dense(hidden_dim, kernel_initializer=init(), dtype=self.dtype_policy,
                                               name="output")
        self.output_dense.build(input_shape)
        self.attention_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)

    def _split_heads(self, projected, parts):
        """[batch, length, parts * hidden] -> [batch, parts, heads, length, head_dim]."""
        shape = (ops.shape(projected)[0], ops.shape(projected)[1], parts, self.num_heads, self.head_dim)
        return ops.transpose(ops.reshape(projected, shape), (0, 2, 3, 1, 4))

    def key_values(self, context):
        """Cross-attention keys and values of `context`, as a cache [batch, 2, heads, keys, head_dim]."""
        return self._split_heads(self.key_value(context), 2)

    def call(self, x, cache=None, index=0, padding_mask=None, context=None, training=None):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        if self.cross:
            query = self._split_heads(self.query(x), 1)[:, 0]
            cache = self.key_values(context) if cache is None else cache
            key_value = cache
        else:
            qkv = self._split_heads(self.qkv(x), 3)
            query, key_value = qkv[:, 0], qkv[:, 1:]
            if cache is not None:
                cache = key_value = write_cache(cache, key_value, index)
        key, value = key_value[:, 0], key_value[:, 1]
        scores = ops.einsum("bhqd,bhkd->bhqk", query, key) * (self.head_dim ** -0.5)
        scores = ops.cast(scores, "float32")
        mask = None
        if self.causal:  # [queries, keys], or [batch, 1, 1, keys] for one query a row at per-row positions
            keys = ops.arange(ops.shape(key)[2])
            if len(getattr(index, "shape", ())) == 1:
                mask = (keys[None, :] <= index[:, None])[:, None, None, :]
            else:
                mask = keys[None, :] <= (ops.arange(length) + index)[:, None]
        if padding_mask is not None:
            keys_mask = ops.cast(padding_mask, "bool")[:, None, None, :]
            mask = keys_mask if mask is None else ops.logical_and(mask, keys_mask)
        if mask is not None:
            scores = ops.where(mask, scores, -1e9)
        probs = ops.cast(ops.softmax(scores, axis=-1), self.compute_dtype)
        probs = self.attention_dropout(probs, training=training)
        out = ops.transpose(ops.einsum("bhqk,bhkd->bhqd", probs, value), (0, 2, 1, 3))
        out = ops.reshape(out, (batch, length, self.num_heads * self.head_dim))
        return self.output_dense(out), cache

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "dropout": self.dropout, "causal": self.causal,
                "cross": self.cross}


def write_cache(cache, key_value, index):
    """`cache` [batch, 2, heads, length, head_dim] with `key_value` [batch, 2, heads, new, head_dim] written at
    position `index`, a scalar, or a vector [batch] (one new position a row: a scatter of one entry a row and head)."""
    if len(getattr(index, "shape", ())) == 0:
        return ops.slice_update(cache, (0, 0, 0, index, 0), key_value)
    batch, _, heads = ops.shape(cache)[0], ops.shape(cache)[1], ops.shape(cache)[2]
    grid = ops.meshgrid(ops.arange(batch), ops.arange(2), ops.arange(heads), indexing="ij")
    rows = [ops.reshape(g, (-1,)) for g in grid]
    indices = ops.stack(rows + [ops.take(index, rows[0])], axis=1)
    return ops.scatter_update(cache, indices, ops.reshape(key_value, (-1, ops.shape(key_value)[-1])))


@keras.saving.register_keras_serializable(package="tfglm")
class TransformerBlock(keras.layers.Layer):
    """Pre-norm block: x + attention(norm(x)), then x + feed_forward(norm(x)) with a GELU feed-forward.
    `norm_first=False` makes it post-norm as BERT: norm(x + attention(x)), then norm(x + feed_forward(x)), with the
    same weights; `activation` names the GELU (`ACTIVATIONS`).

    `cross_attention=True` makes it an encoder-decoder's decoder block: between the two, x + cross_attention(norm(x))
    over `context` (the encoder output; padded keys masked by `context_mask`), or over `cross_cache`, its
    precomputed keys and values.
    """

    def __init__(self, num_heads, intermediate_dim, dropout=0.0, causal=True, epsilon=1e-5, cross_attention=False,
                 norm_first=True, activation="gelu_tanh", **kwargs):
        super().__init__(**kwargs)
        self.norm_first = norm_first
        self.activation = activation
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.causal = causal
        self.epsilon = epsilon
        self.cross_attention = cross_attention

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        policy = self.dtype_policy
        self.attention_norm = keras.layers.LayerNormalization(epsilon=self.epsilon, dtype=policy, name="attention_norm")
        self.attention = MultiHeadAttention(self.num_heads, self.dropout, self.causal, dtype=policy, name="attention")
        self.feed_forward_norm = keras.layers.LayerNormalization(epsilon=self.epsilon, dtype=policy,
                                                                 name="feed_forward_norm")
        self.feed_forward_in = keras.layers.Dense(self.intermediate_dim, kernel_initializer=init(), dtype=policy,
                                                  activation=ACTIVATIONS[self.activation],
                                                  name="feed_forward_in")
        self.feed_forward_out = keras.layers.Dense(hidden_dim, kernel_initializer=init(), dtype=policy,
                                                   name="feed_forward_out")
        self.residual_dropout = keras.layers.Dropout(self.dropout, dtype=policy)
        for layer in (self.attention_norm, self.attention, self.feed_forward_norm, self.feed_forward_in):
            layer.build(input_shape)
        if self.cross_attention:
            self.cross_attention_norm = keras.layers.LayerNormalization(epsilon=self.epsilon, dtype=policy,
                                                                        name="cross_attention_norm")
            self.cross_attention_layer = MultiHeadAttention(self.num_heads, self.dropout, cross=True, dtype=policy,
                                                            name="cross_attention")
            self.cross_attention_norm.build(input_shape)
            self.cross_attention_layer.build(input_shape)
        self.feed_forward_out.build((*input_shape[:-1], self.intermediate_dim))

    def call(self, x, cache=None, index=0, padding_mask=None, context=None, context_mask=None, cross_cache=None,
             training=None):
        x, cache = self._residual(x, self.attention_norm, training, lambda h: self.attention(
            h, cache=cache, index=index, padding_mask=padding_mask, training=training))
        if self.cross_attention:
            x, _ = self._residual(x, self.cross_attention_norm, training, lambda h: self.cross_attention_layer(
                h, cache=cross_cache, padding_mask=context_mask, context=context, training=training))
        x, _ = self._residual(x, self.feed_forward_norm, training,
                              lambda h: (self.feed_forward_out(self.feed_forward_in(h)), None))
        return x, cache

    def _residual(self, x, norm, training, sublayer):
        """x + sublayer(norm(x)) (pre-norm) or norm(x + sublayer(x)) (post-norm); sublayer returns (h, cache)."""
        h, cache = sublayer(norm(x) if self.norm_first else x)
        x = x + self.residual_dropout(h, training=training)
        return (x if self.norm_first else norm(x)), cache

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "intermediate_dim": self.intermediate_dim,
                "dropout": self.dropout, "causal": self.causal, "epsilon": self.epsilon,
                "cross_attention": self.cross_attention, "norm_first": self.norm_first, "activation": self.activation}


def enable_lora(model, rank):
    """LoRA of `rank` (Keras's `Dense.enable_lora`) on every block's attention and feed-forward projections in
    `model`, and every other weight of `model` frozen: only the LoRA factors train. Keras saves a LoRA layer's kernel
    merged (kernel + a @ b * alpha / rank) and without its factors, so checkpoints load into the plain model."""
    for layer in model._flatten_layers():
        if isinstance(layer, TransformerBlock):
            attentions = [layer.attention] + ([layer.cross_attention_layer] if layer.cross_attention else [])
            projections = [layer.feed_forward_in, layer.feed_forward_out]
            for attention in attentions:
                projections += [attention.query, attention.key_value] if attention.cross else [attention.qkv]
                projections.append(attention.output_dense)
            for dense in projections:
                dense.enable_lora(rank)
    for variable in model.variables:
        variable.trainable = "lora_kernel" in variable.path


def lora_variables(model):
    """Every LoRA layer's frozen kernel and both factors in `model`, in layer order (their paths carry auto-numbered
    names): the unmerged state that a checkpoint, which Keras writes merged, cannot give back."""
    return [v for layer in model._flatten_layers() if getattr(layer, "lora_enabled", False)
            for v in (layer._kernel, layer.lora_kernel_a, layer.lora_kernel_b)]
