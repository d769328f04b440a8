"""Shared test set-up.

The Hugging Face and torch caches are pointed at a throw-away folder *before* anything imports
huggingface_hub (which reads its settings from the environment once, at import), so no test ever
reads or writes ``~/.cache``. For the same reason a per-test environment variable cannot switch
huggingface_hub's settings: a test that needs offline mode patches ``huggingface_hub.constants``
with ``monkeypatch`` (undone after the test), or sets the variable for a child process. The tiny
open_clip configs in ``tests/data/`` are registered with open_clip's model registry, so tests build
real open_clip models in milliseconds. Test bundles come from ``tests/bundles.py``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_CACHE_ROOT = Path(tempfile.mkdtemp(prefix="hellofmt-test-cache-"))
for _var, _sub in {
    "HF_HOME": "hf",
    "HF_HUB_CACHE": "hf/hub",
    "HF_DATASETS_CACHE": "hf/datasets",
    "TORCH_HOME": "torch",
    "XDG_CACHE_HOME": "xdg",
}.items():
    os.environ[_var] = str(_CACHE_ROOT / _sub)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if not os.environ.get("HELLOFMT_LIVE_HUB"):  # a developer's own token never reaches the tests
    os.environ.pop("HF_TOKEN", None)

import pytest  # noqa: E402

DATA = Path(__file__).parent / "data"
TINY_VIT = "hf-test-tiny-vit"
TINY_RN = "hf-test-tiny-rn"


def _register_tiny_configs() -> None:
    import open_clip

    open_clip.add_model_config(DATA)


_register_tiny_configs()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A real bundle (tiny ViT foundation embedded, random deltas, 3 classes x 2 images of 32x32,
    probe recorded), built once per session by ``tests/bundles.py``. Treat it as read-only: copy it
    (``shutil.copytree``) before altering anything."""
    from bundles import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle") / "bundle")
