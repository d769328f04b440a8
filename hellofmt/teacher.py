"""The projector as a drop-in teacher model for tools built around one.

Distillation tools (SRe2L's ``train_KD``, RDED's validation, DD-Ranking's live soft-label mode)
take a teacher ``nn.Module``, feed it the student's batch *normalised their way* (torchvision's
``Normalize`` with ImageNet's mean and std, or CIFAR's), and read logits. A bundle stores no teacher,
only a projector that wants images in [0, 1]. :class:`ProjectorTeacher` bridges the two: it undoes
the tool's normalisation, clamps to [0, 1] and returns the projector's logits, so such a tool can
train students from a bundle with no stored labels. Get one with
:meth:`hellofmt.DistilledDataset.as_teacher`.

The module owns no parameters and no buffers: the projector is held by reference, outside the module
tree, so ``teacher.state_dict()`` is empty (a checkpoint of the tool does not copy the foundation),
``teacher.cuda()``, ``.half()`` or ``nn.DataParallel(teacher)`` leave the projector where the dataset
put it, and ``teacher.train()`` cannot switch any of its layers to training mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .projector import Projector

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD", "ProjectorTeacher"]

# What torchvision's ImageNet recipes, timm's defaults, SRe2L and RDED normalise with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What DD-Ranking (and the CIFAR distillation literature it follows) normalises CIFAR-10/100 with.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def _check_channels(values, field: str, *, positive: bool) -> tuple[float, float, float]:
    """Three finite floats (``> 0`` when ``positive``) from a sequence or a tensor, else InputError."""
    if isinstance(values, torch.Tensor):
        values = values.detach().reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InputError(
            f"expected a sequence of 3 numbers (one per RGB channel), got {type(values).__name__}",
            field=field,
            fix=f"pass e.g. {field}={IMAGENET_MEAN if field == 'mean' else IMAGENET_STD}",
        )
    if len(values) != 3:
        raise InputError(f"expected 3 values (one per RGB channel), got {len(values)}", field=field)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputError(f"expected finite numbers, got {list(values)!r}", field=field)
        if positive and v <= 0:
            raise InputError(f"every value must be > 0, got {list(values)!r}", field=field)
        out.append(float(v))
    return out[0], out[1], out[2]


def _check_batch(images) -> None:
    if not isinstance(images, torch.Tensor):
        raise InputError(f"expected a torch.Tensor, got {type(images).__name__}", field="images")
    if not images.dtype.is_floating_point:
        raise InputError(
            f"expected normalised float images, got dtype {str(images.dtype).removeprefix('torch.')}",
            field="images",
            fix="the teacher takes what the tool's Normalize transform outputs",
        )
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"expected a batch [B, 3, H, W], got shape {list(images.shape)}", field="images")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise InputError(f"empty batch: shape {list(images.shape)}", field="images")


class ProjectorTeacher(nn.Module):
    """A bundle's projector behind a teacher's interface: normalised images in, logits out.

    ``forward(x)`` computes ``projector(clamp(x * std + mean, 0, 1))``, divided by ``temperature``
    when one is given. Any input size works (the projector resizes to its foundation's input size).
    Inputs on another device are moved to the projector's and the logits are moved back, in the
    input's dtype. No value check is made on the input (normalised images have no fixed range), and
    gradients flow to an input that requires them (zero where the clamp is active), as they would
    through a real teacher; the projector's own weights never receive any. Without an input that
    requires grad no graph is built, so tools that call the teacher outside ``torch.no_grad`` (SRe2L's
    ``train_KD``, DD-Ranking) pay nothing for it.

    Args:
        projector: the projector (``DistilledDataset.projector``), already on its device.
        mean: the per-channel mean the tool normalises with (3 floats).
        std: the per-channel standard deviation the tool normalises with (3 floats > 0).
        temperature: divide the logits by this (a number > 0); ``None`` returns raw logits, which is
            what tools that apply their own temperature (all three above) expect.

    Raises:
        InputError: ``mean``, ``std`` or ``temperature`` malformed (the error names the field).
    """

    def __init__(
        self,
        projector: Projector,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        temperature: float | None = None,
    ) -> None:
        super().__init__()
        mean = _check_channels(mean, "mean", positive=False)
        std = _check_channels(std, "std", positive=True)
        if temperature is not None and (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise InputError(f"temperature must be None or a number > 0, got {temperature!r}", field="temperature")
        self.mean = mean
        self.std = std
        self.temperature = None if temperature is None else float(temperature)
        device = projector.head_weight.device
        # Held outside the module tree (object.__setattr__ skips nn.Module's registration): no
        # parameters or buffers to copy into checkpoints, and a tool's .cuda()/.half()/.train()
        # cannot move, cast or unfreeze the dataset's projector.
        object.__setattr__(self, "_projector", projector)
        object.__setattr__(self, "_mean", torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1))
        object.__setattr__(self, "_std", torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1))
        super().train(False)

    @property
    def projector(self) -> Projector:
        """The projector the logits come from (shared with the dataset, not a copy)."""
        return self._projector

    @property
    def device(self) -> torch.device:
        """Where the projector runs (inputs are moved here; outputs go back to the input's device)."""
        return self._projector.head_weight.device

    @property
    def num_classes(self) -> int:
        return int(self._projector.num_classes)

    def train(self, mode: bool = True) -> ProjectorTeacher:
        """A no-op that returns ``self``: the teacher is always in eval mode (tools call
        ``teacher.train()``/``.eval()`` freely; the projector's weights and normalisation layers are
        pinned)."""
        return self

    def unnormalise(self, images: torch.Tensor) -> torch.Tensor:
        """``clamp(images * std + mean, 0, 1)`` in float32 on the projector's device."""
        x = images.to(device=self.device, dtype=torch.float32, non_blocking=True)
        return (x * self._std + self._mean).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` for a batch ``[B, 3, H, W]`` normalised with this teacher's ``mean``/``std``.

        Args:
            images: float tensor on any device, any ``H, W``.

        Returns:
            ``[B, C]`` logits (divided by ``temperature`` if set) in ``images.dtype`` on ``images.device``.

        Raises:
            InputError: ``images`` is not a non-empty float ``[B, 3, H, W]`` tensor.
        """
        _check_batch(images)
        logits = self._projector(self.unnormalise(images)).float()
        if self.temperature is not None:
            logits = logits / self.temperature
        return logits.to(device=images.device, dtype=images.dtype)

    def extra_repr(self) -> str:
        t = "" if self.temperature is None else f", temperature={self.temperature:g}"
        return f"classes={self.num_classes}, mean={self.mean}, std={self.std}{t}, device={self.device}"
