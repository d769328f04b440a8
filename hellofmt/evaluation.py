"""``hellofmt eval``: what a bundle is worth to a student, with the controls the field uses.

:func:`evaluate` (also ``hellofmt.evaluate``) trains students on a bundle and measures their top-1
accuracy on a held-out image folder. Every *arm* trains the same student (same initialisation per
seed) on the same views (the same :meth:`DistilledDataset.loader` seed: the same crops, flips and
CutMix partners and boxes), for the same steps; only the labels differ:

- ``bundle``: the projector's soft label for each view (the product);
- ``hard``: cross-entropy on the hard label of each view (the class that covers most of it);
- ``teacher``: the teacher labelling the same views online (the upper bound);
- ``random``: as many real images per class as the bundle has, drawn at random from the training
  data and labelled by the same projector (the control: improvement over random, IOR). A bundle
  built with ``--adapt-steps`` has a projector fine-tuned to its own images; then each random subset
  gets a copy of it adapted to that subset the same way (same steps and settings, against
  ``--teacher``), so that the control is what ``hellofmt build --images RANDOM_SUBSET`` would have
  made. Without ``--teacher`` the copy cannot be adapted, the random arm is labelled by the bundle's
  projector as it is, and the report says that this favours the bundle.

The table then gives ``bundle / teacher``, ``bundle - hard`` (what the soft labels add) and
``IOR = bundle - random`` (what the distilled images add over random real ones). Per class, one pass
over the held-out images measures the projector's top-1 agreement with the teacher (when one is
given) and its own top-1 (``EvalResult.per_class``); :meth:`EvalResult.plot` (``--plot FILE.png``)
draws both, the arms per seed and the worst classes by name. Under ``torchrun``
each student is DDP-wrapped, the loader is sharded by rank and accuracies are all-reduced; rank 0
prints and writes. The recipes (``quick``, ``rded``, ``sre2l``) live in :mod:`hellofmt.students`.

The module is ``hellofmt.evaluation`` rather than ``hellofmt.evaluate``: a submodule of that name
would shadow the function ``hellofmt.evaluate`` once imported.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import __version__
from .errors import EvalInputError, HellofmtError, InputError
from .manifest import Evaluation
from .plots import check_plot_path, plot_eval, ranked_classes
from .students import (
    Protocol,
    build_student,
    check_student,
    get_protocol,
    kd_loss,
    lr_factor,
    make_optimizer,
    parse_student_spec,
)

if TYPE_CHECKING:  # pragma: no cover
    from .dataset import DistilledDataset, DistilledLoader

__all__ = ["ARMS", "ArmResult", "EvalResult", "arm_loader", "evaluate", "load_val_folder", "match_classes"]

ARMS = ("bundle", "hard", "teacher", "random")
_MAX_LISTED = 20
# The most adaptation steps a bundle's recorded build_args may ask the random arm to repeat per seed.
MAX_ADAPT_STEPS = 100_000
_VAL_BATCH = 256


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------
@dataclass
class ArmResult:
    """One arm: held-out top-1 per seed (fractions in [0, 1]) and seconds per seed."""

    name: str
    accuracies: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies) if self.accuracies else float("nan")

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


@dataclass
class EvalResult:
    """What :func:`evaluate` returns (and ``--json`` writes): per-arm accuracies and the setting."""

    bundle: str
    protocol: Protocol
    student: str
    arms: dict[str, ArmResult]
    seeds: list[int]
    val_count: int
    val_skipped: list[str]
    device: str
    world_size: int
    teacher: list[str] = field(default_factory=list)
    train_data: str | None = None
    random_skipped: int = 0
    # None: the bundle's projector was not adapted to its images (or no random arm); True: each random
    # subset got a copy adapted to it; False: adapted bundle, but no teacher to adapt the copy with.
    random_adapted: bool | None = None
    # Per class (bundle class order), on the held-out images: "classes" (names), "count" (images),
    # "projector_top1" and, with a teacher, "teacher_agreement" (the projector's top-1 = the teacher's);
    # None where a class has no held-out image.
    per_class: dict[str, Any] | None = None
    date: str = ""
    hellofmt_version: str = __version__
    rank: int = 0  # this process's rank under torchrun (only rank 0 writes)

    def comparisons(self) -> dict[str, float | None]:
        """``bundle/teacher`` (ratio), ``bundle-hard`` and ``ior`` (= bundle - random), in accuracy
        fractions; ``None`` where an arm is missing."""
        m = {k: a.mean for k, a in self.arms.items()}
        b = m.get("bundle")
        return {
            "bundle/teacher": b / m["teacher"] if b is not None and m.get("teacher") else None,
            "bundle-hard": b - m["hard"] if b is not None and "hard" in m else None,
            "ior": b - m["random"] if b is not None and "random" in m else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "protocol": self.protocol.name,
            "hyperparameters": self.protocol.hyperparameters(),
            "student": self.student,
            "seeds": list(self.seeds),
            "arms": {
                k: {"accuracies": a.accuracies, "mean": a.mean, "std": a.std,
                    "seconds": [round(s, 3) for s in a.seconds]}
                for k, a in self.arms.items()
            },
            "comparisons": self.comparisons(),
            "val_count": self.val_count,
            "val_skipped": len(self.val_skipped),
            "val_skipped_files": self.val_skipped[:_MAX_LISTED],
            "random_skipped": self.random_skipped,
            "random_adapted": self.random_adapted,
            "per_class": self.per_class,
            "teacher": self.teacher,
            "train_data": self.train_data,
            "device": self.device,
            "world_size": self.world_size,
            "hellofmt_version": self.hellofmt_version,
            "date": self.date,
        }

    def to_evaluation(self) -> Evaluation:
        """The manifest record (``evaluations`` entry) of this result."""
        return Evaluation(
            protocol=self.protocol.name,
            student=self.student,
            arms={k: list(a.accuracies) for k, a in self.arms.items()},
            seeds=list(self.seeds),
            hellofmt_version=self.hellofmt_version,
            date=self.date,
            hyperparameters=self.protocol.hyperparameters(),
            val_count=self.val_count,
        )

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Draw this result as a PNG (:func:`hellofmt.plots.plot_eval`): each arm's top-1 per seed and its
        mean, bundle/teacher and IOR marked; per class, the projector's agreement with the teacher on the
        held-out images (its top-1 without a teacher), worst classes named.

        Args:
            path: the PNG to write; its folder must exist.

        Returns:
            The path written.

        Raises:
            InputError: matplotlib is missing (``pip install "hellofmt[plot]"``), the folder does not exist,
                or the name does not end in ``.png``.
        """
        return plot_eval(self.to_dict(), path)

    def format_table(self) -> str:
        """The human-readable report: one row per arm, then the comparisons."""
        p = self.protocol
        lines = [
            f"hellofmt eval  {self.bundle}",
            f"protocol {p.name}: {p.epochs} epochs, batch {p.batch_size}, lr {p.lr:g}, T {p.temperature:g}, "
            f"mix {p.mix}, image {p.image_size} px; student {self.student}; device {self.device}"
            + (f" x {self.world_size}" if self.world_size > 1 else ""),
            f"val: {self.val_count} images"
            + (f" ({len(self.val_skipped)} undecodable, skipped)" if self.val_skipped else ""),
            "",
            f"{'arm':<9} {'top-1 (mean ± std)':>19}  {'per seed':<{max(9, 7 * len(self.seeds))}}  time/seed",
        ]
        width = max(9, 7 * len(self.seeds))
        for name, a in self.arms.items():
            per = " ".join(f"{100 * x:6.1f}" for x in a.accuracies)
            secs = statistics.fmean(a.seconds) if a.seconds else 0.0
            lines.append(f"{name:<9} {100 * a.mean:10.1f}% ± {100 * a.std:4.1f}  {per:<{width}}  {secs:.1f} s")
        c = self.comparisons()
        lines.append("")
        worst = _worst_classes(self.per_class)
        if worst:
            lines.append(worst)
        if c["bundle/teacher"] is not None:
            lines.append(f"bundle/teacher        {c['bundle/teacher']:.3f}")
        if c["bundle-hard"] is not None:
            lines.append(f"bundle - hard         {100 * c['bundle-hard']:+.1f} points (what the soft labels add)")
        if c["ior"] is not None:
            lines.append(f"IOR = bundle - random {100 * c['ior']:+.1f} points (the images against random real ones)")
            if self.random_adapted:
                lines.append("  (the projector was adapted to the bundle's images; each random subset got a copy "
                             "adapted to it the same way)")
            elif self.random_adapted is False:
                lines.append("  (biased towards the bundle: its projector was adapted to its own images, and without "
                             "--teacher the random subsets are labelled by it unadapted)")
        return "\n".join(lines).rstrip()


