"""One student, three label sources, side by side in one run: what on-the-fly labels cost a student.

The same student (timm ``resnet18`` by default, random init, AdamW, the KL loss of ``hellofmt eval``)
trains on the same views of a bundle of generated images (``tests/bundles.py``: a random-weight open_clip
foundation, random low-rank deltas, 1,000 classes x 10 images by default), with its soft labels from

  (a) stored   soft labels precomputed for exactly these views and kept in device memory, the FKD/SRe2L
               way; the views are precomputed too, so only the student's step is timed: the cost floor;
  (b) loader   ``DistilledDataset.loader`` as a user runs it: index, crop + flip, CutMix and the projector
               labelling every view, then the student's step. ``--overlap`` (CUDA) labels batch k+1 on a
               side stream while the student trains on batch k;
  (c) teacher  the teacher online, the RDED way: a ``--teacher`` (timm ``resnet18``, random init) forward
               per view under ``no_grad``, then the student's step, on the same precomputed views as (a).

and, as parts of (b) without the student, (v) the loader's views alone (its projector replaced by a stub
returning zeros) and (p) the projector's forward alone on the same views. The arms are warmed up, then
interleaved for ``--reps`` repetitions of ``--steps`` steps each (the median is reported); every repetition
of (b) restarts epoch 0 of the loader, so (a), (b) and (c) train on the same views (checked at the end).

The compute-bound ceiling of (b)/(a) comes from FLOP counts (``torch.utils.flop_counter.FlopCounterMode``
on one batch, 2 FLOPs per multiply-add; MultiheadAttention's fused fast path is switched off while counting,
as the counter does not see inside it): student forward + backward ``S``, projector forward ``P``, teacher
forward ``T``; (b)/(a) <= S / (S + P) and (c)/(a) <= S / (S + T) when every FLOP costs the same. With a
label autocast (``--label-amp``), the KL divergence of the labels from float32 is measured on one batch.
The last line is machine-readable:

    RESULT projector_vs_stored=<b/a> projector_vs_teacher=<b/c>

Usage::

    python benchmarks/student_epoch.py --tiny --device cpu                 # smoke test, seconds (CI runs it)
    python benchmarks/student_epoch.py --device cuda --foundation ViT-B-32 --overlap
    python benchmarks/student_epoch.py --device cuda --foundation RN50 --overlap
    python benchmarks/student_epoch.py --device cuda --foundation ViT-B-32 --label-amp fp16 --compile

Bad input ends with a one-line error and exit status 2 (a ``--device`` this machine does not have), or 1
(out of memory at the batch asked: the error names ``--batch``), without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import devices  # noqa: E402  (benchmarks/devices.py)

PROG = "student_epoch.py"
TINY_ARCH = "hf-test-tiny-vit"  # tests/data/hf-test-tiny-vit.json, registered with open_clip below
KL_TARGET = 1e-3
AMPS = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}

# Values of the options left unset: the issue's setting, and --tiny (a CPU smoke test in seconds).
PRESETS = {
    "full": dict(foundation="ViT-B-32", classes=1000, ipc=10, batch=256, image_size=224, stored_size=64,
                 steps=20, warmup=5, reps=3),
    "tiny": dict(foundation=TINY_ARCH, classes=10, ipc=10, batch=16, image_size=32, stored_size=32,
                 steps=3, warmup=1, reps=1),
}
ARM_NAMES = {
    "a": "(a) stored soft labels (FKD/SRe2L)",
    "b": "(b) projector, DistilledDataset.loader",
    "b_serial": "    (b) without --overlap",
    "c": "(c) teacher online (RDED)",
    "v": "(v) views alone (crop, flip, mix)",
    "p": "(p) projector forward alone",
}


def fail(message: str, code: int = 2):
    """One line on stderr, ``code`` as the exit status, no traceback."""
    devices.fail(PROG, message, code)


def check_device(text: str) -> torch.device:
    """``--device`` as a device this machine has, or a one-line error naming it."""
    return devices.check_device(text, PROG)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _count(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when visible, else cpu)")
    p.add_argument("--tiny", action="store_true",
                   help="the smoke-test preset: tiny test ViT (32 px), 10 classes x 10 images, resnet18 at 32 px, "
                        "batch 16, 3 steps; seconds on a CPU")
    p.add_argument("--foundation", default=None,
                   help="open_clip architecture, random weights (default ViT-B-32; RN50; --tiny: hf-test-tiny-vit)")
    p.add_argument("--student", default="resnet18", help="timm architecture of the student (random init)")
    p.add_argument("--teacher", default="resnet18", help="timm architecture of arm (c)'s teacher (random init)")
    p.add_argument("--classes", type=_positive, default=None, help="classes of the bundle (default 1000)")
    p.add_argument("--ipc", type=_positive, default=None, help="images per class (default 10)")
    p.add_argument("--batch", type=_positive, default=None, help="student batch (default 256)")
    p.add_argument("--image-size", type=_positive, default=None, help="student view side (default 224)")
    p.add_argument("--stored-size", type=_positive, default=None, help="side of the stored images (default 64)")
    p.add_argument("--steps", type=_positive, default=None, help="timed steps per arm and repetition (default 20)")
    p.add_argument("--warmup", type=_count, default=None, help="untimed steps per arm first (default 5)")
    p.add_argument("--reps", type=_positive, default=None, help="interleaved repetitions, median taken (default 3)")
    p.add_argument("--amp", choices=tuple(AMPS), default=None,
                   help="autocast of the student and the teacher (default bf16 on CUDA, none on a CPU)")
    p.add_argument("--label-amp", choices=tuple(AMPS), default=None,
                   help="autocast of the projector's encoder (default: as --amp; bf16 on CUDA is the projector's own)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last student and teacher (default: on with CUDA)")
    p.add_argument("--label-channels-last", action="store_true", help="channels-last projector encoder too")
    p.add_argument("--compile", action="store_true", help="torch.compile the student, the teacher and the projector")
    p.add_argument("--overlap", action="store_true",
                   help="(b): label batch k+1 on a side CUDA stream while the student trains on batch k, also timed "
                        "without it; a no-op on a CPU")
    p.add_argument("--mix", default="cutmix", help="the loader's mix (none, cutmix, mixup, cutmix-mixup)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    devices.add_clock_option(p)
    p.add_argument("--bundle", type=Path, default=None,
                   help="build the bundle here, or reuse the one already here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    for key, value in PRESETS["tiny" if args.tiny else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# --------------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------------
def open_bundle(args, device: torch.device, tmp: Path):
    """The bundle (built by ``tests/bundles.py``, or reused from ``--bundle``) opened on ``device``."""
    from hellofmt.dataset import DistilledDataset

    from bundles import make_tiny_bundle

    path = args.bundle or tmp / "bundle"
    t0 = time.perf_counter()
    built = not (path / "hellofmt.json").is_file()
    if built:
        # Raw codec: nothing to encode or decode, so setting up 10,000 images takes seconds.
        make_tiny_bundle(path, arch=args.foundation, num_classes=args.classes, ipc=args.ipc,
                         size=args.stored_size, codec="raw", seed=args.seed)
    t_build = time.perf_counter() - t0
    ds = DistilledDataset(path, device=device, verify=False, compile=args.compile, label_batch_size=args.batch)
    arch = (ds.manifest.provenance.build_args or {}).get("arch")
    want = (args.foundation, args.classes, args.classes * args.ipc, (args.stored_size, args.stored_size))
    have = (arch, ds.num_classes, len(ds), ds.image_size)
    if have != want:
        fail(f"--bundle {path}: holds {have[2]} images of {have[3][0]} px in {have[1]} classes on {have[0]}, not "
             f"{want[2]} of {want[3][0]} px in {want[1]} on {want[0]}; give another --bundle folder or remove it")
    what = "built" if built else "reused"
    print(f"bundle {what} in {t_build:.1f}s, opened in {time.perf_counter() - t0 - t_build:.1f}s: {path}", flush=True)
    return ds


class _NoLabels(torch.nn.Module):
    """A stand-in projector for (v): the loader's views at the same sizes, zeros for labels."""

    def __init__(self, projector) -> None:
        super().__init__()
        self.foundation = projector.foundation
        self.num_classes = projector.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.new_zeros(images.shape[0], self.num_classes)


