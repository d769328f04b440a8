"""hellofmt quickstart: build a distilled dataset, then judge it by the students it trains.

Runs on a CPU in about 9 minutes (2 idle cores), offline, with nothing downloaded:

1. makes a small procedural image-folder dataset (8 classes: 2 shapes x 4 textures, random colours,
   sizes, positions and noise, 32 px) in a temporary folder;
2. trains a small CNN teacher on it;
3. builds a bundle with ``hellofmt.build_bundle`` and the default options (the same as
   ``hellofmt build``) on a small pretrained open_clip CLIP that ships with the example
   (``examples/foundation/``: a 7.8 MiB ViT pretrained here on rendered characters and shapes, see its
   README), whose zero-shot head from the class names alone already gets most shapes right: image
   selection, projector distillation (low-rank deltas that close the gap to the teacher), fidelity,
   probe;
4. evaluates it with ``hellofmt.evaluate`` (``hellofmt eval --protocol quick``): the same student
   trained on the same views and steps with the bundle's labels, hard labels, the teacher online
   (the upper bound) and a random real subset labelled by the same projector (the control), and
   prints the table: bundle/teacher, bundle - hard and IOR (bundle - random).

    python examples/quickstart.py [--seeds 2] [--ipc 10] [--keep DIR]

The same from the command line (with the teacher saved as a ``FILE.py:FACTORY``)::

    hellofmt build --train-data DIR/train --teacher teacher.py:make \\
        --foundation examples/foundation/clip32.json:examples/foundation/clip32-fp16.safetensors \\
        --ipc 10 --out DIR/bundle
    hellofmt eval DIR/bundle --val DIR/test --teacher teacher.py:make --train-data DIR/train
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# The pretrained 32-px foundation (benchmarks/foundations/pretrain.py --preset clip32 --half); the tests'
# random-weight tiny ViT (tests/data/hf-test-tiny-vit.json) is the method's worst case, not its use.
FOUNDATION = (f"{ROOT / 'examples' / 'foundation' / 'clip32.json'}:"
              f"{ROOT / 'examples' / 'foundation' / 'clip32-fp16.safetensors'}")
SHAPES = ("disk", "bar")
TEXTURES = ("horizontal", "vertical", "diagonal", "checker")
SIZE = 32


# --------------------------------------------------------------------------------------------------
# 1. a procedural dataset: learnable by a small CNN, but not from colour or position alone
# --------------------------------------------------------------------------------------------------
def make_image(shape: int, texture: int, rng: np.random.Generator) -> np.ndarray:
    """A textured shape (random colours, size, position, stripe period and phase) on a noisy
    background. The texture is local and easy; disk against bar needs the whole shape."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cx, cy = rng.uniform(11, 21, 2)
    r = rng.uniform(7, 11)
    mask = shape_mask(shape, xx - cx, yy - cy, r, rng)
    period = rng.uniform(3.5, 6.0)
    on = texture_mask(texture, xx, yy, period, rng.uniform(0, period, 2))
    fg1, bg = rng.uniform(0, 1, (2, 3))
    fg2 = 1.0 - fg1  # complementary, so the texture always shows
    img = np.where(mask[..., None], np.where(on[..., None], fg1, fg2), bg)
    img = img + rng.normal(0, 0.1, img.shape)  # sensor noise
    return (img.clip(0, 1) * 255).astype(np.uint8)


