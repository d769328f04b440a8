"""The build pipeline (``hellofmt build``): from a teacher and original data to a bundle.

One stage per module: :mod:`.inputs` (image-folder tree, class map), :mod:`.teachers`,
:mod:`.distill` (projector distillation, DDP under torchrun), :mod:`.images` (RDED-style selection or
given images), :mod:`.refine`, :mod:`.fidelity`, :mod:`.checkpoint`, and :mod:`.pipeline`, which
chains them. The runtime (bundle, projector, dataset) never imports this package.

``hellofmt.build`` is itself callable, so ``import hellofmt.build; hellofmt.build(...)`` reads like
the command line it mirrors; ``from hellofmt.build import build`` is the same function.
"""

from __future__ import annotations

import sys
import types

from .pipeline import BuildResult, build

__all__ = ["build", "BuildResult"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> BuildResult:
        return build(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
