"""Every error hellofmt raises on purpose.

One base class, :class:`HellofmtError`, so callers can catch everything a user can cause with one
``except``. Each error carries the file it concerns, the field inside it, and what to do about it;
``str(err)`` joins them into one line such as::

    bundle/hellofmt.json: foundation.weights_sha256: expected 64 hex characters (rebuild the bundle)

Subclasses also derive from the closest built-in exception (``ValueError``, ``FileNotFoundError``,
...) so code that already catches those keeps working.
"""

from __future__ import annotations

import os

__all__ = [
    "HellofmtError",
    "ManifestError",
    "FormatVersionError",
    "ManifestDigestError",
    "BundleError",
    "BundleNotFoundError",
    "MissingFileError",
    "UnsafePathError",
    "UnsafeFileNameError",
    "IntegrityError",
    "BundleExistsError",
    "BundleLockedError",
    "BundleChangedError",
    "ImageStoreError",
    "ImageDecodeError",
    "TensorFileError",
    "ProjectorError",
    "FoundationError",
    "FingerprintMismatchError",
    "ModelConfigError",
    "ProbeMismatchError",
    "InputError",
    "BuildError",
    "BuildInputError",
    "TeacherError",
    "EvalError",
    "EvalInputError",
    "HubError",
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "AuthenticationError",
    "OfflineError",
]


class HellofmtError(Exception):
    """Base class of every error hellofmt raises on purpose.

    Args:
        message: what is wrong, in one sentence.
        file: the file (or directory, or Hub repository) concerned, if any.
        field: the field inside it, as a dotted path (``images.shards[0].count``), if any.
        fix: what the user should do about it, if there is something to say.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | os.PathLike[str] | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.message = message
        self.file = os.fspath(file) if file is not None else None
        self.field = field
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [p for p in (self.file, self.field) if p]
        text = ": ".join([*parts, self.message])
        if self.fix:
            text += f" ({self.fix})"
        return text

    def __reduce__(self):  # keeps errors picklable across torch.distributed / multiprocessing
        return (_rebuild, (type(self), self.message, self.file, self.field, self.fix))


def _rebuild(cls, message, file, field, fix):
    return cls(message, file=file, field=field, fix=fix)


# --- bundle format -------------------------------------------------------------------------------
class ManifestError(HellofmtError, ValueError):
    """The manifest (``hellofmt.json``) is missing a field, has a wrong type, or is not JSON."""


class FormatVersionError(ManifestError):
    """The bundle was written for a newer major format version than this hellofmt reads."""


class ManifestDigestError(ManifestError):
    """The manifest's ``manifest_sha256`` is missing where its format version requires it, malformed,
    given twice, or does not match the manifest: it changed after it was written."""


class BundleError(HellofmtError):
    """A bundle on disk is unusable: a structural problem not covered by a narrower class."""


class BundleNotFoundError(BundleError, FileNotFoundError):
    """The path given is not a bundle (no directory, or no ``hellofmt.json`` in it)."""


class MissingFileError(BundleError, FileNotFoundError):
    """A file the manifest lists is absent."""


class UnsafePathError(BundleError):
    """A file name escapes the bundle (``..``, an absolute path, a symlink leading out)."""


class UnsafeFileNameError(UnsafePathError, ManifestError):
    """A manifest names a file that could escape the bundle (``..``, absolute, ``/``): both an
    :class:`UnsafePathError` (what it is) and a :class:`ManifestError` (where it was found)."""


class IntegrityError(BundleError):
    """A file's size or sha256 differs from what the manifest records: corruption or tampering."""


class BundleExistsError(BundleError, FileExistsError):
    """The output path exists and replacing it was not asked for."""


class BundleLockedError(BundleError):
    """Another process is writing or replacing the same bundle path (its lock is held)."""


class BundleChangedError(BundleError):
    """The bundle was replaced or removed while it was being read; opening it again gives the new one."""


class TensorFileError(BundleError):
    """A safetensors file is truncated, has a hostile header, or lacks a tensor it must have."""


class ImageStoreError(BundleError):
    """An image shard is inconsistent: offsets, labels, counts or sizes."""


class ImageDecodeError(ImageStoreError):
    """An encoded image failed to decode, or decoded to the wrong size."""


# --- projector and foundation --------------------------------------------------------------------
class ProjectorError(HellofmtError):
    """The low-rank deltas do not fit the foundation model (missing target, wrong shape, rank)."""


class FoundationError(HellofmtError):
    """The foundation model cannot be resolved: unknown architecture or tag, unreadable weights."""


class FingerprintMismatchError(FoundationError):
    """The foundation weights differ from the ones the bundle was built with."""


class ModelConfigError(FoundationError, ValueError):
    """A foundation model config (from a manifest or a config file) has a key outside the allow-list,
    a value of the wrong type or out of its bounds, or describes a model too large to build."""


class ProbeMismatchError(HellofmtError):
    """The projector no longer reproduces the labels the builder recorded in the manifest's probe."""


class InputError(HellofmtError, ValueError):
    """An argument passed to a hellofmt function is out of range or of the wrong kind."""


# --- build ---------------------------------------------------------------------------------------
class BuildError(HellofmtError):
    """The build pipeline cannot go on."""


class BuildInputError(BuildError, ValueError):
    """A build input (training data, class map, option) is unusable; checked before heavy work."""


class TeacherError(BuildError):
    """A teacher cannot be loaded or gives unusable outputs (wrong class count, NaN)."""


# --- evaluation ----------------------------------------------------------------------------------
class EvalError(HellofmtError):
    """``hellofmt eval`` cannot go on: a student or a labeller fails while training or evaluating."""


class EvalInputError(EvalError, ValueError):
    """An eval input (validation folder, arm, protocol, student spec, option) is unusable; checked
    before any student is trained."""


# --- Hugging Face Hub ----------------------------------------------------------------------------
class HubError(HellofmtError):
    """Talking to the Hugging Face Hub failed."""


class RepositoryNotFoundError(HubError):
    """The Hub repository does not exist (or is private and no token was given)."""


class RevisionNotFoundError(HubError):
    """The repository exists but the revision (branch, tag or commit) does not."""


class AuthenticationError(HubError):
    """The Hub needs a token, or refused the one given."""


class OfflineError(HubError):
    """The Hub cannot be reached and nothing usable is in the local cache."""
