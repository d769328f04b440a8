"""A bundle on disk: open and check it (:class:`Bundle`), write it atomically (:class:`BundleWriter`).

A bundle is a flat directory: ``hellofmt.json`` (the manifest), image shards, ``projector.safetensors``,
optionally ``foundation.safetensors`` and a ``README.md`` dataset card. The manifest records the size
and sha256 of every other file; opening checks sizes (cheap), ``verify`` checks hashes (reads all).

Writing goes through a temporary directory beside the target, on the same filesystem, so the final
``rename`` is atomic: a reader sees the old bundle or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save

from .errors import (
    BundleError,
    BundleExistsError,
    BundleNotFoundError,
    HellofmtError,
    ImageStoreError,
    InputError,
    IntegrityError,
    ManifestError,
    MissingFileError,
    UnsafePathError,
)
from .fingerprint import fingerprint
from .imagestore import check_codec, encode_shards, read_shard
from .manifest import (
    CARD_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileEntry,
    ImagesInfo,
    Manifest,
    Shard,
    check_file_name,
)
from .tensorfile import PROJECTOR_DTYPES, load_safetensors

__all__ = [
    "UnlistedFileWarning",
    "Bundle",
    "BundleWriter",
    "sha256_file",
]

_CHUNK = 1024 * 1024


class UnlistedFileWarning(UserWarning):
    """A bundle holds a file its manifest does not list; it is ignored."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 (lowercase hex) of a file's exact bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _matrix_shape(shape: list[int]) -> tuple[int, int]:
    # Same rule as lowrank.as_matrix_shape (kept local: the format layer does not import the maths).
    return int(shape[0]), int(math.prod(shape[1:]))


