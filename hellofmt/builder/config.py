"""The build options, written once: :class:`BuildConfig`, a dataclass whose fields carry type, default and help.

As PEFT's ``LoraConfig`` and transformers' ``TrainingArguments`` do, each option is one dataclass field
made with :func:`option` (default, help text, and what the command line needs beyond the type: another
option name, choices, a metavar). Everything else is derived from the field's type: ``bool`` becomes a
flag (``--x/--no-x`` when the default is None), ``tuple[T, ...]`` a repeatable option, ``tuple[T, T]``
an option taking two values (click's ``nargs``). :func:`click_options` turns the fields into the options
of ``hellofmt build``; :meth:`BuildConfig.validate` checks the values before any heavy work;
:meth:`BuildConfig.to_dict` is what a bundle's ``provenance.build_args`` records, and
:meth:`BuildConfig.from_dict` reads it back.

The inputs a build starts from and writes to (training data and its class map, teachers and their
weights, the foundation, pre-made images, the output folder) are arguments of
:func:`~hellofmt.builder.build_bundle`, not fields: in Python they may be tensors, modules or dicts.
This module imports neither torch nor the rest of the builder, so the CLI can build its options from it
cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import click

from ..errors import BuildInputError, HellofmtError
from ..manifest import CODECS, DELTA_ENCODINGS, MIX_MODES

__all__ = ["LOSSES", "SELECTIONS", "RESUME_FIELDS", "BuildConfig", "auto_num_workers", "bad_image_limit",
           "click_options", "default_image_size", "load_side", "option", "option_name"]

LOSSES = ("kl", "mse")
SELECTIONS = ("confidence", "kmeans", "random")
LARGE_IMAGE = 128  # px: from this side on, the ImageNet-style defaults apply (see BuildConfig.resolved)
MIN_IMAGE_SIZE = 8  # px: the smallest --image-size


def default_image_size(foundation_side: int, source_side: int | None) -> int:
    """The synthetic image side when ``--image-size`` is not given: the foundation's input side, or the
    source images' (their median short side, :func:`~hellofmt.builder.inputs.source_side`) when those are
    smaller. A 32-px set stays at 32 px under a 224-px foundation (the projector resamples each view to
    its input size), as RDED keeps CIFAR at 32 px: 49x fewer stored pixels than upsampled copies, and
    students that train and validate at the data's own resolution."""
    if source_side is None:
        return int(foundation_side)
    return max(MIN_IMAGE_SIZE, min(int(foundation_side), int(source_side)))


AUTO_WORKERS_MIN_IMAGES = 256  # below this many training images, --num-workers defaults to 0 (see auto_num_workers)
AUTO_WORKERS_MAX = 16
DEFAULT_BAD_FRACTION = 0.001  # --max-bad-images default: 0.1% of the training images ...
DEFAULT_BAD_MIN = 10  # ... and at least this many


def option(default: Any, help: str, *, name: str | None = None, choices: typing.Sequence[str] | None = None,
           metavar: str | None = None, path: bool = False, resume: bool = False) -> Any:
    """A config field: ``default`` and ``help`` text, plus what the command line needs beyond the type.

    Args:
        default: the default value (immutable: a tuple, not a list).
        help: one sentence for ``--help``.
        name: the option's name when it is not ``--field-name`` (``templates`` -> ``--template``).
        choices: the allowed values (a ``click.Choice``).
        metavar: how ``--help`` names the value(s), e.g. ``"MIN MAX"`` for a pair.
        path: the value is a file or folder path.
        resume: a resumed build must have the same value as the run that wrote the checkpoints.

    Returns:
        A :func:`dataclasses.field` with this in its ``metadata``.
    """
    cli = {k: v for k, v in (("name", name), ("choices", tuple(choices) if choices else None),
                             ("metavar", metavar), ("path", path or None)) if v is not None}
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli, "resume": resume})


