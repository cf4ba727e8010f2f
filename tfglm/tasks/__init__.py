"""Tasks: one module each, registered by name. A program adds its own task with `register`.

`Evaluation`, `Task` and `register` are imported on first use, so that the command line reads the tasks'
declarations (`tfglm.tasks.catalog`) without TensorFlow.
"""

import importlib

_API = {"Evaluation": "tfglm.tasks.base", "Task": "tfglm.tasks.base", "register": "tfglm.tasks.registry"}
__all__ = sorted(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'tfglm.tasks' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
