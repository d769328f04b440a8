"""Datasets for choosing build defaults by students: made offline, with a teacher trained on each.

- ``shapes32``: the quickstart's procedural set (8 classes: 2 shapes x 4 textures, 32 px);
- ``digits32``: scikit-learn's bundled handwritten digits (10 classes, 1,797 real 8x8 scans,
  upsampled to 32 px; ``pip install scikit-learn``), split 1,300 train / 497 test;
- ``shapes64``: the quickstart's 8 classes drawn at 64 px with a finer texture (period 5-9 px against
  a shape of radius 14-22 px, where the 32-px set has 3.5-6 px against 7-11) and two clutter blobs:
  the larger-image set, with detail that a 32-px copy loses. Its foundation is the tiny ViT at 64 px
  (``tiny-vit-64.json`` beside this file: patch 16, the same 16 tokens as the 32-px one);
- ``textures96``: a procedural set of larger images (10 classes: 5 textures x 2 shapes, 96 px, with
  clutter, varying scale and position); its teacher reached only 38%, so it is not used for defaults.

Each is written as an image-folder tree (``train/``, ``test/``) under a cache folder, with a small
CNN teacher (``teacher.safetensors`` + ``teacher.py:make``) trained on it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TINY_FOUNDATION = str(ROOT / "tests" / "data" / "hf-test-tiny-vit.json")
TINY_FOUNDATION_64 = str(Path(__file__).resolve().parent / "tiny-vit-64.json")
DATASETS = ("shapes32", "digits32", "shapes64", "textures96")
FOUNDATIONS = {"shapes64": TINY_FOUNDATION_64}  # the others: TINY_FOUNDATION (32 px)
# Pretrained foundations made on this machine (benchmarks/foundations/pretrain.py), by input side.
PRETRAINED = ("clip32", "clip64")
PRETRAINED_FOR = {"digits32": "clip32", "shapes32": "clip32", "shapes64": "clip64"}


def pretrained_foundation(preset: str, cache: Path | None = None) -> str:
    """The ``--foundation`` spec of a pretrained preset (``clip32``, ``clip64``), pretraining it first
    if it is not cached yet (``$HELLOFMT_FOUNDATIONS``, default ``~/.cache/hellofmt/foundations``)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "foundations"))
    import pretrain

    return pretrain.ensure(preset, cache=cache)


@functools.cache
def _quickstart():
    spec = importlib.util.spec_from_file_location("hellofmt_quickstart", ROOT / "examples" / "quickstart.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _save(root: Path, split: str, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / split / names[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")


