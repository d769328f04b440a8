"""Whole-bundle checking: :func:`verify_bundle`, what ``hellofmt verify`` runs.

It sits above the model layer on purpose: the file checks are the format's
(:meth:`hellofmt.bundle.Bundle.verify`), but the last check rebuilds the projector and recomputes
the manifest's probe (:func:`hellofmt.probe.check_bundle_probe`), which needs the foundation
model. Keeping it here lets the format layer stay free of the model.
"""

from __future__ import annotations

import os

from .bundle import Bundle
from .errors import HellofmtError
from .probe import check_bundle_probe

__all__ = ["verify_bundle"]


def verify_bundle(path: str | os.PathLike[str], *, probe: bool = True) -> list[str]:
    """Run every check on the bundle at ``path``; return one line per problem (``[]``: all good).

    Args:
        path: the bundle directory.
        probe: also rebuild the projector and recompute the manifest's probe, when the files are
            sound and the manifest has one.

    Returns:
        One line per problem, each naming the file (and field) it concerns; ``[]`` when all is well.

    Raises:
        HellofmtError: only when there is nothing to check against (no bundle, unreadable
            manifest). Everything else, including missing or unsafe files, becomes a problem line,
            and so does a HellofmtError raised by the probe check (missing foundation weights, a
            fingerprint mismatch).
    """
    bundle = Bundle.open_unchecked(path)
    problems = bundle.verify()
    if probe and not problems and bundle.manifest.probe is not None:
        try:
            extra = check_bundle_probe(bundle)
        except HellofmtError as e:
            extra = [str(e)]
        problems.extend(extra or [])
    return problems
