"""The runtime (bundle, projector, dataset, hub, CLI start-up) never imports the build pipeline, and
`import hellofmt` stays light; checked in fresh interpreters so other tests' imports do not leak in."""

from __future__ import annotations

import subprocess
import sys

import pytest

_RUNTIME = ["hellofmt.dataset", "hellofmt.projector", "hellofmt.bundle", "hellofmt.hub", "hellofmt.probe", "hellofmt.cli"]


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
