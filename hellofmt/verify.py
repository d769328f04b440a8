"""Whole-bundle checking: :func:`verify_bundle`, what ``hellofmt verify`` runs.

It sits above the model layer on purpose: the file checks are the format's
(:meth:`hellofmt.bundle.Bundle.verify`), but the last check rebuilds the projector and recomputes
the manifest's probe (:func:`hellofmt.probe.check_bundle_probe`), which needs the foundation
model. Keeping it here lets the format layer stay free of the model.
"""

from __future__ import annotations

import os
import warnings

from .bundle import Bundle, reseal_manifest
from .errors import HellofmtError, ManifestDigestError
from .manifest import DIGEST_FIELD, MANIFEST_NAME, MissingDigestWarning
from .probe import check_bundle_probe

__all__ = ["verify_bundle"]


def verify_bundle(path: str | os.PathLike[str], *, probe: bool = True, fix_digest: bool = False) -> list[str]:
    """Run every check on the bundle at ``path``; return one line per problem (``[]``: all good).

    Args:
        path: the bundle directory.
        probe: also rebuild the projector and recompute the manifest's probe, when the files are
            sound and the manifest has one.
        fix_digest: first accept the manifest as it is now and write it back with a fresh
            ``manifest_sha256`` (:func:`hellofmt.bundle.reseal_manifest`): after an edit made on
            purpose, or to give an older bundle one. The other checks then run as usual.

    Returns:
        One line per problem, each naming the file (and field) it concerns; ``[]`` when all is well.

    Raises:
        HellofmtError: only when there is nothing to check against (no bundle, unreadable
            manifest). Everything else, including a manifest digest that does not match (the files
            are then checked against the manifest as it is) or is missing, and missing or unsafe
            files, becomes a problem line,
            and so does a HellofmtError raised by the probe check (missing foundation weights, a
            fingerprint mismatch).
    """
    if fix_digest:
        reseal_manifest(path)
    problems: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MissingDigestWarning)  # reported below, as a problem
            bundle = Bundle.open_unchecked(path)
    except ManifestDigestError as e:
        # Still check every file against the manifest as it is, so the report is complete; a manifest
        # that is not otherwise valid raises here, as before.
        problems.append(str(e))
        bundle = Bundle.open_unchecked(path, check_digest=False)
    if bundle.manifest.manifest_sha256 is None and not problems:
        problems.append(f"{bundle.path / MANIFEST_NAME}: {DIGEST_FIELD}: the manifest has no digest (written before "
                        f"hellofmt 0.3), so a change to it cannot be detected (add one: hellofmt verify --fix-digest "
                        f"{bundle.path})")
    problems.extend(bundle.verify())
    if probe and not problems and bundle.manifest.probe is not None:
        try:
            extra = check_bundle_probe(bundle)
        except HellofmtError as e:
            extra = [str(e)]
        problems.extend(extra or [])
    return problems
