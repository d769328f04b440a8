"""Build inputs: the image-folder tree, the class-name map, and the original data as tensors.

The folder is checked before any heavy work, so a typo in a path or a file that is not an image is
reported in seconds rather than after an hour of distillation; errors list every bad file at once (up
to a limit), each with its path, instead of stopping at the first. The check reads headers only: at
ImageNet size a full decode of every image up front costs about 1,000 core-seconds, and the build
decodes every image anyway. An image whose header reads but whose data does not (a truncated JPEG) is
found when it is first decoded: it is skipped (the next image of the set stands in for it), counted and
named in the manifest, and the build stops only past ``--max-bad-images`` (:class:`SkippedImages`).

Under ``torchrun``, rank 0 alone lists and checks the folder (:func:`scan_once`), records the listing
in the checkpoint folder (``index.json``, reused by ``--resume``) and sends it to the other ranks.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import BuildInputError, HellofmtError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "TensorData",
    "scan_image_folder",
    "scan_once",
    "SkippedImages",
    "collate_samples",
    "load_class_map",
    "load_image",
    "StandInDataset",
    "decode_all",
    "FolderDataset",
    "split_holdout",
    "source_side",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")
_MAX_LISTED = 20
INDEX_FILE = "index.json"  # the listing of --train-data in the checkpoint folder (see scan_once)


@dataclass
class ImageFolder:
    """An image-folder tree: ``folders[i]`` is class ``i``'s sub-folder name, ``names[i]`` the
    readable class name used in the text prompts, ``samples`` the (path, class index) pairs."""

    root: Path
    folders: list[str]
    names: list[str]
    samples: list[tuple[str, int]] = field(default_factory=list)
    # Where images that fail to decode are recorded; None: such an image stops the build at once.
    skipped: SkippedImages | None = field(default=None, compare=False, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.folders)

    def labels(self) -> torch.Tensor:
        return torch.tensor([c for _, c in self.samples], dtype=torch.int64)

    def to_index(self) -> dict:
        """The listing as JSON (what :func:`scan_once` writes as ``index.json``): the root, the class
        folders, and each sample as ``[path relative to the root, class index]``."""
        cut = len(os.fspath(self.root).rstrip(os.sep)) + 1
        return {"format": "hellofmt-image-index", "root": os.fspath(self.root.resolve()),
                "folders": list(self.folders), "samples": [[p[cut:], c] for p, c in self.samples]}

    @classmethod
    def from_index(cls, index: dict, root: str | os.PathLike[str], names: list[str]) -> ImageFolder:
        """The folder that :meth:`to_index` described, its samples under ``root``."""
        base = os.fspath(root).rstrip(os.sep)
        return cls(root=Path(root), folders=list(index["folders"]), names=list(names),
                   samples=[(os.path.join(base, p), int(c)) for p, c in index["samples"]])


class SkippedImages:
    """The images that failed to decode during a build (each once, however often it was read).

    A :class:`FolderDataset` reports them with its samples; whoever consumes the samples (the distillation
    loop, :func:`load_all`) adds them here. Past ``limit`` images, :meth:`add` raises.

    Args:
        limit: the most undecodable images the build accepts (see ``--max-bad-images``).
        total: the images of the set (for the error message).
    """

    def __init__(self, limit: int, total: int):
        self.limit = limit
        self.total = total
        self.files: dict[str, str] = {}  # path -> why it did not decode, in the order found

    def __len__(self) -> int:
        return len(self.files)

    def add(self, failures) -> None:
        """Record ``(path, reason)`` pairs.

        Raises:
            BuildInputError: more than ``limit`` distinct images have failed, naming them.
        """
        for path, reason in failures:
            self.files.setdefault(str(path), str(reason))
        if len(self.files) > self.limit:
            listed = "; ".join(f"{p} ({r})" for p, r in list(self.files.items())[:_MAX_LISTED])
            more = f" and {len(self.files) - _MAX_LISTED} more" if len(self.files) > _MAX_LISTED else ""
            raise BuildInputError(
                f"{len(self.files)} of {self.total} image(s) failed to decode, more than the {self.limit} "
                f"--max-bad-images allows: {listed}{more}", file=next(iter(self.files)), field="--max-bad-images",
                fix="delete or re-encode them, or raise --max-bad-images",
            )


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


def _header_problem(path: str) -> str | None:
    """Why ``path`` is not an image, from its header alone (format and size); None when it looks fine.
    A file whose data is damaged past the header passes here and is caught when it is decoded."""
    try:
        with Image.open(path) as im:
            if im.format is None:
                return "unknown image format"
            w, h = im.size
            if w < 1 or h < 1:
                return f"empty image ({w}x{h})"
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds; every one means "unreadable"
        return f"{type(e).__name__}: {e}"
    return None


def _list_folder(root: Path, what: str) -> tuple[list[str], list[tuple[str, int]]]:
    """The class folders of ``root`` and its image files as (path, class index), sorted."""
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
    return folders, samples


def _class_names(folders: list[str], class_map: dict[str, str] | None, root: Path) -> list[str]:
    """The readable class names: from ``class_map`` (which must name every folder), else the folder names."""
    if class_map is None:
        return [f.replace("_", " ") for f in folders]
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
    return names


def scan_image_folder(
    root: str | os.PathLike[str],
    *,
    class_map: dict[str, str] | None = None,
    what: str = "--train-data",
) -> ImageFolder:
    """List an image-folder tree (one sub-folder per class, images inside, nested folders allowed)
    and check it: the folder exists, every class has images, every image's header reads as an image
    (format and size; the pixels are not decoded, see the module docstring), and ``class_map`` (from
    ``--classes``) names every folder. Raises BuildInputError listing every problem found.
    """
    root = Path(root)
    folders, samples = _list_folder(root, what)
    names = _class_names(folders, class_map, root)
    with ThreadPoolExecutor(min(16, (os.cpu_count() or 2) * 2)) as pool:
        problems = list(pool.map(_header_problem, [s for s, _ in samples]))
    bad = [(s, p) for (s, _), p in zip(samples, problems) if p]
    if bad:
        listed = "; ".join(f"{s} ({p})" for s, p in bad[:_MAX_LISTED])
        more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise BuildInputError(
            f"{len(bad)} unreadable image(s): {listed}{more}", file=root, field=what,
            fix="delete or re-encode them",
        )
    return ImageFolder(root=root, folders=folders, names=names, samples=samples)


def scan_once(
    root: str | os.PathLike[str],
    *,
    class_map: dict[str, str] | None,
    world,
    store=None,
    resume: bool = False,
    what: str = "--train-data",
) -> ImageFolder:
    """:func:`scan_image_folder` once for all ranks: rank 0 lists and checks the folder, writes the listing
    to ``store`` (``index.json``) and sends it to the other ranks, which read nothing from the disk.

    With ``resume``, an ``index.json`` of the same root (resolved path) is used instead of scanning again,
    so a resumed build also sees the very same samples, in the same order (its held-out split and its
    batches depend on them), even if files were added to the folder since. An error on rank 0 is raised
    on every rank.

    Args:
        root: the image-folder tree.
        class_map: folder -> readable name (``--classes``), or None for the folder names.
        world: the process group (:class:`~hellofmt.builder.dist.World`).
        store: the checkpoint folder (a :class:`~hellofmt.builder.checkpoint.CheckpointStore`), or None.
        resume: reuse the index the store holds for this root.
        what: the option name used in errors.

    Returns:
        The checked :class:`ImageFolder`, the same on every rank.

    Raises:
        BuildInputError: as :func:`scan_image_folder` (on every rank).
    """
    from .dist import broadcast_json

    root = Path(root)
    payload = None
    if world.is_main:
        try:
            index = _stored_index(store, root) if resume else None
            if index is None:
                index = scan_image_folder(root, class_map=class_map, what=what).to_index()
                if store is not None:
                    store.write_json(INDEX_FILE, index)
            payload = {"index": index}
        except HellofmtError as e:
            payload = {"error": {"message": e.message, "file": e.file, "field": e.field, "fix": e.fix}}
            if world.size == 1:
                raise
            broadcast_json(world, payload)  # the other ranks raise it too, instead of waiting forever
            raise
    payload = broadcast_json(world, payload)
    if "error" in payload:
        raise BuildInputError(**payload["error"])
    index = payload["index"]
    return ImageFolder.from_index(index, root, _class_names(index["folders"], class_map, root))


def _stored_index(store, root: Path) -> dict | None:
    """The index in ``store`` when it lists ``root`` and is well formed; None otherwise."""
    index = store.read_json(INDEX_FILE) if store is not None else None
    if not index or index.get("format") != "hellofmt-image-index" or index.get("root") != os.fspath(root.resolve()):
        return None
    folders, samples = index.get("folders"), index.get("samples")
    ok = (isinstance(folders, list) and folders and all(isinstance(f, str) for f in folders)
          and isinstance(samples, list)
          and all(isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and isinstance(s[1], int)
                  and 0 <= s[1] < len(folders) for s in samples))
    return index if ok else None


# A JPEG is decoded at a reduced DCT scale (1/2, 1/4, 1/8) only down to _DRAFT_MARGIN times the target side,
# so that the final bicubic resample still averages the DCT scaling's blockiness away: decoding right down to
# the target cost the quickstart teacher 1-2 points of top-1 on upscaled test images (400 views), a 2x margin
# about 1 (within noise). Larger reductions go first through an integer box reduction (Image.reduce) until
# at most _REDUCING_GAP times the target remains. Only the centre square is resampled.
_DRAFT_MARGIN = 2
_REDUCING_GAP = 3.0


def source_side(data: ImageFolder | TensorData, indices: list[int]) -> int | None:
    """The median short side, in pixels, of the source images at ``indices`` as stored (read from their
    headers; the caller passes a small sample), or None when none of them reads. In-memory data: its
    tensor's side. An image that does not read is left out here and reported where it is decoded."""
    if isinstance(data, TensorData):
        return int(min(data.images.shape[-2:]))
    sides = []
    for i in indices:
        try:
            if hasattr(data, "native_size"):  # hfdata.HFData
                w, h = data.native_size(i)
            else:
                with Image.open(data.samples[i][0]) as im:
                    w, h = im.size
        except Exception:  # noqa: BLE001 - PIL raises many kinds; the decode reports them
            continue
        sides.append(min(w, h))
    return int(statistics.median_low(sides)) if sides else None


