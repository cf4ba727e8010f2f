"""A run directory: config.json, tokenizer/, last and best weights, metrics.jsonl and TensorBoard logs/.

Every file is written to a temporary name and renamed into place, so an interrupted run never leaves a half-written
checkpoint. `last.weights.h5` holds the model and optimizer state; the optimizer's step counter is the run's step.
"""

import json
import os

from tfglm.config import load_config
from tfglm.errors import TfglmError
from tfglm.models.gpt import GPT
from tfglm.data.tokenizers import load_tokenizer

CONFIG = "config.json"
TOKENIZER = "tokenizer"
LAST = "last.weights.h5"
BEST = "best.weights.h5"
METRICS = "metrics.jsonl"
LOGS = "logs"


def path(run_dir, name):
    return os.path.join(run_dir, name)


def atomic_write(target, write):
    """Calls write(tmp_path), then renames tmp_path over target."""
    tmp = os.path.join(os.path.dirname(target), "tmp-" + os.path.basename(target))
    write(tmp)
    os.replace(tmp, target)


def read_metrics(run_dir, up_to_step=None):
    """The metrics log, without lines after `up_to_step` (left by steps that were never checkpointed)."""
    metrics_path = path(run_dir, METRICS)
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def read_config(run_dir, overrides=()):
    """The resolved config a run directory holds, with `--set` overrides applied."""
    if not os.path.isdir(run_dir):
        raise TfglmError(f"{run_dir}: no such run directory")
    if not os.path.exists(path(run_dir, CONFIG)):
        raise TfglmError(f"{run_dir}: not a tfglm run directory (no {CONFIG})")
    with open(path(run_dir, CONFIG)) as f:
        return load_config(base=json.load(f), overrides=overrides)


def load_run(run_dir, weights=BEST):
    """(config, tokenizer, model) of a trained run (a GPT, or an encoder pretrainer for model.kind bert); falls back
    to the last checkpoint if there is no best one."""
    config = read_config(run_dir)
    tokenizer = load_tokenizer(path(run_dir, TOKENIZER))
    if config.model.kind == "bert":
        from tfglm.models.heads import build_pretrainer

        model = build_pretrainer(config.model, tokenizer.vocab_size)
    elif config.model.kind == "translate":
        from tfglm.models.encoder_decoder import EncoderDecoder

        model = EncoderDecoder.from_config_tree(config.model, tokenizer.vocab_size)
    else:
        model = GPT.from_config_tree(config.model, tokenizer.vocab_size)
    weights_path = path(run_dir, weights)
    if not os.path.exists(weights_path):
        weights_path = path(run_dir, LAST)
    if not os.path.exists(weights_path):
        raise TfglmError(f"{run_dir}: no checkpoint yet ({BEST} or {LAST})")
    model.load_weights(weights_path)  # the optimizer state in the file is ignored
    return config, tokenizer, model