def _worst_classes(per_class: dict[str, Any] | None, k: int = 5) -> str | None:
    """One line naming the ``k`` classes whose held-out labels the projector gets least right."""
    ranked = ranked_classes(per_class)
    if not ranked or not ranked[2]:
        return None
    key, _, pairs = ranked
    what = "agreement with the teacher" if key == "teacher_agreement" else "top-1"
    return (f"projector {what} on the held-out images, worst classes: "
            + ", ".join(f"{n} {100 * v:.0f}%" for v, n in pairs[:k]))


# --------------------------------------------------------------------------------------------------
# image folders: listing, class matching, loading
# --------------------------------------------------------------------------------------------------
def _list_folder(root: str | os.PathLike[str], option: str) -> tuple[Path, list[str], list[list[str]]]:
    """``(root, class folder names, image paths per folder)`` of an image-folder tree, decoding
    nothing (a large training set is listed in seconds; images are decoded only when drawn)."""
    # One list of extensions for build and eval.
    from .builder.inputs import IMAGE_EXTENSIONS

    root = Path(root)
    if not root.is_dir():
        raise EvalInputError("folder not found" if not root.exists() else "not a folder", file=root, field=option,
                             fix="give an image-folder tree: ROOT/CLASS/IMAGE")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise EvalInputError("no class sub-folders", file=root, field=option,
                             fix="put each class's images in its own sub-folder")
    files: list[list[str]] = []
    for name in folders:
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            found += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        files.append(found)
    return root, folders, files


