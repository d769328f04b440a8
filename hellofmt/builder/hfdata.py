"""Hugging Face ``datasets`` as training data: a ``save_to_disk`` folder or a Hub dataset id.

ImageNet-1K and most image-classification sets on the Hub come as a table with an ``image`` column
(encoded bytes) and a ``label`` column (a ``ClassLabel`` whose names are the classes). :class:`HFData`
lets ``--train-data`` take that form directly, with no export to an image-folder tree first:

- ``hf://datasets/ORG/NAME[@REVISION][:SPLIT]``: loaded with ``datasets.load_dataset`` (it downloads
  into the ``datasets`` cache; split ``train`` unless given). The ``hf://`` prefix keeps a Hub id from
  ever being read as a local folder of the same name, and the other way round.
- a folder written by ``Dataset.save_to_disk`` (it holds ``state.json``) or ``DatasetDict.save_to_disk``
  (``dataset_dict.json``; its ``train`` split is used, or give the split's sub-folder): opened with
  ``datasets.load_from_disk``, which memory-maps Arrow files and runs no code;
- from Python, a ``datasets.Dataset`` object.

No loading script ever runs: ``trust_remote_code`` is never passed. Images are decoded here, not by
``datasets`` (the column is read with ``Image(decode=False)``), exactly as an image folder's files are
(:func:`~hellofmt.builder.inputs.pil_to_square`), and a row that does not decode is handled as an
undecodable file is: replaced by the next row, counted in :attr:`HFData.skipped` and named in the
manifest (``SOURCE#row=N``), up to ``--max-bad-images`` (see :class:`HFRows`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import BuildInputError
from .inputs import SkippedImages, StandInDataset, decode_all, load_class_map, pil_to_square

__all__ = ["HF_PREFIX", "INSTALL", "HFData", "hf_source", "open_hf_data"]

HF_PREFIX = "hf://datasets/"
INSTALL = 'pip install "hellofmt[hf-datasets]"  (or: pip install "datasets>=2.19")'
_FIELD = "--train-data"


def _datasets():
    """The optional ``datasets`` library (heavy: pyarrow, pandas), imported only when used."""
    try:
        import datasets
    except ImportError:
        raise BuildInputError("a Hugging Face dataset needs the `datasets` library, which is not installed",
                              field=_FIELD, fix=INSTALL) from None
    return datasets


def hf_source(train_data: Any) -> Any | None:
    """``train_data`` when it names a Hugging Face dataset (a ``hf://datasets/...`` id, a
    ``save_to_disk`` folder, or a ``datasets.Dataset`` object), else None (an image folder, tensors)."""
    if isinstance(train_data, (str, os.PathLike)):
        s = os.fspath(train_data)
        if s.startswith("hf://"):
            return s
        p = Path(s)
        if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
            return s
        return None
    if type(train_data).__module__.split(".")[0] == "datasets":  # no import: `datasets` may be absent
        return train_data
    return None


def _parse_hub(spec: str) -> tuple[str, str | None, str]:
    """``hf://datasets/ORG/NAME[@REVISION][:SPLIT]`` -> (repo id, revision, split)."""
    if not spec.startswith(HF_PREFIX):
        raise BuildInputError(f"cannot read {spec!r} as a Hub dataset", field=_FIELD,
                              fix=f"write {HF_PREFIX}ORG/NAME[@REVISION][:SPLIT]")
    rest = spec[len(HF_PREFIX):]
    rest, _, split = rest.partition(":")
    repo, _, revision = rest.partition("@")
    parts = repo.split("/")
    if not repo or len(parts) > 2 or not all(parts) or (split == "" and spec.endswith(":")):
        raise BuildInputError(f"cannot read {spec!r} as a Hub dataset", field=_FIELD,
                              fix=f"write {HF_PREFIX}ORG/NAME[@REVISION][:SPLIT], "
                                  f"e.g. {HF_PREFIX}ILSVRC/imagenet-1k:train")
    return repo, revision or None, split or "train"


