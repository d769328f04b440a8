"""Share bundles through the Hugging Face Hub: :func:`push`, :func:`pull`, :func:`dataset_card`.

A bundle directory is also the layout of its Hub dataset repository: ``hellofmt.json``, the image
shards, ``projector.safetensors`` (and ``foundation.safetensors`` when embedded), plus a
``README.md`` dataset card that :func:`push` writes, with a ``preview.png`` contact sheet embedded at its
top and, on request, a ``viewer.parquet`` table that feeds the Hub's dataset viewer (unlisted extras:
readers ignore them, spec section 1). Everything goes through huggingface_hub, so its
settings apply unchanged: ``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE`` (all read by huggingface_hub once, when it is imported).

:func:`pull` downloads into huggingface_hub's cache (or a given directory) and then checks the sha256
of every file against the manifest, so a bundle from the Hub is as trustworthy as one built locally.
Every failure a user can cause (no such repository, revision, token or network) is raised as a
:class:`~hellofmt.errors.HubError` subclass naming the repository and what to do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import (
    AuthenticationError,
    BundleNotFoundError,
    HellofmtError,
    HubError,
    InputError,
    IntegrityError,
    MissingFileError,
    OfflineError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from .manifest import CARD_NAME, EXTRA_NAMES, MANIFEST_NAME, PREVIEW_NAME, VIEWER_TABLE_NAME
from .summary import format_bytes, ratio_text, summarize

__all__ = ["REPO_TYPE", "is_hub_id", "parse_hub_id", "local_bundle", "pull", "push", "dataset_card",
           "write_viewer_table"]

REPO_TYPE = "dataset"
_HF_PREFIX = "hf://datasets/"
# Hub repository names: letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 characters.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^({_NAME})/({_NAME})$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
# The Hub's own git files: never part of a bundle, so pull skips them. So does it skip the Hub page's
# preview and viewer table (the viewer table is a second copy of the images).
_GIT_FILES = (".gitattributes", ".gitignore")
_PAGE_FILES = (PREVIEW_NAME, VIEWER_TABLE_NAME)
_VIEWER_ROW_GROUP = 100  # rows per Parquet row group: the Hub viewer reads images a row group at a time
_VIEWER_CHUNK = 1024  # images decoded at a time while writing the viewer table
_PYARROW_FIX = 'pip install pyarrow (or pip install "hellofmt[hf-datasets]", which brings it)'


# --------------------------------------------------------------------------------------------------
# Hub ids
# --------------------------------------------------------------------------------------------------
def parse_hub_id(source: str) -> tuple[str, str | None]:
    """Split a Hub reference into ``(repo_id, revision)``; raises InputError if it is not one.

    Accepted forms: ``user/name``, ``hf://datasets/user/name``, either followed by ``@revision``
    (a branch, tag or commit; ``None`` when absent). The repository is always a dataset repository.
    """
    text = os.fspath(source).strip() if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(text, str):
        raise InputError(f"expected a Hub id such as 'user/name', got {type(source).__name__}", field="repo_id")
    rest = text[len(_HF_PREFIX):] if text.startswith(_HF_PREFIX) else text
    repo_id, _, revision = rest.partition("@")
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        raise InputError(
            f"{text!r} is not a Hub dataset id",
            field="repo_id",
            fix="use USER/NAME or hf://datasets/USER/NAME, optionally followed by @REVISION",
        )
    if "@" in text and not revision:
        raise InputError(f"{text!r} has an empty revision after '@'", field="revision")
    return repo_id, revision or None


def is_hub_id(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names a Hub dataset (``user/name`` or ``hf://datasets/user/name``, with an
    optional ``@revision``) rather than a local path. It does not look at the file system: callers
    such as :class:`~hellofmt.DistilledDataset` check for an existing local directory first."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    try:
        parse_hub_id(os.fspath(source))
    except (InputError, TypeError):
        return False
    return True


def local_bundle(source: str | os.PathLike[str], *, verify: bool = True) -> Path:
    """The local directory of the bundle ``source`` names, as ``hellofmt info`` and ``verify`` take it.

    A local directory is returned as it is; a Hub id (``user/name``, as :class:`~hellofmt.DistilledDataset`
    accepts) that is not a local directory is pulled through the Hugging Face cache (:func:`pull`: one
    download, then offline from the cache); a file, such as ``bundle/hellofmt.json``, is refused with
    its folder as the fix.

    Args:
        source: a bundle directory or a Hub id.
        verify: for a Hub id, check every downloaded file's sha256 (see :func:`pull`).

    Returns:
        The bundle directory.

    Raises:
        BundleNotFoundError: ``source`` is a file, or neither a directory nor a Hub id.
        HubError: the Hub id could not be pulled (see :func:`pull`).
    """
    text = os.fspath(source)
    if os.path.isdir(text):
        return Path(text)
    if os.path.isfile(text):
        folder = os.path.dirname(text) or "."
        raise BundleNotFoundError(
            "is a file; a bundle is the directory that holds hellofmt.json and its files",
            file=text, fix=f"pass the folder: {folder}",
        )
    if is_hub_id(text):
        try:
            return pull(text, verify=verify)
        except (HubError, BundleNotFoundError) as e:  # perhaps a mistyped local path: say both
            raise type(e)(f"no local directory {text!r}; as a Hub dataset: {e.message}", file=e.file,
                          field=e.field, fix=e.fix) from None
    raise BundleNotFoundError(
        "no such bundle directory, and not a Hub id (user/name)", file=text,
        fix="give the path of a directory holding hellofmt.json, or a Hub dataset id (hellofmt pull USER/NAME DIR)",
    )


def _repo_id_and_revision(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    rid, at_rev = parse_hub_id(repo_id)
    if at_rev is not None and revision is not None and at_rev != revision:
        raise InputError(
            f"two revisions given: {at_rev!r} in {repo_id!r} and revision={revision!r}",
            field="revision",
            fix="give the revision once",
        )
    return rid, revision if revision is not None else at_rev


def _where(repo_id: str, revision: str | None = None) -> str:
    return f"{_HF_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")


# --------------------------------------------------------------------------------------------------
# Errors: huggingface_hub's exceptions -> hellofmt's
# --------------------------------------------------------------------------------------------------
def _connection_errors() -> tuple[type[BaseException], ...]:
    """The transport-level exception types of whichever HTTP client huggingface_hub uses."""
    found: list[type[BaseException]] = []
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _offline_mode() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _token_available(token: str | bool | None) -> bool:
    if token is False:
        return False
    if isinstance(token, str) and token:
        return True
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:  # a broken token file or OIDC set-up: the request itself will tell
        return False


_LOGIN_FIX = "pass --token (token=...), set HF_TOKEN, or run `hf auth login`"


def _translate(err: BaseException, repo_id: str, revision: str | None, token, *, writing: bool) -> HellofmtError:
    """Map an exception from huggingface_hub to the matching hellofmt error (or HubError)."""
    from huggingface_hub import errors as hf

    where = _where(repo_id, revision)
    if isinstance(err, hf.RevisionNotFoundError):
        return RevisionNotFoundError(
            f"the repository has no revision {revision or 'main'!r}",
            file=_where(repo_id), field="revision",
            fix="check the branch, tag or commit name (HfApi().list_repo_refs lists them)",
        )
    if isinstance(err, hf.GatedRepoError):
        return AuthenticationError(
            "the repository is gated", file=where,
            fix=f"accept its conditions on {_endpoint()}/datasets/{repo_id}, then {_LOGIN_FIX}",
        )
    if isinstance(err, hf.HfHubHTTPError):
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        if status == 401:
            if _token_available(token):
                return AuthenticationError(
                    "the Hub refused the token (invalid, expired, or without access to this repository)",
                    file=where, fix="check it with `hf auth whoami`, or create one at "
                    "https://huggingface.co/settings/tokens",
                )
            return AuthenticationError(
                "the Hub needs a token here: the repository is private, or does not exist",
                file=where, fix=f"check the name; for a private repository {_LOGIN_FIX}",
            )
        if status == 403:
            what = "write to" if writing else "read"
            return AuthenticationError(
                f"the token may not {what} this repository", file=where,
                fix="use a token with write access to the namespace" if writing else _LOGIN_FIX,
            )
        if isinstance(err, hf.RepositoryNotFoundError) or status == 404:
            return RepositoryNotFoundError(
                "no such dataset repository on the Hub", file=_where(repo_id),
                fix="check USER/NAME (it is a dataset repository); for a private one " + _LOGIN_FIX,
            )
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return HubError(f"the Hub answered HTTP {status}: {first}", file=where, fix="try again later")
    if isinstance(err, hf.OfflineModeIsEnabled) or (_offline_mode() and isinstance(err, (OSError, ValueError))):
        if writing:
            return OfflineError("HF_HUB_OFFLINE=1 is set, and pushing needs the network", file=where,
                                fix="unset HF_HUB_OFFLINE (or set it to 0) to push")
        return OfflineError(
            "HF_HUB_OFFLINE=1 is set and this revision is not (completely) in the local cache", file=where,
            fix="pull it once with the network (unset HF_HUB_OFFLINE), then it opens offline from the cache",
        )
    incomplete = getattr(hf, "IncompleteSnapshotError", None)
    if incomplete is not None and isinstance(err, incomplete):
        return OfflineError(
            f"cannot reach the Hub at {_endpoint()}, and the cached copy of this revision is incomplete",
            file=where, fix="pull again with the network to complete it",
        )
    if isinstance(err, (hf.LocalEntryNotFoundError, *_connection_errors())):
        if writing:
            return OfflineError(f"cannot reach the Hub at {_endpoint()}", file=where,
                                fix="check the network connection and HF_ENDPOINT, then push again")
        return OfflineError(
            f"cannot reach the Hub at {_endpoint()}, and this revision is not in the local cache", file=where,
            fix="check the network connection (and HF_ENDPOINT); a bundle pulled once opens offline from the "
            "cache, also with HF_HUB_OFFLINE=1",
        )
    return HubError(f"{type(err).__name__}: {err}", file=where)


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors as hf

    return (hf.HfHubHTTPError, hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError, *_connection_errors())


# --------------------------------------------------------------------------------------------------
# pull
# --------------------------------------------------------------------------------------------------
def pull(
    repo_id: str,
    local_dir: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    verify: bool = True,
) -> Path:
    """Download the bundle ``repo_id`` from the Hub, check every file's sha256, return its path.

    Files go to huggingface_hub's cache (shared, one folder per commit) or, with ``local_dir``, to
    that directory. Works offline from the cache (no network, or ``HF_HUB_OFFLINE=1``). A repository
    without ``hellofmt.json`` is refused after one small request, before anything is downloaded.

    Args:
        repo_id: ``user/name`` or ``hf://datasets/user/name``, optionally ``@revision``.
        local_dir: download into this directory instead of the cache.
        revision: branch, tag or commit (default: ``main``, or the ``@revision`` of ``repo_id``).
        token: Hugging Face token for a private repository (default: the logged-in one; ``False``: none).
        force_download: download again even if the cache has the files.
        verify: check every file's sha256 against the manifest. ``False`` leaves the sha256 checks
            (not the size checks) to the caller, e.g. one that opens the bundle with
            ``Bundle.open(path, verify=True)`` next, so that every file is hashed once, not twice.

    Returns:
        The local bundle directory (holding ``hellofmt.json``).

    Raises:
        InputError: ``repo_id`` is not a Hub id, or it and ``revision`` name two different revisions.
        RepositoryNotFoundError, RevisionNotFoundError: no such repository or revision (or no access).
        AuthenticationError: the token is missing or invalid for a private repository.
        OfflineError: no network and the files are not in the cache.
        BundleNotFoundError: the repository holds no ``hellofmt.json``.
        IntegrityError: a downloaded file differs from its manifest entry.
    """
    from huggingface_hub import HfApi, snapshot_download

    from .bundle import Bundle  # imports torch: kept out of `import hellofmt.hub`

    repo_id, revision = _repo_id_and_revision(repo_id, revision)
    where = _where(repo_id, revision)
    hub_errors = _hub_errors()

    # Look before downloading: a repository that is not a bundle fails here, at the cost of one
    # small request, instead of after downloading all of it. Without network, the cache decides.
    if not _offline_mode():
        try:
            info = HfApi(token=token).repo_info(repo_id, repo_type=REPO_TYPE, revision=revision)
        except hub_errors as e:
            info = None
            err = _translate(e, repo_id, revision, token, writing=False)
            if not isinstance(err, OfflineError) and not _server_error(e):
                raise err from None
        if info is not None and info.siblings is not None:
            if MANIFEST_NAME not in {s.rfilename for s in info.siblings}:
                raise _not_a_bundle(repo_id, revision)

    # A folder pull creates is pull's to remove if the download fails; a folder the user already
    # had is left alone (its files may be the user's own).
    created = local_dir is not None and not os.path.lexists(local_dir)
    try:
        path = snapshot_download(
            repo_id,
            repo_type=REPO_TYPE,
            revision=revision,
            local_dir=os.fspath(local_dir) if local_dir is not None else None,
            token=token,
            force_download=force_download,
            ignore_patterns=[*_GIT_FILES, *_PAGE_FILES],
        )
    except hub_errors as e:
        _remove_created(local_dir, created)
        raise _translate(e, repo_id, revision, token, writing=False) from None
    except (ValueError, OSError) as e:
        # huggingface_hub refuses a repository file name that would escape the folder ("Invalid
        # filename": '..', absolute) with a ValueError, and the filesystem its own (a name too long).
        _remove_created(local_dir, created)
        raise HubError(
            f"cannot download the repository: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
            file=where, fix="the repository holds a file name that is not a plain bundle file name: it is not a "
            "valid bundle (tell its owner)",
        ) from None

    path = Path(path)
    if not (path / MANIFEST_NAME).is_file():
        _remove_created(local_dir, created)
        raise _not_a_bundle(repo_id, revision)
    try:
        Bundle.open(path, verify=verify).close()
    except (IntegrityError, MissingFileError) as e:
        _remove_created(local_dir, created)
        raise type(e)(
            f"{e.message} (downloaded from {where})", file=e.file, field=e.field,
            fix="pull again with force_download=True (--force-download); if it persists, the files on the "
            "Hub were changed without their manifest: tell the repository owner",
        ) from None
    except HellofmtError:
        _remove_created(local_dir, created)
        raise
    return path


def _remove_created(local_dir, created: bool) -> None:
    """Remove the download folder after a failed pull, only if pull created it."""
    if created and local_dir is not None and os.path.isdir(local_dir) and not os.path.islink(local_dir):
        shutil.rmtree(local_dir, ignore_errors=True)


def _server_error(err: BaseException) -> bool:
    status = getattr(getattr(err, "response", None), "status_code", None)
    return isinstance(status, int) and status >= 500


def _not_a_bundle(repo_id: str, revision: str | None) -> BundleNotFoundError:
    return BundleNotFoundError(
        f"the repository has no {MANIFEST_NAME}: it is not a hellofmt bundle",
        file=_where(repo_id, revision),
        fix="check the name and revision; bundles are uploaded with `hellofmt push BUNDLE USER/NAME`",
    )


# --------------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------------
def push(
    bundle_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    token: str | None = None,
    license: str | None = None,
    preview: bool = True,
    viewer_table: bool = False,
    preview_max_bytes: int | None = None,
) -> str:
    """Upload the bundle at ``bundle_dir`` to the Hub dataset ``repo_id`` in one commit.

    The bundle is opened and every sha256 checked first: a broken bundle is refused before anything
    is sent. The commit holds the manifest, every file it lists, a generated ``README.md`` dataset
    card (:func:`dataset_card`) and, unless ``preview=False``, the Hub page's extras (spec section 1):
    ``preview.png``, the contact sheet embedded at the top of the card
    (:func:`~hellofmt.show.preview_png`, downscaled to fit ``preview_max_bytes``), and with
    ``viewer_table=True`` ``viewer.parquet`` (:func:`write_viewer_table`), which the card declares so
    that the Hub's dataset viewer shows the images. The viewer table is a second copy of the images
    (about the size of the shards), hence opt-in. ``.safetensors`` files of an earlier push that the
    new bundle lacks, and extras this push does not upload, are deleted in the same commit; other
    files are kept.

    Args:
        bundle_dir: the local bundle directory.
        repo_id: ``user/name`` or ``hf://datasets/user/name``, optionally ``@branch``.
        private: create the repository private (applies only when it is created).
        revision: the branch to commit to, created if needed (default: ``main``); not a commit hash.
        message: the commit message (default: a one-line summary of the bundle).
        token: Hugging Face token with write access (default: the logged-in one).
        license: a Hub license id for the card's metadata (e.g. ``"apache-2.0"``, ``"cc-by-4.0"``).
        preview: upload the preview (and the viewer table, if asked for); ``False``: the card alone.
        viewer_table: also upload ``viewer.parquet`` for the Hub's dataset viewer (needs pyarrow).
        preview_max_bytes: the preview PNG's cap (default :data:`~hellofmt.show.PREVIEW_MAX_BYTES`, 20 MB).

    Returns:
        The URL of the new commit.

    Raises:
        HellofmtError: the bundle's own errors (prefixed "refusing to push a broken bundle").
        InputError: a malformed ``repo_id`` or ``license``, ``revision`` is a commit hash, or
            ``viewer_table`` without pyarrow installed.
        AuthenticationError: no token, or one without write access.
        OfflineError: no network.
        HubError: any other Hub failure.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from .bundle import Bundle  # imports torch: kept out of `import hellofmt.hub`

    repo_id, revision = _repo_id_and_revision(repo_id, revision)
    if revision is not None and _COMMIT.match(revision):
        raise InputError(f"cannot push to a commit ({revision}); give a branch name", field="revision")
    license = _check_license(license)
    viewer_table = bool(viewer_table and preview)
    if viewer_table:
        _pyarrow()  # fail before the bundle is hashed or anything is sent
    try:
        bundle = Bundle.open(bundle_dir, verify=True)
    except HellofmtError as e:
        raise type(e)(f"refusing to push a broken bundle: {e.message}", file=e.file, field=e.field, fix=e.fix) from None

    m = bundle.manifest
    names = [MANIFEST_NAME, *sorted(m.files)]
    ops: list = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(bundle.file(n))) for n in names]
    with tempfile.TemporaryDirectory(prefix="hellofmt-push-") as tmp:
        sheet = None
        if preview and PREVIEW_NAME not in m.files:  # an extra never replaces a listed file
            from .show import PREVIEW_MAX_BYTES, preview_png  # imports torch: kept out of `import hellofmt.hub`

            sheet = preview_png(bundle, max_bytes=preview_max_bytes or PREVIEW_MAX_BYTES)
            ops.append(CommitOperationAdd(path_in_repo=PREVIEW_NAME, path_or_fileobj=sheet.data))
        if viewer_table and VIEWER_TABLE_NAME not in m.files:
            table = Path(tmp) / VIEWER_TABLE_NAME  # on disk: it is as large as the images
            write_viewer_table(bundle, table)
            ops.append(CommitOperationAdd(path_in_repo=VIEWER_TABLE_NAME, path_or_fileobj=str(table)))
        else:
            viewer_table = False
        card = dataset_card(bundle, repo_id, license=license, preview=sheet, viewer_table=viewer_table)
        ops.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode("utf-8")))
        uploaded = {op.path_in_repo for op in ops}

        api = HfApi(token=token)
        message = message or (f"Upload hellofmt bundle: {m.images.count} images, {m.num_classes} classes")
        try:
            api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
            if revision is not None and revision != "main":
                api.create_branch(repo_id, repo_type=REPO_TYPE, branch=revision, exist_ok=True)
            existing = api.list_repo_files(repo_id, repo_type=REPO_TYPE, revision=revision)
            # Stale shards, and a preview or viewer table of an earlier push that this one does not
            # replace: they would show another bundle's images on the page.
            ops += [CommitOperationDelete(path_in_repo=p) for p in existing
                    if p not in uploaded and "/" not in p and (p.endswith(".safetensors") or p in EXTRA_NAMES)]
            info = api.create_commit(
                repo_id, operations=ops, commit_message=message, repo_type=REPO_TYPE, revision=revision
            )
        except _hub_errors() as e:
            raise _translate(e, repo_id, revision, token, writing=True) from None
    return str(info.commit_url)