def _recorded_folders(manifest) -> list[str] | None:
    """Class folder names a builder recorded in the manifest (``class_folders``), if any."""
    if manifest.class_folders is not None:
        return list(manifest.class_folders)
    for obj in (manifest.extra, manifest.provenance.extra, manifest.provenance.build_args):
        v = obj.get("class_folders") if isinstance(obj, dict) else None
        if isinstance(v, list) and len(v) == manifest.num_classes and all(isinstance(x, str) for x in v):
            return v
    return None


def match_classes(
    folders: Sequence[str],
    classes: Sequence[str],
    *,
    class_map: dict[str, str] | None = None,
    recorded_folders: Sequence[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    option: str = "--val",
    map_option: str = "--val-classes",
) -> list[int]:
    """The bundle class index of each folder.

    A folder matches a class through ``class_map`` (folder -> readable name, as build's
    ``--classes``) when given; else through the folder names the builder recorded; else by name
    (the folder name itself, or with ``_`` read as a space, as the builder reads it).

    Raises:
        EvalInputError: the folders and the bundle's classes differ (both differences listed).
    """
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}
    if class_map is not None:
        unmapped = [f for f in folders if f not in class_map]
        if unmapped:
            raise EvalInputError(f"{len(unmapped)} folder(s) have no name in the class map: "
                                 f"{', '.join(unmapped[:_MAX_LISTED])}", file=root, field=map_option,
                                 fix="add a 'folder<TAB>name' line for each")
        names = [class_map[f] for f in folders]
    elif recorded_folders is not None:
        rec = {f: classes[i] for i, f in enumerate(recorded_folders)}
        names = [rec.get(f, f) for f in folders]
    else:
        names = [f if f in index else f.replace("_", " ") for f in folders]
    extra = [f for f, n in zip(folders, names) if n not in index]
    missing = [c for c in classes if c not in set(names)]
    dups = sorted({n for n in names if names.count(n) > 1})
    if extra or missing or dups:
        parts = []
        if extra:
            parts.append(f"not bundle classes: {', '.join(extra[:_MAX_LISTED])}")
        if missing:
            parts.append(f"bundle classes with no folder: {', '.join(missing[:_MAX_LISTED])}")
        if dups:
            parts.append(f"several folders for: {', '.join(dups[:_MAX_LISTED])}")
        raise EvalInputError(
            f"the class folders do not match the bundle's {len(classes)} classes ({'; '.join(parts)})",
            file=root, field=option,
            fix=f"give one sub-folder per bundle class, or map folder names to the bundle's class names with "
                f"{map_option} FILE (JSON or TSV, as build's --classes)",
        )
    return [index[n] for n in names]


def _load_square(path: str, size: int, resize: float) -> torch.Tensor | None:
    """uint8 ``[3, size, size]``: short side resized to ``size * resize``, centre crop (the builder's
    :func:`load_image` when ``resize`` is 1); ``None`` when the file does not decode."""
    # The builder's exact resize, so val views match its images.
    from .builder.inputs import load_image

    load = max(size, round(size * resize))
    try:
        img = load_image(path, load)
    except Exception:  # noqa: BLE001 - PIL raises many kinds; every one means "undecodable"
        return None
    if load != size:
        top = (load - size) // 2
        img = img[:, top:top + size, top:top + size].contiguous()
    return img


def _load_many(paths: list[str], size: int, resize: float) -> list[torch.Tensor | None]:
    with ThreadPoolExecutor(min(16, (os.cpu_count() or 2) * 2)) as pool:
        return list(pool.map(lambda p: _load_square(p, size, resize), paths))