def load_image(path: str, size: int) -> torch.Tensor:
    """Decode ``path`` as RGB, resize its short side to ``size`` and centre-crop to a square:
    uint8 [3, size, size]. Random crops are taken later, on the device, from this square.

    Large JPEGs are decoded at reduced size (PIL's ``draft``: the DCT scales 1/2, 1/4, 1/8, keeping the short
    side at least twice ``size``) and only the centre square is resampled (bicubic, after an integer box
    reduction of large images): see :func:`pil_to_square`."""
    with Image.open(path) as im:
        return pil_to_square(im, size)


def pil_to_square(im: Image.Image, size: int) -> torch.Tensor:
    """:func:`load_image` on an opened PIL image (e.g. a row of a Hugging Face dataset): RGB, short
    side resized to ``size``, centre-cropped square, uint8 [3, size, size]."""
    w, h = im.size
    if im.format == "JPEG" and min(w, h) >= 2 * _DRAFT_MARGIN * size:
        s = _DRAFT_MARGIN * size / min(w, h)
        im.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))  # the scale keeps both sides >= this; no-op if loaded
    im = im.convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    left, top = (nw - size) // 2, (nh - size) // 2
    sx, sy = w / nw, h / nh  # the centre square of the resized image, in this image's pixels
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    im = im.resize((size, size), Image.BICUBIC, box=box, reducing_gap=_REDUCING_GAP)
    buf = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return buf.view(size, size, 3).permute(2, 0, 1).contiguous()


