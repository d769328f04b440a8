"""Layers depend downward only: the format (manifest, image store, bundle) loads no model code, the
runtime (bundle, projector, dataset, hub, CLI start-up) never imports the build pipeline, and
`import hellofmt` stays light; checked in fresh interpreters so other tests' imports do not leak in.
No module reaches into another module's underscore names (checked on the sources with ``ast``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hellofmt

_RUNTIME = [
    "hellofmt.dataset", "hellofmt.projector", "hellofmt.bundle", "hellofmt.hub", "hellofmt.probe", "hellofmt.cli"
]
# The format layer and the bottom modules it stands on.
_FORMAT = ["hellofmt.manifest", "hellofmt.imagestore", "hellofmt.bundle", "hellofmt.tensorfile", "hellofmt.fingerprint"]
# What the format layer must not load: the model, the runtime, the modules on top, and open_clip.
_ABOVE_FORMAT = {
    "hellofmt.probe", "hellofmt.projector", "hellofmt.foundation", "hellofmt.lowrank", "hellofmt.augment",
    "hellofmt.dataset", "hellofmt.verify", "hellofmt.summary", "hellofmt.hub", "hellofmt.cli", "open_clip",
}  # fmt: skip
_PACKAGE = Path(hellofmt.__file__).parent


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    ).stdout
    return set(out.split())


@pytest.mark.parametrize("module", _RUNTIME)
def test_runtime_module_does_not_import_the_build_pipeline(module):
    loaded = _loaded_after(f"import {module}")
    assert not {m for m in loaded if m.startswith("hellofmt.builder")}, f"{module} imports hellofmt.builder"


def test_import_hellofmt_is_light():
    loaded = _loaded_after("import hellofmt")
    assert "torch" not in loaded and "open_clip" not in loaded


def test_build_bundle_is_reachable_from_the_top_level_package():
    loaded = _loaded_after("import hellofmt\nassert callable(hellofmt.build_bundle)")
    assert "hellofmt.builder.pipeline" in loaded


@pytest.mark.parametrize("module", _FORMAT)
def test_format_layer_does_not_import_the_model(module):
    loaded = _loaded_after(f"import {module}")
    assert module in loaded  # the check ran on a real import
    assert not loaded & _ABOVE_FORMAT, f"{module} loads {sorted(loaded & _ABOVE_FORMAT)}"


@pytest.mark.parametrize("module", ["hellofmt.summary", "hellofmt.cli", "hellofmt.hub"])
def test_reports_and_cli_start_up_do_not_load_torch(module):
    loaded = _loaded_after(f"import {module}")
    assert module in loaded and "torch" not in loaded and "open_clip" not in loaded


def test_the_model_layer_is_above_the_format():
    # The contrast that shows the check above can fail: the probe does load the model.
    loaded = _loaded_after("import hellofmt.probe")
    assert {"hellofmt.projector", "hellofmt.foundation"} <= loaded


def _module_name(path: Path) -> tuple[str, bool]:
    """``(dotted module name, is a package)`` of a source file under hellofmt/."""
    parts = list(path.relative_to(_PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def underscore_uses(source: str, module: str, is_package: bool = False) -> list[str]:
    """Where ``source`` (the text of hellofmt module ``module``) uses another hellofmt module's
    underscore name: ``from .x import _y``, or ``x._y`` / ``Y._z`` where the name ``x`` or ``Y`` was
    imported from another hellofmt module (a module, a class, a function)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    tree = ast.parse(source)
    imported: dict[str, str] = {}  # local name -> the hellofmt module it was imported from
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source_mod = ".".join(base + ([node.module] if node.module else []))
            else:
                source_mod = node.module or ""
            if source_mod.split(".")[0] != "hellofmt":
                continue
            for alias in node.names:
                # `from . import lowrank` imports the module hellofmt.lowrank itself.
                origin = source_mod if node.module else f"{source_mod}.{alias.name}"
                if origin != module and _private(alias.name):
                    found.append(f"{module}:{node.lineno}: from {source_mod} import {alias.name}")
                imported[alias.asname or alias.name] = origin
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hellofmt" and alias.asname:
                    imported[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                and imported.get(node.value.id, module) != module):
            found.append(f"{module}:{node.lineno}: {node.value.id}.{node.attr} (from {imported[node.value.id]})")
    return found


def test_the_underscore_check_finds_private_uses():
    code = (
        "from .bundle import _matrix_shape\n"  # a private function
        "from . import bundle as b\n"
        "from .bundle import Bundle\n"
        "from .summary import _UNITS\n"  # its own private name: fine
        "b._CHUNK\n"  # a private module attribute
        "Bundle._safe\n"  # a private method of a class from elsewhere
        "Bundle.open\n"
    )
    found = underscore_uses(code, "hellofmt.summary")
    assert len(found) == 3 and all("hellofmt.bundle" in f for f in found), found
    assert underscore_uses("from ..manifest import _Reader\n", "hellofmt.builder.pipeline") != []
    assert underscore_uses("from .manifest import MANIFEST_NAME\n", "hellofmt.builder", is_package=True) == []


def test_no_module_imports_another_modules_underscore_names():
    files = sorted(_PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = []
    for path in files:
        found += underscore_uses(path.read_text(encoding="utf-8"), *_module_name(path))
    assert found == [], "\n".join(found)


_TOP = ["hellofmt.verify", "hellofmt.summary", "hellofmt.show", "hellofmt.compress", "hellofmt.students",
        "hellofmt.evaluation", "hellofmt.hub", "hellofmt.cli"]


@pytest.mark.parametrize("module", ["hellofmt.dataset", "hellofmt.augment", "hellofmt.teacher", "hellofmt.projector",
                                    "hellofmt.probe", "hellofmt.foundation", "hellofmt.lowrank"])
def test_model_and_runtime_layers_do_not_import_the_top_layer(module):
    loaded = _loaded_after(f"import {module}")
    assert not loaded & set(_TOP), f"{module} imports {sorted(loaded & set(_TOP))}"