@dataclass
class BuildConfig:
    """Every option of a build (``hellofmt build``) that has a default; see :func:`option` for the metadata.

    Lists given for ``templates`` or ``targets`` become tuples (an empty one becomes None, the default);
    a ``torch.device`` or a path becomes a string, so that :meth:`to_dict` is plain JSON. Values are
    checked by :meth:`validate`, which :func:`~hellofmt.builder.build_bundle` calls before any heavy work.
    """

    # -- how many images (the alternative, a folder of images, is an argument of build_bundle) ------
    ipc: int | None = option(
        None, "Images per class, selected RDED-style from the training data (no default: give --ipc or --images).",
        resume=True)
    # -- projector ---------------------------------------------------------------------------------
    templates: tuple[str, ...] | None = option(
        None, "Prompt template with {} for the class name (repeatable; default: hellofmt.projector's templates).",
        name="--template")
    rank: int = option(16, "Rank of the encoder deltas (16: chosen by students, benchmarks/README.md; rank 8 "
                       "with head rank 8 halves the payload for 0.3 to 0.6 points of student accuracy).", resume=True)
    head_rank: int | None = option(16, "Rank of the head delta (0: none).", resume=True)  # None: the same as rank
    alpha: float | None = option(None, "Delta scale alpha (default: the rank).", resume=True)
    head_alpha: float | None = option(None, "Head delta scale (default: the head rank).", resume=True)
    targets: tuple[str, ...] | None = option(
        None, "Regex over foundation parameter names (repeatable; default: per foundation family).", resume=True)
    delta_dtype: str = option("int8", "Encoding of the stored deltas: int8 (per-row scales, 1/4 of float32) or a float "
                              "dtype; the probe and fidelity are measured on the stored deltas.",
                              choices=DELTA_ENCODINGS)
    # -- distillation ------------------------------------------------------------------------------
    epochs: float = option(10.0, "Distillation epochs over the original data.")
    steps: int | None = option(
        None, "Distillation steps (overrides --epochs; default: from --epochs and --min-steps).")
    batch_size: int = option(64, "Batch size per process.", resume=True)
    lr: float = option(5e-3, "Learning rate of the distillation (AdamW, cosine schedule).")
    weight_decay: float = option(0.01, "AdamW weight decay of the distillation.")
    loss: str = option("kl", "Imitation loss: KL to the teacher at --temperature, or MSE on logits.",
                       choices=LOSSES, resume=True)
    ce_weight: float = option(0.1, "Weight of the hard-label cross-entropy.")
    temperature: float = option(1.0, "Label temperature (KL loss, manifest recipe).")
    mix: str = option("cutmix", "The loader's default mixing (label recipe).", choices=MIX_MODES)
    distill_mix: str | None = option(
        "none", "Mixing of the distillation views. Default none: projectors distilled on unmixed views labelled "
        "held-out views more like the teacher and trained better students on both benchmark sets "
        "(benchmarks/README.md); the students' CutMix views are still labelled. Null in a recorded "
        "build_args (0.2.0) means --mix.",
        choices=MIX_MODES)
    # -- images ------------------------------------------------------------------------------------
    image_size: int | None = option(
        None, "Synthetic image side (default: the foundation's input size, or the training images' median "
        "short side when that is smaller).", resume=True)
    load_size: int | None = option(
        None, "Side original images are read at, for the distillation's views, the selection and the held-out "
        "views (default: --image-size itself for whole-image builds, --select-scale 1 1, the default below "
        "128 px, so that kept images are the originals; 8/7 of --image-size for builds from crops).")
    factor: int | None = option(
        None, "Patches per side stitched into each image (default: 1 below 128 px, 2 from 128 px).", resume=True)
    selection: str = option(
        "confidence", "How candidates are kept: confidence (RDED: the teacher's surest; chosen by students under "
        "a pretrained foundation, benchmarks/README.md), kmeans (one per cluster of the projector's embeddings, "
        "the one nearest its centre, among candidates the teacher gets right) or random (a random real subset: "
        "0.7 and 4.0 points behind confidence on the two 32-px sets, level with it at 64 px).",
        choices=SELECTIONS, resume=True)
    candidates: int = option(
        4, "Candidates scored per kept patch: the default pool of each class is ipc x factor^2 x this many "
        "candidates (see --pool-images and --pool-crops).")
    pool_images: int | None = option(
        None, "Original images drawn per class for the candidate pool (RDED's images per class; default: "
        "ipc x factor^2 x --candidates, at most the class's images).")
    pool_crops: int | None = option(
        None, "Candidate crops taken from each pooled image (RDED's crops per image; default: 1 for whole "
        "images, --select-scale 1 1; otherwise as many as make up ipc x factor^2 x --candidates candidates).")
    select_scale: tuple[float, float] | None = option(
        None, "Area range of the candidate crops, as fractions of an image (default: 1 1, whole images, below "
        "128 px; 0.25 1 from 128 px).", metavar="MIN MAX",
        resume=True)
    scale: tuple[float, float] | None = option(
        None, "Area range of the label recipe's random resized crops: distillation views, refinement, fidelity "
        "and the loader's default (default: 0.25 1 below 128 px, 0.08 1 from 128 px).", metavar="MIN MAX")
    min_steps: int = option(
        6000, "Floor on the distillation steps that --epochs gives: a small training set still gets enough "
        "steps (10 epochs of 1,300 images are 190 steps, far too few; 6000: chosen by students, "
        "benchmarks/README.md). 0: --epochs alone. Counted in steps of one process's batch and shared under "
        "torchrun: N processes run a floor of ceil(N0 / N) steps each, the same views as one process.")
    adapt_steps: int = option(
        0, "Steps that fine-tune the projector's deltas to the teacher on views of the bundle's own images "
        "(the label recipe's crops and mixing), after the images are chosen: the only images whose views the "
        "projector will label. 0 (the default): off; 2,000 steps cost students 6.8 points on shapes32 under a "
        "pretrained foundation, and moved them by -0.7 to +2.0 under one with random weights (benchmarks/README.md).")
    refine_steps: int = option(0, "Image refinement steps, per block of --refine-chunk images (0: off).",
                               resume=True)
    refine_lr: float = option(0.01, "Learning rate of the image refinement (Adam).")
    refine_prior: float = option(1.0, "Weight of the stay-near-init term.")
    refine_chunk: int = option(
        256, "Images refined together: memory is bounded by this block (5 float copies of it: the images, "
        "their start, the gradient, Adam's two moments), blocks are split across torchrun processes, and "
        "--refine-steps counts steps per block.")  # resumed with another size: the chunks are redone
    codec: str = option("png", "Codec of the stored images.", choices=CODECS)
    quality: int | None = option(None, "jpeg/webp quality, 1..100 (default: 90 for jpeg/webp; png and raw take none).")
    # -- fidelity ----------------------------------------------------------------------------------
    holdout: float = option(
        0.05, "Fraction of original images held out for fidelity, spread evenly over the classes and capped at "
        "about 2,000 in all or one per class, whichever is more (a class keeps at least one training image).")
    fidelity_views: int = option(4, "Augmented views per image for fidelity.")
    # -- output and run ----------------------------------------------------------------------------
    embed_foundation: bool | None = option(
        None, "Embed the foundation weights (default: only for random-init or config-file foundations).")
    checkpoint_dir: str | None = option(None, "Checkpoint folder (default: OUT.ckpt).", path=True)
    checkpoint_every: int = option(200, "Checkpoint every N steps.")
    resume: bool = option(False, "Continue from the last checkpoint.")
    keep_checkpoints: bool = option(False, "Keep the checkpoint folder after success.")
    overwrite: bool = option(False, "Replace an existing bundle at --out.")
    device: str | None = option(None, "cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available).")
    num_workers: int | None = option(
        None, "Data-loading worker processes per process (default: the CPUs available to this process under "
        "torchrun's LOCAL_WORLD_SIZE, less one for the main process, at most 16; 0 for in-memory data and for "
        f"fewer than {AUTO_WORKERS_MIN_IMAGES} training images).")
    max_bad_images: float | None = option(
        None, "Training images that may fail to decode during the build (skipped, counted and named in the "
        "manifest) before it stops: a count (1 or more), or a fraction of the images (below 1); 0 stops at the "
        f"first (default: {DEFAULT_BAD_FRACTION:.1%} of the images, at least {DEFAULT_BAD_MIN}).")
    seed: int = option(0, "Seed of every random choice of the build.", resume=True)

    def __post_init__(self) -> None:
        # Normalise, never raise: the checks (with the option's name in the error) are in validate().
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            base, arity = _shape(f.name)
            if arity is not None and isinstance(v, list):
                v = tuple(v)
            if arity == "many" and v == ():
                v = None
            elif base is int and isinstance(v, numbers.Integral) and not isinstance(v, bool):
                v = int(v)
            elif base is float and isinstance(v, numbers.Real) and not isinstance(v, bool):
                v = float(v)
            elif base is str and isinstance(v, os.PathLike):
                v = os.fspath(v)
            elif f.name == "device" and v is not None and not isinstance(v, str):
                v = str(v)  # a torch.device
            setattr(self, f.name, v)

    # -- checks ------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every value (types, ranges, choices, the device); the first problem raises.

        Raises:
            BuildInputError: naming the option (``field="--rank"``) and the accepted values.
        """
        for f in dataclasses.fields(self):
            _check_type(f, getattr(self, f.name))

        def bad(field: str, msg: str, fix: str | None = None):
            raise BuildInputError(msg, field=field, fix=fix)

        if self.ipc is not None and self.ipc < 1:
            bad("--ipc", f"expected an integer >= 1, got {self.ipc}")
        if self.factor is not None and self.factor < 1:
            bad("--factor", f"expected an integer >= 1, got {self.factor}")
        for key in ("scale", "select_scale"):
            v = getattr(self, key)
            if v is not None and not 0 < v[0] <= v[1] <= 1:
                bad(option_name(key), f"expected 0 < MIN <= MAX <= 1, got {v[0]} {v[1]}")
        if self.min_steps < 0:
            bad("--min-steps", f"expected an integer >= 0, got {self.min_steps}")
        if self.rank < 1 or (self.head_rank is not None and self.head_rank < 0):
            bad("--rank", "ranks must be >= 1 (--head-rank 0 turns the head delta off)")
        if self.loss not in LOSSES:
            bad("--loss", f"expected mse or kl, got {self.loss!r}")
        for key in ("mix", "distill_mix"):
            v = getattr(self, key)
            if v is not None and v not in MIX_MODES:
                bad(option_name(key), f"expected one of {', '.join(MIX_MODES)}, got {v!r}")
        if self.delta_dtype not in DELTA_ENCODINGS:
            bad("--delta-dtype", f"expected one of {', '.join(DELTA_ENCODINGS)}, got {self.delta_dtype!r}")
        if self.codec not in CODECS:
            bad("--codec", f"expected one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.temperature <= 0:
            bad("--temperature", "expected a number > 0")
        if not 0 <= self.holdout < 1:
            bad("--holdout", "expected a fraction in [0, 1)")
        if self.adapt_steps < 0:
            bad("--adapt-steps", f"expected an integer >= 0, got {self.adapt_steps}")
        if self.refine_steps < 0:
            bad("--refine-steps", "expected an integer >= 0")
        if self.steps is not None and self.steps < 1:
            bad("--steps", "expected an integer >= 1")
        if self.batch_size < 1:
            bad("--batch-size", "expected an integer >= 1")
        if self.image_size is not None and self.image_size < MIN_IMAGE_SIZE:
            bad("--image-size", f"expected an integer >= {MIN_IMAGE_SIZE}")
        if self.load_size is not None and self.load_size < 1:
            bad("--load-size", "expected an integer >= 1")
        if not self.lr > 0:
            bad("--lr", f"expected a number > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            bad("--weight-decay", f"expected a number >= 0, got {self.weight_decay}")
        if self.refine_steps > 0 and not self.refine_lr > 0:
            bad("--refine-lr", f"expected a number > 0, got {self.refine_lr}")
        if self.num_workers is not None and self.num_workers < 0:
            bad("--num-workers", f"expected an integer >= 0, got {self.num_workers}")
        if self.max_bad_images is not None and not (
                self.max_bad_images >= 0 and (self.max_bad_images < 1 or self.max_bad_images.is_integer())):
            bad("--max-bad-images", f"expected a count (an integer >= 0) or a fraction below 1, got "
                f"{self.max_bad_images}")
        if self.fidelity_views < 1:
            bad("--fidelity-views", f"expected an integer >= 1, got {self.fidelity_views}")
        for key in ("candidates", "pool_images", "pool_crops", "refine_chunk"):
            v = getattr(self, key)
            if v is not None and v < 1:
                bad(option_name(key), f"expected an integer >= 1, got {v}")
        # imagestore (codec rules) and torch (devices) are imported here, not at the top: importing this
        # module (the CLI does, to generate its options) must not load torch.
        from ..imagestore import check_codec

        try:
            check_codec(self.codec, self.quality)
        except HellofmtError as e:
            name = "--quality" if e.field == "quality" or "quality" in e.message else "--codec"
            if e.field in ("--quality", "--codec"):
                raise
            bad(name, e.message, e.fix)
        _check_device(self.device)

    # -- conversions -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON values (tuples become lists): what ``provenance.build_args`` records."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildConfig:
        """The config whose :meth:`to_dict` is ``data`` (fields left out keep their defaults).

        Raises:
            BuildInputError: for a key that is not a field (with the closest field name as the fix).
        """
        if not isinstance(data, Mapping):
            raise BuildInputError(f"a build config must be a mapping of option names, got {type(data).__name__}",
                                  field="config")
        _refuse_unknown(data)
        return cls(**data)

    def resolved(self, image_size: int) -> BuildConfig:
        """A copy with the size-dependent defaults filled in for synthetic images of side ``image_size``.

        Below :data:`LARGE_IMAGE` (128 px, CIFAR- and Tiny-ImageNet-sized sets): ``factor`` 1 (one
        real image per synthetic image), ``select_scale`` (1, 1) (whole images, not crops) and the label
        recipe's ``scale`` (0.25, 1). From 128 px (ImageNet-sized): RDED's ``factor`` 2, candidate crops
        over (0.25, 1) and the standard (0.08, 1). Chosen by students (``hellofmt eval``) on two 32-px
        sets: crops down to 8% of a 32-px image and 2x2 mosaics of 16-px patches lost to whole images
        on both; see benchmarks/README.md ("Build defaults chosen by students"). ``load_size``: the side
        originals are read at, by :func:`load_side` (the image side for whole-image builds, 8/7 of it for
        builds from crops).
        """
        small = image_size < LARGE_IMAGE
        select_scale = self.select_scale if self.select_scale is not None else ((1.0, 1.0) if small else (0.25, 1.0))
        return dataclasses.replace(
            self,
            factor=self.factor if self.factor is not None else (1 if small else 2),
            scale=self.scale if self.scale is not None else ((0.25, 1.0) if small else (0.08, 1.0)),
            select_scale=select_scale,
            load_size=load_side(self.load_size, image_size, select_scale),
        )

    def replace(self, **changes: Any) -> BuildConfig:
        """A copy with ``changes`` applied (``config.replace(rank=16)``); this config is left as it is.

        Raises:
            BuildInputError: for a name that is not a field (with the closest field name as the fix).
        """
        _refuse_unknown(changes)
        return dataclasses.replace(self, **changes)


def load_side(load_size: int | None, image_size: int, select_scale) -> int:
    """The side the build reads original images at (distillation views, selection, held-out views):
    ``--load-size`` when given; otherwise, for whole-image builds (``select_scale`` starting at 1, the
    default below 128 px), ``image_size`` itself: a kept image is the original resized once, as the
    eval's random arm reads real images (not enlarged by 8/7 and shrunk back, which blurred edges and
    textures), and the distillation's random crops are crops of the same images a student's views
    come from (measured: benchmarks/README.md, "The kept images were resampled twice"). Builds from
    crops (128 px and up) keep RDED's 8/7 margin."""
    if load_size:
        return int(load_size)
    if float(select_scale[0]) >= 1.0:
        return int(image_size)
    return max(int(image_size), round(image_size * 8 / 7))