def collate_samples(items) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """A batch from samples ``(image, label)`` or ``(image, label, skipped)`` (:class:`FolderDataset`'s):
    images stacked (uint8 [B,3,S,S]), labels (int64 [B]) and every sample's skipped ``(path, reason)``
    pairs in one list. A DataLoader's ``collate_fn``: the failures come back from its worker processes with
    the batch, so the main process can count them."""
    images = torch.utils.data.default_collate([it[0] for it in items])  # in a worker: into shared memory
    labels = torch.tensor([int(it[1]) for it in items], dtype=torch.int64)
    skipped = [f for it in items if len(it) > 2 for f in it[2]]
    return images, labels, skipped


class StandInDataset(torch.utils.data.Dataset):
    """Samples ``indices`` of a source as ``(uint8 square of size, class index, skipped)``, where a
    sample that fails to decode is replaced by the next sample of the subset (cyclically, so the same
    index always gives the same sample) and reported in ``skipped``, a tuple of ``(name, reason)``, for
    the consumer to record (the DataLoader's :func:`collate_samples`, or :func:`decode_all`).

    Without a :class:`SkippedImages` (``skipped`` is None) a failure raises :meth:`_unreadable`'s error;
    :data:`_MAX_STAND_INS` failures in a row raise :meth:`_broken`'s. A source gives :meth:`_decode`,
    :meth:`_name`, those two errors and the ``skipped`` property (:class:`FolderDataset`,
    :class:`hellofmt.builder.hfdata.HFRows`).
    """

    _MAX_STAND_INS = 64  # this many failures in a row is not a few bad samples but a broken set

    def __init__(self, indices: list[int], size: int):
        self.indices = [int(i) for i in indices]
        self.size = size

    @property
    def skipped(self) -> SkippedImages | None:
        raise NotImplementedError

    def _decode(self, j: int) -> tuple[torch.Tensor, int]:
        """Sample ``j`` of the source (not a position in ``indices``) as (uint8 square, label)."""
        raise NotImplementedError

    def _name(self, j: int) -> str:
        raise NotImplementedError

    def _unreadable(self, j: int, e: Exception) -> BuildInputError:
        raise NotImplementedError

    def _broken(self, failed: list[tuple[str, str]]) -> BuildInputError:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, tuple[tuple[str, str], ...]]:
        n = len(self.indices)
        failed: list[tuple[str, str]] = []
        for k in range(min(n, self._MAX_STAND_INS)):
            j = self.indices[(i + k) % n]
            try:
                image, label = self._decode(j)
                return image, label, tuple(failed)
            except Exception as e:  # noqa: BLE001 - headers were checked only; PIL raises many kinds
                if self.skipped is None:
                    raise self._unreadable(j, e) from None
                failed.append((self._name(j), f"{type(e).__name__}: {e}"))
        raise self._broken(failed)