def _digits(root: Path) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x.repeat(1, 3, 1, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    y = d.target
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = order[:1300], order[1300:]
    names = [f"digit_{i}" for i in range(10)]
    _save(root, "train", x[train], y[train], names)
    _save(root, "test", x[test], y[test], names)


def make_image64(shape: int, texture: int, rng) -> np.ndarray:
    """The quickstart's textured disk or bar (``examples/quickstart.py``: make_image) at 64 px, with a
    finer texture relative to the shape and two soft clutter blobs behind it."""
    qs = _quickstart()
    s = 64
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    img = np.tile(rng.uniform(0, 1, 3), (s, s, 1))
    for _ in range(2):
        bx, by, br = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(4, 10)
        img[((xx - bx) ** 2 + (yy - by) ** 2) < br * br] = rng.uniform(0, 1, 3)
    cx, cy = rng.uniform(22, 42, 2)
    r = rng.uniform(14, 22)
    mask = qs.shape_mask(shape, xx - cx, yy - cy, r, rng)
    period = rng.uniform(5.0, 9.0)
    on = qs.texture_mask(texture, xx, yy, period, rng.uniform(0, period, 2))
    fg1 = rng.uniform(0, 1, 3)
    img = np.where(mask[..., None], np.where(on[..., None], fg1, 1.0 - fg1), img)
    img = img + rng.normal(0, 0.1, img.shape)
    return (img.clip(0, 1) * 255).astype(np.uint8)


def _shapes64(root: Path, per_class: int = 150, test_per_class: int = 50) -> None:
    qs = _quickstart()
    for split, n, seed in (("train", per_class, 0), ("test", test_per_class, 1)):
        rng = np.random.default_rng(seed)
        for name, sh, tx in qs.classes():
            d = root / split / name.replace(" ", "_")
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(make_image64(sh, tx, rng)).save(d / f"{k:04d}.png")


TEX96 = ("stripes", "checker", "dots", "rings", "noise")
SHAPES96 = ("disk", "square")


def _texture96(kind: str, rng, yy, xx) -> np.ndarray:
    period = rng.uniform(6, 12)
    ph = rng.uniform(0, period, 2)
    a = rng.uniform(0, np.pi)
    u = xx * np.cos(a) + yy * np.sin(a)
    v = -xx * np.sin(a) + yy * np.cos(a)
    if kind == "stripes":
        return ((u + ph[0]) % period) < period / 2
    if kind == "checker":
        return (((u + ph[0]) % period) < period / 2) ^ (((v + ph[1]) % period) < period / 2)
    if kind == "dots":
        return (
            ((u + ph[0]) % period - period / 2) ** 2 + ((v + ph[1]) % period - period / 2) ** 2
        ) < (period / 3.2) ** 2
    if kind == "rings":
        cx, cy = rng.uniform(0, 96, 2)
        return (np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) + ph[0]) % period < period / 2
    return rng.uniform(0, 1, yy.shape) < 0.5


def make_image96(shape: int, texture: int, rng) -> np.ndarray:
    s = 96
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    img = np.tile(rng.uniform(0, 1, 3), (s, s, 1))
    for _ in range(rng.integers(2, 5)):  # clutter: soft blobs of other colours
        cx, cy, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(5, 18)
        m = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        img[m] = rng.uniform(0, 1, 3)
    cx, cy = rng.uniform(30, 66, 2)
    r = rng.uniform(16, 30)
    if SHAPES96[shape] == "disk":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    else:
        a = rng.uniform(0, np.pi / 2)
        u, v = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a), -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        mask = (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    on = _texture96(TEX96[texture], rng, yy, xx)
    fg1 = rng.uniform(0, 1, 3)
    fg2 = 1 - fg1
    img = np.where(mask[..., None], np.where(on[..., None], fg1, fg2), img)
    img = img + rng.normal(0, 0.06, img.shape)
    return (img.clip(0, 1) * 255).astype(np.uint8)


def _textures96(root: Path, per_class: int = 130, test_per_class: int = 50) -> None:
    names = [f"{t}_{sh}" for sh in SHAPES96 for t in TEX96]
    for split, n, seed in (("train", per_class, 0), ("test", test_per_class, 1)):
        rng = np.random.default_rng(seed)
        for ci, name in enumerate(names):
            sh, tx = divmod(ci, len(TEX96))
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(make_image96(sh, tx, rng)).save(d / f"{k:04d}.png")


def load_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    xs, ys = [], []
    for c, n in enumerate(names):
        for f in sorted((root / n).iterdir()):
            xs.append(torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1))
            ys.append(c)
    return torch.stack(xs), torch.tensor(ys), names


TEACHER_PY = '''"""The benchmark teacher (benchmarks/defaults/data.py: net), weights from teacher.safetensors
beside this file."""
from pathlib import Path
import importlib.util

def make():
    root = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("hellofmt_bench_data", {data!r})
    d = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(d)
    from safetensors.torch import load_file
    m = d.net({num_classes}, {size})
    m.load_state_dict(load_file(str(root / "teacher.safetensors")))
    return m.eval()
'''


def net(num_classes: int, size: int, width: int = 16):
    """The quickstart's small CNN; images above 48 px are average-pooled to 32-48 px first, so its
    three stages still see whole shapes."""
    from torch import nn

    body = _quickstart().cnn(width, num_classes)
    k = size // 48 if size >= 96 else 1
    return nn.Sequential(nn.AvgPool2d(k), body) if k > 1 else body


