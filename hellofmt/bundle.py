"""A bundle on disk: open and check it (:class:`Bundle`), write it atomically (:class:`BundleWriter`).

A bundle is a flat directory: ``hellofmt.json`` (the manifest), image shards, ``projector.safetensors``,
optionally ``foundation.safetensors``, and the unlisted extras ``hellofmt push`` writes for the Hub page
(``manifest.EXTRA_NAMES``: the ``README.md`` dataset card, ``preview.png``, ``viewer.parquet``), which
readers ignore. The manifest records the size and sha256 of every other file; opening checks sizes
(cheap), ``verify`` checks hashes (reads all).

Writing goes through a temporary directory beside the target, on the same filesystem, under a lock
on the target; the directory is then renamed in, or atomically exchanged with the bundle it
replaces, so the target always holds the old complete bundle or the new one, whenever a writer
stops. A reader opens the directory once and reads every file through that handle, so it gets the
version it opened (or a BundleChangedError once that one is deleted), never a mix of two. The
protocol, and what a crash leaves and who cleans it, is spec section 10.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import math
import os
import re
import secrets
import shutil
import stat
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to an exclusive create
    fcntl = None  # type: ignore[assignment]

import torch
from safetensors.torch import save

from .errors import (
    BundleChangedError,
    BundleError,
    BundleExistsError,
    BundleLockedError,
    BundleNotFoundError,
    HellofmtError,
    ImageStoreError,
    InputError,
    IntegrityError,
    ManifestDigestError,
    ManifestError,
    MissingFileError,
    UnsafePathError,
)
from .fingerprint import fingerprint
from .imagestore import check_codec, encode_shards, read_shard
from .manifest import (
    EXTRA_NAMES,
    MANIFEST_NAME,
    MAX_FILE_NAME_BYTES,
    MAX_MANIFEST_BYTES,
    FileEntry,
    ImagesInfo,
    Manifest,
    MissingDigestWarning,
    Shard,
    check_file_name,
    manifest_digest,
)
from .tensorfile import PROJECTOR_DTYPES, load_safetensors

__all__ = [
    "UnlistedFileWarning",
    "Bundle",
    "BundleWriter",
    "DEBRIS_MARKER",
    "recover",
    "sha256_file",
    "from_hub_cache",
    "missing_file_hint",
    "update_manifest",
    "reseal_manifest",
    "open_for_report",
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


def from_hub_cache(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a bundle that came from the Hugging Face Hub: a snapshot in the cache
    (``<repo>/snapshots/<commit>``) or a folder ``hellofmt pull`` downloaded into (its ``.cache``
    holds huggingface_hub's download metadata)."""
    p = Path(os.path.abspath(path))
    return (p.parent.name == "snapshots" and (p.parent.parent / "blobs").is_dir()) or \
        (p / ".cache" / "huggingface").is_dir()


def missing_file_hint(path: str | os.PathLike[str]) -> str:
    """What to do about a bundle file that is absent, by where the bundle came from."""
    if from_hub_cache(path):
        return "the download is incomplete: pull the bundle again"
    return "the folder is incomplete: copy the whole bundle folder again, or rebuild it"


def open_for_report(path: str | os.PathLike[str]) -> tuple[Bundle, list[str]]:
    """Open a bundle to report on it even when it is damaged (``hellofmt info``): the manifest must
    parse and be valid, but a digest mismatch and every listed file that is absent, unsafe or of the
    wrong size are returned as problem lines instead of raised, so a report can show everything the
    manifest says and then what is wrong.

    Raises:
        BundleNotFoundError, ManifestError: there is no manifest to report on.
    """
    problems: list[str] = []
    try:
        bundle = Bundle.open_unchecked(path)
    except ManifestDigestError as e:
        problems.append(str(e))
        bundle = Bundle.open_unchecked(path, check_digest=False)
    problems += bundle.file_problems()
    return bundle, problems


def _matrix_shape(shape: list[int]) -> tuple[int, int]:
    # Same rule as lowrank.as_matrix_shape (kept local: the format layer does not import the maths).
    return int(shape[0]), int(math.prod(shape[1:]))


