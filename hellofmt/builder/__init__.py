"""The build pipeline (``hellofmt build``): from a teacher and original data to a bundle.

One stage per module: :mod:`.inputs` (image-folder tree, class map), :mod:`.teachers`,
:mod:`.distill` (projector distillation, DDP under torchrun), :mod:`.images` (RDED-style selection or
given images), :mod:`.refine`, :mod:`.fidelity`, :mod:`.checkpoint`, and :mod:`.pipeline`, which
chains them. The runtime (bundle, projector, dataset) never imports this package.

:func:`build_bundle` (also ``hellofmt.build_bundle``) is the Python form of ``hellofmt build``.
"""

from __future__ import annotations

from .pipeline import BuildResult, build_bundle

__all__ = ["build_bundle", "BuildResult"]
