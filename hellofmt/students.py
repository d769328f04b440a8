"""Students and student recipes for ``hellofmt eval``: the ``--student`` specs and the protocols.

A bundle is judged by the student it trains, so the student and its recipe are named, fixed and
documented: a number from ``hellofmt eval --protocol rded`` is meant to sit next to a number from
RDED's paper. Three student spec forms, parsed here and nowhere else:

- ``convnet`` or ``convnet:depth=D,width=W,norm=instance|batch|none`` — ConvNet-D3, the dataset-
  distillation field's small standard student (:class:`ConvNet`);
- ``timm:NAME`` — a timm architecture, randomly initialised (``pretrained=False``), wrapped so that
  it takes images in [0, 1] and normalises them with the architecture's mean and std;
- ``FILE.py:FACTORY`` — a Python file imported with importlib; ``FACTORY(num_classes)`` returns an
  ``nn.Module`` taking images in [0, 1]. It is code you wrote, run as such.

The protocols are frozen dataclasses (:class:`QuickProtocol`, :class:`RDEDProtocol`,
:class:`SRe2LProtocol`); every field can be overridden (:func:`get_protocol`). ``docs/eval.md`` lists
each preset's values and the file of the paper's code they come from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import EvalInputError
from .manifest import MAX_IMAGE_SIDE, MIX_MODES

__all__ = [
    "PROTOCOLS",
    "ConvNet",
    "Protocol",
    "QuickProtocol",
    "RDEDProtocol",
    "SRe2LProtocol",
    "StudentSpec",
    "build_student",
    "check_student",
    "get_protocol",
    "kd_loss",
    "lr_factor",
    "make_optimizer",
    "parse_student_spec",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NORMS = ("instance", "batch", "none")
SCHEDULES = ("onecycle", "cosine", "half-cosine", "constant")


# --------------------------------------------------------------------------------------------------
# ConvNet-D3
# --------------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """ConvNet-D``depth``: ``depth`` x [conv 3x3 ``width``, norm, ReLU, avg-pool 2], then a linear
    head on the flattened features, as in the dataset-distillation literature (DC/DM/MTT, and RDED's
    ``conv3``; "instance" norm is ``GroupNorm(width, width)``, their instance norm).

    Args:
        num_classes: outputs of the head.
        image_size: the input side the head is sized for (the flattened feature map).
        width: channels of every conv layer.
        depth: conv blocks; each halves the resolution.
        norm: ``"instance"`` (the field's default), ``"batch"`` (RDED's conv3) or ``"none"``.
    """

    def __init__(self, num_classes: int, image_size: int = 32, *, width: int = 128, depth: int = 3,
                 norm: str = "instance") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = 3, int(image_size)
        for _ in range(depth):
            layers.append(nn.Conv2d(channels, width, 3, padding=1))
            if norm == "instance":
                layers.append(nn.GroupNorm(width, width, affine=True))
            elif norm == "batch":
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            channels, side = width, side // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * side * side, num_classes)
        self.image_size = int(image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# --------------------------------------------------------------------------------------------------
# student specs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudentSpec:
    """A parsed ``--student``: ``kind`` is ``convnet``, ``timm`` or ``file``."""

    kind: str
    name: str = ""  # timm architecture, or FILE.py path
    factory: str | None = None
    width: int = 128
    depth: int = 3
    norm: str = "instance"

    def describe(self) -> str:
        if self.kind == "convnet":
            return f"convnet:depth={self.depth},width={self.width},norm={self.norm}"
        if self.kind == "timm":
            return f"timm:{self.name}"
        return f"{Path(self.name).name}:{self.factory}"


_SPEC_FIX = "use convnet, convnet:depth=D,width=W,norm=instance|batch|none, timm:NAME or FILE.py:FACTORY"


def parse_student_spec(spec: str) -> StudentSpec:
    """Parse a ``--student`` spec (see the module docstring); EvalInputError for anything else."""
    if not isinstance(spec, str) or not spec.strip():
        raise EvalInputError("empty student spec", field="--student", fix=_SPEC_FIX)
    spec = spec.strip()
    if spec == "convnet" or spec.startswith("convnet:"):
        opts: dict[str, object] = {}
        for item in filter(None, spec[len("convnet:"):].split(",")) if ":" in spec else []:
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in ("depth", "width", "norm"):
                raise EvalInputError(f"unknown convnet option {item!r}", field="--student", fix=_SPEC_FIX)
            if key == "norm":
                if value not in _NORMS:
                    raise EvalInputError(f"convnet norm must be one of {', '.join(_NORMS)}, got {value!r}",
                                         field="--student")
                opts[key] = value
            else:
                if not value.isdigit() or not 1 <= int(value) <= (8 if key == "depth" else 4096):
                    raise EvalInputError(f"convnet {key} must be a positive integer, got {value!r}", field="--student",
                                         fix="depth in 1..8, width in 1..4096")
                opts[key] = int(value)
        return StudentSpec("convnet", **opts)  # type: ignore[arg-type]
    if spec.startswith("timm:"):
        name = spec[len("timm:"):]
        if not name:
            raise EvalInputError("no architecture after 'timm:'", field="--student", fix="e.g. timm:resnet18")
        return StudentSpec("timm", name)
    path, sep, factory = spec.rpartition(":")
    if sep and path.endswith(".py") and factory.isidentifier():
        return StudentSpec("file", path, factory=factory)
    raise EvalInputError(f"cannot parse student spec {spec!r}", field="--student", fix=_SPEC_FIX)


def _timm_student(spec: StudentSpec, num_classes: int) -> nn.Module:
    # The builder's check (timm installed, architecture known) and input wrapper, so teachers and
    # students say and do the same.
    from .builder.teachers import Normalize, check_timm_architecture

    timm = check_timm_architecture(spec.name, error=EvalInputError, option="--student")
    try:
        model = timm.create_model(spec.name, pretrained=False, num_classes=num_classes)
    except Exception as e:  # noqa: BLE001 - timm raises many kinds for bad configurations
        raise EvalInputError(f"timm cannot build {spec.name!r}: {e}", field="--student") from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return Normalize(model, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))


def _file_student(spec: StudentSpec, num_classes: int) -> nn.Module:
    path = Path(spec.name)
    if not path.is_file():
        raise EvalInputError("student file not found", file=path, field="--student", fix="give FILE.py:FACTORY")
    mod_name = "hellofmt_student_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module = sys.modules.get(mod_name)
    if module is None:
        try:
            ispec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(ispec)
            sys.modules[mod_name] = module  # DDP and dataclasses look modules up by name
            ispec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file can raise anything at import
            sys.modules.pop(mod_name, None)
            raise EvalInputError(f"importing it failed: {type(e).__name__}: {e}", file=path,
                                 field="--student") from None
    factory = getattr(module, spec.factory, None)
    if not callable(factory):
        raise EvalInputError(f"has no function {spec.factory!r}", file=path, field="--student",
                             fix="FACTORY must name a function FACTORY(num_classes) defined in the file")
    try:
        model = factory(num_classes)
    except Exception as e:  # noqa: BLE001
        raise EvalInputError(f"{spec.factory}({num_classes}) raised {type(e).__name__}: {e}", file=path,
                             field="--student") from None
    if not isinstance(model, nn.Module):
        raise EvalInputError(f"{spec.factory}() returned {type(model).__name__}, not a torch.nn.Module", file=path,
                             field="--student")
    return model


def build_student(spec: str | StudentSpec, num_classes: int, image_size: int) -> tuple[nn.Module, str]:
    """A freshly initialised student (from torch's global generator: seed it first).

    Args:
        spec: a ``--student`` spec string or a parsed :class:`StudentSpec`.
        num_classes: the bundle's class count (the head's width).
        image_size: the side of the views it will see (sizes ConvNet's head).

    Returns:
        ``(module taking float images [B, 3, S, S] in [0, 1], one-line description)``.

    Raises:
        EvalInputError: an unparsable spec, an unknown timm architecture, a factory that fails.
    """
    s = spec if isinstance(spec, StudentSpec) else parse_student_spec(spec)
    if s.kind == "convnet":
        if image_size >> s.depth < 1:
            raise EvalInputError(f"convnet of depth {s.depth} needs images of at least {1 << s.depth} px, "
                                 f"got {image_size}", field="--student", fix="lower depth= or raise --image-size")
        model: nn.Module = ConvNet(num_classes, image_size, width=s.width, depth=s.depth, norm=s.norm)
    elif s.kind == "timm":
        model = _timm_student(s, num_classes)
    else:
        model = _file_student(s, num_classes)
    return model, s.describe()


def check_student(model: nn.Module, num_classes: int, image_size: int, device: torch.device, *, name: str) -> None:
    """Run ``model`` once on two blank images and raise EvalInputError unless it returns finite
    logits of shape ``[2, num_classes]``: a wrong head is refused before any training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.full((2, 3, image_size, image_size), 0.5, device=device))
    except Exception as e:  # noqa: BLE001 - a user's module can raise anything
        raise EvalInputError(f"student forward on a [2, 3, {image_size}, {image_size}] batch failed: "
                             f"{type(e).__name__}: {str(e)[:300]}", field="--student", file=name,
                             fix="a student takes float images in [0, 1] at --image-size") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EvalInputError(f"student returned {shape}; expected logits [2, {num_classes}]", field="--student",
                             file=name)
    if out.shape[1] != num_classes:
        raise EvalInputError(
            f"student outputs {out.shape[1]} classes but the bundle has {num_classes}", field="--student", file=name,
            fix="the student's head needs one output per bundle class (FACTORY receives num_classes)",
        )


