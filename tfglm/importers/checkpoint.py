"""A pretrained checkpoint in Hugging Face's tensor names, and how it maps onto tfglm: the `model` and `tokenizer`
config it describes and the weights of a tfglm encoder or GPT. Every tensor's shape is checked; a missing or
misshapen tensor or a missing config field is one `TfglmError` naming it."""

import json
import logging
import os

import numpy as np

from tfglm.errors import TfglmError

log = logging.getLogger("tfglm")
TASK_OF = {"bert": "masked_lm", "gpt2": "causal_lm"}  # the task of the run an architecture's checkpoint becomes
EMBED_TASK = "embed"  # the task of a mean-pooling sentence-transformers encoder's run


class Checkpoint:
    """An architecture ("bert", "gpt2"), its Hugging Face config, named tensors and tokenizer, and how it pools a
    text into one vector (`model.pooling`); `where` names the source in errors."""

    def __init__(self, architecture, hf_config, tensors, tokenizer, where, pooling="cls"):
        self.architecture, self.hf_config, self.tokenizer, self.where = architecture, hf_config, tokenizer, where
        self.pooling = pooling
        self.tensors = {_canonical(name): value for name, value in tensors.items()}

    @property
    def task(self):
        """The task of the run the checkpoint becomes: a sentence-transformers encoder that mean-pools embeds."""
        return EMBED_TASK if self.pooling == "mean" else TASK_OF[self.architecture]

    def field(self, name, default=None):
        value = self.hf_config.get(name, default)
        if value is None:
            raise TfglmError(f"{self.where}: config.json: {name}: missing")
        return value

    def has(self, name):
        return name in self.tensors

    def tensor(self, name, shape):
        """The tensor `name` as a float32 array, which must have `shape`."""
        if name not in self.tensors:
            raise TfglmError(f"{self.where}: tensor {name}: missing")
        value = np.asarray(self.tensors[name])
        if tuple(value.shape) != tuple(shape):
            raise TfglmError(f"{self.where}: tensor {name}: shape {tuple(value.shape)}, expected {tuple(shape)}")
        return value.astype(np.float32)


