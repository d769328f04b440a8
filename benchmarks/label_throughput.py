"""Labelling throughput, side by side on one device: what a soft label costs.

Measures images/s of
  (a) bare     the plain open_clip encoder forward (``encode_image`` on preprocessed input),
  (b) merged   the merged projector (deltas folded into the weights: resize/normalise, encode, head),
  (c) unmerged the training-form projector (deltas applied through parametrizations every forward),
  (d) loader   DistilledDataset.loader: index, crop+flip, mix, label, softmax (the whole batch path),
  (e) single   DistilledDataset.logits one image at a time,
on random-weight foundations (the shapes are what matter), with a bundle built by
``tests/bundles.py``. Each case is warmed up, then the cases are interleaved for ``--reps``
repetitions and the median is reported. The last line is machine-readable:

    RESULT merged_vs_bare=<b/a> loader_vs_merged=<d/b> batched_vs_single=<b/e>

Usage::

    python benchmarks/label_throughput.py                       # tiny test ViT on the CPU
    python benchmarks/label_throughput.py --arch ViT-B-32 --batch-size 32
    python benchmarks/label_throughput.py --device cuda --arch ViT-B-32 --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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
from devices import add_clock_option, check_device, sync  # noqa: E402  (benchmarks/devices.py)
from devices import clock as pick_clock  # noqa: E402


def _autocast(device: torch.device):
    # The projector runs under bf16 autocast on CUDA; the bare encoder gets the same treatment so
    # the comparison is like for like.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="hf-test-tiny-vit",
                   help="open_clip architecture, random weights (default: the tiny test ViT)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=5, help="batches per timing")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median taken)")
    p.add_argument("--single", type=int, default=16, help="images labelled one at a time per timing")
    p.add_argument("--image-size", type=int, default=None, help="student size (default: the foundation's)")
    p.add_argument("--stored-size", type=int, default=64, help="side of the stored images")
    p.add_argument("--mix", default="cutmix")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_clock_option(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip

    open_clip.add_model_config(ROOT / "tests" / "data")
    from hellofmt.dataset import DistilledDataset
    from hellofmt.projector import Projector

    from bundles import make_tiny_bundle

    device = check_device(args.device, "label_throughput.py")
    bs = args.batch_size
    clock_name, clock = pick_clock(args.clock, device)
    tmp = tempfile.TemporaryDirectory(prefix="hellofmt-bench-")
    t0 = time.perf_counter()
    ipc = max(2, -(-bs // 10))
    path = make_tiny_bundle(Path(tmp.name) / "bundle", arch=args.arch, num_classes=10, ipc=ipc, size=args.stored_size)
    ds = DistilledDataset(path, device=device, verify=False)
    merged = ds.projector
    fsize = merged.foundation.image_size
    size = args.image_size or fsize
    print(f"setup {time.perf_counter() - t0:.1f}s: {args.arch} (input {fsize}px), {len(ds)} stored images of "
          f"{args.stored_size}px, student view {size}px, mix {args.mix}, batch {bs}, device {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {clock_name} clock, "
          f"median of {args.reps}", flush=True)

    # The training form: the same foundation and deltas, not merged.
    from hellofmt.foundation import load_foundation

    man = ds.manifest
    foundation = load_foundation(man.foundation, bundle_dir=ds.bundle.path, device=device)
    unmerged = Projector(foundation, man.classes, man.head.templates, logit_scale=man.head.logit_scale)
    unmerged.load_deltas(ds.bundle.projector_tensors(), man.projector, merge=False)
    unmerged.to(device).eval().requires_grad_(False)

    g = torch.Generator().manual_seed(0)
    x01 = torch.rand(bs, 3, fsize, fsize, generator=g).to(device)
    clip = merged.clip
    with torch.no_grad():
        xpre = merged.preprocess(x01).contiguous()  # what the encoder sees: resized, normalised
    single_x = x01[: args.single]
    # drop_last: every timed batch is full, like the other cases (a short tail batch would be
    # slower per image and muddy the comparison).
    loader_it = iter(ds.loader(batch_size=bs, image_size=size, mix=args.mix, drop_last=True, epochs=10**6))

    def bare():
        with torch.no_grad(), _autocast(device):
            for _ in range(args.iters):
                clip.encode_image(xpre, normalize=True)
        return bs * args.iters

    def run_merged():
        with torch.no_grad():
            for _ in range(args.iters):
                merged(x01)
        return bs * args.iters

    def run_unmerged():
        with torch.no_grad():
            for _ in range(args.iters):
                unmerged(x01)
        return bs * args.iters

    def loader():
        n = 0
        for images, _soft, _hard in itertools.islice(loader_it, args.iters):
            n += images.shape[0]
        return n

    def single():
        for i in range(single_x.shape[0]):
            ds.logits(single_x[i : i + 1])
        return single_x.shape[0]

    cases = {"bare": bare, "merged": run_merged, "unmerged": run_unmerged, "loader": loader, "single": single}
    for fn in cases.values():  # warm-up
        fn()
    sync(device)
    rates: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.reps):
        for name, fn in cases.items():
            sync(device)
            t = clock()
            n = fn()
            sync(device)
            rates[name].append(n / (clock() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}

    labels = {
        "bare": "(a) bare encoder forward",
        "merged": "(b) merged projector",
        "unmerged": "(c) unmerged (training form)",
        "loader": "(d) full loader (aug + label)",
        "single": "(e) one image at a time",
    }
    print(f"\n{'case':34s} {'images/s':>12s} {'vs bare':>8s}")
    for k in cases:
        print(f"{labels[k]:34s} {med[k]:12.1f} {med[k] / med['bare']:8.3f}")
    print(
        f"RESULT merged_vs_bare={med['merged'] / med['bare']:.3f} "
        f"loader_vs_merged={med['loader'] / med['merged']:.3f} "
        f"batched_vs_single={med['merged'] / med['single']:.3f}"
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
