"""A run directory: run.json, config.json, tokenizer/, last and best weights, metrics.jsonl and TensorBoard logs/.

Every file is written to a temporary name and renamed into place, so an interrupted run never leaves a half-written
checkpoint. `last.weights.h5` holds the model and optimizer state; the optimizer's step counter is the run's step.
run.json records the run's task and every start: {"task", "tfglm_version", "starts": [{"step", "strategy",
"replicas", "mixed_precision"}], "resumed_from_step": [...]}.
"""

import contextlib
import json
import os
import shutil

from tfglm.config import load_config
from tfglm.errors import TfglmError

RUN = "run.json"
CONFIG = "config.json"
TOKENIZER = "tokenizer"
LAST = "last.weights.h5"
LAST_LORA = "last.lora.npz"  # a LoRA run's unmerged factors at its last checkpoint (Keras saves LoRA layers merged)
BEST = "best.weights.h5"
METRICS = "metrics.jsonl"
LOGS = "logs"
EVAL = "eval.json"


def path(run_dir, name):
    return os.path.join(run_dir, name)


def save_tokenizer(run_dir, tokenizer):
    """Writes the run's tokenizer/, which `load_tokenizer` reads back."""
    os.makedirs(path(run_dir, TOKENIZER), exist_ok=True)
    tokenizer.save(path(run_dir, TOKENIZER))


@contextlib.contextmanager
def removed_on_failure(run_dir):
    """Makes `run_dir` if it is missing, and removes it again if the block fails: a failed start (bad data, a bad
    column) leaves no empty run behind. A directory that was there before is left as it is."""
    created = not os.path.exists(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def atomic_write(target, write):
    """Calls write(tmp_path), then renames tmp_path over target. An I/O error (a full disk) is one line naming the
    path, and the previous file is left as it was."""
    tmp = os.path.join(os.path.dirname(target), "tmp-" + os.path.basename(target))
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise TfglmError(f"{target}: cannot write ({e.strerror or e}); the previous version is intact") from None


def write_json(target, value):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1, ensure_ascii=False)
    atomic_write(target, write)


def read_json(target):
    try:
        with open(target, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TfglmError(f"{target}:{e.lineno}: invalid JSON ({e.msg}); the file is damaged") from None


def read_metrics(run_dir, up_to_step=None):
    """The metrics log, without lines after `up_to_step` (left by steps that were never checkpointed)."""
    metrics_path = path(run_dir, METRICS)
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def is_run(run_dir):
    return os.path.exists(path(run_dir, CONFIG))


def read_config(run_dir, overrides=()):
    """The resolved config a run directory holds, with `--set` overrides applied."""
    if not os.path.isdir(run_dir):
        raise TfglmError(f"{run_dir}: no such run directory")
    if not is_run(run_dir):
        raise TfglmError(f"{run_dir}: not a tfglm run directory (no {CONFIG})")
    return load_config(base=read_json(path(run_dir, CONFIG)), overrides=overrides, where=path(run_dir, CONFIG))


def task_name(run_dir):
    """The task run.json records, or None for a run written before run.json existed."""
    return read_json(path(run_dir, RUN))["task"] if os.path.exists(path(run_dir, RUN)) else None


def record_start(run_dir, task, step, strategy, replicas, mixed_precision):
    """Adds this start (step 0, or the step resumed from) to run.json."""
    from tfglm import __version__

    record = read_json(path(run_dir, RUN)) if os.path.exists(path(run_dir, RUN)) else {"task": task, "starts": []}
    record.update(tfglm_version=__version__, strategy=strategy, replicas=replicas, mixed_precision=mixed_precision)
    record["starts"].append({"step": step, "strategy": strategy, "replicas": replicas,
                             "mixed_precision": mixed_precision})
    record["resumed_from_step"] = [s["step"] for s in record["starts"][1:]]
    write_json(path(run_dir, RUN), record)


def checkpoint(run_dir, name=BEST):
    """The path of checkpoint `name`, or of the last one when that is missing; an error when there is neither."""
    for candidate in (name, LAST):
        if os.path.exists(path(run_dir, candidate)) and os.path.getsize(path(run_dir, candidate)) > 0:
            return path(run_dir, candidate)
    raise TfglmError(f"{run_dir}: no checkpoint yet ({BEST} or {LAST})")