# The options a resumed build must share with the run that wrote the checkpoints.
RESUME_FIELDS = tuple(f.name for f in dataclasses.fields(BuildConfig) if f.metadata["resume"])


def auto_num_workers(num_images: int, *, cpus: int | None = None, local_world_size: int | None = None) -> int:
    """The ``--num-workers`` default: the CPUs available to this process, less one for the main process.

    The CPUs are those this process may run on (``os.sched_getaffinity``, else ``os.cpu_count``) shared
    among the processes ``torchrun`` started on this machine (``LOCAL_WORLD_SIZE``), capped at
    :data:`AUTO_WORKERS_MAX` (16: beyond that the decoding rarely pays for the processes' memory). 0 when
    a process has one CPU, and 0 for fewer than :data:`AUTO_WORKERS_MIN_IMAGES` training images: starting
    worker processes costs more than decoding a few hundred images in the main process (and keeps the test
    suite's tiny builds fast).

    Args:
        num_images: the training images the data loader reads.
        cpus: the CPUs to share (default: this process's affinity).
        local_world_size: processes on this machine (default: ``LOCAL_WORLD_SIZE``, else 1).

    Returns:
        The number of data-loading worker processes, 0 to :data:`AUTO_WORKERS_MAX`.
    """
    if num_images < AUTO_WORKERS_MIN_IMAGES:
        return 0
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_world_size is None:
        try:
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            local_world_size = 1
    per_process = cpus // max(1, local_world_size)
    return max(0, min(AUTO_WORKERS_MAX, per_process - 1))


