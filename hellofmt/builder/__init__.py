"""The build pipeline (``hellofmt build``): from a teacher and original data to a bundle.

One stage per module: :mod:`.inputs` (image-folder tree, class map), :mod:`.teachers`,
:mod:`.distill` (projector distillation, DDP under torchrun), :mod:`.images` (RDED-style selection or
given images), :mod:`.refine`, :mod:`.fidelity`, :mod:`.checkpoint`, and :mod:`.pipeline`, which
chains them; :mod:`.config` holds the options (:class:`BuildConfig`). The runtime (bundle, projector,
dataset) never imports this package.

:func:`build_bundle` (also ``hellofmt.build_bundle``) is the Python form of ``hellofmt build``.
"""

from __future__ import annotations

from .config import BuildConfig

__all__ = ["BuildConfig", "BuildResult", "build_bundle"]


def __getattr__(name: str):
    # The pipeline imports torch; loading it only when asked for keeps `from hellofmt.builder import
    # BuildConfig` (which the CLI uses to generate the options of `hellofmt build`) light.
    if name in ("build_bundle", "BuildResult"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'hellofmt.builder' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "BuildResult", "build_bundle"])