def set_label_amp(projector, device: torch.device, amp: str) -> str:
    """Run the projector's encoder under ``amp`` (the head stays float32, as in ``Projector._logits``)."""
    if amp == "bf16" and device.type == "cuda":
        projector.autocast = True  # the projector's own path on CUDA: what a user gets
        return "bf16 (the projector's own autocast)"
    projector.autocast = False
    if amp == "none":
        return "none (float32)"
    inner, dtype = projector._encode, AMPS[amp]

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return inner(x)

    projector._encode = encode
    return f"{amp} (autocast around the encoder)"


@contextlib.contextmanager
def float32_encoder(projector):
    """The projector's plain float32 encoder (uncompiled, no autocast) while the block runs."""
    saved, auto = projector._encode, projector.autocast
    projector._encode, projector.autocast = projector._features, False
    try:
        yield projector
    finally:
        projector._encode, projector.autocast = saved, auto


@contextlib.contextmanager
def _countable_attention():
    """MultiheadAttention's fused inference path is one op the FLOP counter does not see inside; the math
    attention kernel is counted as matmuls on every device. Both only while counting."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def count_flops(student, teacher, projector, x: torch.Tensor, soft: torch.Tensor, temperature: float):
    """FLOPs per image (2 per multiply-add): student forward + backward, projector forward, teacher forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from hellofmt.students import kd_loss

    n = x.shape[0]
    out = {}
    with _countable_attention():
        fc = FlopCounterMode(display=False)
        with fc:
            kd_loss(student(x), soft, temperature, False).backward()
        student.zero_grad(set_to_none=True)
        out["student_fwd_bwd"] = fc.get_total_flops() / n
        with float32_encoder(projector), torch.no_grad():
            fc = FlopCounterMode(display=False)
            with fc:
                projector(x)
        out["projector_fwd"] = fc.get_total_flops() / n
        fc = FlopCounterMode(display=False)
        with fc, torch.no_grad():
            teacher(x)
        out["teacher_fwd"] = fc.get_total_flops() / n
    return out