def _load(source: Any):
    """The ``datasets.Dataset`` that ``source`` names, and a description of it for messages."""
    datasets = _datasets()
    if isinstance(source, str) and source.startswith("hf://"):
        repo, revision, split = _parse_hub(source)
        try:
            # a Hub id may download (opt-in, like every other network use); never trust_remote_code
            ds = datasets.load_dataset(repo, split=split, revision=revision)
        except Exception as e:  # noqa: BLE001 - not found, gated, offline, unknown split: all the user's to fix
            raise BuildInputError(f"cannot load the Hub dataset: {type(e).__name__}: {e}", file=source, field=_FIELD,
                                  fix="check the id, the split, your login (`hf auth login`) for gated sets, "
                                      "and the network (HF_DATASETS_OFFLINE=1 uses the cache only)") from None
        return ds, source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            ds = datasets.load_from_disk(str(path))  # Arrow files, memory-mapped; no code runs
        except Exception as e:  # noqa: BLE001 - a damaged or foreign folder
            raise BuildInputError(f"cannot open the saved dataset: {type(e).__name__}: {e}", file=path,
                                  field=_FIELD, fix="give a folder written by Dataset.save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = sorted(ds)
            if "train" in ds:
                ds = ds["train"]
            elif len(splits) == 1:
                ds = ds[splits[0]]
            else:
                raise BuildInputError(f"a DatasetDict with splits {splits} and no 'train'", file=path, field=_FIELD,
                                      fix=f"give the split's folder, e.g. {path / splits[0]}")
        return ds, os.fspath(path)
    if isinstance(source, datasets.DatasetDict):
        raise BuildInputError("a DatasetDict, not one split", field=_FIELD, fix='pass one split, e.g. dd["train"]')
    if not isinstance(source, datasets.Dataset):
        raise BuildInputError(f"cannot use a {type(source).__name__} as training data", field=_FIELD,
                              fix="give a map-style datasets.Dataset (not streaming)")
    name = getattr(source.info, "dataset_name", None) or ""
    return source, f"<datasets.Dataset {name}>".replace(" >", ">")


def open_hf_data(
    source: Any,
    classes: Any = None,
    *,
    image_column: str = "image",
    label_column: str = "label",
) -> HFData:
    """Open a Hugging Face dataset as build input and check its columns and labels.

    Args:
        source: a ``hf://datasets/ORG/NAME[@REVISION][:SPLIT]`` id, a ``save_to_disk`` folder, or a
            ``datasets.Dataset``.
        classes: overrides the class names: a class-map file or dict keyed by the ``ClassLabel`` names
            (or by the label values, as strings, when ``label`` is a plain integer column), or a list of
            names in label order. Default: the ``ClassLabel`` names (underscores read as spaces, as folder
            names are), or the label values ("0", "1", ...) for a plain integer column.
        image_column: the column of images (``Image`` feature, ``{"bytes", "path"}`` dicts, or bytes).
        label_column: the column of integer class indices.

    Returns:
        An :class:`HFData`.

    Raises:
        BuildInputError: ``datasets`` is missing, the dataset does not load, a column is missing or of the
            wrong type, a label is out of range, or a class has no rows.
    """
    datasets = _datasets()
    ds, where = _load(source)
    cols = list(ds.column_names)
    for col, kind in ((image_column, "images"), (label_column, "integer class labels")):
        if col not in cols:
            hint = ""
            if col == image_column:
                hint = next((f"; column {c!r} holds images" for c, f in ds.features.items()
                             if isinstance(f, datasets.Image)), "")
            raise BuildInputError(
                f"no {col!r} column ({kind}); the columns are {cols}{hint}", file=where, field=col,
                fix=f"rename yours: ds = ds.rename_column(OLD, {col!r}), then ds.save_to_disk(DIR)")
    feat = ds.features[label_column]
    if isinstance(feat, datasets.ClassLabel):
        keys = list(feat.names)
    elif isinstance(feat, datasets.Value) and feat.dtype.startswith(("int", "uint")):
        keys = None
    else:
        raise BuildInputError(f"the {label_column!r} column holds {feat}, not integer class labels", file=where,
                              field=label_column, fix="cast it to a ClassLabel: ds.cast_column('label', "
                                                      "datasets.ClassLabel(names=[...]))")
    import numpy as np  # with torch already loaded: no start-up cost

    labels = torch.from_numpy(np.asarray(
        ds.with_format("numpy", columns=[label_column])[0:len(ds)][label_column], dtype=np.int64))
    if labels.numel() == 0:
        raise BuildInputError("the dataset has no rows", file=where, field=_FIELD)
    if keys is None:
        keys = [str(i) for i in range(max(0, int(labels.max())) + 1)]
    names = _class_names(keys, classes, where)
    if int(labels.min()) < 0 or int(labels.max()) >= len(names):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise BuildInputError(f"label {bad} is outside [0, {len(names)})", file=where, field=label_column,
                              fix="use a labelled split (test splits often carry -1) or filter those rows out")
    counts = torch.bincount(labels, minlength=len(names))
    empty = [names[i] for i in (counts == 0).nonzero().flatten().tolist()]
    if empty:
        raise BuildInputError(f"{len(empty)} class(es) have no rows: {', '.join(empty[:20])}", file=where,
                              field=label_column, fix="add rows for them, or keep only the classes present "
                                                      "(ds.align_labels_with_mapping / a smaller ClassLabel)")
    table = ds.select_columns([image_column])
    if isinstance(table.features[image_column], datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))  # bytes: decoded here, like files
    return HFData(table=table, column=image_column, labels=labels, names=names, folders=keys, source=where)


def _class_names(keys: list[str], classes: Any, where: str) -> list[str]:
    """Readable names for the label keys, from ``classes`` when given (see :func:`open_hf_data`)."""
    if classes is None:
        return [k.replace("_", " ") for k in keys]
    if isinstance(classes, (list, tuple)):
        if len(classes) != len(keys) or not all(isinstance(c, str) for c in classes):
            raise BuildInputError(f"expected {len(keys)} class names (one per label), got {len(classes)}",
                                  field="classes", file=where)
        names = list(classes)
    else:
        cmap = load_class_map(classes) if isinstance(classes, (str, os.PathLike)) else dict(classes)
        missing = [k for k in keys if k not in cmap]
        if missing:
            raise BuildInputError(f"{len(missing)} label(s) have no name in the class map: {missing[:20]}",
                                  field="--classes", file=where,
                                  fix="key the map by the dataset's ClassLabel names (or label values)")
        names = [cmap[k] for k in keys]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise BuildInputError(f"two labels map to the same class name: {dups[:5]}", field="--classes", file=where)
    return names


