"""The optional packages of pyproject.toml's `bench` extra: a script that lacks one says so in one line.

No TensorFlow here: the PyTorch workers import it too.
"""

import importlib.util
import sys


def require(*modules):
    """Exits with one line naming the missing `modules` and how to install them; returns when all are present."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"{', '.join(missing)}: not installed; this script needs the bench extra: "
                 'pip install -e ".[bench]"')