class Bundle:
    """An opened, checked bundle directory.

    Attributes:
        path: the bundle directory.
        manifest: the validated manifest.
    """

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, {self.manifest.images.count} images, {self.manifest.num_classes} classes)"

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool = False) -> "Bundle":
        """Open the bundle at ``path``: validate the manifest, check every listed file.

        Every file the manifest lists must exist, be a regular file inside the bundle (a symlink
        leading out raises UnsafePathError) and have the listed size (IntegrityError). Unlisted
        files other than ``README.md`` give an :class:`UnlistedFileWarning`. With ``verify=True``
        the sha256 of every file is checked too (IntegrityError naming the first bad file).
        """
        bundle = cls.open_unchecked(path)
        for name, entry in bundle.manifest.files.items():
            bundle._check_size(name, entry)
        bundle._warn_unlisted()
        if verify:
            for name, entry in bundle.manifest.files.items():
                bundle._check_hash(name, entry)
        return bundle

    @classmethod
    def open_unchecked(cls, path: str | os.PathLike[str]) -> "Bundle":
        """Read and validate the manifest only, checking no other file: what :meth:`verify` and
        ``hellofmt verify`` start from, so that every file problem becomes a report line.

        Raises BundleNotFoundError (no directory or no manifest), UnsafePathError or ManifestError.
        """
        root = Path(path)
        if not root.is_dir():
            raise BundleNotFoundError("no such bundle directory", file=root,
                                      fix="give the path of a directory holding hellofmt.json")
        mpath = root / MANIFEST_NAME
        if not mpath.exists() and not mpath.is_symlink():
            raise BundleNotFoundError(f"no {MANIFEST_NAME} in the directory", file=root,
                                      fix="this is not a hellofmt bundle, or its download is incomplete")
        bundle = cls(root, None)  # type: ignore[arg-type]
        mpath = bundle._safe(MANIFEST_NAME, field="manifest")
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit", file=mpath)
        bundle.manifest = Manifest.from_json(mpath.read_bytes(), file=str(mpath))
        return bundle

    def _safe(self, name: str, field: str | None = None) -> Path:
        check_file_name(name, str(self.path / MANIFEST_NAME), field or f"files.{name}")
        p = self.path / name
        if not p.exists() and not p.is_symlink():
            raise MissingFileError("listed in the manifest but absent", file=p, field=field or f"files.{name}",
                                   fix="the download is incomplete: pull the bundle again")
        try:
            real = p.resolve(strict=True)
        except (OSError, RuntimeError):
            raise UnsafePathError("is a broken or looping symlink", file=p, field=field or f"files.{name}") from None
        root = self.path.resolve()
        # huggingface_hub's cache keeps a snapshot's files as symlinks <repo>/snapshots/<commit>/<name>
        # -> <repo>/blobs/<hash>: that one store, of the same repository, is allowed as a target.
        hf_blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
        if real.parent != root and real.parent != hf_blobs:
            raise UnsafePathError(f"leads out of the bundle (to {real})", file=p, field=field or f"files.{name}",
                                  fix="bundle files must be plain files inside the bundle directory")
        if not stat.S_ISREG(real.stat().st_mode):
            raise UnsafePathError("is not a regular file", file=p, field=field or f"files.{name}")
        return real

    def file(self, name: str) -> Path:
        """The checked path of bundle file ``name``: a plain name, present, a regular file inside
        the bundle (symlinks resolved). Raises MissingFileError or UnsafePathError."""
        return self._safe(name)

    def _unlisted(self) -> list[str]:
        # ".cache" holds huggingface_hub's metadata after a download into a directory (pull DIR).
        known = set(self.manifest.files) | {MANIFEST_NAME, CARD_NAME, ".cache"}
        return sorted(e.name for e in os.scandir(self.path) if e.name not in known)

    def _warn_unlisted(self) -> None:
        for name in self._unlisted():
            warnings.warn(f"{self.path / name}: not listed in the manifest; ignored", UnlistedFileWarning, stacklevel=3)

    def _check_size(self, name: str, entry: FileEntry) -> None:
        p = self.file(name)
        size = p.stat().st_size
        if size != entry.size:
            raise IntegrityError(
                f"file is {size} bytes, the manifest says {entry.size}",
                file=p, field=f"files.{name}.size", fix="the file is truncated or altered: re-download or rebuild",
            )

    def _check_hash(self, name: str, entry: FileEntry) -> None:
        p = self.file(name)
        digest = sha256_file(p)
        if digest != entry.sha256:
            raise IntegrityError(
                f"sha256 is {digest}, the manifest says {entry.sha256}", file=p, field=f"files.{name}.sha256",
                fix="the file is corrupt or was altered: re-download or rebuild the bundle",
            )

    # ---- checking ------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Check everything and return every problem, one line each (``[]`` when all is well).

        Covers: each listed file present, safe, of the listed size and sha256; unlisted files;
        every image of every shard decoding to the manifest's size, with valid offsets and labels
        and the manifest's counts; the projector tensors against the manifest's targets, ranks and
        dtype; the embedded foundation's fingerprint against ``foundation.weights_sha256``. The
        probe needs the model: :func:`hellofmt.verify.verify_bundle` checks it after these.
        """
        problems: list[str] = []

        def attempt(fn: Callable[[], Any]) -> bool:
            try:
                fn()
                return True
            except HellofmtError as e:
                problems.append(str(e))
                return False

        m = self.manifest
        healthy = set()
        for name, entry in m.files.items():
            def size_and_hash(name=name, entry=entry):
                self._check_size(name, entry)
                self._check_hash(name, entry)

            if attempt(size_and_hash):
                healthy.add(name)
        for name in self._unlisted():
            problems.append(f"{self.path / name}: not listed in the manifest (remove it or rebuild the bundle)")
        for shard in m.images.shards:
            if shard.file in healthy:
                attempt(lambda shard=shard: self._read_shard(shard))
        if m.projector.file in healthy:
            problems.extend(self._check_projector())
        if m.foundation.source == "embedded" and m.foundation.weights_file in healthy:
            attempt(self._check_embedded_foundation)
        return problems

    def _check_embedded_foundation(self) -> None:
        """The embedded weights must have the fingerprint the manifest pins (spec 6.1)."""
        f = self.manifest.foundation
        path = self.file(f.weights_file)
        tensors, _ = load_safetensors(path)
        # Loaded weights are float32 (spec 6.1), so a half-precision file fingerprints as its upcast.
        half = (torch.float16, torch.bfloat16)
        got = fingerprint({k: v.float() if v.dtype in half else v for k, v in tensors.items()})
        if got != f.weights_sha256:
            raise IntegrityError(
                f"embedded weights have fingerprint {got[:16]}..., the manifest pins {f.weights_sha256[:16]}...",
                file=path, field="foundation.weights_sha256", fix="rebuild the bundle",
            )

    def _check_projector(self) -> list[str]:
        m = self.manifest
        path = self.file(m.projector.file)
        try:
            tensors, meta = load_safetensors(path, dtypes=PROJECTOR_DTYPES)
        except HellofmtError as e:
            return [str(e)]
        out = []
        # Names, shapes and dtypes (scales too, for a quantised encoding) from the manifest's projector
        # section; None in a shape is the head's embedding width D, which the manifest does not record.
        want = m.projector.tensor_layout(m.num_classes)
        for name, (shape, dtype) in want.items():
            if name not in tensors:
                out.append(f"{path}: {name}: tensor listed by the manifest's projector is missing")
                continue
            got = list(tensors[name].shape)
            if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
                expected = ", ".join("D" if w is None else str(w) for w in shape)
                out.append(f"{path}: {name}: shape {got}, expected [{expected}]")
            if str(tensors[name].dtype).removeprefix("torch.") != dtype:
                out.append(f"{path}: {name}: dtype {tensors[name].dtype}, the manifest's projector.dtype "
                           f"{m.projector.dtype} needs {dtype}")
        for name in sorted(set(tensors) - set(want)):
            out.append(f"{path}: {name}: tensor not described by the manifest's projector")
        if meta.get("format", "hellofmt-projector") != "hellofmt-projector":
            out.append(f"{path}: __metadata__.format: expected 'hellofmt-projector', got {meta['format']!r}")
        return out

    # ---- reading -------------------------------------------------------------------------------
    def _read_shard(self, shard: Shard, out: torch.Tensor | None = None, num_threads: int | None = None):
        im = self.manifest.images
        return read_shard(
            self.file(shard.file), codec=im.codec, height=im.height, width=im.width,
            num_classes=self.manifest.num_classes, expected_count=shard.count, num_threads=num_threads,
            out=out, file=self.path / shard.file,
        )

    def read_images(self, *, num_threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode every image of every shard, in order: (uint8 [N, 3, H, W], int64 [N]).

        Shards are decoded straight into one preallocated tensor. Raises ImageStoreError /
        ImageDecodeError naming the shard and image on any inconsistency with the manifest.
        """
        im = self.manifest.images
        try:
            images = torch.empty((im.count, 3, im.height, im.width), dtype=torch.uint8)
        except (RuntimeError, MemoryError):
            need = im.count * 3 * im.height * im.width
            raise ImageStoreError(
                f"cannot allocate {need:,} bytes for {im.count} images of {im.height}x{im.width}",
                file=self.path / MANIFEST_NAME, field="images.count",
                fix="free memory, or check the bundle: a manifest claiming more images than its shards hold is corrupt",
            ) from None
        labels = []
        start = 0
        for shard in im.shards:
            _, lab = self._read_shard(shard, out=images[start : start + shard.count], num_threads=num_threads)
            labels.append(lab)
            start += shard.count
        labels_t = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)
        per_class = torch.bincount(labels_t, minlength=self.manifest.num_classes).tolist()
        if per_class != im.per_class:
            raise ImageStoreError(
                f"labels give per-class counts {per_class[:8]}..., the manifest says {im.per_class[:8]}...",
                file=self.path / MANIFEST_NAME, field="images.per_class", fix="rebuild the bundle",
            )
        return images, labels_t

    def projector_tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The low-rank delta tensors of ``projector.safetensors`` (header checked first).

        Raises TensorFileError for a truncated or hostile file.
        """
        tensors, _ = load_safetensors(self.file(self.manifest.projector.file), device=device, dtypes=PROJECTOR_DTYPES)
        return tensors

    def foundation_path(self) -> Path | None:
        """The embedded ``foundation.safetensors`` (checked path), or None when the foundation is
        referenced rather than embedded."""
        f = self.manifest.foundation
        if f.source != "embedded":
            return None
        return self.file(f.weights_file)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


class BundleWriter:
    """Write a bundle atomically. Use as a context manager::

        with BundleWriter(out) as w:
            manifest.images = w.write_images(images, labels, num_classes=len(classes))
            w.write_tensors("projector.safetensors", deltas, {"format": "hellofmt-projector"})
            w.commit(manifest)

    Files go to ``tmpdir`` (beside ``out``, same filesystem), hashed as they are written and fsynced.
    ``commit`` writes the manifest and renames the directory into place. An existing ``out`` is
    replaced only with ``overwrite=True`` (moved aside, the new bundle renamed in, the old one
    deleted). If anything fails before ``commit`` completes, ``tmpdir`` is removed and ``out`` is
    untouched.
    """

    def __init__(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        if (self.out.exists() or self.out.is_symlink()) and not overwrite:
            raise BundleExistsError("already exists", file=self.out, fix="choose another path or pass overwrite=True")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self._files: dict[str, FileEntry] = {}
        self.committed = False

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def abort(self) -> None:
        """Remove the temporary directory; ``out`` is left as it was. Safe to call twice."""
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _check_open(self) -> None:
        if self.committed:
            raise BundleError("the writer has already committed", file=self.out)
        if not self.tmpdir.is_dir():
            raise BundleError("the writer was aborted", file=self.out)

    def write_bytes(self, name: str, data: bytes | memoryview) -> FileEntry:
        """Write one file of the bundle from memory, hashing it as it is written, then fsync."""
        self._check_open()
        check_file_name(name, None, "name")
        if name in (MANIFEST_NAME, CARD_NAME) or name in self._files:
            raise InputError(f"{name!r} is reserved or already written", field="name")
        h = hashlib.sha256()
        view = memoryview(data).cast("B")
        with open(self.tmpdir / name, "xb") as f:
            for i in range(0, len(view), 64 * _CHUNK):
                chunk = view[i : i + 64 * _CHUNK]
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        entry = FileEntry(sha256=h.hexdigest(), size=len(view))
        self._files[name] = entry
        return entry

    def write_images(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_classes: int,
        codec: str = "png",
        quality: int | None = None,
        max_shard_bytes: int | None = None,
        num_threads: int | None = None,
    ) -> ImagesInfo:
        """Encode and write the image shards; return the manifest's ``images`` section for them.

        ``images`` is uint8 [N, 3, H, W], ``labels`` integer [N] in ``[0, num_classes)``
        (InputError otherwise).
        """
        self._check_open()
        if any(n.startswith("images-") for n in self._files):
            raise InputError("images were already written to this bundle", field="images")
        if isinstance(labels, torch.Tensor) and labels.numel() and not labels.dtype.is_floating_point:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                raise InputError(f"labels must be in [0, {num_classes}), got values in [{lo}, {hi}]", field="labels")
        shards = []
        for name, count, payload in encode_shards(
            images, labels, codec=codec, quality=quality, max_shard_bytes=max_shard_bytes, num_threads=num_threads
        ):
            self.write_bytes(name, payload)
            shards.append(Shard(file=name, count=count))
        q = check_codec(codec, quality)
        per_class = torch.bincount(labels.detach().cpu().to(torch.int64), minlength=num_classes).tolist()
        return ImagesInfo(
            count=int(images.shape[0]), codec=codec, quality=q, height=int(images.shape[2]),
            width=int(images.shape[3]), shards=shards, per_class=per_class,
        )

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> FileEntry:
        """Write ``tensors`` as the safetensors file ``name`` with ``metadata`` as its ``__metadata__``."""
        self._check_open()
        try:
            payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
        except Exception as e:  # shared storage, non-string metadata, ...
            raise InputError(f"cannot serialise tensors: {e}", field=name) from None
        return self.write_bytes(name, payload)

    def commit(self, manifest: Manifest) -> Path:
        """Fill ``manifest.files``, validate the manifest, write it, fsync, rename into place.

        Returns the final bundle path. Raises ManifestError (nothing is moved) if the manifest is
        invalid or refers to a file that was not written.
        """
        self._check_open()
        manifest.files = dict(sorted(self._files.items()))
        manifest.validate(file=str(self.out / MANIFEST_NAME))
        text = manifest.to_json().encode("utf-8")
        with open(self.tmpdir / MANIFEST_NAME, "xb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.tmpdir)
        aside = None
        if self.out.exists() or self.out.is_symlink():
            if not self.overwrite:
                raise BundleExistsError("appeared while writing", file=self.out, fix="pass overwrite=True to replace it")
            aside = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            aside.rmdir()  # only the unique name is wanted; rename needs it free
            os.rename(self.out, aside)
        try:
            os.rename(self.tmpdir, self.out)
        except BaseException:
            if aside is not None:
                os.rename(aside, self.out)
            raise
        self.committed = True
        _fsync_dir(self.out.parent)
        if aside is not None:
            _remove(aside)
        return self.out