def shape_mask(shape: int, dx: np.ndarray, dy: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Where the shape is, given each pixel's offset from its centre (``dx``, ``dy``) and its radius."""
    if SHAPES[shape] == "disk":
        return dx**2 + dy**2 <= r**2
    a = rng.uniform(0, np.pi)  # a wide bar at any angle
    u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
    return (np.abs(u) <= r * 1.3) & (np.abs(v) <= r * 0.45)


def texture_mask(texture: int, xx: np.ndarray, yy: np.ndarray, period: float, ph: np.ndarray) -> np.ndarray:
    """The texture's "on" pixels: stripes (or a checker) of ``period`` pixels with phases ``ph``."""
    kind = TEXTURES[texture]
    if kind == "horizontal":
        return ((yy + ph[0]) % period) < period / 2
    if kind == "vertical":
        return ((xx + ph[0]) % period) < period / 2
    if kind == "diagonal":
        return ((xx + yy + ph[0]) % period) < period / 2
    return (((xx + ph[0]) % period) < period / 2) ^ (((yy + ph[1]) % period) < period / 2)


def classes() -> list[tuple[str, int, int]]:
    return [(f"{TEXTURES[j]} {SHAPES[i]}", i, j) for i in range(len(SHAPES)) for j in range(len(TEXTURES))]


def make_dataset(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, s, d in classes():
        (root / name.replace(" ", "_")).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            Image.fromarray(make_image(s, d, rng)).save(root / name.replace(" ", "_") / f"{k:04d}.png")
    return root


def load_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    xs, ys = [], []
    for c, n in enumerate(names):
        for f in sorted((root / n).iterdir()):
            xs.append(torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1))
            ys.append(c)
    return torch.stack(xs), torch.tensor(ys)


# --------------------------------------------------------------------------------------------------
# 2. models: a small CNN teacher and a smaller CNN student (both take images in [0, 1])
# --------------------------------------------------------------------------------------------------
def cnn(width: int, num_classes: int) -> nn.Module:
    """Three conv stages, each halving the resolution: cheap enough to train on a laptop CPU."""

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                             nn.MaxPool2d(2))

    # The last 3x3 conv at 4x4 sees the whole image: telling a disk from a bar needs the whole shape.
    return nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                         nn.Conv2d(4 * width, 4 * width, 3, padding=1), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop + flip, batched (the same family the bundle's loader uses)."""
    from hellofmt.augment import random_resized_crop

    return random_resized_crop(x, x.shape[-1], scale=(0.5, 1.0), generator=gen)[0]


def train_teacher(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, *, make_model=None,
                  device: str = "cpu", on_epoch=None) -> nn.Module:
    """Cross-entropy with label smoothing on random resized crops (scale 0.5-1), AdamW, one-cycle.
    ``make_model(num_classes)`` (default: the small CNN) is called after seeding; the model comes back
    on the CPU in eval mode. ``on_epoch(epoch, model)``, when given, is called after each epoch (1-based):
    checkpoints of the run, e.g. weak teachers."""
    torch.manual_seed(seed)
    model = (make_model or (lambda c: cnn(16, c)))(int(y.max()) + 1).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps = epochs * math.ceil(len(x) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(augment(x[idx].to(device), gen)), y[idx].to(device), label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
    return model.cpu().eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 256):
        correct += (model(x[i:i + 256].float() / 255).argmax(1) == y[i:i + 256]).sum().item()
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, default=150, help="original training images per class")
    ap.add_argument("--ipc", type=int, default=10, help="distilled images per class")
    ap.add_argument("--seeds", type=int, default=2, help="students per arm")
    ap.add_argument("--teacher-epochs", type=int, default=20)
    ap.add_argument("--keep", type=Path, help="keep the data, teacher and bundle in this folder (reused next time)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    import hellofmt

    print(f"hellofmt quickstart: make a procedural dataset, train a teacher, build a bundle with the default "
          f"options, then train {4 * args.seeds} students (4 arms x {args.seeds} seeds) with hellofmt eval; about "
          f"9 minutes on an idle 2-core CPU, offline.", flush=True)
    times: dict[str, float] = {}
    work = args.keep or Path(tempfile.mkdtemp(prefix="hellofmt-quickstart-"))
    work.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    train_dir, test_dir = work / "train", work / "test"
    if not train_dir.is_dir():  # with --keep, a second run reuses the data and the teacher
        print(f"making a procedural dataset in {work} ...", flush=True)
        make_dataset(train_dir, args.per_class, seed=0)
        make_dataset(test_dir, 50, seed=1)
    test_x, test_y = load_folder(test_dir)
    times["make data"] = time.perf_counter() - t

    from safetensors.torch import load_file, save_file

    t = time.perf_counter()
    teacher_file = work / "teacher.safetensors"
    if teacher_file.is_file():
        teacher = cnn(16, len(classes()))
        teacher.load_state_dict(load_file(str(teacher_file)))
        teacher.eval()
    else:
        print(f"training the teacher ({args.teacher_epochs} epochs) ...", flush=True)
        train_x, train_y = load_folder(train_dir)
        teacher = train_teacher(train_x, train_y, args.teacher_epochs, seed=0)
        save_file(teacher.state_dict(), str(teacher_file))
    times["train teacher"] = time.perf_counter() - t
    print(f"teacher: {accuracy(teacher, test_x, test_y):.1%} on {len(test_y)} clean held-out images", flush=True)

    t = time.perf_counter()
    from hellofmt.foundation import load_foundation
    from hellofmt.projector import Projector

    names = [p.name.replace("_", " ") for p in sorted(test_dir.iterdir()) if p.is_dir()]  # as the build reads them
    zero_shot = Projector(load_foundation(FOUNDATION), names)  # the class names are all it is given
    print(f"foundation, zero-shot from the class names alone: {accuracy(zero_shot, test_x, test_y):.1%} "
          f"(the teacher: {accuracy(teacher, test_x, test_y):.1%})", flush=True)

    res = hellofmt.build_bundle(str(train_dir), teacher, FOUNDATION, work / "bundle", ipc=args.ipc,
                                device="cpu", overwrite=True)
    times["build bundle"] = time.perf_counter() - t
    print(res["summary"])
    from hellofmt.show import write_contact_sheet

    sheet = work / "bundle.png"
    write_contact_sheet(res.path, sheet)
    print(f"the distilled images, a row per class: {sheet}  (hellofmt show {res.path} --out FILE.png)")

    t = time.perf_counter()
    result = hellofmt.evaluate(res.path, test_dir, teacher=teacher, train_data=train_dir, seeds=args.seeds,
                               protocol="quick", device="cpu")
    times["evaluate"] = time.perf_counter() - t
    print()
    print(result.format_table())
    print("time per stage: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    print("  build stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in res["timings"].items()))
    print(f"files in {work}")


if __name__ == "__main__":
    main()
