"""The whole build: inputs -> projector distillation -> images -> refinement -> fidelity -> bundle.

:func:`build_bundle` is what ``hellofmt build`` calls; from Python it also accepts modules (teachers) and
in-memory data (``(images, labels)`` tensors) directly. Each stage records its wall time; the long
ones checkpoint into ``checkpoint_dir`` (default ``OUT.ckpt``) so ``resume=True`` continues where an
interrupted run stopped. Under ``torchrun`` the distillation runs on every process (DDP); the later
stages are cheap and run on rank 0, which alone writes files.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .. import __version__
from ..errors import BuildError, BuildInputError, HellofmtError
from ..manifest import MIX_MODES, CODECS, Head, LabelRecipe, Manifest, Provenance
from .checkpoint import CheckpointStore
from .dist import init_world
from .distill import DistillConfig, distill_projector
from .inputs import (
    ImageFolder,
    TensorData,
    data_labels,
    dataset_for,
    load_all,
    load_class_map,
    scan_image_folder,
    split_holdout,
)
from .teachers import check_teacher_specs, load_teachers

__all__ = ["build_bundle", "BuildResult"]



class BuildResult(dict):
    """What :func:`build_bundle` returns: ``path`` (the bundle, or None on ranks other than 0), ``metrics``,
    ``timings`` (seconds per stage) and ``summary`` (the ``hellofmt info`` text)."""

    @property
    def path(self) -> Path | None:
        return self.get("path")


def _check_options(**o: Any) -> None:
    def bad(field: str, msg: str, fix: str | None = None):
        raise BuildInputError(msg, field=field, fix=fix)

    if (o["images"] is None) == (o["ipc"] is None):
        bad("--ipc", "give exactly one of --images DIR and --ipc N")
    if o["ipc"] is not None and o["ipc"] < 1:
        bad("--ipc", f"expected an integer >= 1, got {o['ipc']}")
    if o["factor"] < 1:
        bad("--factor", f"expected an integer >= 1, got {o['factor']}")
    if o["rank"] < 1 or (o["head_rank"] is not None and o["head_rank"] < 0):
        bad("--rank", "ranks must be >= 1 (--head-rank 0 turns the head delta off)")
    if o["loss"] not in ("mse", "kl"):
        bad("--loss", f"expected mse or kl, got {o['loss']!r}")
    for key in ("mix", "distill_mix"):
        if o[key] is not None and o[key] not in MIX_MODES:
            bad("--" + key.replace("_", "-"), f"expected one of {', '.join(MIX_MODES)}, got {o[key]!r}")
    if o["codec"] not in CODECS:
        bad("--codec", f"expected one of {', '.join(CODECS)}, got {o['codec']!r}")
    if o["temperature"] <= 0:
        bad("--temperature", "expected a number > 0")
    if not 0 <= o["holdout"] < 1:
        bad("--holdout", "expected a fraction in [0, 1)")
    if o["refine_steps"] < 0:
        bad("--refine-steps", "expected an integer >= 0")
    if o["steps"] is not None and o["steps"] < 1:
        bad("--steps", "expected an integer >= 1")
    if o["batch_size"] < 1:
        bad("--batch-size", "expected an integer >= 1")
    if o["image_size"] is not None and o["image_size"] < 8:
        bad("--image-size", "expected an integer >= 8")
    if o["load_size"] is not None and o["load_size"] < 1:
        bad("--load-size", "expected an integer >= 1")
    if not o["lr"] > 0:
        bad("--lr", f"expected a number > 0, got {o['lr']}")
    if not o["weight_decay"] >= 0:
        bad("--weight-decay", f"expected a number >= 0, got {o['weight_decay']}")
    if o["refine_steps"] > 0 and not o["refine_lr"] > 0:
        bad("--refine-lr", f"expected a number > 0, got {o['refine_lr']}")
    if o["num_workers"] < 0:
        bad("--num-workers", f"expected an integer >= 0, got {o['num_workers']}")
    if o["fidelity_views"] < 1:
        bad("--fidelity-views", f"expected an integer >= 1, got {o['fidelity_views']}")
    if o["candidates"] < 1:
        bad("--candidates", f"expected an integer >= 1, got {o['candidates']}")
    from ..imagestore import check_codec

    try:
        check_codec(o["codec"], o["quality"])
    except HellofmtError as e:
        name = "--quality" if e.field == "quality" or "quality" in e.message else "--codec"
        if e.field in ("--quality", "--codec"):
            raise
        bad(name, e.message, e.fix)
    _check_device(o["device"])


def _check_device(device: Any) -> None:
    """``--device`` names a device this machine has (checked before anything is built)."""
    if device is None:
        return
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


def _resolve_data(train_data, classes) -> tuple[ImageFolder | TensorData, list[str]]:
    """A path becomes a checked ImageFolder; tensors / datasets become TensorData."""
    if isinstance(train_data, (str, os.PathLike)):
        cmap = None
        if isinstance(classes, (str, os.PathLike)):
            cmap = load_class_map(classes)
        elif isinstance(classes, dict):
            cmap = dict(classes)
        elif classes is not None:
            raise BuildInputError("with an image folder, classes must be a class-map file or a dict",
                                  field="classes")
        folder = scan_image_folder(train_data, class_map=cmap)
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


def _build_args(args: dict[str, Any]) -> dict[str, Any]:
    """The options recorded in provenance (JSON-able, no modules or tensors)."""
    out = {}
    for k, v in args.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, os.PathLike):
            out[k] = os.fspath(v)
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
        else:
            out[k] = f"<{type(v).__name__}>"
    return out


# The options a resumed run must share with the run that wrote the checkpoints.
_RESUME_KEYS = ("foundation", "rank", "head_rank", "alpha", "head_alpha", "targets", "seed", "batch_size",
                "loss", "ipc", "factor", "image_size", "refine_steps")


def build_bundle(
    train_data: str | os.PathLike[str] | tuple[torch.Tensor, torch.Tensor] | torch.utils.data.Dataset,
    teacher: str | nn.Module | Sequence[str | nn.Module],
    foundation: str,
    out: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    ipc: int | None = None,
    classes: str | os.PathLike[str] | dict[str, str] | Sequence[str] | None = None,
    teacher_weights: str | Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    rank: int = 8,
    head_rank: int | None = 8,
    alpha: float | None = None,
    head_alpha: float | None = None,
    targets: Sequence[str] | None = None,
    epochs: float = 10.0,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    loss: str = "kl",
    ce_weight: float = 0.1,
    temperature: float = 1.0,
    mix: str = "cutmix",
    distill_mix: str | None = None,
    image_size: int | None = None,
    load_size: int | None = None,
    factor: int = 2,
    candidates: int = 4,
    refine_steps: int = 0,
    refine_lr: float = 0.01,
    refine_prior: float = 1.0,
    codec: str = "png",
    quality: int | None = None,
    holdout: float = 0.05,
    fidelity_views: int = 4,
    embed_foundation: bool | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 200,
    resume: bool = False,
    keep_checkpoints: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> BuildResult:
    """Build a bundle at ``out`` from ``train_data`` (an image-folder path, or in-memory data) and
    ``teacher`` (spec strings ``timm:NAME`` / ``FILE.py:FACTORY``, modules, or a list of them: the
    logits of several are averaged), adapting the open_clip ``foundation`` (``ARCH:TAG``,
    ``hf-hub:ORG/REPO``, ``CONFIG.json[:WEIGHTS.safetensors]``, or a bare ``ARCH`` for random
    weights) with rank-``rank`` deltas. Images come from ``images`` (a folder of distilled images) or
    ``ipc`` per class by RDED selection, optionally refined for ``refine_steps``. ``mix`` is the
    loader's default mixing (recorded in the label recipe); ``distill_mix`` (default: ``mix``) the
    mixing of the distillation views. Returns a
    :class:`BuildResult`; under torchrun only rank 0 writes and gets a path.
    """
    args = dict(locals())
    _check_options(**args)
    from ..foundation import foundation_tensors, load_foundation, parse_foundation_spec
    from ..projector import DEFAULT_TEMPLATES, Projector

    timings: dict[str, float] = {}
    metrics: dict[str, float] = {}
    world = init_world(device)
    dev = world.device
    out = Path(out)
    store = CheckpointStore(checkpoint_dir or out.with_name(out.name + ".ckpt"), enabled=world.is_main)
    try:
        # ---- 1. inputs, all checked before heavy work ------------------------------------------
        with _timed(timings, "inputs"):
            if out.exists() and not overwrite:
                raise BuildInputError("already exists", file=out, field="--out", fix="pass --overwrite or another path")
            data, names = _resolve_data(train_data, classes)
            num_classes = len(names)
            if num_classes < 2:
                raise BuildInputError("need at least two classes", field="--train-data")
            tspecs = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
            tw = list(teacher_weights) if isinstance(teacher_weights, (list, tuple)) else teacher_weights
            check_teacher_specs(tspecs, tw)  # before the foundation, which may be a large download
            if isinstance(foundation, str):
                parse_foundation_spec(foundation)  # an unknown architecture or tag fails here, cheaply
            torch.manual_seed(seed)  # a random-init foundation must come out the same on every rank
            fnd = load_foundation(foundation, device=dev, embed=_embed(foundation, embed_foundation))
            # Taken now: the projector drops the text tower and parametrizes the weights in place.
            embedded_state = (
                {k: v.detach().cpu().clone() for k, v in foundation_tensors(fnd.model).items()}
                if fnd.reference.source == "embedded" and world.is_main else None
            )
            size = image_size or int(fnd.image_size)
            lsize = load_size or max(size, round(size * 8 / 7))
            labels_all = data_labels(data)
            train_idx, held_idx = split_holdout(labels_all, holdout, seed=seed)
            probe_imgs, _ = load_all(data, _probe_indices(labels_all, train_idx), lsize)
            probe = _views(probe_imgs.to(dev), size, seed)
            ens, tdescs = load_teachers(tspecs, num_classes=num_classes, weights=tw, probe=probe, device=dev)
            folders = data.folders if isinstance(data, ImageFolder) else names
            if images is not None:
                from .images import images_from_folder

                pre_images, pre_labels = images_from_folder(images, names, folders, size)
            if resume:
                _check_resume(store, args)
            if world.is_main:
                store.write_json("build.json", _build_args(args))

        # ---- 2. projector distillation -----------------------------------------------------------
        with _timed(timings, "distill"):
            projector = Projector(fnd, names, list(templates or DEFAULT_TEMPLATES))
            projector.to(dev)
            gen = torch.Generator().manual_seed(seed)
            projector.attach_deltas(rank=rank, alpha=alpha, targets=list(targets) if targets else None,
                                    head_rank=head_rank, head_alpha=head_alpha, generator=gen)  # on dev
            cfg = DistillConfig(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                loss=loss, ce_weight=ce_weight, temperature=temperature, view_size=size,
                                mix=distill_mix or mix,
                                checkpoint_every=checkpoint_every, num_workers=num_workers, seed=seed)
            stats = distill_projector(projector, ens, dataset_for(data, train_idx, lsize), cfg, world=world,
                                      store=store, resume=resume, progress=progress)
            metrics["distill.steps"] = stats["distill_steps"]
            metrics["distill.resumed_from"] = stats["distill_resumed_from"]
            metrics["distill.final_loss"] = stats["loss"]
            metrics["distill.train_agreement"] = stats["agreement"]
        if not world.is_main:
            return BuildResult(path=None, metrics=metrics, timings=timings, summary=None)

        projector.eval()
        for p in projector.parameters():
            p.requires_grad_(False)
        # ---- 3. images ---------------------------------------------------------------------------
        with _timed(timings, "images"):
            ck = store.load("images") if resume else None
            if ck is not None and ck.done:
                syn, syn_labels = ck.params()["images"], ck.params()["labels"]
            elif images is not None:
                syn, syn_labels = pre_images, pre_labels
            else:
                from .images import rded_images

                syn, syn_labels, st = rded_images(data, ens, train_indices=train_idx, ipc=ipc, factor=factor,
                                                  image_size=size, load_size=lsize, candidates=candidates,
                                                  device=dev, seed=seed, num_workers=num_workers, progress=progress)
                metrics.update({f"images.{k}": v for k, v in st.items()})
            store.save("images", 0, params={"images": syn, "labels": syn_labels}, done=True)
        syn = syn.to(dev)
        syn_labels = syn_labels.to(dev)

        # ---- 4. refinement ----------------------------------------------------------------------
        if refine_steps > 0:
            from .refine import refine_images

            with _timed(timings, "refine"):
                syn, st = refine_images(projector, ens, syn, syn_labels, steps=refine_steps, view_size=size,
                                        lr=refine_lr, prior=refine_prior, temperature=temperature,
                                        batch_size=batch_size, mix=mix, seed=seed, store=store, resume=resume,
                                        checkpoint_every=max(1, checkpoint_every // 2), progress=progress)
                metrics.update({k.replace("refine_", "refine."): v for k, v in st.items()})

        # ---- 5. fidelity + probe -----------------------------------------------------------------
        from .fidelity import measure

        with _timed(timings, "fidelity"):
            for k, v in measure(projector, ens, syn, syn_labels, view_size=size, views=fidelity_views,
                                temperature=temperature, mix=mix).items():
                metrics[f"fidelity.synthetic.{k}"] = v
            held, held_labels = load_all(data, held_idx, lsize, num_workers=num_workers)
            for k, v in measure(projector, ens, held.to(dev), held_labels.to(dev), view_size=size,
                                views=fidelity_views, temperature=temperature, mix="none").items():
                metrics[f"fidelity.heldout.{k}"] = v
            deltas = projector.delta_tensors()  # float32 contiguous CPU copies
            info = projector.projector_info()
            projector.merge()
            from ..probe import compute_probe

            probe_rec = compute_probe(projector, syn)

        # ---- 6. write ----------------------------------------------------------------------------
        from ..bundle import Bundle, BundleWriter, format_summary, summarize
        with _timed(timings, "write"):
            for k, v in timings.items():
                metrics[f"time.{k}_s"] = round(v, 3)
            ref = fnd.reference
            with BundleWriter(out, overwrite=overwrite) as w:
                img_info = w.write_images(syn.cpu(), syn_labels.cpu(), num_classes=num_classes, codec=codec,
                                          quality=quality)
                w.write_tensors(info.file, deltas, {"format": "hellofmt-projector"})
                if ref.source == "embedded":
                    w.write_tensors(ref.weights_file, embedded_state,
                                    {"format": "hellofmt-foundation", "architecture": ref.architecture})
                manifest = Manifest(
                    classes=list(names),
                    foundation=ref,
                    head=Head(templates=list(templates or DEFAULT_TEMPLATES), logit_scale=projector.logit_scale),
                    projector=info,
                    images=img_info,
                    labels=LabelRecipe(temperature=temperature, mix=mix),
                    provenance=Provenance(
                        hellofmt_version=__version__,
                        created=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        teachers=tdescs,
                        build_args=_build_args(args),
                        seed=seed,
                        extra={"timings_s": {k: round(v, 3) for k, v in timings.items()},
                               "world_size": world.size, "device": str(dev)},
                    ),
                    metrics={k: float(v) for k, v in metrics.items()},
                    probe=probe_rec,
                )
                path = w.commit(manifest)
        bundle = Bundle.open(path)
        summary = format_summary(summarize(bundle))
        if not keep_checkpoints and store.enabled:
            shutil.rmtree(store.dir, ignore_errors=True)
        return BuildResult(path=path, metrics=metrics, timings=timings, summary=summary)
    finally:
        world.close()


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


def _check_resume(store: CheckpointStore, args: dict[str, Any]) -> None:
    old = store.read_json("build.json")
    if old is None:
        return
    now = _build_args(args)
    diff = [k for k in _RESUME_KEYS if old.get(k) != now.get(k)]
    if diff:
        raise BuildError(
            f"--resume with different options than the checkpointed run: {', '.join(diff)}",
            file=store.dir / "build.json", field=diff[0],
            fix="resume with the same options, or delete the checkpoint folder to start over",
        )
