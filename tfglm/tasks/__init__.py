"""Tasks: one module each, registered by name. A program adds its own task with `register`."""

from tfglm.tasks.base import Evaluation, Task
from tfglm.tasks.registry import register

__all__ = ["Evaluation", "Task", "register"]
