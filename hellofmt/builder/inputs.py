"""Build inputs: the image-folder tree, the class-name map, and the original data as tensors.

Everything here runs before any heavy work, so a typo in a path or a corrupt JPEG is reported in
seconds rather than after an hour of distillation. Errors list every bad file at once (up to a
limit), each with its path, instead of stopping at the first.
"""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import BuildInputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "TensorData",
    "scan_image_folder",
    "load_class_map",
    "load_image",
    "FolderDataset",
    "split_holdout",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")
_MAX_LISTED = 20


@dataclass
class ImageFolder:
    """An image-folder tree: ``folders[i]`` is class ``i``'s sub-folder name, ``names[i]`` the
    readable class name used in the text prompts, ``samples`` the (path, class index) pairs."""

    root: Path
    folders: list[str]
    names: list[str]
    samples: list[tuple[str, int]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.folders)

    def labels(self) -> torch.Tensor:
        return torch.tensor([c for _, c in self.samples], dtype=torch.int64)


@dataclass
class TensorData:
    """Original data already in memory: uint8 images [N,3,H,W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return int(self.labels.numel())


def load_class_map(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read ``--classes``: a JSON object ``{"n01440764": "tench", ...}``, a JSON list of
    ``[folder, name]`` pairs, or a TSV/CSV file with one ``folder<TAB>name`` line per class.

    Raises BuildInputError naming the file and line for anything it cannot read.
    """
    p = Path(path)
    if not p.is_file():
        raise BuildInputError("class map not found", file=p, field="--classes", fix="give a JSON or TSV file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BuildInputError(f"cannot read the class map: {e}", file=p, field="--classes") from None
    stripped = text.lstrip()
    out: dict[str, str] = {}
    if stripped.startswith("{") or stripped.startswith("["):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BuildInputError(f"not valid JSON: {e}", file=p, field="--classes") from None
        pairs = obj.items() if isinstance(obj, dict) else obj
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise BuildInputError(
                    "expected folder -> name strings", file=p, field=f"[{i}]", fix='use {"folder": "name", ...}'
                )
            out[pair[0]] = pair[1]
    else:
        delim = "\t" if "\t" in text else ","
        for i, row in enumerate(csv.reader(text.splitlines(), delimiter=delim), start=1):
            if not row or not "".join(row).strip() or row[0].startswith("#"):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise BuildInputError(
                    "expected 'folder<TAB>name'", file=p, field=f"line {i}", fix="one class per line"
                )
            out[row[0].strip()] = delim.join(row[1:]).strip()
    if not out:
        raise BuildInputError("the class map is empty", file=p, field="--classes")
    names = list(out.values())
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise BuildInputError(
            f"readable class names must be unique; repeated: {dups[:5]}", file=p, field="--classes",
            fix="give each class a distinct name (the zero-shot head cannot tell equal prompts apart)",
        )
    return out


def _readable(path: str) -> str | None:
    try:
        with Image.open(path) as im:
            if im.format is None:
                return "unknown image format"
            im.load()  # decode it all: a truncated file fails here, not mid-distillation
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds; every one means "unreadable"
        return f"{type(e).__name__}: {e}"
    return None


def scan_image_folder(
    root: str | os.PathLike[str],
    *,
    class_map: dict[str, str] | None = None,
    what: str = "--train-data",
) -> ImageFolder:
    """List an image-folder tree (one sub-folder per class, images inside, nested folders allowed)
    and check it: the folder exists, every class has images, every image opens, and ``class_map``
    (from ``--classes``) names every folder. Raises BuildInputError listing every problem found.
    """
    root = Path(root)
    if not root.exists():
        raise BuildInputError(
            "folder not found", file=root, field=what, fix="give an image-folder tree: ROOT/CLASS/IMAGE"
        )
    if not root.is_dir():
        raise BuildInputError("not a folder", file=root, field=what, fix="give an image-folder tree: ROOT/CLASS/IMAGE")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise BuildInputError(
            "no class sub-folders", file=root, field=what, fix="put each class's images in its own sub-folder"
        )
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for c, name in enumerate(folders):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith("."):
                    found.append(os.path.join(dirpath, fn))
        if not found:
            empty.append(name)
        samples.extend((f, c) for f in found)
    if empty:
        raise BuildInputError(
            f"{len(empty)} class folder(s) have no images: {', '.join(empty[:_MAX_LISTED])}",
            file=root, field=what, fix=f"add images (extensions {', '.join(IMAGE_EXTENSIONS)}) or remove the folder",
        )
    if class_map is not None:
        missing = [f for f in folders if f not in class_map]
        if missing:
            raise BuildInputError(
                f"{len(missing)} folder(s) have no readable name in the class map: {', '.join(missing[:_MAX_LISTED])}",
                field="--classes", file=root, fix="add a 'folder<TAB>name' line for each",
            )
        names = [class_map[f] for f in folders]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise BuildInputError(f"two folders map to the same class name: {dups[:5]}", field="--classes")
    else:
        names = [f.replace("_", " ") for f in folders]
    with ThreadPoolExecutor(min(16, (os.cpu_count() or 2) * 2)) as pool:
        problems = list(pool.map(_readable, [s for s, _ in samples]))
    bad = [(s, p) for (s, _), p in zip(samples, problems) if p]
    if bad:
        listed = "; ".join(f"{s} ({p})" for s, p in bad[:_MAX_LISTED])
        more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise BuildInputError(
            f"{len(bad)} unreadable image(s): {listed}{more}", file=root, field=what,
            fix="delete or re-encode them",
        )
    return ImageFolder(root=root, folders=folders, names=names, samples=samples)


def load_image(path: str, size: int) -> torch.Tensor:
    """Decode ``path`` as RGB, resize its short side to ``size`` and centre-crop to a square:
    uint8 [3, size, size]. Random crops are taken later, on the device, from this square."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        buf = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return buf.view(size, size, 3).permute(2, 0, 1).contiguous()


class FolderDataset(torch.utils.data.Dataset):
    """Samples of an :class:`ImageFolder` (or a subset of them) as uint8 squares of ``size``."""

    def __init__(self, folder: ImageFolder, size: int, indices: list[int] | None = None):
        self.folder = folder
        self.size = size
        self.indices = list(range(len(folder.samples))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.folder.samples[self.indices[i]]
        try:
            return load_image(path, self.size), label
        except Exception as e:  # noqa: BLE001 - a file can go bad after the up-front scan
            raise BuildInputError(f"cannot decode image: {e}", file=path, fix="delete or re-encode it") from None


class _TensorDataset(torch.utils.data.Dataset):
    def __init__(self, data: TensorData, indices: list[int]):
        self.data = data
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = self.indices[i]
        return self.data.images[j], int(self.data.labels[j])


def split_holdout(
    labels: torch.Tensor, fraction: float, *, seed: int, max_count: int = 2000
) -> tuple[list[int], list[int]]:
    """Deterministic stratified split into (train, held-out) indices. The held-out images never
    reach distillation, so the fidelity measured on them is an honest generalisation figure. Each
    class keeps at least one training image."""
    if fraction <= 0:
        return list(range(labels.numel())), []
    g = torch.Generator().manual_seed(seed)
    n = labels.numel()
    want = min(max_count, max(1, round(fraction * n)))
    per_class_quota = max(1, round(want / max(1, int(labels.max()) + 1)))
    train, held = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)].tolist()
        k = min(per_class_quota, len(idx) - 1)
        held.extend(idx[:k])
        train.extend(idx[k:])
    return sorted(train), sorted(held)


def dataset_for(data: ImageFolder | TensorData, indices: list[int], size: int) -> torch.utils.data.Dataset:
    """A map-style dataset of uint8 squares for either kind of original data."""
    if isinstance(data, ImageFolder):
        return FolderDataset(data, size, indices)
    return _TensorDataset(data, indices)


def data_labels(data: ImageFolder | TensorData) -> torch.Tensor:
    return data.labels() if isinstance(data, ImageFolder) else data.labels


def load_all(
    data: ImageFolder | TensorData, indices: list[int], size: int, *, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the given samples into one uint8 [n,3,size,size] tensor plus labels (small subsets
    only: held-out images, RDED candidates)."""
    if not indices:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    if isinstance(data, TensorData):
        imgs = data.images[indices]
        if imgs.shape[-1] != size or imgs.shape[-2] != size:
            imgs = _resize_uint8(imgs, size)
        return imgs.contiguous(), data.labels[indices].clone()
    ds = FolderDataset(data, size, indices)
    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as pool:
            items = list(pool.map(ds.__getitem__, range(len(ds))))
    else:
        items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    x = images.float() / 255
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
