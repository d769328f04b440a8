"""Build throughput, side by side in one run: is the distillation fed, and does memory stay bounded?

On a generated image-folder tree of JPEGs at a realistic size (default 3,000 of 500x375, random
textures, 10 classes), a teacher (timm ``resnet18`` with random weights, or a small torch CNN when timm
is absent) and a foundation (the tiny test ViT, or ``--foundation``), it measures images/s of

  (1) data     the distillation's DataLoader alone (decode + resize + crop in ``--num-workers`` worker
               processes, batched and collated as ``distill_projector`` builds it), batches discarded;
  (2) compute  the distillation's step alone on in-memory uint8 batches: views (``make_views``), teacher
               forward, projector forward/backward (deltas attached as the build attaches them),
               ``distill_loss``, gradient clipping, AdamW step;
  (3) loop     ``distill_projector`` itself on the folder, timed differentially (a run of ``--steps``
               steps minus a run of ``--loop-warmup`` steps), so that starting the workers and the first
               batch, paid once per build, do not count;

and, separately,

  (4) refine   ``refine_images``' peak memory as the set grows (``--refine-sizes``), chunked
               (``--refine-chunk``) and as one block (the whole set at once, for comparison). On CUDA: the
               peak of ``torch.cuda.max_memory_allocated`` above what was allocated before the call. On the
               CPU: the peak resident set size (RSS) above the RSS just before the call, sampled every
               millisecond by a thread, in a fresh process per measurement. RSS includes what the allocator
               and autograd hold, not only tensors, and a spike shorter than the sampling interval can be
               missed: read it as a slope over set sizes, not as exact bytes;
  (5) open     ``DistilledDataset`` open time (manifest, hashes, decode of the images) against the world
               size (``--open-worlds``, processes joined by a gloo group on the CPU, opening at the same time
               after a barrier; the slowest rank's time, median of ``--open-reps`` opens).

The last line is machine-readable:

    RESULT loop_vs_min=<loop / min(data, compute)> data_img_s_per_core=<data / max(1, num_workers)>

``loop_vs_min`` near 1 means the loop runs as fast as its slower half: decoding overlaps compute. Were
they to run one after the other, the loop would give ``1 / (1/data + 1/compute)`` and ``loop_vs_min``
would be ``max / (data + compute)``, between 0.5 and 1 (printed beside the loop). Wall clock throughout
(worker processes do the decoding); on a shared machine, rerun to see the spread. On a CPU device the
main process gets ``--threads`` torch threads (default: the CPUs left after the workers), the same in
every part, so that compute alone is measured on the cores the loop gives it.

Usage::

    python benchmarks/build_throughput.py                                   # all parts, CPU, ~3,000 JPEGs
    python benchmarks/build_throughput.py --images 600 --steps 20           # quicker
    python benchmarks/build_throughput.py --part refine --refine-sizes 16,64,256
    python benchmarks/build_throughput.py --part data,compute,loop          # the RESULT line only
    python benchmarks/build_throughput.py --device cuda --num-workers 8 --batch-size 256 --size 224
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from devices import check_device, sync  # noqa: E402  (benchmarks/devices.py)

TINY_CONFIG = str(ROOT / "tests" / "data" / "hf-test-tiny-vit.json")
PARTS = ("data", "compute", "loop", "refine", "open")


# --------------------------------------------------------------------------------------------------
# set-up: images, teacher, projector
# --------------------------------------------------------------------------------------------------
def draw_image(rng, c: int, classes: int, width: int, height: int, grid=None):
    """One generated ``height x width x 3`` uint8 image of class ``c`` (of ``classes``), drawn from the numpy
    Generator ``rng``: a smooth random colour field, a stripe pattern whose angle depends on the class, and
    fine grain, so that it compresses and decodes like a photograph rather than like white noise (which
    would be about 4x larger and slower to decode). ``grid``: ``np.mgrid[0:height, 0:width]`` as float32,
    when the caller draws many (computed here otherwise)."""
    import numpy as np
    from PIL import Image

    yy, xx = grid if grid is not None else np.mgrid[0:height, 0:width].astype(np.float32)
    low = rng.uniform(0, 255, (height // 32 + 2, width // 32 + 2, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.float32)
    angle = math.pi * c / classes
    freq = rng.uniform(0.02, 0.08)
    stripes = 40 * np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 6.3))
    grain = rng.normal(0, 8, (height, width, 1)).astype(np.float32)
    return np.clip(base + stripes[..., None] + grain, 0, 255).astype(np.uint8)


def make_folder(root: Path, n: int, classes: int, width: int, height: int, seed: int = 0) -> Path:
    """``n`` JPEGs (quality 90) in ``classes`` class folders (image ``i`` in class ``i % classes``), each a
    :func:`draw_image` from one random stream. Reused when present."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and done.read_text().strip() == f"{n} {classes} {width} {height} {seed}":
        return root
    rng = np.random.default_rng(seed)
    grid = np.mgrid[0:height, 0:width].astype(np.float32)
    for c in range(classes):
        (root / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % classes
        img = draw_image(rng, c, classes, width, height, grid)
        Image.fromarray(img).save(root / f"class_{c:03d}" / f"{i:06d}.jpg", quality=90)
    done.write_text(f"{n} {classes} {width} {height} {seed}")
    return root


def make_teacher(arch: str, classes: int, device: torch.device) -> tuple[torch.nn.Module, str]:
    """A random-weight teacher taking images in [0, 1]: timm ``arch`` if timm is installed, else a small CNN."""
    from hellofmt.builder.teachers import Normalize

    torch.manual_seed(0)
    try:
        import timm  # optional (the test extra has it)

        model, name = timm.create_model(arch, pretrained=False, num_classes=classes), f"timm:{arch}"
    except ImportError:
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, 2, 1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 128, 3, 2, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(128, classes))
        name = "small CNN (timm not installed)"
    teacher = Normalize(model, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).to(device).eval()
    teacher.requires_grad_(False)
    return teacher, name


