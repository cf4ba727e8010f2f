"""The tasks there are, and what each declares to the command line, known without importing them (and TensorFlow
with them), so that `tfglm --help` and the command line's mistakes answer at once.

The built-in tasks are the classes in BUILT_IN; an installed package adds its own under the `tfglm.tasks`
entry-point group, and a program with `tfglm.tasks.register`, which imports them (`tfglm.tasks.registry`). Until a
task is imported, its `name`, `finetune` and `command` are read from its class body, where they are literals; a task
whose class body does not say them (a subclass of another task, a value computed) is imported to read them.
"""

import ast
import collections
import importlib
import importlib.metadata
import importlib.util

BUILT_IN = ("tfglm.tasks.causal_lm:CausalLM", "tfglm.tasks.masked_lm:MaskedLM", "tfglm.tasks.classify:Classify",
            "tfglm.tasks.seq2seq:Seq2Seq", "tfglm.tasks.chat:Chat", "tfglm.tasks.embed:Embed")
ENTRY_POINTS = "tfglm.tasks"
TASKS = {}  # name -> Task class, in registration order (`tfglm.tasks.registry.register`)

# What the command line reads of a task (`tfglm.tasks.base.Task` says what each means).
Declaration = collections.namedtuple("Declaration", "name finetune command")


def references():
    """"module:Class" of every built-in and installed task."""
    return list(BUILT_IN) + [entry.value for entry in importlib.metadata.entry_points(group=ENTRY_POINTS)]


def load(reference):
    """The class at `reference` ("module:Class"), imported."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def declaration(task):
    """The Declaration of Task class `task`."""
    return Declaration(task.name, task.finetune, task.command)


def declarations():
    """The Declaration of every task, in registration order: the registered classes', then those read from the
    sources of the tasks not imported yet."""
    found = {name: declaration(task) for name, task in TASKS.items()}
    for reference in references():
        read = _read(reference) or declaration(load(reference))
        found.setdefault(read.name, read)
    return list(found.values())


def _read(reference):
    """The Declaration of the class at `reference` from the literals of its class body, for a direct subclass of
    `Task` that names itself there; None otherwise."""
    module, _, attribute = reference.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or not (spec.origin or "").endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), spec.origin)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == attribute:
            if [ast.unparse(base) for base in node.bases] != ["Task"]:
                return None
            values = {"finetune": None, "command": None}
            assigned = [(s.targets[0].id, s.value) for s in node.body
                        if isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)]
            for key, value in assigned:
                if key in Declaration._fields:
                    try:
                        values[key] = ast.literal_eval(value)
                    except ValueError:
                        return None
            return Declaration(**values) if isinstance(values.get("name"), str) else None
    return None
