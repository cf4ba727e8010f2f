"""`tfglm import`: a pretrained checkpoint as an ordinary tfglm run directory (run.json, config.json, tokenizer/,
best and last weights) that `finetune --model`, `evaluate`, `predict`, `generate` and `export` take as they take a
trained one.

Two sources, two architectures:

- `huggingface`: a directory in Hugging Face's layout: `config.json`, `model.safetensors` (or shards listed in
  `model.safetensors.index.json`), read with the `safetensors` package's NumPy API, and the tokenizer's files
  (`vocab.txt` or `tokenizer.json` for BERT; `vocab.json` + `merges.txt` or `tokenizer.json` for GPT-2).
- `keras-hub`: a KerasHub preset directory (`save_to_preset`) of a `BertBackbone` or `GPT2Backbone` and its
  tokenizer; its weights are first renamed to Hugging Face's names, so one table per architecture maps both.

BERT-family encoders (BERT, MiniLM) become a `masked_lm` run (post-norm blocks, the config's GELU and epsilon; the
MLM and next-sentence heads are imported when the checkpoint has them, else left random), GPT-2 a `causal_lm` run.
`--set model.max_length=N` keeps the first N position embeddings. Every tensor's shape is checked; a missing or
misshapen tensor, a missing config field or an unknown architecture is one `TfglmError` naming it.
"""

import logging
import os

import numpy as np

from tfglm.config import GenerateConfig, load_config, parse_override
from tfglm.data.tokenizers import BytePairTokenizer, WordPieceTokenizer, read_merges
from tfglm.errors import TfglmError
from tfglm.tasks import runs
from tfglm.tasks.registry import get_task

log = logging.getLogger("tfglm")
TASK_OF = {"bert": "masked_lm", "gpt2": "causal_lm"}
SOURCES = ("huggingface", "keras-hub")


class Checkpoint:
    """An architecture ("bert", "gpt2"), its Hugging Face config, named tensors and tokenizer, and how it pools a
    text into one vector (`model.pooling`); `where` names the source in errors."""

    def __init__(self, architecture, hf_config, tensors, tokenizer, where, pooling="cls"):
        self.architecture, self.hf_config, self.tokenizer, self.where = architecture, hf_config, tokenizer, where
        self.pooling = pooling
        self.tensors = {_canonical(name): value for name, value in tensors.items()}

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


def read_huggingface(directory):
    """The checkpoint in a Hugging Face model directory."""
    from safetensors.numpy import load_file

    hf_config = _read_json(os.path.join(directory, "config.json"))
    model_type = hf_config.get("model_type")
    if model_type not in TASK_OF:
        raise TfglmError(f"{directory}: config.json: model_type: unknown architecture {model_type!r} "
                         f"(known: {', '.join(TASK_OF)})")
    index = os.path.join(directory, "model.safetensors.index.json")
    files = (sorted(set(_read_json(index)["weight_map"].values())) if os.path.exists(index)
             else ["model.safetensors"])
    tensors = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise TfglmError(f"{path}: missing (the weights must be safetensors)")
        try:
            tensors.update(load_file(path))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise TfglmError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    tokenizer = _hf_wordpiece(directory) if model_type == "bert" else _hf_bytepair(directory)
    return Checkpoint(model_type, hf_config, tensors, tokenizer, directory, _sentence_transformers_pooling(directory))


def _sentence_transformers_pooling(directory):
    """"mean" for a sentence-transformers model that mean-pools (its modules.json names a Pooling module whose
    config.json has pooling_mode_mean_tokens), else "cls"."""
    modules = os.path.join(directory, "modules.json")
    if not os.path.exists(modules):
        return "cls"
    for module in _read_json(modules):
        if str(module.get("type", "")).endswith(".Pooling"):
            pooling = _read_json(os.path.join(directory, module.get("path", ""), "config.json"))
            if pooling.get("pooling_mode_mean_tokens"):
                return "mean"
            if not pooling.get("pooling_mode_cls_token"):
                log.warning("%s: the model pools in a way tfglm does not (%s); classifiers use [CLS] "
                            "(model.pooling=mean is the other choice)", directory, module.get("path"))
    return "cls"


def _read_json(path):
    if not os.path.exists(path):
        raise TfglmError(f"{path}: missing")
    return runs.read_json(path)


def _hf_wordpiece(directory):
    """BERT's vocabulary (vocab.txt, else tokenizer.json's `model.vocab`) and lower-casing (tokenizer.json's
    normalizer, else tokenizer_config.json's `do_lower_case`)."""
    spec_path = os.path.join(directory, "tokenizer.json")
    spec = _read_json(spec_path) if os.path.exists(spec_path) else {}
    if os.path.exists(os.path.join(directory, "vocab.txt")):
        with open(os.path.join(directory, "vocab.txt"), encoding="utf-8") as f:
            vocabulary = f.read().splitlines()
    elif spec.get("model", {}).get("type") == "WordPiece":
        vocab = spec["model"]["vocab"]
        vocabulary = sorted(vocab, key=vocab.get)
    else:
        raise TfglmError(f"{directory}: no WordPiece vocabulary (vocab.txt or tokenizer.json)")
    lowercase = (spec.get("normalizer") or {}).get("lowercase")
    if lowercase is None:
        config_path = os.path.join(directory, "tokenizer_config.json")
        lowercase = (_read_json(config_path) if os.path.exists(config_path) else {}).get("do_lower_case", True)
    return WordPieceTokenizer(vocabulary, lowercase)