# --------------------------------------------------------------------------------------------------
# protocols
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """A student recipe: every hyperparameter of training a student on a bundle.

    Fields left ``None`` are resolved per bundle by :meth:`resolved` (the bundle's image size, its
    label recipe's crop scale, a paper's batch-size rule).

    Attributes:
        name: the preset's name (``quick``, ``rded``, ``sre2l``).
        student: the default ``--student`` spec.
        epochs: passes over the bundle's images.
        batch_size: images per step (across all processes under torchrun); capped at the set's size.
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9).
        betas: AdamW's betas.
        no_decay_1d: no weight decay on biases and norm parameters (RDED's and SRe2L's grouping).
        schedule: ``onecycle`` (warm-up 30%, then cosine to 0), ``cosine`` (to 0), ``half-cosine``
            (``0.5 (1 + cos(pi t / 2))``, from 1 to 0.5: RDED's code) or ``constant``.
        schedule_per_epoch: step the schedule once per epoch (the papers) rather than per batch.
        temperature: ``T`` of ``softmax(logits / T)`` for both the labels and the student.
        t2: multiply the KL loss by ``T**2`` (Hinton's scaling; the papers leave it out).
        mix: the loader's mixing: ``none``, ``cutmix``, ``mixup``, ``cutmix-mixup``.
        scale: RandomResizedCrop area range; ``None``: the bundle's label recipe.
        flip: random horizontal flips.
        image_size: the student's input side; ``None``: the bundle's image size.
        val_resize: validation images are resized to ``image_size * val_resize`` (short side) and
            centre-cropped to ``image_size`` (1.0: resized straight to the side, as the builder does).
    """

    name: str = "custom"
    student: str = "convnet"
    epochs: int = 100
    batch_size: int | None = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    no_decay_1d: bool = True
    schedule: str = "cosine"
    schedule_per_epoch: bool = False
    temperature: float = 4.0
    t2: bool = True
    mix: str = "cutmix"
    scale: tuple[float, float] | None = None
    flip: bool = True
    image_size: int | None = None
    val_resize: float = 1.0

    def resolved(
        self, *, num_images: int, num_classes: int, image_size: int, recipe_scale, build_args: dict
    ) -> Protocol:
        """This protocol with every ``None`` filled in for one bundle (``batch_size`` capped at
        ``num_images``)."""
        bs = self.batch_size if self.batch_size is not None else 64
        return dataclasses.replace(
            self,
            batch_size=max(1, min(bs, num_images)),
            scale=tuple(self.scale if self.scale is not None else recipe_scale),
            image_size=self.image_size or image_size,
        )

    def hyperparameters(self) -> dict:
        """The fields as JSON values (what ``--json`` and ``--record`` store)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class QuickProtocol(Protocol):
    """``quick``: a CPU check in minutes, for small sets (tens of images per class at 32-64 px).

    ConvNet-D3 at width 64 (``convnet:width=64``, instance norm), 160 epochs of batch 32 (8 classes x
    10 images: 480 steps), AdamW (lr 3e-3, weight decay 5e-4, betas 0.9/0.999, no decay on biases
    and norms), one-cycle schedule per step (30% warm-up from lr/25, cosine to 0), KL at T = 4 with
    the T^2 factor, the loader's CutMix (Beta(1, 1) per image), random resized crops over the
    bundle's recipe scale, flips, validation at the bundle's image size. Not a paper's recipe: chosen
    on the quickstart's bundle (8 classes x 10 images, 32 px) so that one arm and seed trains in about
    20 s on 2 CPU cores; width 64 matched width 128 there at two thirds of the time (docs/eval.md).
    Its length is in epochs, so it grows with the bundle: for larger sets use ``--epochs`` or ``rded``.
    """

    name: str = "quick"
    student: str = "convnet:width=64"
    epochs: int = 160
    batch_size: int | None = 32
    lr: float = 3e-3
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    temperature: float = 4.0
    t2: bool = True
    mix: str = "cutmix"


@dataclass(frozen=True)
class RDEDProtocol(Protocol):
    """``rded``: the student recipe of RDED (Sun et al., CVPR 2024), from LINs-lab/RDED's
    ``argument.py``, ``validation/main.py``, ``validation/utils.py`` and ``scripts/*.sh``.

    Student ResNet-18 (``timm:resnet18``, torchvision's architecture; RDED uses ``conv3``, a
    batch-norm ConvNet-D3, for CIFAR: ``--student convnet:norm=batch``), 300 epochs, AdamW (lr 1e-3,
    the value ``argument.py`` sets for resnet18 and conv3-6; betas 0.9/0.999; weight decay 0.01, none
    on biases and norms), the schedule of ``validation/main.py`` stepped per epoch:
    ``0.5 (1 + cos(pi e / E / 2))`` (1 down to 0.5), KL (``KLDivLoss(reduction="batchmean")``) at
    T = 20 (``argument.py``'s value for CutMix; 4 for MixUp) without the T^2 factor, CutMix
    (Beta(1, 1)), random resized crop with scale ``(1 / factor, 1)`` where ``factor`` is the
    bundle's build ``--factor`` (2 when not recorded), flips, batch size by ``argument.py``'s rule
    (50 for 10 images per class, 100 for 50, 10 for 1; doubled for 100 or more classes; capped at the
    set's size), validation images resized to 8/7 of the side and centre-cropped.
    """

    name: str = "rded"
    student: str = "timm:resnet18"
    epochs: int = 300
    batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    schedule: str = "half-cosine"
    schedule_per_epoch: bool = True
    temperature: float = 20.0
    t2: bool = False
    mix: str = "cutmix"
    val_resize: float = 8 / 7

    def resolved(
        self, *, num_images: int, num_classes: int, image_size: int, recipe_scale, build_args: dict
    ) -> Protocol:
        ipc = max(1, num_images // max(1, num_classes))
        bs = self.batch_size
        if bs is None:  # argument.py: 100 at ipc 50, 50 at ipc 10, 10 at ipc 1; x2 at 100+ classes
            bs = 100 if ipc >= 50 else 50 if ipc >= 10 else 10
            if num_classes >= 100:
                bs *= 2
        scale = self.scale
        if scale is None:
            factor = build_args.get("factor") if isinstance(build_args, dict) else None
            factor = factor if isinstance(factor, int) and not isinstance(factor, bool) and factor >= 1 else 2
            scale = (1.0 / factor, 1.0)
        return dataclasses.replace(self, batch_size=max(1, min(bs, num_images)), scale=tuple(scale),
                                   image_size=self.image_size or image_size)


@dataclass(frozen=True)
class SRe2LProtocol(Protocol):
    """``sre2l``: the student recipe of SRe2L (Yin et al., NeurIPS 2023) ``train_KD``, from
    VILA-Lab/SRe2L's ``SRe2L/validate/train_KD.py`` and ``train_KD.sh``.

    Student ResNet-18 (``timm:resnet18``), 300 epochs, global batch 1024 (``--batch-size 512
    --gradient-accumulation-steps 2``; capped at the set's size), AdamW (lr 1e-3, weight decay 0.01,
    none on biases and norms, betas 0.9/0.999), cosine ``0.5 (1 + cos(pi e / E))`` stepped per epoch
    (``--cos``), KL (``KLDivLoss(reduction="batchmean")``) at T = 20 (``train_KD.sh``; the script's
    own default is 3) without the T^2 factor, CutMix (Beta(1, 1)), random resized crop scale
    (0.08, 1), flips, validation images resized to 256/224 of the side and centre-cropped.
    """

    name: str = "sre2l"
    student: str = "timm:resnet18"
    epochs: int = 300
    batch_size: int | None = 1024
    lr: float = 1e-3
    weight_decay: float = 0.01
    schedule: str = "cosine"
    schedule_per_epoch: bool = True
    temperature: float = 20.0
    t2: bool = False
    mix: str = "cutmix"
    scale: tuple[float, float] | None = (0.08, 1.0)
    val_resize: float = 256 / 224


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (QuickProtocol(), RDEDProtocol(), SRe2LProtocol())}


def _positive(name: str, v, *, integer: bool = False, zero: bool = False):
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not math.isfinite(v) or (v < 0 if zero else v <= 0):
        want = "an integer" if integer else "a number"
        raise EvalInputError(f"expected {want} {'>= 0' if zero else '> 0'}, got {v!r}",
                             field=f"--{name.replace('_', '-')}")
    return v


def get_protocol(name: str | Protocol, **overrides) -> Protocol:
    """The preset ``name`` (``quick``, ``rded``, ``sre2l``) with ``overrides`` (fields of
    :class:`Protocol`; ``None`` values are ignored) applied and checked.

    Raises:
        EvalInputError: an unknown protocol, an unknown field, or a value out of range.
    """
    if isinstance(name, Protocol):
        proto = name
    else:
        proto = PROTOCOLS.get(name) if isinstance(name, str) else None
        if proto is None:
            raise EvalInputError(f"unknown protocol {name!r}", field="--protocol",
                                 fix=f"choose one of {', '.join(PROTOCOLS)}")
    known = {f.name for f in dataclasses.fields(Protocol)}
    changes = {k: v for k, v in overrides.items() if v is not None}
    bad = sorted(set(changes) - known)
    if bad:
        raise EvalInputError(f"unknown protocol setting(s): {', '.join(bad)}", field="protocol",
                             fix=f"settings are {', '.join(sorted(known))}")
    for key in ("epochs", "batch_size", "image_size"):
        if key in changes:
            _positive(key, changes[key], integer=True)
    if "image_size" in changes and changes["image_size"] > MAX_IMAGE_SIDE:
        raise EvalInputError(f"expected at most {MAX_IMAGE_SIDE}, got {changes['image_size']}", field="--image-size")
    for key in ("lr", "temperature", "val_resize"):
        if key in changes:
            _positive(key, changes[key])
    if "weight_decay" in changes:
        _positive("weight_decay", changes["weight_decay"], zero=True)
    if "mix" in changes and changes["mix"] not in MIX_MODES:
        raise EvalInputError(f"mix must be one of {', '.join(MIX_MODES)}, got {changes['mix']!r}", field="--mix")
    if "schedule" in changes and changes["schedule"] not in SCHEDULES:
        raise EvalInputError(f"schedule must be one of {', '.join(SCHEDULES)}", field="schedule")
    if "optimizer" in changes and changes["optimizer"] not in ("adamw", "sgd"):
        raise EvalInputError("optimizer must be adamw or sgd", field="optimizer")
    if "scale" in changes:
        sc = changes["scale"]
        if not (isinstance(sc, (list, tuple)) and len(sc) == 2 and 0 < sc[0] <= sc[1] <= 1):
            raise EvalInputError(f"scale must be two numbers 0 < min <= max <= 1, got {sc!r}", field="--scale")
        changes["scale"] = tuple(float(x) for x in sc)
    return dataclasses.replace(proto, **changes)


# --------------------------------------------------------------------------------------------------
# training pieces
# --------------------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, proto: Protocol) -> torch.optim.Optimizer:
    """The protocol's optimiser over ``model``'s parameters (with RDED's/SRe2L's grouping: weight
    decay only on parameters named ``*weight*`` with more than one dimension, when ``no_decay_1d``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if proto.no_decay_1d:
        decay = [p for n, p in model.named_parameters() if p.requires_grad and "weight" in n and p.dim() > 1]
        ids = {id(p) for p in decay}
        groups = [{"params": decay}, {"params": [p for p in params if id(p) not in ids], "weight_decay": 0.0}]
    else:
        groups = [{"params": params}]
    if proto.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=proto.lr, momentum=0.9, weight_decay=proto.weight_decay)
    return torch.optim.AdamW(groups, lr=proto.lr, betas=tuple(proto.betas), weight_decay=proto.weight_decay)


def lr_factor(schedule: str, t: float) -> float:
    """The learning-rate multiplier at training progress ``t`` in [0, 1] for ``schedule``."""
    t = min(max(t, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "half-cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t / 2))
    if schedule == "onecycle":
        warm = 0.3
        if t < warm:  # like torch's OneCycleLR: from lr/25 up to lr
            return 0.04 + 0.96 * 0.5 * (1.0 - math.cos(math.pi * t / warm))
        return 0.5 * (1.0 + math.cos(math.pi * (t - warm) / (1.0 - warm)))
    return 1.0


def kd_loss(student_logits: torch.Tensor, soft: torch.Tensor, temperature: float, t2: bool) -> torch.Tensor:
    """``KL(soft || softmax(student / T))``, mean over the batch (``batchmean``), times ``T**2``
    when ``t2``. ``soft`` is already ``softmax(labeller / T)`` (the loader computes it)."""
    log_p = torch.log_softmax(student_logits.float() / temperature, dim=1)
    loss = torch.nn.functional.kl_div(log_p, soft.float(), reduction="batchmean")
    return loss * temperature**2 if t2 else loss