def bad_image_limit(max_bad_images: float | None, num_images: int) -> int:
    """How many images may fail to decode before a build stops (``--max-bad-images``, see its help).

    Args:
        max_bad_images: a count (>= 1), a fraction of ``num_images`` (< 1), 0, or None for the default
            (:data:`DEFAULT_BAD_FRACTION` of the images, at least :data:`DEFAULT_BAD_MIN`).
        num_images: the images of the training data.

    Returns:
        The largest number of undecodable images the build accepts.
    """
    if max_bad_images is None:
        return max(DEFAULT_BAD_MIN, int(DEFAULT_BAD_FRACTION * num_images))
    if max_bad_images >= 1:
        return int(max_bad_images)
    return int(max_bad_images * num_images)


def option_name(name: str, config_cls: type = BuildConfig) -> str:
    """The command-line name of field ``name`` (``head_rank`` -> ``--head-rank``, ``templates`` -> ``--template``)."""
    f = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    return f.metadata.get("cli", {}).get("name") or "--" + name.replace("_", "-")


def click_options(config_cls: type = BuildConfig) -> list[click.Option]:
    """The click options of a config dataclass, one per field, in field order.

    Each option's name comes from :func:`option_name`; its default, help and choices from the field;
    its kind from the field's type (``bool``: a flag, ``--x/--no-x`` when the default is None;
    ``tuple[T, ...]``: repeatable; ``tuple[T, T]``: two values). The value arrives under the field's
    name, so ``config_cls(**values)`` rebuilds the config.

    Args:
        config_cls: a dataclass whose fields were made with :func:`option` (default :class:`BuildConfig`).

    Returns:
        One ``click.Option`` per field.
    """
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        cli = f.metadata.get("cli", {})
        name = option_name(f.name, config_cls)
        base, arity = _split(hints[f.name])
        kw: dict[str, Any] = {"help": f.metadata.get("help"), "default": f.default}
        if base is bool and arity is None:
            decl = name if f.default is False else f"{name}/--no-{name[2:]}"
            if f.default is False:
                kw["is_flag"] = True
        else:
            decl = name
            if cli.get("choices"):
                kw["type"] = click.Choice(cli["choices"])
            elif cli.get("path"):
                kw["type"] = click.Path(path_type=str)
            else:
                kw["type"] = base
            if arity == "many":
                kw["multiple"] = True
            elif arity is not None:
                kw["nargs"] = arity
            if f.default is not None:
                kw["show_default"] = True
        if cli.get("metavar"):
            kw["metavar"] = cli["metavar"]
        out.append(click.Option([decl, f.name], **kw))
    return out


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _split(hint: Any) -> tuple[type, int | str | None]:
    """``int | None`` -> (int, None); ``tuple[str, ...]`` -> (str, "many"); ``tuple[float, float]`` -> (float, 2)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"a config field must be one type or one type | None, not {hint}")
        return _split(rest[0])
    if typing.get_origin(hint) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0], "many"
        if len(set(args)) != 1:
            raise TypeError(f"a fixed-length config field must have one element type, not {hint}")
        return args[0], len(args)
    return hint, None


_HINTS: dict[str, Any] = {}


def _shape(name: str) -> tuple[type, int | str | None]:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(BuildConfig))
    return _split(_HINTS[name])


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_KINDS = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}


def _check_type(f: dataclasses.Field, v: Any) -> None:
    base, arity = _shape(f.name)
    optional = type(None) in typing.get_args(_HINTS[f.name])

    def ok(x: Any) -> bool:
        if base is bool:
            return isinstance(x, bool)
        if base in (int, float) and isinstance(x, bool):
            return False
        return isinstance(x, int if base is int else (int, float) if base is float else base)

    if v is None and optional:
        return
    if arity is None:
        good, want = ok(v), _KIND.get(base, base.__name__)
    elif arity == "many":
        good, want = isinstance(v, tuple) and all(map(ok, v)), f"a list of {_KINDS.get(base, base.__name__)}"
    else:
        good = isinstance(v, tuple) and len(v) == arity and all(map(ok, v))
        want = f"{arity} {_KINDS.get(base, base.__name__)}"
    if not good:
        raise BuildInputError(f"expected {want}, got {v!r}", field=option_name(f.name))


def _check_device(device: str | None) -> None:
    """``--device`` names a device this machine has (checked before anything is built)."""
    if device is None:
        return
    import torch  # heavy: only when a device is named, never when the CLI lists its options

    fix = "use cpu, cuda or cuda:N (N below the number of visible GPUs)"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise BuildInputError(f"not a device: {device!r} ({e})", field="--device", fix=fix) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BuildInputError(f"{device!r}: CUDA is not available on this machine", field="--device",
                                  fix="use --device cpu, or run where a CUDA GPU is visible")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BuildInputError(f"{device!r}: only {torch.cuda.device_count()} CUDA device(s) visible",
                                  field="--device", fix=fix)


def _refuse_unknown(names: typing.Iterable[str]) -> None:
    known = [f.name for f in dataclasses.fields(BuildConfig)]
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    hints = []
    for n in unknown:
        close = difflib.get_close_matches(str(n), known, n=1)
        if close:
            hints.append(f"did you mean {close[0]!r} for {n!r}?")
    fix = " ".join(hints) or "see hellofmt.BuildConfig (or `hellofmt build --help`) for the options"
    raise BuildInputError(f"unknown build option(s): {', '.join(map(repr, unknown))}", field=str(unknown[0]),
                          fix=fix)


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