def load_val_folder(
    root: str | os.PathLike[str],
    classes: Sequence[str],
    size: int,
    *,
    class_map: dict[str, str] | None = None,
    recorded_folders: Sequence[str] | None = None,
    resize: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The validation images as uint8 ``[N, 3, size, size]``, their bundle class indices ``[N]``,
    and the paths of the images that did not decode (skipped, not fatal).

    Raises:
        EvalInputError: no folder, classes that do not match (:func:`match_classes`), or no image
            that decodes.
    """
    root, folders, files = _list_folder(root, "--val")
    idx = match_classes(folders, classes, class_map=class_map, recorded_folders=recorded_folders, root=root)
    paths = [p for fs in files for p in fs]
    labels = [idx[c] for c, fs in enumerate(files) for _ in fs]
    loaded = _load_many(paths, size, resize)
    keep = [i for i, x in enumerate(loaded) if x is not None]
    skipped = [paths[i] for i, x in enumerate(loaded) if x is None]
    if not keep:
        raise EvalInputError(f"no image in the folder decodes ({len(skipped)} tried)", file=root, field="--val",
                             fix="give a folder of images: ROOT/CLASS/IMAGE.{png,jpg,...}")
    images = torch.stack([loaded[i] for i in keep])
    return images, torch.tensor([labels[i] for i in keep], dtype=torch.int64), skipped


def _random_subset(
    files: list[list[str]], folder_class: list[int], per_class: Sequence[int], size: int, seed: int, root: Path
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``per_class[c]`` real images of class ``c`` drawn at random (from ``seed``) and loaded as the
    builder loads ``--images``; an image that does not decode is replaced by another draw.
    Returns ``(images, labels, undecodable count)``."""
    g = torch.Generator().manual_seed(int(seed))
    by_class: dict[int, list[str]] = {}
    for f, c in zip(files, folder_class):
        by_class.setdefault(c, []).extend(f)
    xs, ys, bad = [], [], 0
    for c, want in enumerate(per_class):
        if want == 0:
            continue
        pool = by_class.get(c, [])
        order = torch.randperm(len(pool), generator=g).tolist()
        got: list[torch.Tensor] = []
        pos = 0
        while len(got) < want and pos < len(order):
            batch = [pool[i] for i in order[pos:pos + (want - len(got))]]
            pos += len(batch)
            for img in _load_many(batch, size, 1.0):
                if img is None:
                    bad += 1
                else:
                    got.append(img)
        if len(got) < want:
            raise EvalInputError(
                f"class {c} has {len(got)} readable images in the training data; the random arm needs {want}",
                file=root, field="--train-data", fix="give a training folder with at least as many images per class as "
                                                     "the bundle, or leave out the random arm (--arms)")
        xs += got
        ys += [c] * want
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), bad


# --------------------------------------------------------------------------------------------------
# arms
# --------------------------------------------------------------------------------------------------
class _NoLabels(nn.Module):
    """The hard arm's labeller: its soft labels are never used, so they cost nothing."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.num_classes)


class _Online(nn.Module):
    """The teacher arm's labeller: the teacher's logits on exactly the view the student sees."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x).float()


def _adaptation(manifest, image_side: int):
    """The adaptation a bundle's projector got in its build (``--adapt-steps``), as a
    :class:`~hellofmt.builder.distill.DistillConfig` to repeat it on other images; None if it got none."""
    from .builder.config import LOSSES, BuildConfig
    from .builder.distill import DistillConfig

    args = dict(manifest.provenance.build_args or {})
    steps = args.get("adapt_steps") or 0
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        return None
    if steps > MAX_ADAPT_STEPS:  # a bundle is untrusted: it does not get to set an unbounded training run
        raise EvalInputError(f"the bundle's build_args.adapt_steps is {steps}, above {MAX_ADAPT_STEPS:,}",
                             field="--arms", fix="leave 'random' out of --arms for this bundle")
    d = BuildConfig()  # a recorded build_args may predate an option: the default then

    def arg(name: str, kind):
        v = args.get(name)
        return v if isinstance(v, kind) and not isinstance(v, bool) else getattr(d, name)

    loss = arg("loss", str)
    return DistillConfig(steps=steps, batch_size=max(1, arg("batch_size", int)), lr=float(arg("lr", (int, float))),
                         weight_decay=float(arg("weight_decay", (int, float))),
                         loss=loss if loss in LOSSES else d.loss, ce_weight=float(arg("ce_weight", (int, float))),
                         temperature=float(manifest.labels.temperature), view_size=int(image_side),
                         mix=manifest.labels.mix, scale=tuple(manifest.labels.scale), checkpoint_every=0,
                         num_workers=0, seed=arg("seed", int))