def label_kl(projector, x: torch.Tensor, temperature: float) -> tuple[float, float, float]:
    """``KL(float32 || autocast labels)`` on one batch: (mean, max over the views, top-1 agreement)."""
    with torch.no_grad():
        fast = projector(x).float()
        with float32_encoder(projector):
            exact = projector(x).float()
    logp, logq = torch.log_softmax(exact / temperature, 1), torch.log_softmax(fast / temperature, 1)
    kl = (logp.exp() * (logp - logq)).sum(1)
    agree = (exact.argmax(1) == fast.argmax(1)).float().mean()
    return float(kl.mean()), float(kl.max()), float(agree)


class SideStreamLabels:
    """Batches of a loader iterator made on a side CUDA stream, one batch ahead: ``prefetch()`` queues
    the next batch's views and labels there, ``take()`` makes the current stream wait for them."""

    def __init__(self, it, device: torch.device) -> None:
        self.it, self.stream, self.batch = it, torch.cuda.Stream(device), None

    def prefetch(self) -> None:
        with torch.cuda.stream(self.stream):
            self.batch = next(self.it)

    def take(self):
        main = torch.cuda.current_stream(self.stream.device)
        main.wait_stream(self.stream)
        for t in self.batch:
            t.record_stream(main)  # made on the side stream, used on this one: not freed under its feet
        batch, self.batch = self.batch, None
        return batch