def make_projector(foundation: str, names: list[str], device: torch.device):
    """The projector with deltas attached as ``build_bundle`` attaches them (BuildConfig's defaults)."""
    from hellofmt.builder.config import BuildConfig
    from hellofmt.foundation import load_foundation
    from hellofmt.projector import DEFAULT_TEMPLATES, Projector

    c = BuildConfig()
    torch.manual_seed(0)
    fnd = load_foundation(foundation, device=device)
    projector = Projector(fnd, names, list(DEFAULT_TEMPLATES)).to(device)
    projector.attach_deltas(rank=c.rank, alpha=c.alpha, targets=list(c.targets) if c.targets else None,
                            head_rank=c.head_rank, head_alpha=c.head_alpha, generator=torch.Generator().manual_seed(0))
    return projector


def _distill_config(args, steps: int):
    from hellofmt.builder.distill import DistillConfig

    return DistillConfig(steps=steps, batch_size=args.batch_size, lr=5e-3, view_size=args.size, mix="cutmix",
                         scale=(0.08, 1.0), checkpoint_every=0, num_workers=args.num_workers, seed=0)


# --------------------------------------------------------------------------------------------------
# (1) data, (2) compute, (3) loop
# --------------------------------------------------------------------------------------------------
def bench_data(dataset, args, device: torch.device) -> float:
    """Images/s of the distillation's DataLoader alone, after its first batch (worker start-up)."""
    from torch.utils.data import DataLoader

    from hellofmt.builder.distill import StepBatchSampler
    from hellofmt.builder.inputs import collate_samples

    # As distill_projector builds it: one loader for the run, persistent prefetching workers.
    w = args.num_workers
    sampler = StepBatchSampler(len(dataset), args.batch_size, seed=0, start=0, stop=args.data_batches + 1)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=w, collate_fn=collate_samples,
                        pin_memory=device.type == "cuda", persistent_workers=w > 0,
                        prefetch_factor=max(2, -(-8 // w)) if w > 0 else None)
    it = iter(loader)
    next(it)  # workers started, first batch decoded
    t, n = time.perf_counter(), 0
    for images, _labels, _failed in it:
        images = images.to(device, non_blocking=True)
        n += images.shape[0]
    sync(device)
    rate = n / (time.perf_counter() - t)
    del it, loader
    return rate


def bench_compute(projector, teacher, batch: torch.Tensor, labels: torch.Tensor, args, device: torch.device) -> float:
    """Images/s of the distillation step on an in-memory uint8 batch (the loop's body without the loader)."""
    from hellofmt.builder.distill import distill_loss, make_views, step_generator

    cfg = _distill_config(args, args.steps)
    params = [p for p in projector.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = device.type == "cuda"
    projector.train()
    images, labels = batch.to(device), labels.to(device)

    def step(k: int) -> None:
        g = step_generator(0, 0, k, device)
        views, y, y2, lam = make_views(images, labels, size=cfg.view_size, generator=g, scale=cfg.scale,
                                       ratio=cfg.ratio, mix=cfg.mix)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            t = teacher(views).float()
        p = projector(views).float()
        loss = distill_loss(p, t, y, y2, lam, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()

    for k in range(2):  # warm-up
        step(k)
    sync(device)
    t0 = time.perf_counter()
    for k in range(args.compute_steps):
        step(k)
    sync(device)
    projector.eval()
    return args.compute_steps * images.shape[0] / (time.perf_counter() - t0)


def bench_loop(projector, teacher, dataset, args, device: torch.device, tmp: Path) -> tuple[float, float]:
    """Images/s of ``distill_projector`` on the folder: (steady, whole), where steady is timed
    differentially (``--steps`` minus ``--loop-warmup`` steps) and whole includes the start-up."""
    from hellofmt.builder.checkpoint import CheckpointStore
    from hellofmt.builder.dist import World
    from hellofmt.builder.distill import distill_projector

    world = World(0, 1, 0, device, False)
    times = {}
    for steps in (args.loop_warmup, args.steps):
        store = CheckpointStore(tmp / f"ckpt-{steps}", enabled=False)
        sync(device)
        t0 = time.perf_counter()
        distill_projector(projector, teacher, dataset, _distill_config(args, steps), world=world, store=store,
                          progress=False)
        sync(device)
        times[steps] = time.perf_counter() - t0
    bs = args.batch_size
    steady = (args.steps - args.loop_warmup) * bs / (times[args.steps] - times[args.loop_warmup])
    return steady, args.steps * bs / times[args.steps]


# --------------------------------------------------------------------------------------------------
# (4) refinement memory
# --------------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _peak_rss(out: dict):
    """Samples the RSS every millisecond while the block runs; ``out["peak"]``: the peak above the start."""
    base, peak, stop = _rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()
        out["peak"] = max(0, max(peak[0], _rss()) - base)


def refine_peak(args, n: int, chunk: int) -> int:
    """Peak bytes that ``refine_images`` adds while refining ``n`` images in chunks of ``chunk``."""
    from hellofmt.builder.refine import refine_images

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, _ = make_teacher(args.teacher, args.classes, device)
    projector = make_projector(args.foundation, [f"class {i}" for i in range(args.classes)], device)
    projector.eval()
    g = torch.Generator().manual_seed(n)
    s = args.refine_image_size or args.size
    images = torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % args.classes
    kw = dict(steps=args.refine_steps, view_size=args.size, batch_size=args.refine_batch, chunk=chunk,
              progress=False)
    if device.type == "cuda":
        images = images.to(device)
        labels = labels.to(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        refine_images(projector, teacher, images, labels, **kw)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    out: dict = {}
    with _peak_rss(out):
        refine_images(projector, teacher, images, labels, **kw)
    return out["peak"]


def _refine_child(args, n: int, chunk: int, q) -> None:
    try:
        q.put(refine_peak(args, n, chunk))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        q.put(f"{type(e).__name__}: {e}")


def bench_refine(args) -> list[tuple[int, int | None, int | None]]:
    """(n, peak bytes chunked, peak bytes as one block) for each size of ``--refine-sizes``."""
    rows = []
    ctx = mp.get_context("spawn")
    for n in args.refine_sizes:
        res = []
        for chunk in (args.refine_chunk, n):
            if args.refine_chunk >= n and res:  # the chunk already held the whole set
                res.append(res[0])
            elif torch.device(args.device).type == "cuda":
                res.append(refine_peak(args, n, chunk))
            else:
                q = ctx.Queue()
                p = ctx.Process(target=_refine_child, args=(args, n, chunk, q))
                p.start()
                got = q.get()
                p.join()
                if isinstance(got, str):
                    raise RuntimeError(f"refinement of {n} images (chunk {chunk}) failed: {got}")
                res.append(got)
        rows.append((n, res[0], res[1]))
    return rows


# --------------------------------------------------------------------------------------------------
# (5) DistilledDataset open time against the world size
# --------------------------------------------------------------------------------------------------
def _open_child(rank: int, world: int, init: str, bundle: str, threads: int, reps: int, q) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        import open_clip  # noqa: F401 - imported before the clock starts: opening is timed, not importing

        import hellofmt.foundation  # noqa: F401
        import hellofmt.projector  # noqa: F401
        from hellofmt.dataset import DistilledDataset

        open_clip.add_model_config(ROOT / "tests" / "data")
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            ds = DistilledDataset(bundle, device="cpu")
            dist.barrier()
            times.append(time.perf_counter() - t0)
        q.put((rank, times, len(ds)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        q.put((rank, f"{type(e).__name__}: {e}", 0))
    finally:
        dist.destroy_process_group()


def bench_open(args, tmp: Path) -> list[tuple[int, float, int]]:
    """(world size, seconds to open on the slowest rank (median of ``--open-reps`` opens), images) for each
    of ``--open-worlds``."""
    import open_clip

    from bundles import make_tiny_bundle

    open_clip.add_model_config(ROOT / "tests" / "data")  # the tiny test ViT the bundle embeds
    bundle = make_tiny_bundle(tmp / "open-bundle", num_classes=args.classes, ipc=args.open_ipc,
                              size=args.open_size, codec="png")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ctx = mp.get_context("spawn")
    rows = []
    for w in args.open_worlds:
        q = ctx.Queue()
        init = f"file://{tmp / f'pg-{w}-{time.monotonic_ns()}'}"
        procs = [ctx.Process(target=_open_child, args=(r, w, init, str(bundle), max(1, cores // w), args.open_reps, q))
                 for r in range(w)]
        for p in procs:
            p.start()
        got = [q.get() for _ in procs]
        for p in procs:
            p.join()
        bad = [g for g in got if isinstance(g[1], str)]
        if bad:
            raise RuntimeError(f"opening with world size {w} failed on rank {bad[0][0]}: {bad[0][1]}")
        slowest = [max(g[1][i] for g in got) for i in range(args.open_reps)]
        rows.append((w, statistics.median(slowest), got[0][2]))
    return rows


# --------------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="all", help=f"all, or one or more (comma-separated) of {', '.join(PARTS)}")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--data", type=Path, default=None, help="folder of the generated JPEGs (default: a temp folder)")
    p.add_argument("--images", type=int, default=3000, help="JPEGs to generate")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--size", type=int, default=64, help="view side: the teacher's and the distillation's input")
    p.add_argument("--teacher", default="resnet18", help="timm architecture of the random-weight teacher")
    p.add_argument("--foundation", default=TINY_CONFIG, help="foundation spec (default: the tiny test ViT)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the main process (default on CPU: the CPUs left after the workers)")
    p.add_argument("--data-batches", type=int, default=30, help="batches timed in (1)")
    p.add_argument("--compute-steps", type=int, default=10, help="steps timed in (2)")
    p.add_argument("--steps", type=int, default=30, help="distillation steps of the timed run in (3)")
    p.add_argument("--loop-warmup", type=int, default=5, help="steps of the run subtracted in (3)")
    p.add_argument("--refine-sizes", type=_ints, default=[16, 64, 256])
    p.add_argument("--refine-chunk", type=int, default=16)
    p.add_argument("--refine-steps", type=int, default=2)
    p.add_argument("--refine-batch", type=int, default=16)
    p.add_argument("--refine-image-size", type=int, default=None, help="side of the refined images (default --size)")
    p.add_argument("--open-worlds", type=_ints, default=[1, 2])
    p.add_argument("--open-ipc", type=int, default=100, help="images per class of the bundle opened in (5)")
    p.add_argument("--open-size", type=int, default=128, help="side of the bundle's images in (5)")
    p.add_argument("--open-reps", type=int, default=3, help="opens per world size in (5) (median taken)")
    args = p.parse_args(argv)
    parts = PARTS if args.part == "all" else tuple(x.strip() for x in args.part.split(",") if x.strip())
    if not parts or set(parts) - set(PARTS):
        p.error(f"--part: expected all or a comma-separated list of {', '.join(PARTS)}, got {args.part!r}")
    device = check_device(args.device, "build_throughput.py")
    args.device = str(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif args.threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args.threads = max(1, cores - args.num_workers)
    if args.threads:
        torch.set_num_threads(args.threads)

    tmpdir = tempfile.TemporaryDirectory(prefix="hellofmt-build-bench-")
    tmp = Path(tmpdir.name)
    rates: dict[str, float] = {}
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"workers {args.num_workers}, batch {args.batch_size}, view {args.size}px", flush=True)

    if {"data", "compute", "loop"} & set(parts):
        from hellofmt.builder.inputs import dataset_for, load_all, scan_image_folder

        t0 = time.perf_counter()
        root = make_folder(args.data or tmp / "images", args.images, args.classes, args.width, args.height)
        gen_s = time.perf_counter() - t0
        folder = scan_image_folder(root)
        lsize = max(args.size, round(args.size * 8 / 7))  # the build's load size
        dataset = dataset_for(folder, list(range(len(folder.samples))), lsize)
        teacher, tname = make_teacher(args.teacher, folder.num_classes, device)
        projector = make_projector(args.foundation, folder.names, device)
        print(f"setup: {len(folder.samples)} JPEGs {args.width}x{args.height} in {folder.num_classes} classes "
              f"({gen_s:.1f}s to generate or find) at {root}, loaded at {lsize}px; teacher {tname}; "
              f"foundation {Path(args.foundation).name}", flush=True)
        if "data" in parts:
            rates["data"] = bench_data(dataset, args, device)
            print(f"(1) data     {rates['data']:9.1f} img/s  ({args.num_workers} worker(s))", flush=True)
        if "compute" in parts:
            batch, labels = load_all(folder, list(range(min(args.batch_size, len(folder.samples)))), lsize)
            rates["compute"] = bench_compute(projector, teacher, batch, labels, args, device)
            print(f"(2) compute  {rates['compute']:9.1f} img/s", flush=True)
        if "loop" in parts:
            rates["loop"], whole = bench_loop(projector, teacher, dataset, args, device, tmp)
            print(f"(3) loop     {rates['loop']:9.1f} img/s  (steps {args.loop_warmup}..{args.steps}; "
                  f"{whole:.1f} img/s counting start-up)", flush=True)
            if "data" in rates and "compute" in rates:
                d, c = rates["data"], rates["compute"]
                print(f"    min(data, compute) {min(d, c):.1f} img/s; one after the other would give "
                      f"{1 / (1 / d + 1 / c):.1f} img/s", flush=True)

    if "refine" in parts:
        what = "torch.cuda.max_memory_allocated above the start" if device.type == "cuda" else \
            "peak RSS above the start, fresh process per row"
        s = args.refine_image_size or args.size
        print(f"(4) refine peak memory ({what}); {s}px images, {args.refine_steps} steps per chunk, "
              f"batch {args.refine_batch}", flush=True)
        print(f"    {'images':>7s} {'chunk ' + str(args.refine_chunk):>18s} {'per image':>11s} "
              f"{'one block':>12s} {'per image':>11s}")
        for n, chunked, whole in bench_refine(args):
            print(f"    {n:7d} {chunked / 2**20:15.1f} MB {chunked / n / 2**10:8.1f} KB "
                  f"{whole / 2**20:9.1f} MB {whole / n / 2**10:8.1f} KB", flush=True)

    if "open" in parts:
        rows = bench_open(args, tmp)
        print(f"(5) DistilledDataset open ({rows[0][2]} PNG images of {args.open_size}px, gloo on the CPU, "
              f"slowest rank, median of {args.open_reps})", flush=True)
        for w, secs, _ in rows:
            print(f"    world {w}: {secs:7.2f} s  ({rows[0][1] / secs:.2f}x world 1)", flush=True)

    tmpdir.cleanup()
    loop_vs_min = rates["loop"] / min(rates["data"], rates["compute"]) if {"loop", "data", "compute"} <= set(
        rates) else float("nan")
    per_core = rates["data"] / max(1, args.num_workers) if "data" in rates else float("nan")
    print(f"RESULT loop_vs_min={loop_vs_min:.3f} data_img_s_per_core={per_core:.1f}")


if __name__ == "__main__":
    main()
