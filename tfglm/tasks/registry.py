"""The task registry: a run's task name -> its `Task` class, and loading a trained run through it.

A new task is one module in `tfglm/tasks/` and one line here.
"""

import collections
import importlib
import logging
import os

from tfglm.errors import TfglmError
from tfglm.training import runs

log = logging.getLogger("tfglm")

TASKS = {
    "causal_lm": "tfglm.tasks.causal_lm:CausalLM",
    "masked_lm": "tfglm.tasks.masked_lm:MaskedLM",
    "classify": "tfglm.tasks.classify:Classify",
    "seq2seq": "tfglm.tasks.seq2seq:Seq2Seq",
    "chat": "tfglm.tasks.chat:Chat",
}
DEFAULT_FOR_KIND = {"gpt": "causal_lm", "bert": "masked_lm", "translate": "seq2seq"}  # what `tfglm train` runs

Run = collections.namedtuple("Run", "config tokenizer model task")


def get_task(name):
    """The `Task` class registered as `name`."""
    if name not in TASKS:
        raise TfglmError(f"task: unknown task {name!r} (known: {', '.join(TASKS)})")
    module, _, attribute = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def task_for_run(run_dir, overrides=()):
    """The task of the run in `run_dir`, made for its config (with `--set` overrides)."""
    config = runs.read_config(run_dir, overrides)
    name = runs.task_name(run_dir)
    if name is None:  # written before run.json: a classifier has labels.json, the rest follow their model.kind
        name = "classify" if os.path.exists(runs.path(run_dir, "labels.json")) else DEFAULT_FOR_KIND[config.model.kind]
    return get_task(name)(config, run_dir)


def load_run(run_dir, weights=runs.BEST):
    """Run(config, tokenizer, model, task) of a trained run, with its best weights (its last when it has no best).

    Examples:
    ```python
    import tensorflow as tf
    import tfglm

    run = tfglm.load_run("runs/example")  # e.g. the run `tfglm.train`'s example writes
    generator = run.task.generator(run.model)  # a causal LM's Generator
    generator.generate(tf.constant(["abc"]), 4, 0.0, 0, 1.0, 0)["completions"]
    ```
    """
    task = task_for_run(run_dir)
    task.load_vocabulary()
    model = task.build_model()
    path, last = runs.checkpoint(run_dir, weights), runs.path(run_dir, runs.LAST)
    for candidate in [path] + ([last] if path != last and os.path.exists(last) else []):
        try:
            model.load_weights(candidate)  # the optimizer state in the file is ignored
            return Run(task.config, task.tokenizer, model, task)
        except (OSError, ValueError) as e:
            error = f"{candidate}: unreadable checkpoint ({str(e).splitlines()[0]})"
            if candidate != last:
                log.warning("%s: unreadable checkpoint; trying %s", candidate, last)
    raise TfglmError(error)