def _adapted_copy(ds: DistilledDataset, teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg, *,
                  world, progress: bool) -> nn.Module:
    """A copy of the bundle's projector, its deltas fine-tuned to ``teacher`` on views of ``images`` as
    the build adapted them to the bundle's own (``cfg`` from :func:`_adaptation`); merged, frozen."""
    import tempfile

    from .builder.checkpoint import CheckpointStore
    from .builder.distill import distill_projector
    from .projector import Projector

    proj = Projector.from_bundle(ds.bundle, device=world.device, trainable=True)
    own = torch.utils.data.TensorDataset(images.cpu(), labels.cpu())
    with tempfile.TemporaryDirectory() as tmp:  # never written: the store is disabled
        distill_projector(proj, teacher, own, cfg, world=world, store=CheckpointStore(tmp, enabled=False),
                          progress=progress, stage="adapt")
    proj.merge()
    proj.eval()
    return proj


def _with_labeller(ds: DistilledDataset, labeller: nn.Module) -> DistilledDataset:
    # The same images, targets and loader, with another module in the projector's seat: the loader
    # draws its crops, flips and mixes from (seed, epoch, rank) alone, so every arm gets the same
    # views. A labeller without a `foundation` gets the student's own view (no resampling).
    other = copy.copy(ds)
    other.projector = labeller
    return other


def arm_loader(ds: DistilledDataset, proto: Protocol, seed: int, *, rank: int | None = None,
               world_size: int | None = None) -> DistilledLoader:
    """The loader every arm trains from, for one seed: the same views for the same ``seed``."""
    world = world_size or 1
    return ds.loader(
        batch_size=max(1, proto.batch_size // world),
        image_size=proto.image_size,
        scale=proto.scale,
        mix=proto.mix,
        temperature=proto.temperature,
        flip=proto.flip,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )


def _top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device, rank: int,
          world: int) -> float:
    """Top-1 on this rank's share of the val set, summed over ranks (all-reduce)."""
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    xs, ys = images[rank::world], labels[rank::world]
    with torch.no_grad():
        for i in range(0, xs.shape[0], _VAL_BATCH):
            x = xs[i:i + _VAL_BATCH].to(device, non_blocking=True).float().div_(255)
            y = ys[i:i + _VAL_BATCH].to(device, non_blocking=True)
            correct[0] += (model(x).argmax(1) == y).sum()
            correct[1] += y.numel()
    if world > 1:
        torch.distributed.all_reduce(correct)
    return float(correct[0] / correct[1].clamp_min(1))


def _per_class(ds: DistilledDataset, teacher: nn.Module | None, images: torch.Tensor, labels: torch.Tensor,
               device: torch.device, rank: int, world: int) -> dict[str, Any]:
    """Per class, on the held-out images: how many there are, the projector's top-1, and its top-1
    agreement with ``teacher`` (None without one); one forward pass of each over this rank's share,
    counts summed over ranks (all-reduce)."""
    num = ds.num_classes
    counts = torch.zeros(3, num, dtype=torch.float64, device=device)  # images, projector right, agrees
    xs, ys = images[rank::world], labels[rank::world]
    with torch.no_grad():
        for i in range(0, xs.shape[0], _VAL_BATCH):
            x = xs[i:i + _VAL_BATCH].to(device, non_blocking=True).float().div_(255)
            y = ys[i:i + _VAL_BATCH].to(device, non_blocking=True)
            pred = ds.logits(x).argmax(1)
            counts[0].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
            counts[1].index_add_(0, y, (pred == y).double())
            if teacher is not None:
                counts[2].index_add_(0, y, (pred == teacher(x).argmax(1).to(pred.device)).double())
    if world > 1:
        torch.distributed.all_reduce(counts)
    n = counts[0].tolist()

    def rate(row: int) -> list[float | None]:
        return [c / k if k else None for c, k in zip(counts[row].tolist(), n)]

    return {"classes": list(ds.classes), "count": [int(k) for k in n], "projector_top1": rate(1),
            "teacher_agreement": rate(2) if teacher is not None else None}


def _check_plot(path) -> Path | None:
    """``--plot``'s path checked before any model loads: matplotlib installed, a ``.png`` name, an existing
    folder."""
    if path is None:
        return None
    try:
        return check_plot_path(path, field="--plot")
    except InputError as e:
        raise EvalInputError(e.message, file=e.file, field=e.field, fix=e.fix) from None


