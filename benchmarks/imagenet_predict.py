"""ImageNet-1K build time, predicted from a measured run (issue #24, item 4).

Runs the real build (``hellofmt.build_bundle``, what ``hellofmt build`` calls) end to end on a generated
ImageNet-shaped folder of JPEGs (default 100 classes x 1,300 of 500x375, procedural images made once and
reused with ``--data DIR``), with the options of ``examples/imagenet.md`` section 1 (``--ipc 10 --factor 2
--image-size 224 --rank 4 --head-rank 8 --epochs 1 --batch-size 256 --lr 1e-3 --loss kl --ce-weight 0.1
--refine-steps 200 --codec jpeg --quality 90 --checkpoint-every 500``), except that the distillation runs
``--steps`` steps (default 400) instead of the 6,000 that ``--epochs 1`` and the default ``--min-steps``
give. The foundation is ``ViT-B-32`` with random weights (given as a model config + safetensors file, so that
the bundle references it as a ``ViT-B-32:openai`` build would, instead of embedding 600 MB of weights) and
the teacher ``timm:resnet18`` with random weights (``--teacher-weights``, as the example gives it): the
shapes are what cost, not the values.

Each stage's wall time comes from the build's own ``timings`` (inputs, distill, images, refine, fidelity,
write). Inside the stages, the script times the parts that scale differently by wrapping the functions
the pipeline calls (nothing in hellofmt is changed; the wrappers are removed after the build):

  inputs    folder scan (``scan_once``: headers of every image)  -> scales with the training images;
            the rest (foundation and teacher loads, checks)     -> fixed;
  distill   text head (``zeroshot_weights``: classes x templates prompts) -> scales with the classes;
            the optimiser steps (``distill_projector``; the steady time per view from the steps after the
            first fifth, at most 20, timed by when each step draws its views) -> steps x views per step;
            the loop's start-up (workers, first batches) and the projector's set-up -> fixed;
  images    RDED selection (``rded_images``) -> scales with the candidates scored (classes x ipc x
            factor^2 x --candidates); the rest -> fixed;
  refine    the KL before/after of each block (``_kl_sum``) -> scales with the images (classes x ipc);
            the steps (and the rest) -> with the views they label: blocks (of --refine-chunk images) x
            --refine-steps x min(--batch-size, block);
  fidelity  delta rounding (``_round_deltas``), views of the synthetic images, the held-out images'
            load and their views (``measure``, ``load_all``) -> each by its own count of views or images;
            the rest (probe, merge) -> fixed;
  write     the images (``BundleWriter.write_images``) -> scales with the images; the rest -> fixed.

ImageNet-1K is 1,281,167 training images in 1,000 classes. The distillation steps at ImageNet-1K are the
build's own formula (``hellofmt.builder.distill.planned_steps``: ``max(ceil(--min-steps / processes),
round(epochs x steps per epoch))``, steps per epoch from the distributed sampler) with the example's
options: on 1 GPU section 1's (batch 256), on 8 GPUs section 2's torchrun command (batch 128 per
process). 8 GPUs are **not measured** here: their column assumes
data-parallel distillation at the measured time per view on every GPU, plus an all-reduce of the deltas'
gradients per step (``--allreduce-gbps``, ``--allreduce-latency-ms``, not overlapped with the backward pass:
an upper bound); selection split by class and refinement by block across the 8; the folder scan, fidelity
and writing on rank 0 alone, as the build does them. Every assumption is printed with the table and
stored in ``--json``.

Usage::

    python benchmarks/imagenet_predict.py --tiny --device cpu          # smoke test: seconds, not a prediction
    python benchmarks/imagenet_predict.py --device cuda --data /tmp/in-shaped --num-workers 15 \\
        --json predict.json --markdown predict.md                      # the GPU run, 4-5 minutes on an H100

The GPU run's default (130,000 JPEGs, 400 steps, 4 refinement blocks of 200 steps) was sized, without a GPU
to try it on, from the H200 rates of benchmarks/README.md ("Build throughput"): about a minute to generate the
JPEGs on 16 cores (9 GB in the --data folder), then a build of about 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from devices import check_device, fail, sync  # noqa: E402  (benchmarks/devices.py)

PROG = "imagenet_predict.py"
IN1K_IMAGES = 1_281_167  # ImageNet-1K's training split
IN1K_CLASSES = 1000
TINY_CONFIG = ROOT / "tests" / "data" / "hf-test-tiny-vit.json"

# `hellofmt build` options of examples/imagenet.md, section 1 (one GPU), as BuildConfig fields; the
# test checks them against the example's command. Section 2 (8 GPUs under torchrun) differs in these:
IMAGENET_MD = dict(ipc=10, factor=2, image_size=224, rank=4, head_rank=8, epochs=1.0, batch_size=256, lr=1e-3,
                   loss="kl", ce_weight=0.1, refine_steps=200, codec="jpeg", quality=90, checkpoint_every=500)
IMAGENET_MD_TORCHRUN = dict(batch_size=128, lr=2e-3)

# --tiny: every stage of the build in seconds on one CPU thread (a smoke test of this script, no prediction).
TINY = dict(classes=4, per_class=20, width=64, height=48, foundation=str(TINY_CONFIG), teacher="test_resnet",
            image_size=32, ipc=2, steps=6, batch_size=8, refine_steps=2, refine_chunk=4, num_workers=0)


# --------------------------------------------------------------------------------------------------
# the data: an ImageNet-shaped folder of JPEGs
# --------------------------------------------------------------------------------------------------
def _folder_name(c: int) -> str:
    return f"class_{c:04d}"


def _draw_chunk(task: tuple) -> int:
    """Write JPEGs ``start..stop-1`` of class ``c`` (a worker process): each one build_throughput's
    :func:`draw_image` from its own random stream ``(seed, c, j)``, so any split into processes gives the
    same files."""
    import numpy as np
    from build_throughput import draw_image
    from PIL import Image

    root, c, start, stop, classes, width, height, seed = task
    grid = np.mgrid[0:height, 0:width].astype(np.float32)
    folder = Path(root) / _folder_name(c)
    for j in range(start, stop):
        img = draw_image(np.random.default_rng([seed, c, j]), c, classes, width, height, grid)
        Image.fromarray(img).save(folder / f"{c:04d}_{j:05d}.JPEG", quality=90)
    return stop - start


def make_imagenet_folder(root: Path, classes: int, per_class: int, width: int, height: int, *, seed: int = 0,
                         workers: int = 1, progress: bool = True) -> tuple[Path, float]:
    """``classes`` folders of ``per_class`` JPEGs (quality 90) of ``width x height`` under ``root``, made once:
    a folder that holds this very set (its ``.complete`` marker) is reused. Returns (root, seconds spent)."""
    from tqdm.auto import tqdm

    want = f"imagenet-shaped {classes} {per_class} {width} {height} {seed}"
    done, busy = root / ".complete", root / ".generating"
    if done.is_file():
        if done.read_text().strip() == want:
            return root, 0.0
        raise SystemExit(f"{PROG}: error: --data {root} holds another generated set ({done.read_text().strip()}); "
                         "give another folder")
    if root.is_dir() and any(root.iterdir()) and not busy.is_file():
        raise SystemExit(f"{PROG}: error: --data {root} is not empty and was not made by this script; give an "
                         "empty or new folder")
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    busy.write_text(want)
    for c in range(classes):
        (root / _folder_name(c)).mkdir(exist_ok=True)
    step = 100
    tasks = [(str(root), c, s, min(s + step, per_class), classes, width, height, seed)
             for c in range(classes) for s in range(0, per_class, step)]
    bar = tqdm(total=classes * per_class, desc=f"generate {width}x{height} JPEGs", unit="img", disable=not progress,
               dynamic_ncols=True, mininterval=2.0)
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            for n in pool.imap_unordered(_draw_chunk, tasks):
                bar.update(n)
    else:
        for t in tasks:
            bar.update(_draw_chunk(t))
    bar.close()
    done.write_text(want)
    busy.unlink()
    return root, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# the models: random weights, given as files, as a real build gives them
# --------------------------------------------------------------------------------------------------
def make_foundation_files(foundation: str, dest: Path) -> str:
    """A ``CONFIG.json:WEIGHTS.safetensors`` spec of ``foundation`` (an open_clip architecture or a model
    config file) with random weights (seed 0). An architecture's config gets ``quick_gelu`` as OpenAI's
    weights use it (``ViT-B-32:openai``). Built with ``embed_foundation=False``, the bundle references these
    files instead of embedding the weights, as a build on a pretrained tag does."""
    import open_clip
    import safetensors.torch
    import torch

    from hellofmt.foundation import foundation_tensors, load_foundation

    if foundation.endswith(".json"):
        config, name = json.loads(Path(foundation).read_text()), Path(foundation).stem
    else:
        config = open_clip.get_model_config(foundation)
        if config is None:
            raise SystemExit(f"{PROG}: error: --foundation {foundation}: not an open_clip architecture")
        config, name = {**config, "quick_gelu": True}, foundation
    dest.mkdir(parents=True, exist_ok=True)
    cfg = dest / f"{name}.json"
    cfg.write_text(json.dumps(config, indent=1))
    torch.manual_seed(0)
    fnd = load_foundation(str(cfg))  # a config alone: random weights
    weights = dest / f"{name}.safetensors"
    safetensors.torch.save_file(foundation_tensors(fnd.model), str(weights))
    return f"{cfg}:{weights}"


def make_teacher_weights(arch: str, classes: int, dest: Path) -> Path:
    """timm ``arch`` with ``classes`` outputs and random weights (seed 0), as safetensors."""
    import safetensors.torch
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=classes)
    path = dest / f"{arch}-{classes}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# --------------------------------------------------------------------------------------------------
# timing the parts of each stage
# --------------------------------------------------------------------------------------------------
class Probe:
    """Wraps functions the pipeline calls, to time the parts of its stages; :meth:`restore` undoes it."""

    def __init__(self, device) -> None:
        self.device = device
        self.times: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.step_times: list[float] = []  # when each distillation step drew its views
        self.loop: dict = {}
        self.phase = "build"
        self._undo: list[tuple[object, str, object]] = []

    def sync(self) -> None:
        sync(self.device)

    def add(self, key: str, seconds: float, count: float | None = None) -> None:
        self.times[key] = self.times.get(key, 0.0) + seconds
        if count is not None:
            self.counts[key] = self.counts.get(key, 0.0) + count

    def patch(self, owner, name: str, make) -> None:
        orig = getattr(owner, name)
        self._undo.append((owner, name, orig))
        setattr(owner, name, make(orig))

    def timed(self, key: str, count=None):
        """A wrapper factory: time every call under ``key`` (``count(args, kwargs, result)`` adds a count)."""

        def make(orig):
            def wrapper(*args, **kwargs):
                self.sync()
                t0 = time.perf_counter()
                out = orig(*args, **kwargs)
                self.sync()
                self.add(key, time.perf_counter() - t0, count(args, kwargs, out) if count else None)
                return out

            return wrapper

        return make

    def install(self) -> None:
        import hellofmt.builder.distill as distill_mod
        import hellofmt.builder.fidelity as fidelity_mod  # imported now: it binds make_views at import
        import hellofmt.builder.images as images_mod
        import hellofmt.builder.pipeline as pipeline
        import hellofmt.builder.refine as refine_mod
        import hellofmt.projector as projector_mod
        from hellofmt.bundle import BundleWriter

        self.patch(pipeline, "scan_once", self.timed("inputs.scan", lambda a, k, out: len(out.samples)))
        self.patch(projector_mod, "zeroshot_weights",
                   self.timed("distill.text_head", lambda a, k, out: len(a[2]) * len(a[3])))

        def split(orig):
            def wrapper(labels, *a, **k):
                train, held = orig(labels, *a, **k)
                self.loop["labels"], self.loop["train"], self.loop["held"] = labels, train, held
                return train, held

            return wrapper

        self.patch(pipeline, "split_holdout", split)

        def distill(orig):
            def wrapper(projector, teacher, dataset, cfg, **kw):
                if kw.get("stage", "distill") != "distill":
                    return orig(projector, teacher, dataset, cfg, **kw)
                self.loop["trainable"] = sum(p.numel() for p in projector.parameters() if p.requires_grad)
                self.loop["batch_size"] = cfg.batch_size
                self.sync()
                self.step_times.clear()
                self.phase = "distill"
                t0 = time.perf_counter()
                try:
                    stats = orig(projector, teacher, dataset, cfg, **kw)
                    self.sync()
                finally:
                    self.phase = "build"
                self.loop["start"], self.loop["end"] = t0, time.perf_counter()
                self.add("distill.loop", self.loop["end"] - t0)
                return stats

            return wrapper

        self.patch(pipeline, "distill_projector", distill)

        def views(orig):
            def wrapper(*a, **k):
                if self.phase == "distill":
                    self.step_times.append(time.perf_counter())
                return orig(*a, **k)

            return wrapper

        self.patch(distill_mod, "make_views", views)
        self.patch(images_mod, "rded_images", self.timed("images.select"))
        self.patch(refine_mod, "_kl_sum", self.timed("refine.discrepancy", lambda a, k, out: out[1]))

        def fidelity_phase(key, count):
            inner = self.timed(key, count)

            def make(orig):
                timed = inner(orig)

                def wrapper(*a, **k):
                    self.phase = "fidelity"
                    return timed(*a, **k)

                return wrapper

            return make

        def n_views(a, k, out):
            return a[2].shape[0] * k.get("views", 4)

        self.patch(pipeline, "_round_deltas", fidelity_phase("fidelity.round_deltas", None))

        def measure(orig):
            def wrapper(*a, **k):
                key = "fidelity.heldout" if k.get("mix") == "none" else "fidelity.synthetic"
                self.phase = "fidelity"
                return self.timed(key, n_views)(orig)(*a, **k)

            return wrapper

        self.patch(fidelity_mod, "measure", measure)

        def load_all(orig):
            def wrapper(data, indices, *a, **k):
                key = "fidelity.heldout_load" if self.phase == "fidelity" else "inputs.load"
                return self.timed(key, lambda *_: len(indices))(orig)(data, indices, *a, **k)

            return wrapper

        self.patch(pipeline, "load_all", load_all)
        self.patch(BundleWriter, "write_images", self.timed("write.images", lambda a, k, out: a[1].shape[0]))

    def restore(self) -> None:
        while self._undo:
            owner, name, orig = self._undo.pop()
            setattr(owner, name, orig)


def steady_step(step_times: list[float], end: float) -> tuple[float, int]:
    """(seconds per step after warm-up, warm-up steps left out): the steps after the first fifth (at most
    20, at least 1 when there are 2 or more), timed from when each step drew its views to the loop's end."""
    n = len(step_times)
    if n == 0:
        return 0.0, 0
    k0 = min(20, max(1, n // 5)) if n >= 2 else 0
    return (end - step_times[k0]) / (n - k0), k0


# --------------------------------------------------------------------------------------------------
# scaling
# --------------------------------------------------------------------------------------------------
def build_steps(train_images: int, batch: int, world: int, *, epochs: float, min_steps: int) -> int:
    """The distillation steps the build runs for these options (distill_projector's formula, with the
    distributed sampler's steps per epoch of one process)."""
    from hellofmt.builder.distill import StepBatchSampler, planned_steps

    per_epoch = StepBatchSampler(train_images, batch, rank=0, world_size=world).per_epoch
    return planned_steps(per_epoch, steps=None, epochs=epochs, min_steps=min_steps, world_size=world)


def held_out(images: int, classes: int, fraction: float, max_count: int = 2000) -> int:
    """Held-out images that ``split_holdout`` keeps from ``images`` spread evenly over ``classes``."""
    import torch

    from hellofmt.builder.inputs import split_holdout

    labels = torch.arange(images) % classes
    return len(split_holdout(labels, fraction, seed=0, max_count=max_count)[1])


def round_views(n_images: int, views: int) -> int:
    """Views that ``_round_deltas`` labels before and after rounding, for a set of ``n_images``."""
    per = max(1, min(views, 4096 // max(1, n_images)))
    return per * min(n_images, 4096)


def refine_views(n_images: int, chunk: int, steps: int, batch: int, *, world: int = 1) -> int:
    """Views that rank 0 labels in the refinement steps: ``steps`` per block of ``chunk`` images, each of
    ``min(batch, block size)`` views, over the blocks ``0, world, 2 world, ...`` (rank 0's)."""
    sizes = [min(chunk, n_images - s) for s in range(0, n_images, chunk)]
    return sum(steps * min(batch, n) for n in sizes[::world])


def predict(run: dict, args) -> dict:
    """The parts of every stage, measured and scaled (see the module docstring): a dict for --json."""
    from hellofmt.builder.config import BuildConfig
    from hellofmt.builder.images import candidate_pool

    T, P, cfg = run["timings"], run["parts"], run["config"]
    C, N = run["classes"], run["images"]
    TC, TN, G = args.target_classes, args.target_images, args.gpus
    # the run's options (as the build resolved them) and ImageNet-1K's (examples/imagenet.md, sections 1 and 2)
    t1 = BuildConfig(**IMAGENET_MD).resolved(IMAGENET_MD["image_size"])
    tg = t1.replace(**IMAGENET_MD_TORCHRUN)
    n_syn, t_syn = C * cfg["ipc"], TC * t1.ipc
    held_t = held_out(TN, TC, t1.holdout)
    train_t = TN - held_t
    min_steps = t1.min_steps if args.target_min_steps is None else args.target_min_steps
    b1, bg = t1.batch_size, tg.batch_size
    steps1 = build_steps(train_t, b1, 1, epochs=t1.epochs, min_steps=min_steps)
    stepsg = build_steps(train_t, bg, G, epochs=tg.epochs, min_steps=min_steps)
    epochs_alone = (build_steps(train_t, b1, 1, epochs=t1.epochs, min_steps=0),
                    build_steps(train_t, bg, G, epochs=tg.epochs, min_steps=0))
    grad_bytes = 4 * run["trainable"]
    allreduce = (args.allreduce_latency_ms / 1e3 + 2 * (G - 1) / G * grad_bytes / (args.allreduce_gbps * 1e9)
                 if G > 1 else 0.0)

    def scored(c, class_sizes):  # candidates the teacher scores: candidate_pool's, class by class
        whole = float(c["select_scale"][0]) >= 1.0
        return sum(candidate_pool(n, c["ipc"] * c["factor"] ** 2, c["candidates"], pool_images=c["pool_images"],
                                  pool_crops=c["pool_crops"], whole=whole)[2] for n in class_sizes)

    cand_run = scored(cfg, run["train_per_class"])
    cand_t = scored(t1.to_dict(), [train_t // TC] * TC)
    cand_g = scored(t1.to_dict(), [train_t // TC] * math.ceil(TC / G))
    blocks_run = math.ceil(n_syn / cfg["refine_chunk"])
    blocks_t = math.ceil(t_syn / t1.refine_chunk)
    blocks_g = math.ceil(blocks_t / G)
    views = cfg["fidelity_views"]
    parts = []

    def part(stage, name, seconds, unit, measured, units_1, units_g, scaled_by, extra_g=0.0):
        """One part: ``seconds`` for ``measured`` units, scaled to ``units_1`` (one GPU) and ``units_g`` (per GPU
        of G, plus ``extra_g`` seconds); a part with no units (``measured`` 0) is fixed."""
        seconds = max(0.0, seconds)
        s1 = units_1 / measured if measured else 1.0
        sg = units_g / measured if measured else 1.0
        parts.append(dict(stage=stage, part=name, measured_s=seconds, unit=unit, measured_units=measured,
                          units_1gpu=units_1, units_per_gpu=units_g, scale_1gpu=s1, scale_per_gpu=sg,
                          scaled_by=scaled_by, extra_per_gpu_s=extra_g, predicted_1gpu_s=seconds * s1,
                          predicted_gpus_s=seconds * sg + extra_g))

    fixed = "fixed (the same at any size)"
    # inputs
    scan = P.get("inputs.scan", 0.0)
    part("inputs", "folder scan (headers)", scan, "images listed", N, TN, TN,
         f"training images; {G} GPUs: rank 0 scans alone")
    part("inputs", "foundation, teacher, checks", T["inputs"] - scan, "-", 0, 0, 0, fixed)
    # distill
    text = P.get("distill.text_head", 0.0)
    prompts = run["prompts"]
    part("distill", "text head", text, "prompts (classes x templates)", prompts, prompts * TC / C, prompts * TC / C,
         "classes; every GPU builds it")
    loop, steps, bs = P.get("distill.loop", 0.0), run["steps"], run["batch_size"]
    per_step = run["steady_step_s"]
    stepping = min(loop, steps * per_step)  # (a first step faster than the steady ones can make it exceed the loop)
    startup = loop - stepping
    part("distill", "set-up and loop start-up", T["distill"] - text - loop + startup, "-", 0, 0, 0,
         fixed + ": projector, workers, first batches")
    part("distill", "optimiser steps", stepping, f"views ({steps:,} steps x {bs})", steps * bs,
         steps1 * b1, stepsg * bg,
         f"steps x views per step: 1 GPU {steps1:,} x {b1}, {G} GPUs {stepsg:,} x {bg} per GPU "
         f"(+{1e3 * allreduce:.2f} ms all-reduce per step)", extra_g=stepsg * allreduce)
    # images
    sel = P.get("images.select", 0.0)
    part("images", "RDED selection", sel, "candidates scored", cand_run, cand_t, cand_g,
         f"candidates ({cand_t // TC} per class); {G} GPUs: {math.ceil(TC / G)} classes each")
    part("images", "other", T["images"] - sel, "-", 0, 0, 0, fixed)
    # refine
    if "refine" in T:
        disc = P.get("refine.discrepancy", 0.0)
        ch = t1.refine_chunk
        imgs_g = sum(min(ch, t_syn - s) for s in range(0, t_syn, ch)[::G])  # rank 0's blocks
        part("refine", "KL before/after", disc, "images", n_syn, t_syn, imgs_g,
             f"images; {G} GPUs: rank 0's blocks")
        rs, rb = cfg["refine_steps"], cfg["batch_size"]
        v_run = refine_views(n_syn, cfg["refine_chunk"], rs, rb)
        v1 = refine_views(t_syn, ch, t1.refine_steps, b1)
        vg = refine_views(t_syn, ch, tg.refine_steps, bg, world=G)
        part("refine", "steps", T["refine"] - disc, f"views ({blocks_run} blocks x {rs} steps)", v_run, v1, vg,
             f"views: {blocks_t} blocks of {ch} x {t1.refine_steps} steps x batch {b1}; {G} GPUs: {blocks_g} "
             f"blocks each, batch {bg}")
    # fidelity: rank 0 alone
    rd = P.get("fidelity.round_deltas", 0.0)
    tv = t1.fidelity_views
    rv1, rvt = round_views(n_syn, views), round_views(t_syn, tv)
    part("fidelity", "delta rounding", rd, "views", rv1, rvt, rvt, "views (at most 4,096 images); rank 0 alone")
    syn = P.get("fidelity.synthetic", 0.0)
    part("fidelity", "synthetic views", syn, "views", n_syn * views, t_syn * tv, t_syn * tv,
         "images x views; rank 0 alone")
    hl, hm, held = P.get("fidelity.heldout_load", 0.0), P.get("fidelity.heldout", 0.0), run["held"]
    part("fidelity", "held-out load", hl, "images", held, held_t, held_t,
         "held-out images (split_holdout: 5%, at most 2,000); rank 0 alone")
    part("fidelity", "held-out views", hm, "views", held * views, held_t * tv, held_t * tv,
         "held-out images x views; rank 0 alone")
    part("fidelity", "probe, merge, other", T["fidelity"] - rd - syn - hl - hm, "-", 0, 0, 0, fixed)
    # write: rank 0 alone
    wi = P.get("write.images", 0.0)
    part("write", "images", wi, f"images ({run['bundle_bytes'] / 2**20:.1f} MiB bundle)", n_syn, t_syn, t_syn,
         f"images ({t1.codec}); rank 0 alone")
    part("write", "deltas, manifest, hashes", T["write"] - wi, "-", 0, 0, 0, fixed)

    for st in T:  # a stage these options do not run at ImageNet-1K (--adapt-steps): as measured
        if not any(q["stage"] == st for q in parts):
            part(st, "all (not scaled)", T[st], "-", 0, 0, 0, fixed)
    stages = {}
    for st in T:
        mine = [p for p in parts if p["stage"] == st]
        stages[st] = dict(measured_s=T[st], predicted_1gpu_s=sum(p["predicted_1gpu_s"] for p in mine),
                          predicted_gpus_s=sum(p["predicted_gpus_s"] for p in mine))
    # what each part's measured time was multiplied by, and why
    scale_factors = {f"{q['stage']}/{q['part']}": dict(one_gpu=q["scale_1gpu"], per_gpu=q["scale_per_gpu"],
                                                        scaled_by=q["scaled_by"]) for q in parts}
    assumptions = [
        f"ImageNet-1K: {TN:,} training images in {TC:,} classes ({held_t:,} held out for fidelity, as split_holdout "
        f"does), JPEGs decoded as fast as the generated {run['width']}x{run['height']} ones, from the page cache "
        "(the generated files were just written; a cold disk or a network file system may be slower).",
        f"Distillation steps from the build's formula max(ceil(--min-steps {min_steps} / processes), round(epochs "
        f"x steps per epoch)) with examples/imagenet.md's --epochs 1: 1 GPU batch {b1} -> {steps1:,} steps; "
        f"{G} GPUs batch {bg} per process (section 2's torchrun command) -> {stepsg:,} steps on every GPU. "
        f"With --min-steps 0 (--epochs alone): {epochs_alone[0]:,} and {epochs_alone[1]:,} steps.",
        f"Time per view of a step: the measured steady rate ({1e3 * per_step / bs:.3f} ms per view at batch {bs}), "
        "the same at every batch size and on every GPU (at batch 128 a GPU is likely less efficient: optimistic "
        "for the multi-GPU column). Refinement likewise per view of its steps (at batch 128 per process on "
        f"{G} GPUs, as section 2's --batch-size gives it), selection per candidate, fidelity per view.",
        f"{G} GPUs (not measured): DDP with every GPU fed as this run's was (as many CPU cores for decoding per "
        f"GPU); all-reduce of the {run['trainable']:,} trainable parameters' float32 gradients "
        f"({grad_bytes / 2**20:.1f} MiB) per step at {args.allreduce_gbps:g} GB/s bus bandwidth plus "
        f"{args.allreduce_latency_ms:g} ms latency = {1e3 * allreduce:.2f} ms, not overlapped with the backward "
        "pass (an upper bound; DDP overlaps it). Folder scan, fidelity and writing on rank 0 alone; process "
        "start, imports, torchrun rendezvous and the gathers between stages are not counted.",
        "Fixed parts (loading the foundation and the teacher, the loop's start-up, probe, manifest) are taken as "
        "measured: with ViT-B-32:openai from a warm open_clip cache the foundation loads in about the same time "
        "as the random weights from a file here.",
    ]
    return dict(parts=parts, stages=stages, scale_factors=scale_factors, assumptions=assumptions,
                target=dict(images=TN, classes=TC, held_out=held_t, gpus=G, distill_steps_1gpu=steps1,
                            distill_steps_per_gpu=stepsg, distill_steps_epochs_alone=list(epochs_alone),
                            batch_1gpu=b1, batch_per_gpu=bg, min_steps=min_steps, refine_blocks=blocks_t,
                            refine_blocks_per_gpu=blocks_g, refine_blocks_run=blocks_run, candidates=cand_t,
                            allreduce_s_per_step=allreduce))


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
def fmt_pred(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 3 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def fmt_measured(s: float) -> str:
    return f"{s:.2f} s" if s >= 0.1 else f"{s:.4f} s"


def fmt_units(x: float) -> str:
    return f"{x:,.0f}" if abs(x - round(x)) < 1e-9 or x >= 100 else f"{x:,.1f}"


def markdown(run: dict, pred: dict, *, tiny: bool) -> str:
    G = pred["target"]["gpus"]
    head = ("**Smoke test on a CPU (`--tiny`): this checks that the script runs; its figures are NOT a "
            "prediction.**" if tiny else
            "**A prediction, not a measured ImageNet-1K build**: every part measured on the run below, then "
            "scaled to ImageNet-1K by the count in the \"scaled by\" column.")
    o = run["options"]
    cuda = f" (CUDA {run['cuda']})" if run["device"].startswith("cuda") else ""
    lines = [
        head, "",
        f"Measured on: {run['device_name']}, torch {run['torch']}{cuda}, {run['cpus']} CPUs, "
        f"{run['num_workers']} data workers; `hellofmt build` (`build_bundle`) on {run['images']:,} generated "
        f"{run['width']}x{run['height']} JPEGs in {run['classes']} classes; foundation {run['foundation_name']} "
        f"and teacher timm:{run['teacher']}, both random weights; options of examples/imagenet.md section 1 "
        f"except {o}. Build total {sum(run['timings'].values()):.1f} s.", "",
        f"| stage | part | measured on this run | unit (this run) | scaled by | ImageNet-1K, 1 GPU | "
        f"ImageNet-1K, {G} GPUs |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for st, s in pred["stages"].items():
        lines.append(f"| {st} | **stage** (the build's timing) | {fmt_measured(s['measured_s'])} | | | "
                     f"**{fmt_pred(s['predicted_1gpu_s'])}** | **{fmt_pred(s['predicted_gpus_s'])}** |")
        for p in pred["parts"]:
            if p["stage"] != st:
                continue
            unit = p["unit"] if p["unit"] == "-" else f"{fmt_units(p['measured_units'])} {p['unit']}"
            lines.append(f"| | {p['part']} | {fmt_measured(p['measured_s'])} | {unit} | {p['scaled_by']} | "
                         f"{fmt_pred(p['predicted_1gpu_s'])} | {fmt_pred(p['predicted_gpus_s'])} |")
    m1 = sum(s["measured_s"] for s in pred["stages"].values())
    p1 = sum(s["predicted_1gpu_s"] for s in pred["stages"].values())
    pg = sum(s["predicted_gpus_s"] for s in pred["stages"].values())
    lines.append(f"| **total** | | **{m1:.2f} s** | | | **{fmt_pred(p1)}** | **{fmt_pred(pg)}** |")
    lines += ["", "Assumptions:", ""] + [f"- {a}" for a in pred["assumptions"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--tiny", action="store_true", help="a smoke test in seconds on a CPU (not a prediction): "
                   + ", ".join(f"{k}={v}" for k, v in TINY.items() if k != "foundation") + ", the tiny test ViT")
    g = p.add_argument_group("the generated data")
    g.add_argument("--data", type=Path, default=None, help="folder of the generated JPEGs, made once and reused "
                   "(default: a temporary folder, removed at the end)")
    g.add_argument("--classes", type=int, default=100)
    g.add_argument("--per-class", type=int, default=1300)
    g.add_argument("--width", type=int, default=500)
    g.add_argument("--height", type=int, default=375)
    g.add_argument("--gen-workers", type=int, default=None, help="processes generating JPEGs (default: the CPUs)")
    r = p.add_argument_group("the measured build (examples/imagenet.md section 1, scaled down)")
    r.add_argument("--foundation", default="ViT-B-32", help="open_clip architecture or model config .json "
                   "(random weights)")
    r.add_argument("--teacher", default="resnet18", help="timm architecture (random weights)")
    how = r.add_mutually_exclusive_group()
    how.add_argument("--steps", type=int, default=None, help="distillation steps of the run (default 400)")
    how.add_argument("--epochs", type=float, default=None,
                     help="distillation epochs of the run instead (with --min-steps 0)")
    r.add_argument("--ipc", type=int, default=None, help=f"images per class (default {IMAGENET_MD['ipc']})")
    r.add_argument("--batch-size", type=int, default=None, help=f"default {IMAGENET_MD['batch_size']}")
    r.add_argument("--refine-steps", type=int, default=None, help=f"default {IMAGENET_MD['refine_steps']}")
    r.add_argument("--num-workers", type=int, default=None, help="data workers (default: the build's, the CPUs - 1)")
    r.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    r.add_argument("--keep", type=Path, default=None, help="keep the bundle here (default: removed)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    s = p.add_argument_group("the prediction")
    s.add_argument("--target-images", type=int, default=IN1K_IMAGES)
    s.add_argument("--target-classes", type=int, default=IN1K_CLASSES)
    s.add_argument("--target-min-steps", type=int, default=None, help="--min-steps at ImageNet-1K (default: the "
                   "build's default, which examples/imagenet.md keeps)")
    s.add_argument("--gpus", type=int, default=8, help="GPUs of the multi-GPU column")
    s.add_argument("--allreduce-gbps", type=float, default=25.0, help="all-reduce bus bandwidth assumed, GB/s "
                   "(25: PCIe-class, conservative; NVLink gives 10x more)")
    s.add_argument("--allreduce-latency-ms", type=float, default=0.1, help="all-reduce latency assumed per step")
    s.add_argument("--json", type=Path, default=None, help="write every figure and scale factor here")
    s.add_argument("--markdown", type=Path, default=None, help="write the Markdown table here")
    args = p.parse_args(argv)
    device = check_device(args.device, PROG)
    for name, low in (("gpus", 1), ("steps", 1), ("ipc", 1), ("batch_size", 1), ("refine_steps", 0),
                      ("num_workers", 0), ("classes", 2), ("per_class", 2), ("width", 8), ("height", 8)):
        v = getattr(args, name)
        if v is not None and v < low:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= {low}, got {v}")
    if args.epochs is not None and not args.epochs > 0:
        p.error(f"--epochs: expected a number > 0, got {args.epochs}")
    if args.keep is not None and args.keep.exists():
        p.error(f"--keep {args.keep}: already exists; give a new path")

    import torch

    if args.tiny:
        for k in ("classes", "per_class", "width", "height"):
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, TINY[k])
        if args.foundation == p.get_default("foundation"):
            args.foundation = TINY["foundation"]
        if args.teacher == p.get_default("teacher"):
            args.teacher = TINY["teacher"]
    if args.threads:
        torch.set_num_threads(args.threads)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    progress = not args.no_progress
    import open_clip
    import timm

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    cuda = f" (CUDA {torch.version.cuda})" if device.type == "cuda" else ""
    print(f"device {device}: {dev_name}; torch {torch.__version__}{cuda}, open_clip {open_clip.__version__}, "
          f"timm {timm.__version__}, {cpus} CPUs", flush=True)

    tmpdir = tempfile.TemporaryDirectory(prefix="hellofmt-in1k-predict-")
    tmp = Path(tmpdir.name)
    try:
        data = args.data or tmp / "jpegs"
        data, gen_s = make_imagenet_folder(data, args.classes, args.per_class, args.width, args.height,
                                           workers=args.gen_workers or cpus, progress=progress)
        print(f"data: {args.classes * args.per_class:,} JPEGs {args.width}x{args.height} in {args.classes} classes "
              f"at {data} ({'reused' if gen_s == 0 else f'generated in {gen_s:.1f} s'})", flush=True)
        t0 = time.perf_counter()
        spec = make_foundation_files(args.foundation, tmp / "foundation")
        tw = make_teacher_weights(args.teacher, args.classes, tmp)
        print(f"models: foundation {Path(spec.split(':')[0]).stem} and teacher timm:{args.teacher}, random weights "
              f"written in {time.perf_counter() - t0:.1f} s", flush=True)

        from hellofmt import build_bundle
        from hellofmt.builder.config import BuildConfig
        from hellofmt.errors import HellofmtError

        opts = dict(IMAGENET_MD)
        changed = {}
        if args.tiny:
            changed.update({k: TINY[k] for k in ("image_size", "ipc", "steps", "batch_size", "refine_steps",
                                                  "refine_chunk", "num_workers")})
        else:
            changed["steps"] = 400
        if args.epochs is not None:
            changed.pop("steps", None)
            changed.update(epochs=args.epochs, min_steps=0)
        for k in ("steps", "ipc", "batch_size", "refine_steps", "num_workers"):
            if getattr(args, k) is not None:
                changed[k] = getattr(args, k)
        opts.update(changed)
        opts.update(device=str(device), embed_foundation=False)
        shown = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items())
        out = args.keep or tmp / "bundle"
        probe = Probe(device)
        probe.install()
        try:
            res = build_bundle(str(data), f"timm:{args.teacher}", spec, out, BuildConfig(**opts),
                               teacher_weights=str(tw), progress=progress)
        except HellofmtError as e:  # an option out of range, --keep that exists, ...: one line, as hellofmt build
            fail(PROG, str(e).replace("\n", " "))
        finally:
            probe.restore()
        timings = dict(res["timings"])
        manifest = json.loads((Path(res.path) / "hellofmt.json").read_text())
        cfg = dict(manifest["provenance"]["build_args"])
        cfg["min_steps_default"] = BuildConfig().min_steps
        labels, train = probe.loop["labels"], probe.loop["train"]
        per_class = torch.bincount(labels[train], minlength=args.classes).tolist()
        per_step, warm = steady_step(probe.step_times, probe.loop["end"])
        run = dict(
            device=str(device), device_name=dev_name, torch=torch.__version__, cuda=torch.version.cuda,
            open_clip=open_clip.__version__, timm=timm.__version__, cpus=cpus, num_workers=cfg["num_workers"],
            images=int(labels.numel()), classes=args.classes, width=args.width, height=args.height,
            held=len(probe.loop["held"]), train_per_class=per_class, foundation_name=Path(spec.split(":")[0]).stem,
            teacher=args.teacher, options=shown or "nothing", config=cfg, timings=timings, parts=probe.times,
            counts=probe.counts, steps=len(probe.step_times), metric_steps=int(res["metrics"]["distill.steps"]),
            batch_size=probe.loop["batch_size"], steady_step_s=per_step, warmup_steps_left_out=warm,
            trainable=probe.loop["trainable"], prompts=int(probe.counts.get("distill.text_head", 0)),
            refine_steps=cfg["refine_steps"], generate_s=gen_s, tiny=args.tiny,
            bundle_bytes=sum(f.stat().st_size for f in Path(res.path).rglob("*") if f.is_file()),
            warnings=len(res["warnings"]))
        if held_out(run["images"], args.classes, cfg["holdout"]) != run["held"]:
            print(f"note: {run['held']} images held out, the formula gives "
                  f"{held_out(run['images'], args.classes, cfg['holdout'])}", flush=True)
        if run["steps"] != run["metric_steps"]:
            print(f"note: {run['steps']} steps timed, the build reports {run['metric_steps']}", flush=True)
        pred = predict(run, args)
        print(f"build timings (s): {json.dumps({k: round(v, 3) for k, v in timings.items()})}", flush=True)
        print(f"distillation: {run['steps']} steps of {run['batch_size']}, steady {1e3 * per_step:.1f} ms/step "
              f"({run['batch_size'] / per_step:.1f} views/s; first {warm} steps left out)", flush=True)
        md = markdown(run, pred, tiny=args.tiny)
        print()
        print(md, flush=True)
        if args.markdown:
            args.markdown.write_text(md)
        if args.json:
            args.json.write_text(json.dumps({"run": run, **pred}, indent=1, default=str))
        G = pred["target"]["gpus"]
        st = pred["stages"]
        print(f"RESULT total_1gpu_h={sum(s['predicted_1gpu_s'] for s in st.values()) / 3600:.3f} "
              f"total_{G}gpu_h={sum(s['predicted_gpus_s'] for s in st.values()) / 3600:.3f} "
              f"distill_1gpu_h={st['distill']['predicted_1gpu_s'] / 3600:.3f} "
              f"distill_{G}gpu_h={st['distill']['predicted_gpus_s'] / 3600:.3f}", flush=True)
    finally:
        tmpdir.cleanup()


if __name__ == "__main__":
    main()