def _pyarrow():
    """pyarrow and pyarrow.parquet (optional: they come with ``datasets``), imported only for the viewer table."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InputError("the viewer table is a Parquet file, and writing it needs pyarrow, which is not installed",
                         field="--viewer-table", fix=f"{_PYARROW_FIX}; or push without --viewer-table") from None
    return pyarrow, pyarrow.parquet


def write_viewer_table(bundle, out: str | os.PathLike[str]) -> int:
    """Write the Hub viewer's table of a bundle's images to ``out`` (Parquet); return its size in bytes.

    One row per image, in bundle order: ``image`` (Hugging Face's ``Image`` feature: the stored
    pixels as PNG) and ``label`` (a ``ClassLabel`` over the bundle's classes), the layout
    ``datasets.load_dataset("parquet", ...)`` and the Hub's dataset viewer read as an image
    classification set. It duplicates the images (spec section 1: an unlisted extra readers ignore).

    Args:
        bundle: an opened :class:`~hellofmt.bundle.Bundle` or a bundle directory.
        out: the Parquet file to write (replaced if it exists).

    Returns:
        The file's size in bytes.

    Raises:
        InputError: pyarrow is not installed.
        HellofmtError: the bundle cannot be opened or its images decoded.
    """
    from .bundle import Bundle  # imports torch: kept out of `import hellofmt.hub`
    from .imagestore import encode_image

    pa, pq = _pyarrow()
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    m = bundle.manifest
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": list(m.classes)}}
    schema = pa.schema(
        [pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), pa.field("label", pa.int64())],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    with pq.ParquetWriter(os.fspath(out), schema) as writer:
        for start in range(0, m.images.count, _VIEWER_CHUNK):
            images, labels = bundle.read_images(start=start, stop=min(m.images.count, start + _VIEWER_CHUNK))
            rows = {"image": [{"bytes": encode_image(x, "png"), "path": None} for x in images],
                    "label": labels.tolist()}
            writer.write_table(pa.table(rows, schema=schema), row_group_size=_VIEWER_ROW_GROUP)
    return os.path.getsize(out)


def _check_license(license: str | None) -> str | None:
    if license is None:
        return None
    value = license.strip().lower()
    if not _LICENSE.match(value):
        raise InputError(
            f"{license!r} is not a license identifier", field="license",
            fix="use a Hub license id such as apache-2.0, mit, cc-by-4.0 or other",
        )
    return value


# --------------------------------------------------------------------------------------------------
# Dataset card
# --------------------------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~])")


def _md(text: str) -> str:
    """Text as literal Markdown: special characters escaped, on one line."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _bytes(n: int) -> str:
    return f"{n:,} bytes ({format_bytes(n)})" if n >= 1024 else f"{n:,} bytes"


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M"


def dataset_card(bundle, repo_id: str | None = None, *, license: str | None = None, preview=None,
                 viewer_table: bool = False) -> str:
    """The ``README.md`` dataset card for a bundle (a :class:`~hellofmt.bundle.Bundle` or a path).

    YAML metadata (``task_categories: image-classification``, tags ``hellofmt`` and
    ``dataset-distillation``, size category, ``license`` when given; the viewer's ``configs`` when a
    viewer table ships, else ``viewer: false``), then: the preview image when given, one line naming
    the label payload against the stored soft labels it replaces, the foundation model, classes,
    images per class, codec, the payload in detail (images x 300 epochs x classes x 2 bytes), the
    fidelity metrics of ``manifest.metrics``, every recorded student evaluation as a table (or "not
    evaluated yet" and the command to run), every file with its size and sha256, and a usage snippet
    for ``repo_id``.

    Args:
        bundle: a :class:`~hellofmt.bundle.Bundle` or a bundle directory.
        repo_id: the Hub id the card is for (default: the folder name; ``USER/NAME`` in the snippet).
        license: a Hub license id for the metadata.
        preview: the :class:`~hellofmt.show.Preview` uploaded as ``preview.png`` (None: no image).
        viewer_table: whether ``viewer.parquet`` ships (declared in ``configs``).
    """
    from .bundle import Bundle  # imports torch: kept out of `import hellofmt.hub`

    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    s = summarize(bundle)
    m = bundle.manifest
    im, fd, pr, lp = s["images"], s["foundation"], s["projector"], s["label_payload"]
    license = _check_license(license)
    name = repo_id or Path(bundle.path).name

    meta = []
    if license:
        meta.append(f"license: {license}")
    meta += [
        "task_categories:", "- image-classification",
        "tags:", "- hellofmt", "- dataset-distillation",
        "size_categories:", f"- {_size_category(im['count'])}",
    ]
    if viewer_table:  # the viewer reads this one file; the shards and the manifest are not data files to it
        meta += ["configs:", "- config_name: default", "  data_files:", "  - split: train",
                 f"    path: {VIEWER_TABLE_NAME}"]
    else:  # it would guess at the JSON manifest or the preview PNG and show those as the dataset
        meta.append("viewer: false")
    lo, hi = im["per_class_min"], im["per_class_max"]
    ipc = f"{lo}" if lo == hi else f"{lo} to {hi} (uneven)"
    codec = f"`{im['codec']}`" + (f" (quality {im['quality']})" if im["quality"] is not None else "")
    ranks = ", ".join(map(str, pr["ranks"])) or "none"
    head = f", head rank {pr['head_rank']}" if pr["head_rank"] is not None else ""
    ratio = lp["ratio"]
    lines = ["---", *meta, "---", "", f"# {_md(name)}", ""]
    if preview is not None:
        shown = (f"all {preview.num_classes:,} classes" if preview.classes_shown == preview.num_classes else
                 f"{preview.classes_shown:,} of the {preview.num_classes:,} classes, evenly spaced")
        lines += [f"![Images of {_md(name)}: {shown}]({PREVIEW_NAME})", "",
                  f"*The images: {shown}, up to {preview.per_class} per class (the first of each), one row "
                  f"per class with its name"
                  + (f"; shrunk to {preview.width}x{preview.height} px to stay under the preview's size cap"
                     if preview.scale < 1 else "") + ". `hellofmt show` draws the same sheet.*", ""]
    lines += [
        f"**Labels: {format_bytes(lp['projector_bytes'])} instead of {format_bytes(lp['stored_label_bytes'])}.** "
        "A student's soft labels come from the projector's low-rank deltas, not from a stored label for every "
        f"image in every epoch ({lp['stored_label_rule']}): {ratio_text(ratio)}.", "",
        f"A distilled image-classification dataset in the hellofmt format (HeLlO: Heavy Labels Out): "
        f"{im['count']:,} synthetic images of {m.num_classes:,} classes and **no stored labels**. Soft labels "
        "are generated on the fly, for exactly the crop, flip, CutMix or MixUp view a student sees, by a "
        "projector: the open_clip foundation model below with low-rank deltas and a zero-shot head built "
        "from the class names.", "",
        "| | |", "|---|---|",
        f"| Foundation model | `{_md(fd['reference'])}` (open_clip, {fd['image_size']} px input, weights "
        f"sha256 `{fd['weights_sha256'][:16]}…`) |",
        f"| Classes | {m.num_classes:,} |",
        f"| Images per class | {ipc} |",
        f"| Images | {im['count']:,}, {im['width']}x{im['height']}, codec {codec}, {im['shards']} shard(s) |",
        f"| Label payload (projector) | {_bytes(lp['projector_bytes'])}: {pr['targets']} low-rank targets, "
        f"rank {ranks}{head}, {pr['dtype']} |",
        f"| Stored soft labels it replaces | {_bytes(lp['stored_label_bytes'])} "
        f"({lp['stored_label_rule']}) |",
        f"| Ratio | the label payload is {ratio_text(ratio)} |",
    ]
    emb = s.get("embedded_foundation")
    if emb:
        lines.append(f"| Embedded foundation | {_bytes(emb['bytes'])} (`{_md(emb['file'])}`): the bundle carries its "
                     "foundation model's weights, a fixed cost of the model, not of the labels, and not part of "
                     "the ratio |")
    lines += ["", "## Fidelity", ""]
    if m.metrics:
        lines += ["How closely the projector reproduces the teacher (measured by the builder):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {_md(k)} | {v:.4g} |" for k, v in sorted(m.metrics.items())]
    else:
        lines.append("The builder recorded no fidelity metrics.")
    lines += _card_evaluations(s["evaluations"], repo_id or "USER/NAME")
    shown = m.classes[:1000]
    more = f", and {m.num_classes - len(shown):,} more (see `hellofmt.json`)" if m.num_classes > len(shown) else ""
    usage_id = repo_id or "USER/NAME"
    lines += [
        "", "## Classes", "",
        ", ".join(_md(c) for c in shown) + more, "",
        "## Usage", "",
        "```python",
        "from hellofmt import DistilledDataset",
        "",
        f'ds = DistilledDataset("{usage_id}", device="cuda")  # downloads, checks every sha256, caches',
        'for images, soft, hard in ds.loader(batch_size=256, mix="cutmix", seed=0):  # views at the images\' side',
        "    ...  # images in [0, 1] on the device; soft: the projector's labels for exactly these views",
        "```", "",
        f"Or on the command line: `hellofmt pull {usage_id} DIR`, then `hellofmt info DIR`. Once pulled, the "
        "bundle also opens offline from the Hugging Face cache (`HF_HUB_OFFLINE=1`).", "",
        "## Files", "",
        "`hellofmt.json` is the manifest; it records the size and sha256 of every other file, which "
        "hellofmt checks when it opens the bundle. This card and, when present, `preview.png` and `viewer.parquet` "
        "are not among the checked files: they are for this page, and hellofmt ignores them (`hellofmt pull` "
        "skips the last two).", "",
        "| file | bytes | sha256 |", "|---|---:|---|",
    ]
    lines += [f"| `{n}` | {e.size:,} | `{e.sha256}` |" for n, e in sorted(m.files.items())]
    prov = m.provenance
    lines += ["", "## Provenance", "",
              f"Built with hellofmt {_md(prov.hellofmt_version)} on {_md(prov.created)}"
              + (f"; teacher(s): {', '.join(_md(t) for t in prov.teachers)}" if prov.teachers else "")
              + (f"; seed {prov.seed}" if prov.seed is not None else "") + ".", ""]
    return "\n".join(lines)


def _card_evaluations(evaluations: list[dict], repo_id: str) -> list[str]:
    """The card's "Student evaluations" section, from :func:`~hellofmt.summary.summarize`'s ``evaluations``:
    a table of every recorded evaluation, or "not evaluated yet" and the commands that record one."""
    out = ["", "## Student evaluations", ""]
    if not evaluations:
        return out + [
            "Not evaluated yet: no student evaluation is recorded in this bundle. What it is worth to a student "
            "(its labels against hard labels, the teacher and a random real subset, over several seeds) is "
            "measured, and recorded for this card, with:", "",
            "```bash",
            f"hellofmt pull {repo_id} BUNDLE",
            "hellofmt eval BUNDLE --val VAL_DIR --teacher TEACHER --train-data TRAIN_DIR --record",
            f"hellofmt push BUNDLE {repo_id}",
            "```",
        ]
    arms = [a for a in ("bundle", "hard", "teacher", "random") if any(a in e["arms"] for e in evaluations)]
    arms += sorted({a for e in evaluations for a in e["arms"]} - set(arms))
    out += ["Students trained on the same views, steps and seeds with each labelling (`hellofmt eval`): the "
            "bundle's labels, hard labels, the teacher online (upper bound) and a random real subset of the same "
            "size labelled by the same projector (the control). Top-1 (%) on held-out images, mean ± std over "
            "seeds; bundle − hard is what the soft labels add, IOR (bundle − random) what the distilled images "
            "add over random real ones, both in points.", "",
            "| protocol | student | seeds | val images | " + " | ".join(arms)
            + " | bundle/teacher | bundle − hard | IOR (bundle − random) |",
            "|---|---|---:|---:|" + "---:|" * len(arms) + "---:|---:|---:|"]
    for e in evaluations:
        cells = [f"{100 * e['arms'][a]['mean']:.1f} ± {100 * e['arms'][a]['std']:.1f}" if a in e["arms"] else "-"
                 for a in arms]
        c = e["comparisons"]
        ratio = f"{c['bundle/teacher']:.3f}" if c.get("bundle/teacher") is not None else "-"
        points = [f"{100 * c[k]:+.1f}" if c.get(k) is not None else "-" for k in ("bundle-hard", "ior")]
        val = f"{e['val_count']:,}" if e.get("val_count") is not None else "-"
        out.append(f"| {_md(e['protocol'])} | {_md(e['student'])} | {len(e['seeds'])} | {val} | "
                   + " | ".join([*cells, ratio, *points]) + " |")
    return out