def _open(cell: Any) -> Image.Image:
    """One image cell (``{"bytes", "path"}``, bytes, or a PIL image) opened lazily with PIL (only the
    header is read until the pixels are asked for)."""
    if isinstance(cell, Image.Image):
        return cell
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if data is None:
            if not path:
                raise ValueError("empty image cell")
            return Image.open(path)
        cell = data
    if not isinstance(cell, (bytes, bytearray, memoryview)):
        raise ValueError(f"not an image: {type(cell).__name__}")
    return Image.open(io.BytesIO(cell))


def _decode(cell: Any, size: int) -> torch.Tensor:
    """One image cell (see :func:`_open`) -> uint8 [3, size, size]."""
    if isinstance(cell, Image.Image):
        return pil_to_square(cell, size)
    with _open(cell) as im:
        return pil_to_square(im, size)


class HFData:
    """A Hugging Face dataset as build input: the same interface as
    :class:`~hellofmt.builder.inputs.ImageFolder` / :class:`~hellofmt.builder.inputs.TensorData`
    (``names``, ``num_classes``, ``labels`` [N] int64, ``len``) plus :meth:`dataset_for` and
    :meth:`load_all`, which :func:`~hellofmt.builder.inputs.dataset_for` and
    :func:`~hellofmt.builder.inputs.load_all` hand over to.

    ``folders`` are the ``ClassLabel`` names (the keys of ``--classes``). ``skipped`` works as an image
    folder's: with a :class:`~hellofmt.builder.inputs.SkippedImages` there, a row that fails to decode is
    replaced by the next row of the subset and recorded (as ``SOURCE#row=N``); without one, it raises."""

    def __init__(self, *, table: Any, column: str, labels: torch.Tensor, names: list[str], folders: list[str],
                 source: str):
        self.table = table
        self.column = column
        self.labels = labels
        self.names = names
        self.folders = folders
        self.source = source
        self.skipped: SkippedImages | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def row_name(self, row: int) -> str:
        """How messages and the manifest name row ``row``."""
        return f"{self.source}#row={int(row)}"

    def decode(self, row: int, size: int) -> torch.Tensor:
        """Row ``row``'s image as uint8 [3, size, size]; raises whatever the decoder raises."""
        return _decode(self.table[int(row)][self.column], size)

    def native_size(self, row: int) -> tuple[int, int]:
        """Row ``row``'s image (width, height) as stored, from its header."""
        cell = self.table[int(row)][self.column]
        if isinstance(cell, Image.Image):
            return cell.size
        with _open(cell) as im:
            return im.size

    def dataset_for(self, indices: list[int], size: int) -> torch.utils.data.Dataset:
        """A map-style dataset of ``(uint8 square, label, skipped)`` over the given rows."""
        return HFRows(self, indices, size)

    def load_all(self, indices: list[int], size: int, *, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The given rows as one uint8 [n,3,size,size] tensor plus labels (small subsets only), decoded by
        ``num_workers`` threads; undecodable rows are replaced and recorded as :class:`HFRows` does."""
        return decode_all(HFRows(self, indices, size), num_workers=num_workers)


class HFRows(StandInDataset):
    """Rows ``indices`` of an :class:`HFData` as ``(uint8 [3, size, size], label, skipped)``, like
    :class:`~hellofmt.builder.inputs.FolderDataset`: with ``data.skipped`` set, an undecodable row is
    replaced by the next row of the subset (cyclically) and reported in ``skipped`` as ``(name, reason)``
    pairs for the consumer to record; without it, the failure raises BuildInputError naming the row."""

    def __init__(self, data: HFData, indices: list[int], size: int):
        super().__init__(indices, size)
        self.data = data

    @property
    def skipped(self) -> SkippedImages | None:
        """Where the consumer records the rows that failed (the data's)."""
        return self.data.skipped

    def _decode(self, j: int) -> tuple[torch.Tensor, int]:
        return self.data.decode(j, self.size), int(self.data.labels[j])

    def _name(self, j: int) -> str:
        return self.data.row_name(j)

    def _unreadable(self, j: int, e: Exception) -> BuildInputError:
        return BuildInputError(f"cannot decode the image of row {j}: {type(e).__name__}: {e}",
                               file=self.data.source, field=self.data.column, fix="re-encode or drop the bad rows")

    def _broken(self, failed: list[tuple[str, str]]) -> BuildInputError:
        return BuildInputError(f"{len(failed)} rows in a row failed to decode: {'; '.join(p for p, _ in failed[:5])}",
                               file=self.data.source, field=self.data.column,
                               fix="check the dataset (were the image bytes written?)")
