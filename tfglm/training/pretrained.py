"""`tfglm import`: a pretrained checkpoint (`tfglm.importers`) as an ordinary tfglm run directory (run.json,
config.json, tokenizer/, best and last weights) that `finetune --model`, `evaluate`, `predict`, `generate` and `export`
take as they take a trained one.

BERT-family encoders (BERT, MiniLM) become a `masked_lm` run (post-norm blocks, the config's GELU and epsilon; the
MLM and next-sentence heads are imported when the checkpoint has them, else left random), or an `embed` run when
sentence-transformers mean-pools them (`tfglm.tasks.embed`); GPT-2 a `causal_lm` run.
`--set model.max_length=N` keeps the first N position embeddings.
"""

import logging
import os

import tfglm
from tfglm.config import GenerateConfig, load_config, parse_override
from tfglm.errors import TfglmError
from tfglm.importers import READERS
from tfglm.importers.checkpoint import load_bert, load_gpt2, model_config
from tfglm.tasks.registry import get_task
from tfglm.training import runs

log = logging.getLogger("tfglm")


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
    if source not in READERS:
        raise TfglmError(f"--from: unknown source {source!r} (known: {', '.join(READERS)})")
    if not os.path.isdir(directory):
        raise TfglmError(f"{directory}: no such checkpoint directory")
    if os.path.exists(run_dir) and (not os.path.isdir(run_dir) or os.listdir(run_dir)):
        raise TfglmError(f"{run_dir}: exists and is not empty; choose another --out (or --overwrite a run)")
    ck = READERS[source](directory)
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
    task = get_task(ck.task)(config, run_dir)
    task.tokenizer = ck.tokenizer
    model = task.build_model()
    backbone = task.backbone(model)
    if ck.architecture == "bert":
        load_bert(ck, backbone, config.model.max_length, pretrainer=None if backbone is model else model)
    else:
        load_gpt2(ck, backbone, config.model.max_length)
    runs.save_tokenizer(run_dir, ck.tokenizer)
    runs.atomic_write(runs.path(run_dir, runs.CONFIG), config.save)
    runs.write_json(runs.path(run_dir, runs.RUN), {
        "task": task.name, "tfglm_version": tfglm.__version__, "starts": [], "resumed_from_step": [],
        "imported_from": {"source": source, "path": os.path.abspath(directory), "architecture": ck.architecture}})
    for name in (runs.BEST, runs.LAST):
        runs.atomic_write(runs.path(run_dir, name), model.save_weights)
    log.info("imported %s (%s, %d parameters) into %s as a %s run", directory, ck.architecture, model.count_params(),
             run_dir, task.name)
    return task.name
