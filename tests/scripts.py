"""Load a repository script (a benchmark or an example, not a package module) as a module, for the tests
that call its functions. ``from scripts import load_script``: pytest puts ``tests/`` on ``sys.path``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str) -> ModuleType:
    """Execute ``path`` as a module called ``name``, with its own folder on ``sys.path`` meanwhile (so that
    it imports its neighbours, as it does when run)."""
    folder = str(Path(path).resolve().parent)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(folder)
    return mod