def _train_one(
    arm: str, ds: DistilledDataset, proto: Protocol, student, seed: int, *, num_classes: int, device: torch.device,
    world, val: tuple[torch.Tensor, torch.Tensor], progress: bool,
) -> float:
    from tqdm.auto import tqdm  # progress bars only when training

    torch.manual_seed(seed)  # the same initial student in every arm for this seed
    model, _ = build_student(student, num_classes, proto.image_size)
    model = model.to(device)
    net: nn.Module = model
    if world.size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    loader = arm_loader(ds, proto, seed, rank=world.rank, world_size=world.size)
    per_epoch = len(loader)
    total = proto.epochs * per_epoch
    opt = make_optimizer(model, proto)
    base = [g["lr"] for g in opt.param_groups]
    bar = tqdm(total=total, desc=f"{arm:<7} seed {seed}", disable=not progress, dynamic_ncols=True, leave=False)
    step = 0
    for epoch in range(proto.epochs):
        net.train()
        loss_sum = torch.zeros((), device=device)
        hits = torch.zeros((), device=device)
        seen = 0
        for images, soft, hard in loader.epoch_batches(epoch):
            t = epoch / proto.epochs if proto.schedule_per_epoch else step / max(1, total)
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * lr_factor(proto.schedule, t)
            step += 1
            bar.update(1)
            # Every rank pads its shard to the same batch sizes, so skipping a 1-image batch (which
            # batch norm cannot train on) skips it everywhere and DDP stays in step.
            if images.shape[0] < 2:
                continue
            out = net(images)
            loss = nn.functional.cross_entropy(out, hard) if arm == "hard" else \
                kd_loss(out, soft, proto.temperature, proto.t2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * images.shape[0]
            hits += (out.detach().argmax(1) == hard).sum()
            seen += images.shape[0]
        if seen:  # one host sync per epoch
            bar.set_postfix(epoch=f"{epoch + 1}/{proto.epochs}", loss=f"{float(loss_sum) / seen:.3f}",
                            acc=f"{float(hits) / seen:.1%}", refresh=False)
    bar.close()
    return _top1(model, val[0], val[1], device, world.rank, world.size)


# --------------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------------
def _check_arms(arms, teacher, train_data) -> list[str]:
    if arms is None:
        return [a for a in ARMS if (a != "teacher" or teacher) and (a != "random" or train_data is not None)]
    if isinstance(arms, str):
        arms = [a.strip() for a in arms.split(",") if a.strip()]
    arms = list(dict.fromkeys(arms))
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise EvalInputError(f"unknown arm(s): {', '.join(map(repr, unknown)) or 'none given'}", field="--arms",
                             fix=f"choose from {', '.join(ARMS)}, comma-separated")
    if "teacher" in arms and not teacher:
        raise EvalInputError("the teacher arm needs a teacher", field="--teacher",
                             fix="give --teacher timm:NAME (with --teacher-weights) or FILE.py:FACTORY, "
                                 "or leave 'teacher' out of --arms")
    if "random" in arms and train_data is None:
        raise EvalInputError("the random arm needs the original training data", field="--train-data",
                             fix="give --train-data DIR (an image folder with the bundle's classes), "
                                 "or leave 'random' out of --arms")
    return arms


def _read_class_map(path, option: str) -> dict[str, str] | None:
    if path is None or isinstance(path, dict):
        return path
    # Build's --classes reader, so both take the same files.
    from .builder.inputs import load_class_map

    try:
        return load_class_map(path)
    except HellofmtError as e:
        raise EvalInputError(e.message, file=e.file, field=option if e.field == "--classes" else e.field,
                             fix=e.fix) from None


def _local_manifest(bundle) -> Any:
    """The manifest of a local bundle directory (cheap: no image, no model), else ``None``."""
    if isinstance(bundle, (str, os.PathLike)) and os.path.isdir(bundle):
        from .bundle import Bundle

        return Bundle.open(bundle).manifest
    return None


def _write_manifest_atomically(bundle_dir: Path, evaluation: Evaluation) -> None:
    """Append ``evaluation`` to the bundle's manifest, atomically and under the bundle's write lock
    (:func:`hellofmt.bundle.update_manifest`); every file hash stays valid."""
    from .bundle import update_manifest

    update_manifest(bundle_dir, lambda m: m.evaluations.append(evaluation))


def evaluate(
    bundle: str | os.PathLike[str],
    val: str | os.PathLike[str],
    *,
    arms: Sequence[str] | str | None = None,
    student: str | None = None,
    protocol: str | Protocol = "quick",
    teacher: str | nn.Module | Sequence[str | nn.Module] | None = None,
    teacher_weights: str | Sequence[str] | None = None,
    train_data: str | os.PathLike[str] | None = None,
    val_classes: str | os.PathLike[str] | dict[str, str] | None = None,
    train_classes: str | os.PathLike[str] | dict[str, str] | None = None,
    seeds: int = 3,
    first_seed: int = 0,
    device: str | torch.device | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    temperature: float | None = None,
    mix: str | None = None,
    image_size: int | None = None,
    json_path: str | os.PathLike[str] | None = None,
    record: bool = False,
    plot: str | os.PathLike[str] | None = None,
    progress: bool = True,
    verify: bool = True,
) -> EvalResult:
    """Train students on ``bundle`` and measure their top-1 on the image folder ``val``.

    Args:
        bundle: a bundle directory or a Hub id (``user/name``).
        val: an image folder (``VAL/CLASS/IMAGE``) with one sub-folder per bundle class. Images that
            do not decode are skipped and counted.
        arms: any of ``bundle``, ``hard``, ``teacher``, ``random`` (a list or a comma-separated
            string); default: every arm the inputs allow.
        student: ``convnet[:depth=D,width=W,norm=N]``, ``timm:NAME`` or ``FILE.py:FACTORY``
            (``FACTORY(num_classes)``); default: the protocol's.
        protocol: ``quick``, ``rded``, ``sre2l`` (:mod:`hellofmt.students`), or a :class:`Protocol`.
        teacher: the teacher arm's labeller(s): ``timm:NAME`` or ``FILE.py:FACTORY`` (as build's
            ``--teacher``; several are averaged) or an ``nn.Module`` taking images in [0, 1].
        teacher_weights: safetensors weights of each ``timm:`` teacher, in order.
        train_data: the original training image folder, for the random arm.
        val_classes: folder -> class name map (a JSON/TSV file as build's ``--classes``, or a dict)
            for ``val``'s folders.
        train_classes: the same for ``train_data`` (default: ``val_classes``).
        seeds: students per arm (seeds ``first_seed .. first_seed + seeds - 1``).
        first_seed: the first student seed (default 0). A run with ``first_seed=K`` adds students to an
            earlier run of ``seeds=K``: the same seed trains the same student on the same random subset.
        device: ``cpu``, ``cuda``, ``cuda:N`` (default: ``cuda:LOCAL_RANK`` if available).
        epochs, batch_size, lr, weight_decay, temperature, mix, image_size: override the protocol's
            (``batch_size`` is global across torchrun processes; ``image_size`` defaults to the
            bundle's).
        json_path: also write the result as JSON here (rank 0).
        record: append the result to the bundle manifest's ``evaluations`` (rank 0; local bundles).
        plot: also draw the result as a PNG here (rank 0; :meth:`EvalResult.plot`; needs ``hellofmt[plot]``).
        progress: tqdm bars (rank 0).
        verify: check the bundle's hashes and probe when opening it.

    Returns:
        an :class:`EvalResult` (``format_table()`` for the report, ``to_dict()`` for JSON).

    Raises:
        EvalInputError: a bad option, arm, student or folder (before any training).
        TeacherError: a teacher that cannot be loaded or gives the wrong number of classes.
    """
    from .builder.dist import init_world  # torchrun set-up shared with build
    from .dataset import DistilledDataset

    # ---- everything checkable without a model ---------------------------------------------------
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise EvalInputError(f"expected an integer >= 1, got {seeds!r}", field="--seeds",
                             fix="train at least one student per arm (3 is the default)")
    if isinstance(first_seed, bool) or not isinstance(first_seed, int) or first_seed < 0:
        raise EvalInputError(f"expected an integer >= 0, got {first_seed!r}", field="--first-seed",
                             fix="give the first seed to train, e.g. 3 to add students to a run of --seeds 3")
    seed_list = list(range(first_seed, first_seed + seeds))
    proto = get_protocol(protocol, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         temperature=temperature, mix=mix, image_size=image_size)
    spec = parse_student_spec(student or proto.student)
    if isinstance(teacher, (str, nn.Module)):
        teacher = [teacher]
    teacher = list(teacher) if teacher else []
    arm_list = _check_arms(arms, teacher, train_data)
    if "teacher" in arm_list:
        from .builder.teachers import check_teacher_specs

        check_teacher_specs(teacher, list(teacher_weights) if isinstance(teacher_weights, (list, tuple))
                            else teacher_weights)
    vmap = _read_class_map(val_classes, "--val-classes")
    tmap = _read_class_map(train_classes, "--train-classes") if train_classes is not None else vmap
    plot = _check_plot(plot)
    if record and not (isinstance(bundle, (str, os.PathLike)) and os.path.isdir(bundle)):
        raise EvalInputError("--record writes into a local bundle folder; this is not one", file=str(bundle),
                             field="--record", fix="pull it first (hellofmt pull USER/NAME DIR) and evaluate DIR")
    # What is written at the end is checked now, before any student trains: the folder --record
    # rewrites the manifest in (a temporary file, then a rename) and the folder of --json.
    if record and not os.access(bundle, os.W_OK | os.X_OK):
        raise EvalInputError("--record rewrites the bundle's hellofmt.json, but the folder is not writable",
                             file=str(bundle), field="--record",
                             fix="evaluate a copy you can write to, or drop --record")
    if json_path is not None:
        parent = os.path.dirname(os.path.abspath(json_path))
        if os.path.isdir(json_path) or not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise EvalInputError("cannot write the results here (a folder, or a folder that is missing or not "
                                 "writable)", file=str(json_path), field="--json",
                                 fix="give a file path in an existing folder you can write to")
    manifest = _local_manifest(bundle)
    train_listing = None
    if manifest is not None:  # a local bundle: the val classes are checked before any model loads
        vroot, vfolders, _ = _list_folder(val, "--val")
        match_classes(vfolders, manifest.classes, class_map=vmap, recorded_folders=_recorded_folders(manifest),
                      root=vroot)
    if "random" in arm_list:
        train_listing = _list_folder(train_data, "--train-data")

    # ---- models and data ------------------------------------------------------------------------
    world = init_world(device)
    try:
        ds = DistilledDataset(bundle, device=world.device, verify=verify)
        manifest = ds.manifest
        num_classes = ds.num_classes
        proto = proto.resolved(num_images=len(ds), num_classes=num_classes, image_size=ds.image_size[0],
                               recipe_scale=manifest.labels.scale, build_args=manifest.provenance.build_args)
        model, student_desc = build_student(spec, num_classes, proto.image_size)
        check_student(model.to(world.device), num_classes, proto.image_size, world.device, name=student_desc)
        del model
        recorded = _recorded_folders(manifest)
        val_x, val_y, skipped = load_val_folder(val, manifest.classes, proto.image_size, class_map=vmap,
                                                recorded_folders=recorded, resize=proto.val_resize)
        sources: dict[str, Any] = {}
        teacher_desc: list[str] = []
        adapt = _adaptation(manifest, ds.image_size[0]) if "random" in arm_list else None
        ens = None
        if "bundle" in arm_list:
            sources["bundle"] = ds
        if "hard" in arm_list:
            sources["hard"] = _with_labeller(ds, _NoLabels(num_classes))
        if "teacher" in arm_list or (adapt is not None and teacher):
            from .builder.teachers import load_teachers

            probe = torch.nn.functional.interpolate(ds.images[:4].to(world.device).float() / 255,
                                                    size=(proto.image_size, proto.image_size), mode="bilinear",
                                                    antialias=True, align_corners=False)
            ens, teacher_desc = load_teachers(teacher, num_classes=num_classes, weights=teacher_weights, probe=probe,
                                              device=world.device)
            if "teacher" in arm_list:
                sources["teacher"] = _with_labeller(ds, _Online(ens))
        train_folder_class = None
        if train_listing is not None:
            train_folder_class = match_classes(train_listing[1], manifest.classes, class_map=tmap,
                                               recorded_folders=recorded, root=train_listing[0],
                                               option="--train-data",
                                               map_option="--train-classes" if train_classes is not None
                                               else "--val-classes")

        per_class = _per_class(ds, ens, val_x, val_y, world.device, world.rank, world.size)

        # ---- train ------------------------------------------------------------------------------
        show = progress and world.is_main
        results = {a: ArmResult(a) for a in arm_list}
        random_bad = 0
        for arm in arm_list:
            for seed in seed_list:
                t0 = time.perf_counter()
                src = sources.get(arm)
                if arm == "random":
                    xs, ys, bad = _random_subset(train_listing[2], train_folder_class, manifest.images.per_class,
                                                 ds.image_size[0], seed, train_listing[0])
                    random_bad += bad
                    src = ds.with_images(xs, ys)
                    if adapt is not None and ens is not None:
                        src = _with_labeller(src, _adapted_copy(ds, ens, xs, ys, adapt, world=world, progress=show))
                acc = _train_one(arm, src, proto, spec, seed, num_classes=num_classes, device=world.device,
                                 world=world, val=(val_x, val_y), progress=show)
                results[arm].accuracies.append(acc)
                results[arm].seconds.append(time.perf_counter() - t0)
        result = EvalResult(
            bundle=str(ds.path),
            protocol=proto,
            student=student_desc,
            arms=results,
            seeds=seed_list,
            val_count=int(val_y.numel()),
            val_skipped=skipped,
            device=str(world.device),
            world_size=world.size,
            teacher=teacher_desc,
            train_data=os.fspath(train_data) if train_data is not None else None,
            random_skipped=random_bad,
            random_adapted=None if adapt is None else ens is not None,
            per_class=per_class,
            date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            rank=world.rank,
        )
        if world.is_main:
            if json_path is not None:
                text = json.dumps(result.to_dict(), indent=2, ensure_ascii=False, allow_nan=False)
                Path(json_path).write_text(text + "\n", encoding="utf-8")
            if record:
                _write_manifest_atomically(Path(ds.path), result.to_evaluation())
            if plot is not None:
                result.plot(plot)
        world.barrier()
        return result
    finally:
        world.close()
