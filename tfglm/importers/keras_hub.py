"""Checkpoints in a KerasHub preset directory (`save_to_preset`) of a `BertBackbone` or `GPT2Backbone` and its
tokenizer; the weights are renamed to Hugging Face's names, so one table per architecture maps both sources."""

import os

import numpy as np

from tfglm.data.tokenizers import BytePairTokenizer, WordPieceTokenizer
from tfglm.errors import TfglmError
from tfglm.importers.checkpoint import Checkpoint, read_json


def read(directory):
    """The checkpoint in a KerasHub preset directory, renamed to Hugging Face's names."""
    import keras_hub

    config = read_json(os.path.join(directory, "config.json"))
    name = config.get("class_name")
    if name not in ("BertBackbone", "GPT2Backbone"):
        raise TfglmError(f"{directory}: config.json: class_name: unknown architecture {name!r} "
                         f"(known: BertBackbone, GPT2Backbone)")
    if not os.path.exists(os.path.join(directory, "tokenizer.json")):
        raise TfglmError(f"{directory}: tokenizer.json: missing (save the tokenizer with save_to_preset too)")
    if name == "BertBackbone":
        backbone = keras_hub.models.BertBackbone.from_preset(directory)
        keras_tokenizer = keras_hub.models.BertTokenizer.from_preset(directory)
        tokenizer = WordPieceTokenizer(keras_tokenizer.vocabulary, keras_tokenizer.lowercase)
        return Checkpoint("bert", *_keras_hub_bert(backbone), tokenizer, directory)
    backbone = keras_hub.models.GPT2Backbone.from_preset(directory)
    keras_tokenizer = keras_hub.models.GPT2Tokenizer.from_preset(directory)
    tokenizer = BytePairTokenizer(keras_tokenizer.vocabulary, keras_tokenizer.merges)
    return Checkpoint("gpt2", *_keras_hub_gpt2(backbone), tokenizer, directory)


def _np(variable):
    return np.asarray(variable.numpy())


def _attention(layer):
    """A Keras MultiHeadAttention's query, key, value and output (kernel [in, out], bias [out])."""
    hidden = layer.query_dense.kernel.shape[0]
    q, k, v = ((_np(d.kernel).reshape(hidden, -1), _np(d.bias).reshape(-1))
               for d in (layer.query_dense, layer.key_dense, layer.value_dense))
    out = (_np(layer.output_dense.kernel).reshape(-1, hidden), _np(layer.output_dense.bias))
    return q, k, v, out


def _norm(tensors, name, layer):
    tensors[f"{name}.weight"], tensors[f"{name}.bias"] = _np(layer.gamma), _np(layer.beta)


def _keras_hub_bert(backbone):
    """(Hugging Face config, tensors) of a KerasHub BertBackbone (tanh GELU, epsilon 1e-12)."""
    c = backbone.get_config()
    hf_config = {"vocab_size": c["vocabulary_size"], "num_hidden_layers": c["num_layers"],
                 "num_attention_heads": c["num_heads"], "hidden_size": c["hidden_dim"],
                 "intermediate_size": c["intermediate_dim"], "max_position_embeddings": c["max_sequence_length"],
                 "type_vocab_size": c["num_segments"], "hidden_act": "gelu_new", "layer_norm_eps": 1e-12}
    t = {"embeddings.word_embeddings.weight": _np(backbone.get_layer("token_embedding").embeddings),
         "embeddings.position_embeddings.weight": _np(backbone.get_layer("position_embedding").position_embeddings),
         "embeddings.token_type_embeddings.weight": _np(backbone.get_layer("segment_embedding").embeddings)}
    _norm(t, "embeddings.LayerNorm", backbone.get_layer("embeddings_layer_norm"))
    for i in range(c["num_layers"]):
        block, p = backbone.get_layer(f"transformer_layer_{i}"), f"encoder.layer.{i}."
        q, k, v, out = _attention(block._self_attention_layer)
        for name, (kernel, bias) in (("attention.self.query", q), ("attention.self.key", k),
                                     ("attention.self.value", v), ("attention.output.dense", out),
                                     ("intermediate.dense", _dense(block._feedforward_intermediate_dense)),
                                     ("output.dense", _dense(block._feedforward_output_dense))):
            t[f"{p}{name}.weight"], t[f"{p}{name}.bias"] = kernel.T, bias  # PyTorch's Linear is [out, in]
        _norm(t, f"{p}attention.output.LayerNorm", block._self_attention_layer_norm)
        _norm(t, f"{p}output.LayerNorm", block._feedforward_layer_norm)
    kernel, t["pooler.dense.bias"] = _dense(backbone.get_layer("pooled_dense"))
    t["pooler.dense.weight"] = kernel.T
    return hf_config, t


def _keras_hub_gpt2(backbone):
    """(Hugging Face config, tensors) of a KerasHub GPT2Backbone."""
    c = backbone.get_config()
    hf_config = {"vocab_size": c["vocabulary_size"], "n_layer": c["num_layers"], "n_head": c["num_heads"],
                 "n_embd": c["hidden_dim"], "n_inner": c["intermediate_dim"], "n_positions": c["max_sequence_length"],
                 "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
    t = {"wte.weight": _np(backbone.get_layer("token_embedding").embeddings),
         "wpe.weight": _np(backbone.get_layer("position_embedding").position_embeddings)}
    for i in range(c["num_layers"]):
        block, p = backbone.get_layer(f"transformer_layer_{i}"), f"h.{i}."
        q, k, v, out = _attention(block._self_attention_layer)
        t[f"{p}attn.c_attn.weight"] = np.concatenate([q[0], k[0], v[0]], axis=1)  # Conv1D: [in, out]
        t[f"{p}attn.c_attn.bias"] = np.concatenate([q[1], k[1], v[1]])
        for name, (kernel, bias) in (("attn.c_proj", out), ("mlp.c_fc", _dense(block._feedforward_intermediate_dense)),
                                     ("mlp.c_proj", _dense(block._feedforward_output_dense))):
            t[f"{p}{name}.weight"], t[f"{p}{name}.bias"] = kernel, bias
        _norm(t, f"{p}ln_1", block._self_attention_layer_norm)
        _norm(t, f"{p}ln_2", block._feedforward_layer_norm)
    _norm(t, "ln_f", backbone.get_layer("layer_norm"))
    return hf_config, t


def _dense(layer):
    return _np(layer.kernel), _np(layer.bias)
