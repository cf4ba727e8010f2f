"""The task registry: a run's task name -> its `Task` class, and loading a trained run through it.

The tasks `tfglm.tasks.catalog` lists (built-in and installed) are imported on first use (of the registry, or of a
config), so that importing a task module never waits on the others; a program adds its own with `register`.
Registering a task adds its config section to the config tree.
"""

import collections
import logging
import os

from tfglm import config as config_tree
from tfglm.errors import TfglmError
from tfglm.tasks import catalog
from tfglm.tasks.base import Task
from tfglm.training import runs

log = logging.getLogger("tfglm")

_found = []  # [True] once the built-in and installed tasks are registered

Run = collections.namedtuple("Run", "config tokenizer model task")


def register(task):
    """Adds `task` (a `Task` subclass) under its `name`, and its config section (`section`, at `key()`) to the config
    tree; returns it, so it can decorate the class.

    Examples:
    ```python
    import dataclasses
    import tfglm
    from tfglm.tasks import Task, register

    @dataclasses.dataclass
    class EchoConfig:
        repeats: int = 2

    @register
    class Echo(Task):
        name, model_kinds, section = "echo", ("gpt",), EchoConfig

    tfglm.load_config(overrides=["echo.repeats=3"]).echo.repeats  # 3
    ```
    """
    discover()
    if not (isinstance(task, type) and issubclass(task, Task) and task.name):
        raise TfglmError(f"task: {task!r} is not a Task subclass with a name")
    registered = catalog.TASKS.get(task.name, task)
    if registered is not task:
        raise TfglmError(f"task: {task.name!r} is registered already ({registered.__module__})")
    if task.section is not None:
        config_tree.add_section(task.key(), task.section, task.checks)
    catalog.TASKS[task.name] = task
    return task


def discover():
    """Registers the built-in tasks and those installed packages declare (once)."""
    if _found:
        return
    _found.append(True)
    for reference in catalog.references():
        register(catalog.load(reference))


def tasks():
    """Every registered Task class, in registration order."""
    discover()
    return list(catalog.TASKS.values())


def get_task(name):
    """The `Task` class registered as `name`."""
    discover()
    if name not in catalog.TASKS:
        raise TfglmError(f"task: unknown task {name!r} (known: {', '.join(catalog.TASKS)})")
    return catalog.TASKS[name]


def default_task(kind):
    """The name of the task `tfglm train` runs for `model.kind` `kind`."""
    for task in tasks():
        if kind in task.default_for:
            return task.name
    raise TfglmError(f"model.kind: no task trains {kind!r} models by default; name one")


def task_for_run(run_dir, overrides=()):
    """The task of the run in `run_dir`, made for its config (with `--set` overrides)."""
    config = runs.read_config(run_dir, overrides)
    name = runs.task_name(run_dir)
    if name is None:  # written before run.json: a classifier has labels.json, the rest follow their model.kind
        name = "classify" if os.path.exists(runs.path(run_dir, "labels.json")) else default_task(config.model.kind)
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


config_tree.SECTION_SOURCES.append(discover)