def train_teacher(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, device: str = "cpu", on_epoch=None):
    """The quickstart's teacher recipe on :func:`net` (sized for the images)."""
    size = int(x.shape[-1])
    return _quickstart().train_teacher(x, y, epochs, seed, make_model=lambda c: net(c, size), device=device,
                                       on_epoch=on_epoch)


def weak_teachers(info: dict, epochs: tuple[int, ...], *, teacher_epochs: int = 40, device: str = "cpu") -> list:
    """Checkpoints of the teacher's own training run (the run :func:`prepare` made: same seed, same
    epochs) after each of ``epochs``, as HeLlO's several weak teachers: saved once as
    ``teacher-eN.safetensors`` beside the teacher, returned as eval-mode modules."""
    from safetensors.torch import load_file, save_file

    root = Path(info["root"])
    files = {e: root / f"teacher-e{e}.safetensors" for e in epochs}
    if not all(f.is_file() for f in files.values()):
        train_x, train_y, _ = load_folder(root / "train")

        def save(epoch, model):
            if epoch in files:
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(files[epoch]))

        train_teacher(train_x, train_y, teacher_epochs, seed=0, device=device, on_epoch=save)
    out = []
    for e in epochs:
        m = net(len(info["names"]), info["size"])
        m.load_state_dict(load_file(str(files[e])))
        out.append(m.eval())
    return out


def emit(record: dict, out: str) -> None:
    """Print ``record`` as one JSON line and append it to ``out`` (``-``: print only)."""
    line = json.dumps(record)
    print(line, flush=True)
    if out != "-":
        with open(out, "a") as f:
            f.write(line + "\n")


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, device: str = "cpu") -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 256):
        correct += (model(x[i:i + 256].to(device).float() / 255).argmax(1).cpu() == y[i:i + 256]).sum().item()
    return correct / len(x)


def make_data(name: str, cache: Path) -> Path:
    """Write (once) dataset ``name``'s ``train/`` and ``test/`` image folders under ``cache/name``."""
    qs = _quickstart()
    root = cache / name
    if not (root / "test").is_dir():
        if name == "shapes32":
            qs.make_dataset(root / "train", 150, seed=0)
            qs.make_dataset(root / "test", 50, seed=1)
        elif name == "digits32":
            _digits(root)
        elif name == "shapes64":
            _shapes64(root)
        elif name == "textures96":
            _textures96(root)
        else:
            raise SystemExit(f"unknown dataset {name!r}: one of {', '.join(DATASETS)}")
    return root


def prepare(name: str, cache: Path, *, teacher_epochs: int = 40, device: str = "cpu") -> dict:
    """Make (once) the data and the teacher of dataset ``name`` under ``cache/name``; return paths,
    test tensors and the teacher's held-out accuracy."""
    root = make_data(name, cache)
    test_x, test_y, names = load_folder(root / "test")
    tfile = root / "teacher.safetensors"
    if not tfile.is_file():
        from safetensors.torch import save_file

        train_x, train_y, _ = load_folder(root / "train")
        teacher = train_teacher(train_x, train_y, teacher_epochs, seed=0, device=device)
        save_file(teacher.state_dict(), str(tfile))
    size = int(test_x.shape[-1])
    (root / "teacher.py").write_text(TEACHER_PY.format(data=str(Path(__file__).resolve()), num_classes=len(names),
                                                       size=size))
    from safetensors.torch import load_file

    teacher = net(len(names), size)
    teacher.load_state_dict(load_file(str(tfile)))
    teacher.eval()
    acc = accuracy(teacher, test_x, test_y)
    return {"root": root, "train": root / "train", "test": root / "test", "teacher_spec": f"{root / 'teacher.py'}:make",
            "teacher": teacher, "teacher_acc": acc, "test_x": test_x, "test_y": test_y, "names": names,
            "size": int(test_x.shape[-1]), "foundation": FOUNDATIONS.get(name, TINY_FOUNDATION)}
