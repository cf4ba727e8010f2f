"""Every module path the READMEs and tfglm's docstrings cite exists: files by path, dotted names down to the
attribute. Read from source with `ast`, so it needs no TensorFlow and runs in a second."""

import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = ["README.md", "bench/README.md", "export/README.md"]
FILE = re.compile(r"(?<![\w./-])((?:tfglm|bench|tests|export)/[\w/]+\.py|configs/[\w.-]+\.yaml)(?![\w/])")
DOTTED = re.compile(r"(?<![\w./-])(?:tfglm|bench)(?:\.\w+)+")


def _docstrings(path):
    """The docstrings of a module and of every class and function in it."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                                   ast.AsyncFunctionDef))]
    return "\n".join(doc for doc in map(ast.get_docstring, nodes) if doc)


def _sources():
    """{where: text} of the READMEs and of each tfglm module's docstrings."""
    texts = {}
    for name in READMES:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            texts[name] = f.read()
    for path in sorted(glob.glob(os.path.join(ROOT, "tfglm", "**", "*.py"), recursive=True)):
        texts[os.path.relpath(path, ROOT)] = _docstrings(path)
    return texts


def _module_file(parts):
    """The source file of module `parts` (a package's __init__.py), or None."""
    base = os.path.join(ROOT, *parts)
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _top_level_names(path):
    """Names a module defines or imports at its top level (functions, classes, assignments, imports)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _class_names(path, cls):
    """Names defined in the body of class `cls` of module `path` (methods and class attributes), or None."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))} | {
                t.id for n in node.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    return None


def _lazy_names(path):
    """{name: module} of a package's `_API` table, the names its `__getattr__` imports on first use."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_API" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _resolves(dotted):
    """Whether `tfglm.a.b.C.d` names a module, or a module's top-level name and then a name in that class."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        path = _module_file(parts[:end])
        if path is None:
            continue
        rest = parts[end:]
        if not rest:
            return True
        lazy = _lazy_names(path)
        if rest[0] in lazy:
            return _resolves(".".join([lazy[rest[0]], *rest]))
        if rest[0] not in _top_level_names(path):
            return False
        if len(rest) == 1:
            return True
        members = _class_names(path, rest[0])
        return members is not None and len(rest) == 2 and rest[1] in members
    return False


def _missing():
    missing = []
    for where, text in _sources().items():
        for cited in sorted(set(FILE.findall(text))):
            if not os.path.isfile(os.path.join(ROOT, cited)):
                missing.append(f"{where}: {cited}")
        for cited in sorted(set(m.rstrip(".") for m in DOTTED.findall(text))):
            if not _resolves(cited):
                missing.append(f"{where}: {cited}")
    return missing


def test_every_cited_module_path_exists():
    missing = _missing()
    assert not missing, "cited but not found:\n" + "\n".join(missing)


def test_a_missing_path_or_name_is_reported(tmp_path, monkeypatch):
    assert _resolves("tfglm.tasks.registry") and _resolves("tfglm.serving.export.export_run")
    assert not _resolves("tfglm.distribute") and not _resolves("tfglm.serving.export.no_such_name")
    monkeypatch.setattr("test_docs.READMES", [])
    monkeypatch.setattr("test_docs._sources", lambda: {"x.md": "see `tfglm/distribute.py` and configs/none.yaml; "
                                                                "tfglm.tasks.registry is fine, tfglm.nope is not"})
    assert _missing() == ["x.md: configs/none.yaml", "x.md: tfglm/distribute.py", "x.md: tfglm.nope"]