def _hf_bytepair(directory):
    """GPT-2's vocab.json + merges.txt, else tokenizer.json's BPE model."""
    if os.path.exists(os.path.join(directory, "vocab.json")):
        vocabulary = _read_json(os.path.join(directory, "vocab.json"))
        merges = read_merges(os.path.join(directory, "merges.txt"))
    elif os.path.exists(os.path.join(directory, "tokenizer.json")):
        model = _read_json(os.path.join(directory, "tokenizer.json"))["model"]
        vocabulary = model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    else:
        raise TfglmError(f"{directory}: no byte-pair vocabulary (vocab.json + merges.txt, or tokenizer.json)")
    return BytePairTokenizer(vocabulary, merges)


def read_keras_hub(directory):
    """The checkpoint in a KerasHub preset directory, renamed to Hugging Face's names."""
    import keras_hub

    config = _read_json(os.path.join(directory, "config.json"))
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


def load_bert(ck, pretrainer, positions):
    """Sets an `EncoderPretrainer`'s weights from a BERT checkpoint (its first `positions` position embeddings);
    the pooler, MLM and next-sentence heads only when the checkpoint has them."""
    e = pretrainer.encoder
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
    head = pretrainer.mlm_head
    optional = {"pooler": linear(e.pooler, "pooler.dense", h, h),
                "MLM head": [*linear(head._intermediate_dense, "cls.predictions.transform.dense", h, h),
                             *ln(head._intermediate_layer_norm, "cls.predictions.transform.LayerNorm"),
                             (head._bias, ["cls.predictions.bias"], [(v,)])],
                "next-sentence head": linear(pretrainer.nsp_head, "cls.seq_relationship", h, 2)}
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


def import_checkpoint(source, directory, run_dir, overrides=()):
    """Writes the checkpoint in `directory` (`source`: "huggingface" or "keras-hub") as a run in `run_dir`; returns
    the task name.

    Examples:
    ```python
    import keras_hub
    import tfglm

    backbone = keras_hub.models.BertBackbone(vocabulary_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                                             intermediate_dim=16, max_sequence_length=16)
    backbone.save_to_preset("tiny-bert")
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]
    keras_hub.models.BertTokenizer(vocabulary=vocabulary).save_to_preset("tiny-bert")
    tfglm.import_checkpoint("keras-hub", "tiny-bert", "runs/tiny-bert", ["model.max_length=8"])  # "masked_lm"
    run = tfglm.load_run("runs/tiny-bert")  # as a `tfglm pretrain` run; `finetune --model` takes it
    ```
    """
    if source not in SOURCES:
        raise TfglmError(f"--from: unknown source {source!r} (known: {', '.join(SOURCES)})")
    if not os.path.isdir(directory):
        raise TfglmError(f"{directory}: no such checkpoint directory")
    if os.path.exists(run_dir) and (not os.path.isdir(run_dir) or os.listdir(run_dir)):
        raise TfglmError(f"{run_dir}: exists and is not empty; choose another --out (or --overwrite a run)")
    ck = read_huggingface(directory) if source == "huggingface" else read_keras_hub(directory)
    positions_available = ck.field("max_position_embeddings" if ck.architecture == "bert" else "n_positions")
    base = model_config(ck)
    length = next((value for keys, value in map(parse_override, overrides) if keys == ["model", "max_length"]),
                  base["model"]["max_length"])
    if isinstance(length, int):  # generation's default fits a short context
        base["generate"] = {"max_new_tokens": max(1, min(GenerateConfig().max_new_tokens, length - 1))}
    config = load_config(base=base, overrides=overrides, where=f"{directory}: config.json")
    if config.model.max_length > positions_available:
        raise TfglmError(f"model.max_length: {config.model.max_length} is more than the checkpoint's "
                         f"{positions_available} positions")
    vocab_size = ck.field("vocab_size")
    if vocab_size != ck.tokenizer.vocab_size:
        raise TfglmError(f"{directory}: config.json: vocab_size: {vocab_size}, but the tokenizer has "
                         f"{ck.tokenizer.vocab_size} tokens")
    task = get_task(TASK_OF[ck.architecture])(config, run_dir)
    task.tokenizer = ck.tokenizer
    model = task.build_model()
    loader = load_bert if ck.architecture == "bert" else load_gpt2
    loader(ck, model if ck.architecture == "bert" else task.backbone(model), config.model.max_length)
    os.makedirs(runs.path(run_dir, runs.TOKENIZER), exist_ok=True)
    ck.tokenizer.save(runs.path(run_dir, runs.TOKENIZER))
    runs.atomic_write(runs.path(run_dir, runs.CONFIG), config.save)
    from tfglm import __version__

    runs.write_json(runs.path(run_dir, runs.RUN), {
        "task": task.name, "tfglm_version": __version__, "starts": [], "resumed_from_step": [],
        "imported_from": {"source": source, "path": os.path.abspath(directory), "architecture": ck.architecture}})
    for name in (runs.BEST, runs.LAST):
        runs.atomic_write(runs.path(run_dir, name), model.save_weights)
    log.info("imported %s (%s, %d parameters) into %s as a %s run", directory, ck.architecture, model.count_params(),
             run_dir, task.name)
    return task.name
