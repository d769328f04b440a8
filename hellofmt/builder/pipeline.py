"""The whole build: inputs -> projector distillation -> images -> refinement -> adaptation -> fidelity -> bundle.

:func:`build_bundle` is what ``hellofmt build`` calls; from Python it also accepts modules (teachers) and
in-memory data (``(images, labels)`` tensors) directly. Its options are a
:class:`~hellofmt.builder.config.BuildConfig`, which the bundle's provenance records. Each stage records
its wall time; the long ones checkpoint into ``checkpoint_dir`` (default ``OUT.ckpt``) so ``resume=True``
continues where an interrupted run stopped. Under ``torchrun`` the distillation runs on every process
(DDP), selection and refinement are split across the processes (by class, by chunk), and rank 0 alone
measures fidelity and writes the bundle.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import BuildError, BuildInputError
from ..manifest import Head, LabelRecipe, Manifest, Provenance
from .checkpoint import CheckpointStore
from .config import RESUME_FIELDS, BuildConfig, auto_num_workers, bad_image_limit, default_image_size
from .dist import init_world
from .distill import DistillConfig, distill_projector
from .hfdata import HFData, hf_source, open_hf_data
from .inputs import (
    ImageFolder,
    SkippedImages,
    TensorData,
    data_labels,
    dataset_for,
    load_all,
    load_class_map,
    scan_image_folder,
    scan_once,
    source_side,
    split_holdout,
)
from .teachers import check_teacher_specs, load_teachers

__all__ = ["BuildResult", "build_bundle", "build_warnings", "agreement_floor"]


class BuildResult(dict):
    """What :func:`build_bundle` returns: ``path`` (the bundle, or None on ranks other than 0), ``metrics``,
    ``timings`` (seconds per stage), ``summary`` (the ``hellofmt info`` text) and ``warnings`` (what about
    the build should worry its user, each with the fix; also recorded in ``provenance.extra.warnings``)."""

    @property
    def path(self) -> Path | None:
        return self.get("path")


def agreement_floor(num_classes: int) -> float:
    """The held-out agreement below which :func:`build_warnings` flags a projector: twice chance
    (``2 / C``), a projector that has barely learned its teacher whatever the class count, capped at
    halfway between chance and 100% so that 2- and 3-class sets (where twice chance is 100%) are judged
    too. Not a fixed 50%: on 1000 classes 40% agreement carries much information, on 2 classes 50% none."""
    chance = 1.0 / num_classes
    return min(2.0 * chance, (1.0 + chance) / 2.0)


# Confidence and k-means selection keep candidates the teacher gets right first, so a healthy teacher
# gets ~100% of the kept images right; below this it got few of a class's candidates right (digits32, a
# 32-px teacher given 64-px views: 53%, students 23% against 89% at 32 px; benchmarks/README.md).
TEACHER_KEPT_FLOOR = 0.9


def build_warnings(
    metrics: Mapping[str, float],
    *,
    num_classes: int,
    config: BuildConfig,
    train_count: int | None = None,
    originals_per_class: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    skipped_images: Sequence[str] | None = None,
    image_size: int | None = None,
    world_size: int = 1,
) -> list[str]:
    """What about a finished build should worry its user, one sentence each with the fix.

    - held-out top-1 agreement with the teacher below :func:`agreement_floor` (or, with no held-out
      images, agreement on the bundle's views): the projector has barely learned the teacher;
    - distillation shorter than one pass over the training originals;
    - ``--ipc`` at or above the originals of some class: its images reuse the same few originals;
    - training images that failed to decode and were skipped (``inputs.skipped_images``);
    - a teacher that gets fewer than :data:`TEACHER_KEPT_FLOOR` of the kept images right
      (``images.init_teacher_top1``; not with ``--selection random``): it is run at a resolution or
      class order it was not trained for.

    Args:
        metrics: the build's metrics (``fidelity.heldout.top1_agreement``, ``distill.steps``, ...).
        num_classes: the class count (chance is ``1 / num_classes``).
        config: the build's options (``ipc``, ``factor``, ``lr``, ``batch_size``, ...).
        train_count: original images the projector was distilled on.
        originals_per_class: training originals of each class (None: images were given, not selected).
        classes: class names, to name the classes concerned.
        skipped_images: the training images that failed to decode (skipped), to name the first few.
        image_size: the synthetic image side, to name it in the fix.
        world_size: the processes that distilled, each on its own batches (``distill.steps`` is per process).

    Returns:
        The warnings, possibly none.
    """
    out = []
    steps = int(metrics.get("distill.steps", 0))
    where, agree = "held-out original images", metrics.get("fidelity.heldout.top1_agreement")
    if agree is None:
        where, agree = "the bundle's own views", metrics.get("fidelity.synthetic.top1_agreement")
    floor = agreement_floor(num_classes)
    if agree is not None and agree < floor:
        rule = "twice chance" if floor == 2.0 / num_classes else "halfway between chance and 100%"
        out.append(
            f"the projector agrees with the teacher on only {100 * agree:.1f}% of {where} (chance is "
            f"{100 / num_classes:.1f}% for {num_classes} classes; flagged below {100 * floor:.1f}%, {rule}): "
            f"it has barely learned the teacher in {steps} distillation step(s), and its labels are close to "
            f"noise. Fix: distil longer (raise --min-steps or --epochs{'; drop --steps' if config.steps else ''}) "
            f"or raise --lr (now {config.lr:g})."
        )
    views = steps * config.batch_size * max(1, world_size)
    if train_count and steps and views < train_count:
        each = f" on each of {world_size} processes" if world_size > 1 else ""
        out.append(
            f"distillation ran {steps} step(s) of {config.batch_size} views{each}, {views:,} views in "
            f"all: less than one pass over the {train_count:,} training originals. Fix: raise --min-steps or "
            f"--epochs{' (or drop --steps)' if config.steps else ''}."
        )
    if config.ipc is not None and originals_per_class:
        short = [i for i, n in enumerate(originals_per_class) if n <= config.ipc]
        if short:
            fewest = min(short, key=lambda i: originals_per_class[i])
            name = f" ({classes[fewest]!r})" if classes is not None else ""
            k = (config.factor or 1) ** 2
            out.append(
                f"--ipc {config.ipc} asks for as many images per class as there are training originals, or more, "
                f"in {len(short)} of {num_classes} classes (fewest: {originals_per_class[fewest]}{name}): their "
                f"{config.ipc} images are stitched from {config.ipc * k:,} crops of at most "
                f"{originals_per_class[fewest]} distinct originals, so images repeat sources, and the bundle "
                f"holds no fewer images than the data it distils. Fix: --ipc below {min(originals_per_class)}, "
                f"or add originals."
            )
    kept_top1 = metrics.get("images.init_teacher_top1")
    if kept_top1 is not None and config.selection != "random" and kept_top1 < TEACHER_KEPT_FLOOR:
        held = metrics.get("fidelity.heldout.teacher_top1")
        held_txt = f" (and {100 * held:.1f}% of held-out views)" if held is not None else ""
        side = f"{image_size}-px" if image_size else "the build's"
        out.append(
            f"the teacher gets only {100 * kept_top1:.1f}% of the bundle's own images right{held_txt}, although the "
            f"selection keeps the candidates it gets right first: it fails on most of {side} views of its own "
            f"training images. A teacher trained at another resolution, or with its classes in another order, "
            f"does this, and its labels then mislead the projector and the students. Fix: build at the side the "
            f"teacher was trained at (--image-size{f', now {image_size}' if image_size else ''}), and check the "
            f"class order (--classes) against the teacher's outputs."
        )
    n_bad = int(metrics.get("inputs.skipped_images", 0))
    if n_bad:
        named = f" ({', '.join(list(skipped_images)[:5])}{', ...' if n_bad > 5 else ''})" if skipped_images else ""
        out.append(
            f"{n_bad} training image(s) failed to decode and were skipped{named}; the manifest's "
            f"provenance.extra.skipped_images names the first {_LISTED_SKIPPED}. Fix: delete or re-encode them."
        )
    return out


_LISTED_SKIPPED = 20  # skipped images named in provenance.extra


def _resolve_data(train_data, classes, *, world=None, store=None,
                  resume: bool = False) -> tuple[ImageFolder | TensorData | HFData, list[str]]:
    """A path becomes a checked ImageFolder; tensors / datasets become TensorData; a Hugging Face dataset
    (``hf://datasets/ORG/NAME[:SPLIT]``, a ``save_to_disk`` folder, a ``datasets.Dataset``) becomes HFData."""
    if hf_source(train_data) is not None:
        hf = open_hf_data(hf_source(train_data), classes)
        return hf, hf.names
    if isinstance(train_data, (str, os.PathLike)):
        cmap = None
        if isinstance(classes, (str, os.PathLike)):
            cmap = load_class_map(classes)
        elif isinstance(classes, dict):
            cmap = dict(classes)
        elif classes is not None:
            raise BuildInputError("with an image folder, classes must be a class-map file or a dict",
                                  field="classes")
        if world is None:
            folder = scan_image_folder(train_data, class_map=cmap)
        else:  # rank 0 scans (or reuses its index on resume) and sends the listing to the others
            folder = scan_once(train_data, class_map=cmap, world=world, store=store, resume=resume)
        return folder, folder.names
    if isinstance(train_data, TensorData):
        return train_data, train_data.names
    if isinstance(train_data, torch.utils.data.Dataset):
        items = [train_data[i] for i in range(len(train_data))]
        train_data = (torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor([int(y) for _, y in items]))
    if isinstance(train_data, (tuple, list)) and len(train_data) == 2:
        images, labels = train_data
        if not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)):
            raise BuildInputError("in-memory training data needs classes=[name, ...]", field="classes")
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels).long()
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise BuildInputError(f"expected uint8 images [N,3,H,W], got {images.dtype} {tuple(images.shape)}",
                                  field="train_data")
        if labels.shape != (images.shape[0],):
            raise BuildInputError("expected one label per image", field="train_data")
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= len(classes):
            raise BuildInputError(f"labels must be in [0, {len(classes)})", field="train_data")
        counts = torch.bincount(labels, minlength=len(classes))
        empty = [classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
        if empty:
            raise BuildInputError(f"class(es) with no images: {', '.join(empty[:20])}", field="train_data")
        return TensorData(images, labels, list(classes)), list(classes)
    raise BuildInputError(f"cannot use {type(train_data).__name__} as training data", field="train_data",
                          fix="give an image-folder path, (images uint8 [N,3,H,W], labels) or a Dataset")


@contextmanager
def _timed(timings: dict[str, float], name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def _describe(x: Any) -> Any:
    """A JSON value naming an input (a spec string or path; a module or tensor by its type)."""
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    return f"<{type(x).__name__}>"


def _run_record(config: BuildConfig, foundation: Any) -> dict[str, Any]:
    """What the checkpoint folder records (``build.json``), for :func:`_check_resume` to compare."""
    return {**config.to_dict(), "foundation": _describe(foundation)}


# The options a resumed run must share with the run that wrote the checkpoints: the foundation and the
# config fields marked ``resume=True``.
_RESUME_KEYS = ("foundation", *RESUME_FIELDS)


def build_bundle(
    train_data: str | os.PathLike[str] | tuple[torch.Tensor, torch.Tensor] | torch.utils.data.Dataset,
    teacher: str | nn.Module | Sequence[str | nn.Module],
    foundation: str,
    out: str | os.PathLike[str],
    config: BuildConfig | Mapping[str, Any] | None = None,
    *,
    images: str | os.PathLike[str] | None = None,
    classes: str | os.PathLike[str] | dict[str, str] | Sequence[str] | None = None,
    teacher_weights: str | Sequence[str] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> BuildResult:
    """Build a bundle at ``out``: distil a low-rank projector from ``teacher`` on ``train_data``, make the
    images, measure fidelity, and write everything atomically. The Python form of ``hellofmt build``.

    Every option with a default is a field of :class:`~hellofmt.builder.config.BuildConfig`; pass a config,
    or the fields as keywords (``build_bundle(..., ipc=10, rank=16)``), or both (keywords win). Long
    stages checkpoint into ``checkpoint_dir`` (default ``OUT.ckpt``) and ``resume=True`` continues them.
    Under ``torchrun`` every process distils (DDP), selects and refines its share of the images, and rank 0
    alone measures fidelity and writes.

    Args:
        train_data: the original data: an image-folder path (``DIR/CLASS/IMAGE``), ``(images, labels)``
            tensors (uint8 ``[N, 3, H, W]`` and int ``[N]``), or a ``torch.utils.data.Dataset`` of such pairs.
        teacher: ``timm:NAME`` or ``FILE.py:FACTORY`` spec strings, modules in eval mode taking images in
            [0, 1], or a list of them (their logits are averaged: weak teachers).
        foundation: the open_clip model to adapt: ``ARCH:TAG``, ``hf-hub:ORG/REPO``,
            ``CONFIG.json[:WEIGHTS.safetensors]``, or a bare ``ARCH`` for random weights.
        out: the bundle directory to write (refused if it exists, unless ``overwrite=True``).
        config: the build options, as a :class:`BuildConfig` or its :meth:`~BuildConfig.to_dict` form
            (a bundle's ``provenance.build_args``); default ``BuildConfig()``.
        images: a folder of pre-made distilled images (same class folders as ``train_data``), instead of
            ``ipc`` images per class selected RDED-style; exactly one of the two is needed.
        classes: class folder -> readable name (a JSON or TSV file, or a dict) for an image folder; the
            class names, in label order, for in-memory data.
        teacher_weights: the safetensors weights of each ``timm:`` teacher, in order.
        progress: show progress bars.
        **overrides: :class:`BuildConfig` fields, applied onto ``config``.

    Returns:
        A :class:`BuildResult`: ``path`` (None on torchrun ranks other than 0), ``metrics``, ``timings``
        (seconds per stage), ``summary`` (the ``hellofmt info`` text) and ``warnings`` (see
        :func:`build_warnings`; also recorded in the manifest's ``provenance.extra.warnings``).

    Raises:
        BuildInputError: an unknown option name (with the closest one), an option out of range, or
            unusable inputs, all before any heavy work.
        TeacherError: a teacher that cannot be loaded or gives unusable outputs.
        BuildError: a resumed build whose options differ from the checkpointed run's.
    """
    if config is None:
        config = BuildConfig()
    elif not isinstance(config, BuildConfig):
        config = BuildConfig.from_dict(config)
    c = config.replace(**overrides)
    if (images is None) == (c.ipc is None):
        raise BuildInputError("give exactly one of --images DIR and --ipc N", field="--ipc")
    c.validate()
    from ..foundation import foundation_tensors, load_foundation, parse_foundation_spec
    from ..projector import DEFAULT_TEMPLATES, Projector

    timings: dict[str, float] = {}
    metrics: dict[str, float] = {}
    world = init_world(c.device)
    dev = world.device
    out = Path(out)
    store = CheckpointStore(c.checkpoint_dir or out.with_name(out.name + ".ckpt"), enabled=world.is_main)
    # A failure while the inputs are checked removes the checkpoint folder if this run created it (the
    # data scan writes its index there), and nothing else; a later failure keeps it for --resume.
    fresh_store = not os.path.lexists(store.dir)
    inputs_checked = False
    try:
        # ---- 1. inputs, all checked before heavy work ------------------------------------------
        with _timed(timings, "inputs"):
            if out.exists() and not c.overwrite:
                raise BuildInputError("already exists", file=out, field="--out", fix="pass --overwrite or another path")
            tspecs = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
            tw = list(teacher_weights) if isinstance(teacher_weights, (list, tuple)) else teacher_weights
            # Everything that can be checked without the data, before the scan writes its first byte.
            if isinstance(classes, (str, os.PathLike)) and hf_source(train_data) is None:
                load_class_map(classes)
            check_teacher_specs(tspecs, tw)  # before the foundation, which may be a large download
            if isinstance(foundation, str):
                _check_foundation_files(parse_foundation_spec(foundation))  # unknown names fail here, cheaply
            if images is not None and not os.path.isdir(images):
                raise BuildInputError("no such folder", file=images, field="--images",
                                      fix="give the folder of pre-made images (DIR/CLASS/IMAGE)")
            data, names = _resolve_data(train_data, classes, world=world, store=store, resume=c.resume)
            if hasattr(data, "skipped"):  # folder images / dataset rows that fail to decode later: skipped, counted
                n_data = len(data_labels(data))
                data.skipped = SkippedImages(bad_image_limit(c.max_bad_images, n_data), n_data)
            num_classes = len(names)
            if num_classes < 2:
                raise BuildInputError("need at least two classes", field="--train-data")
            torch.manual_seed(c.seed)  # a random-init foundation must come out the same on every rank
            fnd = load_foundation(foundation, device=dev, embed=_embed(foundation, c.embed_foundation))
            # Taken now: the projector drops the text tower and parametrizes the weights in place.
            embedded_state = (
                {k: v.detach().cpu().clone() for k, v in foundation_tensors(fnd.model).items()}
                if fnd.reference.source == "embedded" and world.is_main else None
            )
            labels_all = data_labels(data)
            train_idx, held_idx = split_holdout(labels_all, c.holdout, seed=c.seed)
            probe_idx = _probe_indices(labels_all, train_idx)  # one image per class, at most 64
            # their headers also decide the default side (the images' own, when below the foundation's)
            size = c.image_size or default_image_size(int(fnd.image_size), source_side(data, probe_idx))
            c = c.resolved(size)  # the size-dependent defaults (factor, crop scales, load side), recorded as used
            lsize = c.load_size  # the image side itself for whole-image builds (config.load_side)
            if c.num_workers is None:  # auto (recorded as used): none for in-memory data, see auto_num_workers
                c = c.replace(num_workers=0 if isinstance(data, TensorData) else auto_num_workers(len(train_idx)))
            probe_imgs, _ = load_all(data, probe_idx, lsize)
            probe = _views(probe_imgs.to(dev), size, c.seed)
            ens, tdescs = load_teachers(tspecs, num_classes=num_classes, weights=tw, probe=probe, device=dev)
            folders = data.folders if isinstance(data, ImageFolder) else names
            if images is not None:
                from .images import images_from_folder

                pre_images, pre_labels = images_from_folder(images, names, folders, size)
            if c.resume:
                _check_resume(store, _run_record(c, foundation))
            if world.is_main:
                store.write_json("build.json", _run_record(c, foundation))
            inputs_checked = True

        # ---- 2. projector distillation -----------------------------------------------------------
        with _timed(timings, "distill"):
            projector = Projector(fnd, names, list(c.templates or DEFAULT_TEMPLATES))
            projector.to(dev)
            gen = torch.Generator().manual_seed(c.seed)
            projector.attach_deltas(rank=c.rank, alpha=c.alpha, targets=list(c.targets) if c.targets else None,
                                    head_rank=c.head_rank, head_alpha=c.head_alpha, generator=gen)  # on dev
            cfg = _distill_config(c, size, steps=c.steps, epochs=c.epochs, min_steps=c.min_steps,
                                  mix=c.distill_mix or c.mix, num_workers=c.num_workers)
            stats = _train_deltas(projector, ens, dataset_for(data, train_idx, lsize), cfg, "distill", metrics,
                                  world=world, store=store, resume=c.resume, progress=progress)
            metrics["distill.resumed_from"] = stats["distill_resumed_from"]
        # ---- 3. images: every rank selects the classes c % world == rank; all get every image ----------
        with _timed(timings, "images"):
            # under torchrun every rank reads the same (shared) checkpoint folder, so all take the same branch
            ck = store.load("images") if c.resume else None
            if ck is not None and ck.done:
                syn, syn_labels = ck.params()["images"], ck.params()["labels"]
            else:
                if images is not None:
                    syn, syn_labels = pre_images, pre_labels
                else:
                    from .images import rded_images

                    syn, syn_labels, st = rded_images(
                        data, ens, train_indices=train_idx, ipc=c.ipc, factor=c.factor, image_size=size,
                        load_size=lsize, candidates=c.candidates,
                        pool_images=c.pool_images, pool_crops=c.pool_crops, selection=c.selection,
                        scale=tuple(c.select_scale), embed=_embedder(projector), device=dev, seed=c.seed,
                        num_workers=c.num_workers, world=world, progress=progress)
                    metrics.update({f"images.{k}": v for k, v in st.items()})
                store.save("images", 0, params={"images": syn, "labels": syn_labels}, done=True)  # rank 0 writes

        # ---- 4. refinement: chunk i on rank i % world, gathered on every rank ---------------------------
        if c.refine_steps > 0:
            from .refine import refine_images

            with _timed(timings, "refine"):
                # each rank checkpoints the chunks it refines (distinct files), so this store writes on all ranks
                syn, st = refine_images(projector, ens, syn.cpu(), syn_labels.cpu(), steps=c.refine_steps,
                                        view_size=size, lr=c.refine_lr, prior=c.refine_prior,
                                        temperature=c.temperature, batch_size=c.batch_size, mix=c.mix, seed=c.seed,
                                        chunk=c.refine_chunk, store=CheckpointStore(store.dir), scale=tuple(c.scale),
                                        resume=c.resume, world=world, progress=progress,
                                        checkpoint_every=max(1, c.checkpoint_every // 2) if c.checkpoint_every else 0)
                metrics.update({k.replace("refine_", "refine."): v for k, v in st.items()})
        # ---- 5. adaptation: the deltas fine-tuned on views of the bundle's own images (DDP, every rank) ---
        if c.adapt_steps > 0:
            with _timed(timings, "adapt"):
                own = torch.utils.data.TensorDataset(syn.cpu(), syn_labels.cpu())
                _train_deltas(projector, ens, own, _distill_config(c, size, steps=c.adapt_steps, mix=c.mix),
                              "adapt", metrics, world=world, store=store, resume=c.resume, progress=progress)
        if not world.is_main:  # fidelity and writing are rank 0's
            world.close(sync=True)  # waits for rank 0 to write the bundle
            return BuildResult(path=None, metrics=metrics, timings=timings, summary=None, warnings=[])
        syn = syn.to(dev)
        syn_labels = syn_labels.to(dev)

        # ---- 6. fidelity + probe -----------------------------------------------------------------
        from .fidelity import measure

        with _timed(timings, "fidelity"):
            if c.delta_dtype != "float32":  # from here on, every label measured or recorded is the stored deltas'
                for k, v in _round_deltas(projector, syn, c, size).items():
                    metrics[f"delta_encoding.{k}"] = v
            for k, v in measure(projector, ens, syn, syn_labels, view_size=size, views=c.fidelity_views,
                                temperature=c.temperature, mix=c.mix, scale=tuple(c.scale)).items():
                metrics[f"fidelity.synthetic.{k}"] = v
            held, held_labels = load_all(data, held_idx, lsize, num_workers=c.num_workers)
            for k, v in measure(projector, ens, held.to(dev), held_labels.to(dev), view_size=size,
                                views=c.fidelity_views, temperature=c.temperature, mix="none",
                                scale=tuple(c.scale)).items():
                metrics[f"fidelity.heldout.{k}"] = v
            deltas = projector.delta_tensors(c.delta_dtype)  # as the projector file stores them
            info = projector.projector_info(c.delta_dtype)
            projector.merge()
            from ..probe import compute_probe

            probe_rec = compute_probe(projector, syn)
            tracker = getattr(data, "skipped", None)
            skipped = list(tracker.files) if tracker is not None else []
            if tracker is not None:
                metrics["inputs.skipped_images"] = len(skipped)
            warnings = build_warnings(
                metrics, num_classes=num_classes, config=c, train_count=len(train_idx), classes=names,
                skipped_images=skipped, image_size=size, world_size=world.size,
                originals_per_class=(torch.bincount(labels_all[train_idx], minlength=num_classes).tolist()
                                     if images is None and train_idx else None),
            )

        # ---- 7. write ----------------------------------------------------------------------------
        from ..bundle import Bundle, BundleWriter
        from ..summary import format_summary, summarize
        with _timed(timings, "write"):
            for k, v in timings.items():
                metrics[f"time.{k}_s"] = round(v, 3)
            ref = fnd.reference
            with BundleWriter(out, overwrite=c.overwrite) as w:
                img_info = w.write_images(syn.cpu(), syn_labels.cpu(), num_classes=num_classes, codec=c.codec,
                                          quality=c.quality)
                w.write_tensors(info.file, deltas, {"format": "hellofmt-projector"})
                if ref.source == "embedded":
                    w.write_tensors(ref.weights_file, embedded_state,
                                    {"format": "hellofmt-foundation", "architecture": ref.architecture})
                manifest = Manifest(
                    format_version=info.format_version,
                    classes=list(names),
                    foundation=ref,
                    head=Head(templates=list(c.templates or DEFAULT_TEMPLATES), logit_scale=projector.logit_scale),
                    projector=info,
                    images=img_info,
                    labels=LabelRecipe(temperature=c.temperature, mix=c.mix, scale=list(c.scale)),
                    provenance=Provenance(
                        hellofmt_version=__version__,
                        created=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        teachers=tdescs,
                        build_args=c.to_dict(),
                        seed=c.seed,
                        extra={"timings_s": {k: round(v, 3) for k, v in timings.items()},
                               "world_size": world.size, "device": str(dev),
                               **({"warnings": warnings} if warnings else {}),
                               **({"skipped_images": skipped[:_LISTED_SKIPPED]} if skipped else {})},
                    ),
                    metrics={k: float(v) for k, v in metrics.items()},
                    probe=probe_rec,
                    class_folders=list(data.folders) if isinstance(data, ImageFolder) else None,
                )
                path = w.commit(manifest)
        bundle = Bundle.open(path)
        summary = format_summary(summarize(bundle), show_warnings=False)  # the caller shows `warnings`
        if not c.keep_checkpoints and store.enabled:
            shutil.rmtree(store.dir, ignore_errors=True)
        world.close(sync=True)
        return BuildResult(path=path, metrics=metrics, timings=timings, summary=summary, warnings=warnings)
    except BaseException:
        if not inputs_checked and fresh_store and world.is_main:
            shutil.rmtree(store.dir, ignore_errors=True)  # this run's own: it did not exist before
        raise
    finally:
        world.close()


def _check_foundation_files(spec) -> None:
    """The files a ``CONFIG.json[:WEIGHTS.safetensors]`` foundation spec names must exist (checked
    before anything is written; they are read later, after the data scan)."""
    for path, what in ((spec.config_path, "model config"), (spec.weights_path, "weights")):
        if path is not None and not os.path.isfile(path):
            raise BuildInputError(f"no such file (the foundation's {what})", file=path, field="--foundation",
                                  fix="give CONFIG.json[:WEIGHTS.safetensors] files that exist, ARCH:TAG or "
                                  "hf-hub:ORG/REPO")


def _distill_config(c: BuildConfig, size: int, **stage) -> DistillConfig:
    """The settings the distillation and the adaptation share (loss, optimiser, views, checkpoints,
    seed), plus the ``stage``'s own (steps, mixing, workers)."""
    return DistillConfig(batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay, loss=c.loss,
                         ce_weight=c.ce_weight, temperature=c.temperature, view_size=size, scale=tuple(c.scale),
                         checkpoint_every=c.checkpoint_every, seed=c.seed, **stage)


def _train_deltas(projector, teacher, dataset, cfg: DistillConfig, stage: str, metrics: dict[str, float],
                  **kw) -> dict[str, float]:
    """One training stage of the deltas (``distill`` or ``adapt``, checkpointed under that name): they
    are made trainable, trained, recorded as ``STAGE.steps``, ``.final_loss`` and ``.train_agreement``,
    then the whole projector is frozen in eval mode again. Returns :func:`distill_projector`'s stats."""
    for p in projector.delta_parameters():
        p.requires_grad_(True)
    stats = distill_projector(projector, teacher, dataset, cfg, stage=stage, **kw)
    metrics[f"{stage}.steps"] = stats["distill_steps"]
    metrics[f"{stage}.final_loss"] = stats["loss"]
    metrics[f"{stage}.train_agreement"] = stats["agreement"]
    projector.eval()
    projector.requires_grad_(False)
    return stats


def _embedder(projector):
    """Views -> the projector's image embeddings (the space ``--selection kmeans`` clusters in)."""

    @torch.no_grad()
    def embed(views: torch.Tensor) -> torch.Tensor:
        return projector._encode(projector.preprocess(views)).float()

    return embed


def _round_deltas(projector: nn.Module, images: torch.Tensor, c: BuildConfig, size: int) -> dict[str, float]:
    """Put the trained deltas through ``c.delta_dtype`` (what the file will hold) and measure how far the
    labels moved: float32 logits before and after on ``c.fidelity_views`` random-resized-crop views of each
    image (at most 4096 views), at the label temperature."""
    from ..probe import exact_float32
    from .distill import make_views, step_generator

    per = max(1, min(c.fidelity_views, 4096 // max(1, images.shape[0])))
    n = min(images.shape[0], 4096)

    def views():
        for v in range(per):
            g = step_generator(c.seed, 7, v, images.device)
            for s in range(0, n, 64):
                x = images[s:min(s + 64, n)]
                yield make_views(x, torch.zeros(x.shape[0], dtype=torch.int64, device=x.device), size=size,
                                 generator=g, scale=tuple(c.scale), mix="none")[0]

    with exact_float32(images.device):
        return projector.round_deltas_(c.delta_dtype, views, temperature=c.temperature)


def _embed(spec: Any, embed: bool | None) -> bool:
    """Embed the foundation when the bundle could not name it otherwise: a bare architecture
    (random weights) or a config file of one's own."""
    if embed is not None:
        return bool(embed)
    s = str(spec)
    return ":" not in s or s.endswith(".json") or ".json:" in s


def _probe_indices(labels: torch.Tensor, train_idx: list[int], per_class: int = 1) -> list[int]:
    seen: dict[int, int] = {}
    out = []
    for i in train_idx:
        c = int(labels[i])
        if seen.get(c, 0) < per_class:
            seen[c] = seen.get(c, 0) + 1
            out.append(i)
    return out[:64]


def _views(images: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    from .distill import make_views, step_generator

    g = step_generator(seed, 0, 0, images.device)
    lab = torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)
    return make_views(images, lab, size=size, generator=g, mix="none")[0]


def _check_resume(store: CheckpointStore, now: dict[str, Any]) -> None:
    """Refuse to resume checkpoints written with other :data:`_RESUME_KEYS` than ``now`` (a :func:`_run_record`)."""
    old = store.read_json("build.json")
    if old is None:
        return
    diff = [k for k in _RESUME_KEYS if old.get(k) != now.get(k)]
    if diff:
        raise BuildError(
            f"--resume with different options than the checkpointed run: {', '.join(diff)}",
            file=store.dir / "build.json", field=diff[0],
            fix="resume with the same options, or delete the checkpoint folder to start over",
        )
