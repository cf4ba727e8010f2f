"""Checkpoints in Hugging Face's layout: `config.json`, `model.safetensors` (or shards listed in
`model.safetensors.index.json`), read with the `safetensors` package's NumPy API, and the tokenizer's files
(`vocab.txt` or `tokenizer.json` for BERT; `vocab.json` + `merges.txt` or `tokenizer.json` for GPT-2)."""

import logging
import os

from tfglm.data.tokenizers import BytePairTokenizer, WordPieceTokenizer, read_merges
from tfglm.errors import TfglmError
from tfglm.importers.checkpoint import TASK_OF, Checkpoint, read_json

log = logging.getLogger("tfglm")


def read(directory):
    """The checkpoint in a Hugging Face model directory."""
    from safetensors.numpy import load_file

    hf_config = read_json(os.path.join(directory, "config.json"))
    model_type = hf_config.get("model_type")
    if model_type not in TASK_OF:
        raise TfglmError(f"{directory}: config.json: model_type: unknown architecture {model_type!r} "
                         f"(known: {', '.join(TASK_OF)})")
    index = os.path.join(directory, "model.safetensors.index.json")
    files = (sorted(set(read_json(index)["weight_map"].values())) if os.path.exists(index)
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
    tokenizer = wordpiece(directory) if model_type == "bert" else bytepair(directory)
    return Checkpoint(model_type, hf_config, tensors, tokenizer, directory, _sentence_transformers_pooling(directory))


def _sentence_transformers_pooling(directory):
    """"mean" for a sentence-transformers model that mean-pools (its modules.json names a Pooling module whose
    config.json has pooling_mode_mean_tokens), else "cls"."""
    modules = os.path.join(directory, "modules.json")
    if not os.path.exists(modules):
        return "cls"
    for module in read_json(modules):
        if str(module.get("type", "")).endswith(".Pooling"):
            pooling = read_json(os.path.join(directory, module.get("path", ""), "config.json"))
            if pooling.get("pooling_mode_mean_tokens"):
                return "mean"
            if not pooling.get("pooling_mode_cls_token"):
                log.warning("%s: the model pools in a way tfglm does not (%s); classifiers use [CLS] "
                            "(model.pooling=mean is the other choice)", directory, module.get("path"))
    return "cls"

def wordpiece(directory):
    """BERT's vocabulary (vocab.txt, else tokenizer.json's `model.vocab`) and lower-casing (tokenizer.json's
    normalizer, else tokenizer_config.json's `do_lower_case`)."""
    spec_path = os.path.join(directory, "tokenizer.json")
    spec = read_json(spec_path) if os.path.exists(spec_path) else {}
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
        lowercase = (read_json(config_path) if os.path.exists(config_path) else {}).get("do_lower_case", True)
    return WordPieceTokenizer(vocabulary, lowercase)


def bytepair(directory):
    """GPT-2's vocab.json + merges.txt, else tokenizer.json's BPE model."""
    if os.path.exists(os.path.join(directory, "vocab.json")):
        vocabulary = read_json(os.path.join(directory, "vocab.json"))
        merges = read_merges(os.path.join(directory, "merges.txt"))
    elif os.path.exists(os.path.join(directory, "tokenizer.json")):
        model = read_json(os.path.join(directory, "tokenizer.json"))["model"]
        vocabulary = model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    else:
        raise TfglmError(f"{directory}: no byte-pair vocabulary (vocab.json + merges.txt, or tokenizer.json)")
    return BytePairTokenizer(vocabulary, merges)