def decode_all(ds: StandInDataset, *, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of ``ds`` in one uint8 [n,3,size,size] tensor plus labels (small subsets only),
    decoded by ``num_workers`` threads (PIL releases the GIL); the failures replaced are recorded in
    ``ds.skipped``."""
    if not len(ds):
        return torch.zeros(0, 3, ds.size, ds.size, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as pool:
            items = list(pool.map(ds.__getitem__, range(len(ds))))
    else:
        items = [ds[i] for i in range(len(ds))]
    images, labels, failed = collate_samples(items)
    if failed:  # only with a SkippedImages: the dataset raises otherwise
        ds.skipped.add(failed)
    return images, labels


class FolderDataset(StandInDataset):
    """Samples of an :class:`ImageFolder` (or a subset of them) as ``(uint8 square of size, class index,
    skipped)``; with ``folder.skipped`` set, an image that fails to decode is replaced and reported as
    :class:`StandInDataset` says, and without it raises BuildInputError naming the file."""

    def __init__(self, folder: ImageFolder, size: int, indices: list[int] | None = None):
        super().__init__(list(range(len(folder.samples))) if indices is None else indices, size)
        self.folder = folder

    @property
    def skipped(self) -> SkippedImages | None:
        """Where the consumer records the images that failed (the folder's)."""
        return self.folder.skipped

    def _decode(self, j: int) -> tuple[torch.Tensor, int]:
        path, label = self.folder.samples[j]
        return load_image(path, self.size), label

    def _name(self, j: int) -> str:
        return self.folder.samples[j][0]

    def _unreadable(self, j: int, e: Exception) -> BuildInputError:
        return BuildInputError(f"cannot decode image: {e}", file=self._name(j), fix="delete or re-encode it")

    def _broken(self, failed: list[tuple[str, str]]) -> BuildInputError:
        return BuildInputError(
            f"{len(failed)} images in a row failed to decode: {'; '.join(p for p, _ in failed[:5])}",
            file=failed[0][0], field="--train-data", fix="check the folder (a failing disk, a half-copied tree?)",
        )


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
    if hasattr(data, "dataset_for"):  # other sources bring their own (hfdata.HFData)
        return data.dataset_for(indices, size)
    if isinstance(data, ImageFolder):
        return FolderDataset(data, size, indices)
    return _TensorDataset(data, indices)


def data_labels(data: ImageFolder | TensorData) -> torch.Tensor:
    return data.labels() if isinstance(data, ImageFolder) else data.labels


def load_all(
    data: ImageFolder | TensorData, indices: list[int], size: int, *, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the given samples into one uint8 [n,3,size,size] tensor plus labels (small subsets
    only: held-out images, RDED candidates). ``num_workers`` threads decode (PIL releases the GIL).

    An image folder with a :class:`SkippedImages` (``data.skipped``) records the images that fail to decode
    there, each replaced by the next of ``indices`` (the labels returned are the replacements'); without one,
    a failure raises BuildInputError."""
    if hasattr(data, "load_all"):  # other sources bring their own (hfdata.HFData)
        return data.load_all(indices, size, num_workers=num_workers)
    if not indices:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    if isinstance(data, TensorData):
        imgs = data.images[indices]
        if imgs.shape[-1] != size or imgs.shape[-2] != size:
            imgs = _resize_uint8(imgs, size)
        return imgs.contiguous(), data.labels[indices].clone()
    return decode_all(FolderDataset(data, size, indices), num_workers=num_workers)


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    x = images.float() / 255
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