def _canonical(name):
    """Hugging Face names without a task model's prefix ("bert.", "transformer.") and with old BERT checkpoints'
    LayerNorm gamma/beta as weight/bias."""
    for prefix in ("bert.", "transformer."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def read_json(path):
    """The JSON file at `path`; a missing or damaged file is one line naming it."""
    if not os.path.exists(path):
        raise TfglmError(f"{path}: missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TfglmError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); the file is damaged") from None


def model_config(checkpoint):
    """The `model` and `tokenizer` config values the checkpoint's Hugging Face config describes."""
    ck = checkpoint
    if ck.architecture == "bert":
        if ck.hf_config.get("position_embedding_type", "absolute") != "absolute":
            raise TfglmError(f"{ck.where}: config.json: position_embedding_type: only 'absolute' is supported")
        activation = ck.field("hidden_act")
        if activation not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise TfglmError(f"{ck.where}: config.json: hidden_act: {activation!r} is not supported "
                             f"(gelu, gelu_new, gelu_pytorch_tanh)")
        model = {"kind": "bert", "num_layers": ck.field("num_hidden_layers"),
                 "num_heads": ck.field("num_attention_heads"), "hidden_dim": ck.field("hidden_size"),
                 "intermediate_dim": ck.field("intermediate_size"), "max_length": ck.field("max_position_embeddings"),
                 "num_segments": ck.field("type_vocab_size", 2), "norm_first": False,
                 "activation": "gelu" if activation == "gelu" else "gelu_tanh",
                 "layer_norm_epsilon": float(ck.field("layer_norm_eps", 1e-12)), "pooling": ck.pooling}
        return {"model": model, "tokenizer": {"kind": "wordpiece"}}
    activation = ck.field("activation_function", "gelu_new")
    epsilon = float(ck.field("layer_norm_epsilon", 1e-5))
    if activation not in ("gelu_new", "gelu_pytorch_tanh") or epsilon != 1e-5:
        raise TfglmError(f"{ck.where}: config.json: activation_function {activation!r}, layer_norm_epsilon "
                         f"{epsilon}: GPT-2 imports need gelu_new and 1e-5")
    hidden = ck.field("n_embd")
    model = {"kind": "gpt", "num_layers": ck.field("n_layer"), "num_heads": ck.field("n_head"), "hidden_dim": hidden,
             "intermediate_dim": ck.hf_config.get("n_inner") or 4 * hidden, "max_length": ck.field("n_positions")}
    return {"model": model, "tokenizer": {"kind": "bytepair"}}


def _assign(ck, variable, names, shapes, fn=lambda a: a):
    """Sets `variable` to fn(tensors `names`, each checked against its shape)."""
    value = fn(*(ck.tensor(n, s) for n, s in zip(names, shapes)))
    variable.assign(value)


def load_bert(ck, encoder, positions, pretrainer=None):
    """Sets an `Encoder`'s weights from a BERT checkpoint (its first `positions` position embeddings), and those of
    the `EncoderPretrainer` around it, if any; the pooler, MLM and next-sentence heads only when the checkpoint has
    them."""
    e = encoder
    h, i, v = e.hidden_dim, e.intermediate_dim, e.vocab_size
    ln = lambda norm, name: [(norm.gamma, [f"{name}.weight"], [(h,)]), (norm.beta, [f"{name}.bias"], [(h,)])]  # noqa
    linear = lambda dense, name, n_in, n_out: [  # noqa: E731  PyTorch's Linear weight is [out, in]
        (dense.kernel, [f"{name}.weight"], [(n_out, n_in)], np.transpose), (dense.bias, [f"{name}.bias"], [(n_out,)])]
    specs = [(e.token_embedding.embeddings, ["embeddings.word_embeddings.weight"], [(v, h)]),
             (e.position_embedding.position_embeddings, ["embeddings.position_embeddings.weight"],
              [(ck.field("max_position_embeddings"), h)], lambda a: a[:positions]),
             (e.segment_embedding.embeddings, ["embeddings.token_type_embeddings.weight"], [(e.num_segments, h)]),
             *ln(e.embedding_norm, "embeddings.LayerNorm")]
    for n, block in enumerate(e.blocks):
        p = f"encoder.layer.{n}."
        qkv = [f"{p}attention.self.{x}" for x in ("query", "key", "value")]
        specs += [(block.attention.qkv.kernel, [f"{x}.weight" for x in qkv], [(h, h)] * 3,
                   lambda *w: np.concatenate([a.T for a in w], axis=1)),
                  (block.attention.qkv.bias, [f"{x}.bias" for x in qkv], [(h,)] * 3, lambda *b: np.concatenate(b)),
                  *linear(block.attention.output_dense, f"{p}attention.output.dense", h, h),
                  *ln(block.attention_norm, f"{p}attention.output.LayerNorm"),
                  *linear(block.feed_forward_in, f"{p}intermediate.dense", h, i),
                  *linear(block.feed_forward_out, f"{p}output.dense", i, h),
                  *ln(block.feed_forward_norm, f"{p}output.LayerNorm")]
    for spec in specs:
        _assign(ck, *spec)
    optional = {"pooler": linear(e.pooler, "pooler.dense", h, h)}
    if pretrainer is not None:
        head = pretrainer.mlm_head
        optional.update({"MLM head": [*linear(head._intermediate_dense, "cls.predictions.transform.dense", h, h),
                                      *ln(head._intermediate_layer_norm, "cls.predictions.transform.LayerNorm"),
                                      (head._bias, ["cls.predictions.bias"], [(v,)])],
                         "next-sentence head": linear(pretrainer.nsp_head, "cls.seq_relationship", h, 2)})
    for part, part_specs in optional.items():
        if all(ck.has(name) for spec in part_specs for name in spec[1]):
            for spec in part_specs:
                _assign(ck, *spec)
        else:
            log.info("%s: no %s in the checkpoint; it starts random", ck.where, part)


def load_gpt2(ck, gpt, positions):
    """Sets a `GPT`'s weights from a GPT-2 checkpoint (Conv1D weights are [in, out], as Keras's kernels)."""
    h, i, v = gpt.hidden_dim, gpt.intermediate_dim, gpt.vocab_size
    ln = lambda norm, name: [(norm.gamma, [f"{name}.weight"], [(h,)]), (norm.beta, [f"{name}.bias"], [(h,)])]  # noqa
    conv = lambda dense, name, n_in, n_out: [  # noqa: E731
        (dense.kernel, [f"{name}.weight"], [(n_in, n_out)]), (dense.bias, [f"{name}.bias"], [(n_out,)])]
    specs = [(gpt.token_embedding.embeddings, ["wte.weight"], [(v, h)]),
             (gpt.position_embedding.position_embeddings, ["wpe.weight"], [(ck.field("n_positions"), h)],
              lambda a: a[:positions]),
             *ln(gpt.final_norm, "ln_f")]
    for n, block in enumerate(gpt.blocks):
        p = f"h.{n}."
        specs += [*ln(block.attention_norm, f"{p}ln_1"), *conv(block.attention.qkv, f"{p}attn.c_attn", h, 3 * h),
                  *conv(block.attention.output_dense, f"{p}attn.c_proj", h, h),
                  *ln(block.feed_forward_norm, f"{p}ln_2"), *conv(block.feed_forward_in, f"{p}mlp.c_fc", h, i),
                  *conv(block.feed_forward_out, f"{p}mlp.c_proj", i, h)]
    for spec in specs:
        _assign(ck, *spec)
