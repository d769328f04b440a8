"""Image store throughput and size: write and read images/s and bytes per image, per codec.

The images are synthetic but natural-looking: per image, a smooth random colour field (a few
low-frequency sinusoids per channel, like out-of-focus scenery), a soft-edged disc of another colour
(an "object"), and mild Gaussian pixel noise (sigma 4/255, like sensor noise). Pure noise would be
incompressible and make png/webp look far worse than on distilled images.

Write = encode every image (thread pool) + write the shards through ``BundleWriter`` (hashing and
fsync included). Read = ``read_shard`` of every shard: header checks + decode (thread pool) into one
uint8 [N, 3, H, W] tensor. Run::

    python benchmarks/storage.py                 # 1000 images at 224x224, all codecs
    python benchmarks/storage.py --count 200 --threads 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hellofmt.bundle import BundleWriter
from hellofmt.imagestore import read_shard


def natural_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, size, size]: smooth colour fields + a soft disc + mild noise (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for start in range(0, n, 50):
        b = min(50, n - start)
        img = torch.zeros(b, 3, size, size)
        for _ in range(4):  # a few low-frequency waves per channel
            fx, fy = (torch.rand(b, 3, 1, 1, generator=g) * 3 for _ in range(2))
            phase = torch.rand(b, 3, 1, 1, generator=g) * 6.283
            amp = torch.rand(b, 3, 1, 1, generator=g) * 0.15
            img += amp * torch.sin(6.283 * (fx * xx + fy * yy) + phase)
        img += torch.rand(b, 3, 1, 1, generator=g) * 0.6 + 0.2
        cx, cy = (torch.rand(b, 1, 1, 1, generator=g) * 0.6 + 0.2 for _ in range(2))
        r = torch.rand(b, 1, 1, 1, generator=g) * 0.2 + 0.1
        d = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
        mask = torch.sigmoid((r - d) * 60)
        colour = torch.rand(b, 3, 1, 1, generator=g)
        img = img * (1 - mask) + colour * mask
        img += torch.randn(b, 3, size, size, generator=g) * (4 / 255)
        out[start : start + b] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def run(codec: str, quality: int | None, images: torch.Tensor, labels: torch.Tensor, threads: int, root: Path):
    out = root / f"b-{codec}"
    n, _, h, w = images.shape
    t0 = time.perf_counter()
    with BundleWriter(out) as wr:
        info = wr.write_images(images, labels, num_classes=10, codec=codec, quality=quality,
                               max_shard_bytes=64 * 1024**2, num_threads=threads)
        # no commit: the writer's temp dir holds the shards; reading them is what we measure next
        t_write = time.perf_counter() - t0
        nbytes = sum(os.path.getsize(wr.tmpdir / s.file) for s in info.shards)
        t0 = time.perf_counter()
        parts = [read_shard(wr.tmpdir / s.file, codec=codec, height=h, width=w, num_classes=10,
                            expected_count=s.count, num_threads=threads) for s in info.shards]
        t_read = time.perf_counter() - t0
    back = torch.cat([p[0] for p in parts])
    err = (back.float() - images.float()).abs().mean().item()
    shutil.rmtree(out, ignore_errors=True)
    return n / t_write, n / t_read, nbytes / n, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=None, help="encode/decode threads (default: min(8, cores))")
    ap.add_argument("--codecs", default="raw,png,jpeg:90,webp:90")
    args = ap.parse_args()
    threads = args.threads or max(1, min(8, os.cpu_count() or 1))
    images = natural_images(args.count, args.size)
    labels = torch.arange(args.count) % 10
    print(f"{args.count} images {args.size}x{args.size}, {threads} thread(s), torch threads {torch.get_num_threads()}")
    print(f"{'codec':<10} {'write img/s':>12} {'read img/s':>11} {'bytes/img':>10} {'vs raw':>7} {'mean |err|':>11}")
    raw_bytes = 3 * args.size * args.size
    with tempfile.TemporaryDirectory(prefix="hellofmt-bench-") as tmp:
        for spec in args.codecs.split(","):
            codec, _, q = spec.partition(":")
            quality = int(q) if q else None
            wps, rps, bpi, err = run(codec, quality, images, labels, threads, Path(tmp))
            print(f"{spec:<10} {wps:>12,.0f} {rps:>11,.0f} {bpi:>10,.0f} {bpi / raw_bytes:>7.1%} {err:>11.3f}")


if __name__ == "__main__":
    main()