class Bundle:
    """An opened, checked bundle directory.

    Attributes:
        path: the bundle directory.
        manifest: the validated manifest.
    """

    def __init__(self, path: Path, manifest: Manifest, *, dir_fd: int | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        # The version this Bundle reads: an open descriptor of the directory, and where the
        # platform allows, a path through it (/proc/self/fd/N on Linux), so that every file is read
        # from the directory the manifest came from even if the path is replaced meanwhile.
        self._fd = dir_fd
        self._root = _pinned_root(dir_fd) or self.path
        self._seen: dict[str, tuple[int, int]] = {}

    def close(self) -> None:
        """Let go of the directory this Bundle pinned; later reads go by path. Safe to call twice."""
        fd, self._fd, self._root = self._fd, None, self.path
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # a finaliser never raises (interpreter shutdown)
            self.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # A descriptor means nothing in another process: an unpickled Bundle reads by path.
        state = dict(self.__dict__)
        state.update(_fd=None, _root=self.path)
        return state

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, {self.manifest.images.count} images, {self.manifest.num_classes} classes)"

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool = False, check_digest: bool = True) -> Bundle:
        """Open the bundle at ``path``: validate the manifest, check every listed file.

        Every file the manifest lists must exist, be a regular file inside the bundle (a symlink
        leading out raises UnsafePathError) and have the listed size (IntegrityError). Unlisted
        files other than the extras of ``manifest.EXTRA_NAMES`` (card, preview, viewer table) give an
        :class:`UnlistedFileWarning`. With ``verify=True``
        the sha256 of every file is checked too (IntegrityError naming the first bad file). The
        manifest's own digest is checked first (ManifestDigestError), unless ``check_digest=False``.
        """
        bundle = cls.open_unchecked(path, check_digest=check_digest)
        try:
            for name, entry in bundle.manifest.files.items():
                bundle._check_size(name, entry)
            bundle._warn_unlisted()
            if verify:
                for name, entry in bundle.manifest.files.items():
                    bundle._check_hash(name, entry)
        except BaseException:
            bundle.close()
            raise
        return bundle

    @classmethod
    def open_unchecked(cls, path: str | os.PathLike[str], *, check_digest: bool = True) -> Bundle:
        """Read and validate the manifest only (its digest too, unless ``check_digest=False``),
        checking no other file: what :meth:`verify` and ``hellofmt verify`` start from, so that
        every file problem becomes a report line.

        The directory is opened once and every later read goes through that handle (spec
        section 10): a replace of the bundle meanwhile gives this reader the version it opened,
        or a BundleChangedError once the old version is swept, never a mix of two.

        Raises BundleNotFoundError (no directory or no manifest), UnsafePathError or ManifestError.
        """
        root = Path(path)
        try:
            is_dir = stat.S_ISDIR(os.stat(root).st_mode)
        except (OSError, ValueError):  # ENOENT, ENAMETOOLONG, EACCES, an embedded NUL, ...
            is_dir = False
        if not is_dir and recover(root):  # an interrupted replace, finished where the platform needs it
            is_dir = root.is_dir()
        if not is_dir:
            raise BundleNotFoundError("no such bundle directory", file=root,
                                      fix="give the path of a directory holding hellofmt.json")
        try:
            fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:  # platforms that cannot open a directory: reads go by path
            fd = None
        bundle = cls(root, None, dir_fd=fd)  # type: ignore[arg-type]
        try:
            try:
                mpath = bundle._safe(MANIFEST_NAME, field="manifest")
            except MissingFileError:
                raise BundleNotFoundError(f"no {MANIFEST_NAME} in the directory", file=root,
                                          fix="this is not a hellofmt bundle, or its download is incomplete") from None
            try:
                with open(mpath, "rb") as f:
                    data = f.read(MAX_MANIFEST_BYTES + 1)
            except OSError as e:
                raise BundleError(f"cannot read: {e.strerror or e}", file=root / MANIFEST_NAME,
                                  field="manifest") from None
            if len(data) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"manifest is over the {MAX_MANIFEST_BYTES}-byte limit", file=root / MANIFEST_NAME)
            bundle.manifest = Manifest.from_json(data, file=str(root / MANIFEST_NAME), check_digest=check_digest)
        except BaseException:
            bundle.close()
            raise
        return bundle

    def _safe(self, name: str, field: str | None = None) -> Path:
        """The path to read bundle file ``name`` from, in the pinned directory, after its checks."""
        field = field or f"files.{name}"
        shown = self.path / name
        check_file_name(name, str(self.path / MANIFEST_NAME), field)
        self._check_not_replaced()
        p = self._root / name
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            self._check_not_replaced(gone=True)
            raise MissingFileError("listed in the manifest but absent", file=shown, field=field,
                                   fix=missing_file_hint(self.path)) from None
        except OSError as e:
            raise BundleError(f"cannot read: {e.strerror or e}", file=shown, field=field) from None
        if stat.S_ISLNK(st.st_mode):
            try:
                real = Path(os.path.realpath(p, strict=True))
                root = Path(os.path.realpath(self._root, strict=True))
                st = os.stat(p)
            except (OSError, RuntimeError):
                raise UnsafePathError("is a broken or looping symlink", file=shown, field=field,
                                      fix=missing_file_hint(self.path)) from None
            # huggingface_hub's cache keeps a snapshot's files as symlinks <repo>/snapshots/<commit>/<name>
            # -> <repo>/blobs/<hash>: that one store, of the same repository, is allowed as a target.
            hf_blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
            if real.parent != root and real.parent != hf_blobs:
                raise UnsafePathError(f"leads out of the bundle (to {real})", file=shown, field=field,
                                      fix="bundle files must be plain files inside the bundle directory")
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError("is not a regular file", file=shown, field=field)
        return p

    def _check_not_replaced(self, gone: bool = False) -> None:
        """Raise BundleChangedError if the directory this Bundle opened was removed (swept after a
        replace) or, where reads go by path, if another directory now stands at the path."""
        if self._fd is None:
            return
        try:
            pinned = os.fstat(self._fd)
            if pinned.st_nlink == 0:
                removed = True
            elif self._root is self.path or gone:  # is the path still the directory we opened?
                now = os.stat(self.path)
                removed = (now.st_dev, now.st_ino) != (pinned.st_dev, pinned.st_ino)
            else:
                removed = False
        except OSError:
            removed = gone
        if removed:
            raise BundleChangedError(
                "the bundle was replaced or removed while it was being read", file=self.path,
                fix="open it again to read the current version",
            )

    def _pinned(self, name: str) -> Path:
        """The checked path of file ``name`` in the pinned directory, for reading: the same file
        (device and inode) the size check saw when there was one, and of the listed size."""
        p = self._safe(name)
        st = self._stat(p, name)
        seen = self._seen.get(name)
        if seen is not None and seen != (st.st_dev, st.st_ino):
            raise BundleChangedError("the file was replaced since the bundle was opened", file=self.path / name,
                                     field=f"files.{name}", fix="open the bundle again")
        entry = self.manifest.files.get(name) if self.manifest is not None else None
        if entry is not None and st.st_size != entry.size:
            raise IntegrityError(
                f"file is {st.st_size} bytes, the manifest says {entry.size}", file=self.path / name,
                field=f"files.{name}.size", fix="the file is truncated or altered: re-download or rebuild",
            )
        return p

    def _stat(self, p: Path, name: str) -> os.stat_result:
        try:
            return os.stat(p)
        except OSError as e:  # removed since _safe looked: a sweep after a replace
            self._check_not_replaced(gone=True)
            raise MissingFileError(f"cannot read: {e.strerror or e}", file=self.path / name,
                                   field=f"files.{name}") from None

    def file(self, name: str) -> Path:
        """The checked path of bundle file ``name`` (``path / name``): a plain name, present, a
        regular file inside the bundle. Raises MissingFileError or UnsafePathError. The Bundle's
        own readers go through the directory it opened; a caller reading this path by itself
        reads whatever is at the path now."""
        self._safe(name)
        return self.path / name

    def file_problems(self) -> list[str]:
        """Every listed file that is absent, unsafe or of another size than the manifest says, one
        line each (``[]``: all present); hashes are not read. What ``hellofmt info`` lists for a
        damaged bundle."""
        problems = []
        for name, entry in self.manifest.files.items():
            try:
                self._check_size(name, entry)
            except HellofmtError as e:
                problems.append(str(e))
        return problems

    def _unlisted(self) -> list[str]:
        # ".cache" holds huggingface_hub's metadata after a download into a directory (pull DIR);
        # the debris marker appears in a replaced version while a writer deletes it.
        known = set(self.manifest.files) | {MANIFEST_NAME, *EXTRA_NAMES, ".cache", DEBRIS_MARKER}
        return sorted(e.name for e in os.scandir(self._root) if e.name not in known)

    def _warn_unlisted(self) -> None:
        for name in self._unlisted():
            warnings.warn(f"{self.path / name}: not listed in the manifest; ignored", UnlistedFileWarning, stacklevel=3)

    def _check_size(self, name: str, entry: FileEntry) -> None:
        st = self._stat(self._safe(name), name)
        if st.st_size != entry.size:
            raise IntegrityError(
                f"file is {st.st_size} bytes, the manifest says {entry.size}", file=self.path / name,
                field=f"files.{name}.size", fix="the file is truncated or altered: re-download or rebuild",
            )
        self._seen[name] = (st.st_dev, st.st_ino)

    def _check_hash(self, name: str, entry: FileEntry) -> None:
        try:
            digest = sha256_file(self._pinned(name))
        except OSError as e:  # removed between the check and the read: a sweep after a replace
            self._check_not_replaced(gone=True)
            raise MissingFileError(f"cannot read: {e.strerror or e}", file=self.path / name,
                                   field=f"files.{name}") from None
        if digest != entry.sha256:
            raise IntegrityError(
                f"sha256 is {digest}, the manifest says {entry.sha256}", file=self.path / name,
                field=f"files.{name}.sha256",
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
        tensors, _ = load_safetensors(self._pinned(f.weights_file), file=path)
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
            tensors, meta = load_safetensors(self._pinned(m.projector.file), file=path, dtypes=PROJECTOR_DTYPES)
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
    def _read_shard(self, shard: Shard, out: torch.Tensor | None = None, num_threads: int | None = None,
                    select: tuple[int, int] | None = None):
        im = self.manifest.images
        return read_shard(
            self._pinned(shard.file), codec=im.codec, height=im.height, width=im.width,
            num_classes=self.manifest.num_classes, expected_count=shard.count, num_threads=num_threads,
            out=out, file=self.path / shard.file, select=select,
        )

    def read_images(
        self, *, num_threads: int | None = None, start: int = 0, stop: int | None = None, verify: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode every image of every shard, in order: (uint8 [N, 3, H, W], int64 [N]).

        Shards are decoded straight into one preallocated tensor. ``start``/``stop`` decode only
        images ``start`` to ``stop - 1`` of the whole set (a rank's share under torch.distributed):
        only the shards holding them are read, and the per-class counts are checked only for the
        whole set (:meth:`check_per_class` checks gathered labels). ``verify`` checks the sha256 of
        each shard read, just before it is decoded. Raises ImageStoreError / ImageDecodeError naming
        the shard and image on any inconsistency with the manifest, IntegrityError for a bad hash.
        """
        im = self.manifest.images
        stop = im.count if stop is None else stop
        if not 0 <= start <= stop <= im.count:
            raise InputError(f"expected 0 <= start <= stop <= {im.count}, got {start}, {stop}", field="start")
        count = stop - start
        try:
            images = torch.empty((count, 3, im.height, im.width), dtype=torch.uint8)
        except (RuntimeError, MemoryError):
            need = count * 3 * im.height * im.width
            raise ImageStoreError(
                f"cannot allocate {need:,} bytes for {count} images of {im.height}x{im.width}",
                file=self.path / MANIFEST_NAME, field="images.count",
                fix="free memory, or check the bundle: a manifest claiming more images than its shards hold is corrupt",
            ) from None
        labels = []
        first = 0  # index of the shard's first image in the whole set
        for shard in im.shards:
            a, b = max(start, first), min(stop, first + shard.count)
            if a < b or (count == im.count and shard.count == 0):
                if verify:
                    self._check_hash(shard.file, self.manifest.files[shard.file])
                _, lab = self._read_shard(shard, out=images[a - start : b - start], num_threads=num_threads,
                                          select=(a - first, b - first))
                labels.append(lab)
            first += shard.count
        labels_t = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)
        if count == im.count:
            self.check_per_class(labels_t)
        return images, labels_t

    def check_hash(self, name: str) -> None:
        """Check file ``name``'s sha256 against the manifest (IntegrityError, MissingFileError)."""
        self._check_hash(name, self.manifest.files[name])

    def check_per_class(self, labels: torch.Tensor) -> None:
        """Check the labels of the whole image set against the manifest's per-class counts."""
        im = self.manifest.images
        labels_t = labels.cpu()
        per_class = torch.bincount(labels_t, minlength=self.manifest.num_classes).tolist()
        if per_class != im.per_class:
            raise ImageStoreError(
                f"labels give per-class counts {per_class[:8]}..., the manifest says {im.per_class[:8]}...",
                file=self.path / MANIFEST_NAME, field="images.per_class", fix="rebuild the bundle",
            )

    def projector_tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The low-rank delta tensors of ``projector.safetensors`` (header checked first).

        Raises TensorFileError for a truncated or hostile file.
        """
        name = self.manifest.projector.file
        tensors, _ = load_safetensors(self._pinned(name), file=self.path / name, device=device,
                                      dtypes=PROJECTOR_DTYPES)
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
# Everything a writer leaves beside a bundle OUT is named ".OUT.hellofmt-*" (spec section 10):
#   .OUT.hellofmt-lock         the lock file, held with flock while a writer works, removed on release
#   .OUT.hellofmt-tmp-<hex>    a bundle being written (holds the marker until it is complete), or,
#                              after an exchange, the previous bundle waiting to be deleted
#   .OUT.hellofmt-old-<hex>    the previous bundle, moved aside (platforms without an atomic exchange)
# Only directories with such a name AND the marker file, a hellofmt.json, or nothing at all, are
# ever deleted: a sweep never touches a user's file.
DEBRIS_MARKER = ".hellofmt-partial"
_LOCK_SUFFIX = ".hellofmt-lock"
_DEBRIS_RE = r"\.hellofmt-(tmp|old)-[0-9a-f]{12}"
_NAME_SLACK = len(".") + len(".hellofmt-tmp-") + 12  # what a writer adds to OUT's name

# Test hook: called with the name of every filesystem step a writer takes ("mkdir", "write:NAME",
# "exchange", ...), so a test can stop (SIGKILL) a writing process at each one.
_step_hook: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _step_hook is not None:
        _step_hook(name)


def _pinned_root(fd: int | None) -> Path | None:
    """A path that reaches the directory open as ``fd`` whatever happens to its name: Linux's
    /proc/self/fd/N. None where the platform has no such path (reads then go by path, checked
    against the descriptor's identity)."""
    if fd is None or not sys.platform.startswith("linux"):
        return None
    proc = Path(f"/proc/self/fd/{fd}")
    try:
        a, b = os.stat(proc), os.fstat(fd)
    except OSError:
        return None
    return proc if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) else None


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename inside it survives a crash (a no-op where directories cannot be opened)."""
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


# ---- atomic renames ------------------------------------------------------------------------------
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


@functools.lru_cache(maxsize=1)
def _rename_call():
    """(function, flag map) of the platform's flagged rename: Linux renameat2, macOS renamex_np."""
    import ctypes  # only for the flagged rename; kept out of the readers' path

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux"):
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            at_fdcwd = -100
            return (lambda a, b, f: fn(at_fdcwd, a, at_fdcwd, b, f)), {_RENAME_NOREPLACE: 1, _RENAME_EXCHANGE: 2}
        if sys.platform == "darwin":
            fn = libc.renamex_np
            fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
            return fn, {_RENAME_NOREPLACE: 0x4, _RENAME_EXCHANGE: 0x2}  # RENAME_EXCL, RENAME_SWAP
    except (OSError, AttributeError):  # an old C library without the call
        pass
    return None, {}


def _flagged_rename(src: Path, dst: Path, flag: int) -> bool:
    """Rename with ``flag`` (no-replace or exchange); False where the platform or the filesystem
    cannot, so the caller falls back. Other failures raise OSError."""
    import ctypes

    fn, flags = _rename_call()
    if fn is None:
        return False
    if fn(os.fsencode(src), os.fsencode(dst), flags[flag]) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


# ---- the lock ------------------------------------------------------------------------------------
class _Lock:
    """An exclusive lock on one bundle path: ``flock`` on ``.OUT.hellofmt-lock`` beside it.

    The holder removes the file when it lets go; a waiter that then locks a removed file sees
    that the path no longer names it and tries again, so a lock file is never shared by two.
    A killed holder's lock is released by the kernel; its file stays until the next writer.
    """

    def __init__(self, target: Path) -> None:
        self.path = target.parent / f".{target.name}{_LOCK_SUFFIX}"
        self.fd: int | None = None

    def acquire(self, timeout: float | None) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds (None: for ever; 0: not at all)."""
        if fcntl is None:  # no flock (Windows): an exclusive create; a crash leaves it behind
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                return True
            except FileExistsError:
                return False
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if timeout is None else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)
                continue
            except BaseException:
                os.close(fd)
                raise
            try:
                a, b = os.stat(self.path), os.fstat(fd)
                same = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return True
            os.close(fd)  # the previous holder removed it: lock the new one

    def holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid.isdigit() else "another process"

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            self.path.unlink()  # while still holding it: see the class docstring
        except FileNotFoundError:
            pass
        os.close(fd)


# ---- debris --------------------------------------------------------------------------------------
def _debris(target: Path) -> list[tuple[str, Path]]:
    """hellofmt's own leftovers beside ``target``: ("tmp" | "old", path), oldest first."""
    pattern = re.compile(re.escape(f".{target.name}") + _DEBRIS_RE)
    found = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    for e in entries:
        m = pattern.fullmatch(e.name)
        if m is None or not e.is_dir(follow_symlinks=False):
            continue
        path = Path(e.path)
        if _is_ours(path):
            found.append((e.stat(follow_symlinks=False).st_mtime_ns, m.group(1), path))
    return [(kind, path) for _, kind, path in sorted(found)]


def _is_ours(path: Path) -> bool:
    """A directory a writer made or moved aside: it holds the marker, a manifest, or nothing."""
    try:
        names = os.listdir(path)
        return not names or any(
            n in (DEBRIS_MARKER, MANIFEST_NAME) and stat.S_ISREG(os.lstat(path / n).st_mode) for n in names
        )
    except OSError:
        return False


def _complete(path: Path) -> bool:
    """A finished bundle directory: a manifest and no marker."""
    return (path / MANIFEST_NAME).is_file() and not os.path.lexists(path / DEBRIS_MARKER)


def _mark(path: Path) -> None:
    with open(path / DEBRIS_MARKER, "w", encoding="utf-8") as f:
        f.write("hellofmt: an unfinished or replaced bundle; the next writer of this path removes it\n")


def _remove_debris(path: Path) -> None:
    """Delete one of hellofmt's own directories (see :func:`_is_ours`). The marker goes in first
    and out last, so a sweep stopped half-way leaves a directory the next one still recognises."""
    if not _is_ours(path):
        return
    if not os.path.lexists(path / DEBRIS_MARKER):
        _mark(path)
        _step("mark-old")
    for e in sorted(os.scandir(path), key=lambda e: e.name):
        if e.name == DEBRIS_MARKER:
            continue
        if e.is_dir(follow_symlinks=False):  # huggingface_hub's .cache after pull DIR
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            os.unlink(e.path)
        _step(f"sweep:{e.name}")
    os.unlink(path / DEBRIS_MARKER)
    _step("sweep:marker")
    os.rmdir(path)
    _step("sweep:dir")


def _recover_and_sweep(target: Path) -> None:
    """Under the lock: finish an interrupted replace, then delete every leftover.

    Only a replace by two renames (no atomic exchange) can leave ``target`` missing: the old
    bundle moved aside, the new one not yet in. It is rolled forward when the new bundle is
    complete, else back. Then every other leftover of ``target`` is deleted.
    """
    debris = _debris(target)
    if not os.path.lexists(target):
        olds = [p for kind, p in debris if kind == "old" and _complete(p)]
        if olds:
            news = [p for kind, p in debris if kind == "tmp" and _complete(p)]
            os.rename((news or olds)[-1], target)
            fsync_dir(target.parent)
            debris = _debris(target)
    for _, path in debris:
        _remove_debris(path)


def recover(path: str | os.PathLike[str]) -> bool:
    """Finish or roll back an interrupted replace of the bundle at ``path`` and delete hellofmt's
    leftovers beside it, unless a writer holds its lock (then nothing is done). The next writer
    does this anyway; :meth:`Bundle.open` calls it when ``path`` is missing. Never raises.

    Returns:
        True when there were leftovers and they were dealt with.
    """
    target = Path(path).absolute()
    try:
        if not _debris(target):
            return False
        lock = _Lock(target)
        if not lock.acquire(0):
            return False
        try:
            _recover_and_sweep(target)
        finally:
            lock.release()
        return True
    except OSError:  # a read-only place, or no permission: leave it for a writer
        return False


def _what_is_there(path: Path) -> str | None:
    """None when ``path`` may be replaced (a bundle directory or an empty one), else what it is."""
    if path.is_symlink():
        return "is a symbolic link"
    if not path.is_dir():
        return "is a file, not a bundle directory"
    names = sorted(os.listdir(path))
    if not names or MANIFEST_NAME in names:
        return None
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"is a folder of {len(names)} other entries ({shown}), not a hellofmt bundle"


class BundleWriter:
    """Write a bundle atomically. Use as a context manager::

        with BundleWriter(out) as w:
            manifest.images = w.write_images(images, labels, num_classes=len(classes))
            w.write_tensors("projector.safetensors", deltas, {"format": "hellofmt-projector"})
            w.commit(manifest)

    The writer takes ``out``'s lock first (``.OUT.hellofmt-lock``: one writer per path; another
    gets :class:`~hellofmt.errors.BundleLockedError`, or waits up to ``lock_timeout`` seconds),
    finishes or sweeps what an earlier writer killed half-way left behind, then writes every
    file into ``tmpdir`` (beside ``out``, same filesystem, created with the umask's permissions),
    hashed as written and fsynced. ``commit`` writes the manifest and puts the directory in
    place: renamed in, or, replacing an existing bundle (``overwrite=True``), atomically
    exchanged with it where the platform can (Linux, macOS), then the old one deleted. At every
    instant ``out`` holds the old complete bundle or the new complete one (spec section 10). If
    anything fails before ``commit`` completes, ``tmpdir`` is removed and ``out`` is untouched.
    ``overwrite`` replaces only a bundle (a directory with a ``hellofmt.json``) or an empty
    directory, never a folder of other files.
    """

    def __init__(self, out: str | os.PathLike[str], *, overwrite: bool = False,
                 lock_timeout: float | None = 0.0) -> None:
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        self.committed = False
        self._files: dict[str, FileEntry] = {}
        self.tmpdir = self.out.parent / f".{self.out.name}.hellofmt-tmp-{secrets.token_hex(6)}"
        name_bytes = len(os.fsencode(self.out.name))
        if not self.out.name or name_bytes + _NAME_SLACK > MAX_FILE_NAME_BYTES:
            raise InputError(
                f"the bundle directory's name is {name_bytes} bytes; at most {MAX_FILE_NAME_BYTES - _NAME_SLACK} "
                "leave room for the writer's temporary names", file=self.out, field="out", fix="choose a shorter name",
            )
        self._lock = _Lock(self.out)
        with _os_errors(self.out):
            self.out.parent.mkdir(parents=True, exist_ok=True)
            _step("lock")
            if not self._lock.acquire(lock_timeout):
                raise BundleLockedError(
                    f"{self._lock.holder()} is writing this bundle (lock {self._lock.path.name})", file=self.out,
                    fix="wait for it to finish, or pass lock_timeout=None to wait",
                )
        try:
            with _os_errors(self.out):
                _recover_and_sweep(self.out)
                _step("swept")
                self._check_target()
                os.mkdir(self.tmpdir, 0o777)  # the umask decides, as for any directory the user makes
                _step("mkdir")
                _mark(self.tmpdir)
                _step("mark")
        except BaseException:
            self._lock.release()
            raise

    def _check_target(self) -> None:
        if not os.path.lexists(self.out):
            return
        if not self.overwrite:
            raise BundleExistsError("already exists", file=self.out, fix="choose another path or pass overwrite=True")
        what = _what_is_there(self.out)
        if what is not None:
            raise BundleExistsError(what, file=self.out,
                                    fix="overwrite replaces only a hellofmt bundle or an empty folder: choose "
                                    "another path, or move the files away")

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def abort(self) -> None:
        """Remove the temporary directory and let go of the lock; ``out`` is left as it was. Safe
        to call twice."""
        if not self.committed:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        self._lock.release()

    def _check_open(self) -> None:
        if self.committed:
            raise BundleError("the writer has already committed", file=self.out)
        if not self.tmpdir.is_dir():
            raise BundleError("the writer was aborted", file=self.out)

    def write_bytes(self, name: str, data: bytes | memoryview) -> FileEntry:
        """Write one file of the bundle from memory, hashing it as it is written, then fsync."""
        self._check_open()
        check_file_name(name, None, "name")
        if name in (MANIFEST_NAME, *EXTRA_NAMES, DEBRIS_MARKER) or name in self._files:
            raise InputError(f"{name!r} is reserved or already written", field="name")
        h = hashlib.sha256()
        view = memoryview(data).cast("B")
        with _os_errors(self.tmpdir / name):
            with open(self.tmpdir / name, "xb") as f:
                _step(f"create:{name}")
                for i in range(0, len(view), 64 * _CHUNK):
                    chunk = view[i : i + 64 * _CHUNK]
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                _step(f"write:{name}")
                os.fsync(f.fileno())
            _step(f"fsync:{name}")
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

    def write_tensors(
        self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> FileEntry:
        """Write ``tensors`` as the safetensors file ``name`` with ``metadata`` as its ``__metadata__``."""
        self._check_open()
        try:
            payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
        except Exception as e:  # shared storage, non-string metadata, ...
            raise InputError(f"cannot serialise tensors: {e}", field=name) from None
        return self.write_bytes(name, payload)

    def commit(self, manifest: Manifest) -> Path:
        """Fill ``manifest.files``, validate the manifest, write it, fsync, put the bundle in place.

        Returns the final bundle path. Raises ManifestError (nothing is moved) if the manifest is
        invalid or refers to a file that was not written; BundleExistsError if ``out`` is not
        replaceable; BundleError if the filesystem refuses a step (``out`` is then as it was).
        """
        self._check_open()
        manifest.files = dict(sorted(self._files.items()))
        manifest.validate(file=str(self.out / MANIFEST_NAME))
        text = manifest.to_json().encode("utf-8")
        with _os_errors(self.tmpdir / MANIFEST_NAME):
            with open(self.tmpdir / MANIFEST_NAME, "xb") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            _step("manifest")
            os.unlink(self.tmpdir / DEBRIS_MARKER)  # complete from here on
            _step("unmark")
            fsync_dir(self.tmpdir)
            _step("fsync-tmp")
        self._check_target()
        old = None
        with _os_errors(self.out):
            if not os.path.lexists(self.out):
                if not _flagged_rename(self.tmpdir, self.out, _RENAME_NOREPLACE):
                    os.rename(self.tmpdir, self.out)  # under the lock: nothing else of ours can be there
                _step("rename")
            elif _flagged_rename(self.tmpdir, self.out, _RENAME_EXCHANGE):
                old = self.tmpdir  # the exchange left the previous bundle under the temporary name
                _step("exchange")
            else:  # two renames: Bundle.open and the next writer finish an interrupted one (recover)
                old = self.out.parent / f".{self.out.name}.hellofmt-old-{secrets.token_hex(6)}"
                os.rename(self.out, old)
                _step("move-aside")
                try:
                    os.rename(self.tmpdir, self.out)
                except BaseException:
                    os.rename(old, self.out)
                    raise
                _step("move-in")
        self.committed = True
        try:
            fsync_dir(self.out.parent)
            _step("fsync-parent")
            if old is not None:
                _remove_debris(old)
        except OSError:  # the bundle is in place; the next writer sweeps what is left
            pass
        finally:
            self._lock.release()
            _step("unlock")
        return self.out


@contextlib.contextmanager
def _os_errors(file: Path):
    """The filesystem's refusals (no space, no permission, a name too long) as a BundleError."""
    try:
        yield
    except HellofmtError:
        raise
    except OSError as e:
        where = e.filename if isinstance(e.filename, str) else file
        raise BundleError(f"cannot write: {e.strerror or e}", file=where,
                          fix="check the path, the free space and the permissions") from None


def update_manifest(path: str | os.PathLike[str], change, *, lock_timeout: float | None = 30.0,
                    check_digest: bool = True) -> Manifest:
    """Rewrite a bundle's ``hellofmt.json`` in place under the bundle's write lock: ``change(manifest)``
    edits the manifest as it is now; the result is validated, written to a temporary file in the
    bundle, fsynced and renamed over the manifest, so a reader sees the old or the new one. The
    manifest is not in its own file list, so every file hash stays valid; its digest
    (``manifest_sha256``) is recomputed over the new text, under the lock. Used by
    ``hellofmt eval --record`` and, with ``check_digest=False`` (accept the manifest as it is now),
    by :func:`reseal_manifest`.

    Raises:
        BundleLockedError: a writer holds the bundle for longer than ``lock_timeout`` seconds.
    """
    target = Path(path)
    lock = _Lock(target)
    if not lock.acquire(lock_timeout):
        raise BundleLockedError(f"{lock.holder()} is writing this bundle (lock {lock.path.name})", file=target,
                                fix="wait for it to finish and try again")
    try:
        with Bundle.open(target, check_digest=check_digest) as bundle:
            manifest = bundle.manifest
        change(manifest)
        out = target / MANIFEST_NAME
        manifest.validate(file=str(out))
        tmp = target / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(manifest.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
        fsync_dir(target)
        return manifest
    finally:
        lock.release()


def reseal_manifest(path: str | os.PathLike[str], *, lock_timeout: float | None = 30.0) -> str:
    """Accept a bundle's manifest as it is now and write it back with a fresh ``manifest_sha256``
    (``hellofmt verify --fix-digest``): after an edit made on purpose, or to give an older bundle a
    digest. The manifest must still be valid; its fields are written back unchanged (unknown ones
    too), under the bundle's lock, atomically. Returns the new digest.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingDigestWarning)  # adding one is the point
        manifest = update_manifest(path, lambda m: None, lock_timeout=lock_timeout, check_digest=False)
    return manifest_digest(manifest.to_json())
