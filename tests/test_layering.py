"""The package's structure, drawn from its imports: no import cycle between modules, and no import from a lower layer
into a higher one. Every import counts, at the top of a module or inside a function (docstring examples do not)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tfglm"

# Top to bottom. A module may import modules of its own layer (without a cycle) and of the layers below it. A module
# belongs to the layer of the longest name here that is its own or a package's above it (`tfglm` names only itself).
LAYERS = [
    ("command line", ["tfglm.cli", "tfglm.__main__"]),
    ("serving entry", ["tfglm.serving.serve"]),  # `tfglm serve`: the core with its fronts before it
    ("serving fronts", ["tfglm.serving.rest", "tfglm.serving.grpc_api", "tfglm.serving.openai_api",
                        "tfglm.serving.http"]),  # http: the web server under REST and OpenAI
    ("serving core", ["tfglm.serving"]),
    ("training and tasks", ["tfglm.training", "tfglm.tasks"]),
    ("models, preprocessors, generation, importers",
     ["tfglm.models", "tfglm.preprocessors", "tfglm.generation", "tfglm.importers"]),
    ("layers and data", ["tfglm.layers", "tfglm.data"]),
    ("config and errors", ["tfglm.config", "tfglm.errors", "tfglm"]),  # `tfglm` itself: the version, the lazy API
]


def modules():
    """{dotted name: path} of every module in the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name, path, known):
    """The tfglm modules that module `name` (at `path`) imports: `from a import b` is a.b when that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    return {target for target in found if target in known and target != name}


def layer(name):
    """The index in LAYERS of the layer module `name` belongs to; None for a module no layer names."""
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or (prefix != "tfglm" and name.startswith(prefix + "."))]
    return max(matches)[1] if matches else None


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges):
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    unplaced = [name for name in modules() if layer(name) is None]
    assert modules() and not unplaced, f"modules in no layer of LAYERS (add them to it): {unplaced}"


def test_no_import_cycles():
    edges = graph()
    found = cycles(edges)
    described = ["; ".join(f"{a} -> {b}" for a in component for b in sorted(edges[a]) if b in component)
                 for component in found]
    assert not found, "import cycles:\n" + "\n".join(described)


def test_imports_point_down():
    assert all(layer(name) is not None for name in modules())
    upward = [f"{name} ({LAYERS[layer(name)][0]}) -> {target} ({LAYERS[layer(target)][0]})"
              for name, targets in sorted(graph().items()) for target in sorted(targets) if layer(target) < layer(name)]
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(upward)


def test_tasks_do_not_import_each_other():
    """A task module imports the Task interface and the registry, never another task: what two tasks share lives in
    a lower layer."""
    shared = {"tfglm.tasks", "tfglm.tasks.base", "tfglm.tasks.registry"}
    crossing = [f"{name} -> {target}" for name, targets in sorted(graph().items()) if name.startswith("tfglm.tasks.")
                and name not in shared for target in sorted(targets)
                if target.startswith("tfglm.tasks.") and target not in shared]
    assert not crossing, "tasks importing other tasks:\n" + "\n".join(crossing)


@pytest.mark.parametrize("source, expected", [
    ("from tfglm.config import load_config\n", {"tfglm.config"}),
    ("from tfglm.training import runs\n", {"tfglm.training.runs"}),
    ("def f():\n    import tfglm.cli\n", {"tfglm.cli"}),
    ("from . import runs\nfrom ..errors import TfglmError\n", {"tfglm.training.runs", "tfglm.errors"}),
])
def test_imports_are_read_from_source(tmp_path, source, expected):
    path = tmp_path / "trainer.py"
    path.write_text(source)
    assert imports("tfglm.training.trainer", path, modules()) == expected


def test_cycles_and_layers_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("tfglm.serving.serve") < layer("tfglm.serving.rest") < layer("tfglm.serving.core") < layer(
        "tfglm.tasks.chat")
    assert layer("tfglm.training.trainer") == layer("tfglm.tasks.registry") < layer("tfglm.importers.huggingface")
    assert layer("tfglm") == layer("tfglm.errors") and layer("tfglm.unplaced") is None