# --------------------------------------------------------------------------------------------------
def run(args, device: torch.device) -> dict:
    import open_clip

    open_clip.add_model_config(ROOT / "tests" / "data")
    from hellofmt.students import build_student, kd_loss

    amp, label_amp = args.amp, args.label_amp or args.amp
    channels_last = args.channels_last
    overlap = args.overlap and device.type == "cuda"
    clock_name, clock = devices.clock(args.clock, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    bs, size, steps = args.batch, args.image_size, args.steps

    tmpdir = tempfile.TemporaryDirectory(prefix="hellofmt-student-epoch-")
    ds = open_bundle(args, device, Path(tmpdir.name))
    C, T = ds.num_classes, ds.temperature
    if len(ds) < bs:
        fail(f"--batch {bs} is more than the bundle's {len(ds)} images; lower --batch or raise --classes/--ipc")
    label_how = set_label_amp(ds.projector, device, label_amp)
    if args.label_channels_last:
        ds.projector.clip.visual.to(memory_format=torch.channels_last)

    torch.manual_seed(args.seed)
    student, sname = build_student(f"timm:{args.student}", C, size)
    teacher, tname = build_student(f"timm:{args.teacher}", C, size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student = student.to(device, memory_format=fmt).train()
    teacher = teacher.to(device, memory_format=fmt).eval().requires_grad_(False)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.05, **fused)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    f = ds.projector.foundation
    fsize = int(f.image_size)

    def autocast():
        return torch.autocast(device.type, dtype=AMPS[amp]) if AMPS[amp] else contextlib.nullcontext()

    print(f"setup: foundation {args.foundation} (random weights, input {fsize} px), {len(ds)} stored images of "
          f"{args.stored_size} px in {C} classes, mix {args.mix}; student {sname} at {size} px, batch {bs}, AdamW, "
          f"amp {amp}, channels-last {'on' if channels_last else 'off'}; teacher {tname}; labels amp {label_how}; "
          f"overlap {'on' if overlap else 'off'}; compile {'on' if args.compile else 'off'}", flush=True)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        mem = torch.cuda.get_device_properties(device).total_memory / 2**30
        dev_name += f", {mem:.1f} GiB"
    print(f"device {device} ({dev_name}); torch {torch.__version__}, open_clip {open_clip.__version__}, threads "
          f"{torch.get_num_threads()}; {clock_name} clock; median of {args.reps} x {steps} steps per arm after "
          f"{args.warmup} warm-up", flush=True)
    if args.overlap and not overlap:
        print("note: --overlap needs CUDA streams; on a CPU the batches are labelled in turn (a no-op)", flush=True)

    # The loader, and every view of the timed steps with its labels, once (untimed): (a) and (c) train on them.
    per_epoch = len(ds) // bs
    loader = ds.loader(batch_size=bs, image_size=size, mix=args.mix, seed=args.seed, drop_last=True,
                       epochs=math.ceil(steps / per_epoch))
    stub = copy.copy(ds)  # shares images and manifest; its projector is replaced for (v)
    stub.projector = _NoLabels(ds.projector)
    views_only = stub.loader(batch_size=bs, image_size=size, mix=args.mix, seed=args.seed, drop_last=True,
                             epochs=loader.epochs)
    t0 = time.perf_counter()
    loader.set_epoch(0)
    views, softs = [], []
    for x, soft, _hard in loader:
        views.append(x)  # as the loader gives them; every arm's step makes them channels-last alike
        softs.append(soft)
        if len(views) == steps:
            break
    print(f"precomputed {steps} batches of views and labels for (a) and (c) in {time.perf_counter() - t0:.1f}s "
          f"({sum(v.numel() * v.element_size() for v in views) / 2**20:.0f} MiB of views)", flush=True)

    n_count = min(bs, 8)
    flops = count_flops(student, teacher, ds.projector, views[0][:n_count], softs[0][:n_count], T)
    S, P, Tf = flops["student_fwd_bwd"], flops["projector_fwd"], flops["teacher_fwd"]
    print(f"FLOPs per image (FlopCounterMode, 2 per multiply-add): student forward+backward {S / 1e9:.3f} G, "
          f"projector forward {P / 1e9:.3f} G, teacher forward {Tf / 1e9:.3f} G", flush=True)
    kl = None
    if label_amp != "none":
        kl_mean, kl_max, agree = label_kl(ds.projector, views[0], T)
        kl = {"mean": kl_mean, "max": kl_max, "top1_agreement": agree}
        verdict = "within" if kl_mean <= KL_TARGET else "OVER"
        print(f"labels: KL(float32 || {label_amp}) on one batch of {bs} views: mean {kl_mean:.2e}, max {kl_max:.2e} "
              f"({verdict} {KL_TARGET:g}); top-1 agreement {agree:.4f}", flush=True)
    else:
        print("labels: float32 (--label-amp none), no KL check", flush=True)

    if args.compile:
        student, teacher = torch.compile(student), torch.compile(teacher)

    def step(x: torch.Tensor, soft: torch.Tensor) -> None:
        x = x.contiguous(memory_format=fmt)
        with autocast():
            out = student(x)
        loss = kd_loss(out, soft, T, False)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    last_b: dict[str, torch.Tensor] = {}

    def arm_a(n: int) -> int:
        for k in range(n):
            step(views[k], softs[k])
        return n * bs

    def arm_c(n: int) -> int:
        for k in range(n):
            x = views[k].contiguous(memory_format=fmt)  # once for the teacher and the student
            with torch.no_grad(), autocast():
                t = teacher(x)
            step(x, torch.softmax(t.float() / T, dim=1))
        return n * bs

    def arm_b_serial(n: int) -> int:
        loader.set_epoch(0)
        it = iter(loader)
        for _ in range(n):
            x, soft, _hard = next(it)
            step(x, soft)
        last_b[f"{n - 1}"] = x
        return n * bs

    def arm_b_overlap(n: int) -> int:
        loader.set_epoch(0)
        side = SideStreamLabels(iter(loader), device)
        side.prefetch()
        for k in range(n):
            x, soft, _hard = side.take()
            if k + 1 < n:
                side.prefetch()  # batch k+1 is labelled on the side stream while the student trains on batch k
            step(x, soft)
        last_b[f"{n - 1}"] = x
        return n * bs

    def arm_v(n: int) -> int:
        views_only.set_epoch(0)
        it = iter(views_only)
        for _ in range(n):
            next(it)
        return n * bs

    def arm_p(n: int) -> int:
        with torch.no_grad():
            for k in range(n):
                ds.projector(views[k])
        return n * bs

    arms = {"a": arm_a, "b": arm_b_overlap if overlap else arm_b_serial, "c": arm_c, "v": arm_v, "p": arm_p}
    if overlap:
        arms["b_serial"] = arm_b_serial

    t0 = time.perf_counter()
    for fn in arms.values():
        if args.warmup:
            fn(min(args.warmup, steps))
    devices.sync(device)
    print(f"warm-up {time.perf_counter() - t0:.1f}s", flush=True)
    rates: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.reps):
        for name, fn in arms.items():
            devices.sync(device)
            t = clock()
            n = fn(steps)
            devices.sync(device)
            rates[name].append(n / max(clock() - t, 1e-9))
    med = {k: statistics.median(v) for k, v in rates.items()}
    same = torch.equal(last_b[f"{steps - 1}"], views[steps - 1])

    print(f"\n{'arm':44s} {'images/s':>14s} {'vs (a)':>8s}")
    for k in ("a", "b", "b_serial", "c", "v", "p"):
        if k in med:
            print(f"{ARM_NAMES[k]:44s} {med[k]:10.1f} img/s {med[k] / med['a']:8.3f}")
    serial = 1 / (1 / med["a"] + 1 / med["v"] + 1 / med["p"])
    print(f"(b) were its parts (a) + (v) + (p) run one after another: {serial:.1f} img/s")
    print(f"same views in (a), (b) and (c): {'yes' if same else 'NO'}")
    ceil_ba, ceil_ca = S / (S + P), S / (S + Tf)
    ceil_bc = (S + Tf) / (S + P)
    b_a, c_a, b_c = med["b"] / med["a"], med["c"] / med["a"], med["b"] / med["c"]
    print(f"compute-bound ceiling (FLOPs): (b)/(a) <= S/(S+P) = {ceil_ba:.3f}, measured {b_a:.3f} "
          f"({b_a / ceil_ba:.0%} of it); (c)/(a) <= S/(S+T) = {ceil_ca:.3f}, measured {c_a:.3f}; "
          f"(b)/(c) at the FLOP ratio would be {ceil_bc:.3f}, measured {b_c:.3f}")
    print(f"RESULT projector_vs_stored={b_a:.3f} projector_vs_teacher={b_c:.3f}", flush=True)
    tmpdir.cleanup()
    return {
        "device": str(device), "device_name": dev_name, "torch": torch.__version__, "open_clip": open_clip.__version__,
        "threads": torch.get_num_threads(), "clock": clock_name,
        "config": {"foundation": args.foundation, "student": args.student, "teacher": args.teacher,
                   "classes": C, "images": len(ds), "stored_size": args.stored_size, "image_size": size,
                   "batch": bs, "steps": steps, "warmup": args.warmup, "reps": args.reps, "amp": amp,
                   "label_amp": label_amp, "channels_last": channels_last,
                   "label_channels_last": args.label_channels_last, "compile": args.compile, "overlap": overlap,
                   "mix": args.mix, "seed": args.seed},
        "images_per_s": med, "images_per_s_reps": rates, "flops_per_image": flops,
        "ceiling": {"b_over_a": ceil_ba, "c_over_a": ceil_ca, "b_over_c": ceil_bc},
        "projector_vs_stored": b_a, "projector_vs_teacher": b_c, "teacher_vs_stored": c_a,
        "serial_parts_img_s": serial, "label_kl": kl, "same_views": same,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.amp is None:
        args.amp = "bf16" if device.type == "cuda" else "none"
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        out = run(args, device)
    except torch.cuda.OutOfMemoryError:
        views = args.steps * args.batch * (3 * args.image_size**2 + args.classes) * 4 / 2**30
        fail(f"out of memory on {device} at --batch {args.batch} (student {args.student} at {args.image_size} px, "
             f"foundation {args.foundation}; the views and labels kept for (a) and (c) take {views:.1f} GiB): "
             f"try a smaller --batch, e.g. --batch {max(1, args.batch // 2)}, or fewer --steps", code=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
