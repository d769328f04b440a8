"""Reports on a bundle: :func:`summarize` (a JSON-ready dict) and :func:`format_summary` (text).

``hellofmt info`` prints them, the Hub dataset card (:func:`hellofmt.hub.dataset_card`) and the
builder's closing summary are made from them. :func:`format_bytes` is the package's one byte
formatter (binary units: KiB, MiB, GiB, TiB), used by these reports and the loader's log lines.

This module reads only the manifest of an opened :class:`~hellofmt.bundle.Bundle` and imports
nothing heavy, so the CLI and the Hub code can import it at start-up.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .manifest import Foundation

if TYPE_CHECKING:
    from .bundle import Bundle

__all__ = [
    "STORED_LABEL_EPOCHS",
    "format_bytes",
    "ratio_text",
    "foundation_reference",
    "summarize",
    "format_summary",
]

STORED_LABEL_EPOCHS = 300  # SRe2L-style stored soft labels: one float16 vector per image per epoch
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """A byte count in binary units, for people: ``1536`` -> ``'1.5 KiB'``, ``512`` -> ``'512 B'``.

    Args:
        n: the number of bytes.

    Returns:
        Whole bytes below 1 KiB, otherwise one decimal in the largest unit (up to TiB) that keeps
        the number at or above 1.
    """
    x = float(n)
    for unit in _UNITS:
        if abs(x) < 1024 or unit == _UNITS[-1]:
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def ratio_text(ratio: float | None) -> str:
    """How the label payload compares with stored labels, in words that stay right both ways.

    Args:
        ratio: stored-label bytes over projector bytes (``summarize(...)["label_payload"]["ratio"]``),
            or None when there is nothing to compare.

    Returns:
        ``'40x smaller than stored labels'``, ``'2.0x larger than stored labels (...)'`` or ``'n/a'``.
    """
    if not ratio:
        return "n/a"
    if ratio >= 1:
        return f"{ratio:,.1f}x smaller than stored labels" if ratio < 10 else f"{ratio:,.0f}x smaller than stored labels"
    return f"{1 / ratio:,.1f}x larger than stored labels (the projector pays off only at larger scale)"


def foundation_reference(f: Foundation) -> str:
    """A manifest's foundation reference as one readable string: ``ARCH:TAG``, ``hf-hub:ORG/REPO``,
    ``ARCH (embedded: FILE)`` or ``ARCH (file: FILE)``."""
    if f.source == "pretrained":
        return f"{f.architecture}:{f.pretrained}"
    if f.source == "hf-hub":
        return f"hf-hub:{f.hf_hub_id}"
    if f.source == "embedded":
        return f"{f.architecture} (embedded: {f.weights_file})"
    return f"{f.architecture} (file: {f.weights_file or 'given at load'})"


def summarize(bundle: Bundle) -> dict:
    """A JSON-ready summary of a bundle, as ``hellofmt info`` shows it.

    Includes classes, image count and per-class counts, codec, image size, the foundation
    reference, projector ranks and parameter count, bytes per file, and the label payload: the
    projector file's bytes against what SRe2L-style stored labels would take for the same images
    (images x 300 epochs x classes x 2 bytes, float16), with the ratio.

    Args:
        bundle: an opened :class:`~hellofmt.bundle.Bundle`; only its manifest and path are read.

    Returns:
        A dict of plain JSON values (see ``hellofmt info BUNDLE --json``).
    """
    m = bundle.manifest
    im = m.images
    files = {name: e.size for name, e in sorted(m.files.items())}
    proj_bytes = files.get(m.projector.file, 0)
    stored = im.count * STORED_LABEL_EPOCHS * m.num_classes * 2
    # A delta for a parameter of shape [out, *rest] is B [out, r] @ A [r, prod(rest)] (the rule of
    # lowrank.as_matrix_shape), so it holds r * (out + prod(rest)) numbers.
    params = sum(t.rank * (t.shape[0] + math.prod(t.shape[1:])) for t in m.projector.targets)
    ranks = sorted({t.rank for t in m.projector.targets})
    f = m.foundation
    return {
        "path": str(bundle.path),
        "format_version": m.format_version,
        "num_classes": m.num_classes,
        "classes": list(m.classes),
        "images": {
            "count": im.count,
            "per_class": list(im.per_class),
            "per_class_min": min(im.per_class) if im.per_class else 0,
            "per_class_max": max(im.per_class) if im.per_class else 0,
            "codec": im.codec,
            "quality": im.quality,
            "height": im.height,
            "width": im.width,
            "shards": len(im.shards),
        },
        "foundation": {
            "reference": foundation_reference(f),
            "library": f.library,
            "architecture": f.architecture,
            "source": f.source,
            "weights_sha256": f.weights_sha256,
            "image_size": f.image_size,
        },
        "projector": {
            "file": m.projector.file,
            "targets": len(m.projector.targets),
            "ranks": ranks,
            "head_rank": m.projector.head.rank if m.projector.head else None,
            "dtype": m.projector.dtype,
            "encoder_delta_parameters": params,
        },
        "files": files,
        "total_bytes": sum(files.values()),
        "label_payload": {
            "projector_bytes": proj_bytes,
            "stored_label_bytes": stored,
            "stored_label_rule": f"images x {STORED_LABEL_EPOCHS} epochs x classes x 2 bytes (float16)",
            "ratio": (stored / proj_bytes) if proj_bytes else None,
        },
        "metrics": dict(m.metrics),
        "probe_views": len(m.probe.views) if m.probe else 0,
    }


def format_summary(summary: dict) -> str:
    """Render :func:`summarize`'s dict as the readable text ``hellofmt info`` prints.

    Args:
        summary: what :func:`summarize` returned.

    Returns:
        Several lines of text, without a trailing newline.
    """
    s = summary
    im, fd, pr, lp = s["images"], s["foundation"], s["projector"], s["label_payload"]
    names = ", ".join(s["classes"][:5]) + (f", ... ({s['num_classes'] - 5} more)" if s["num_classes"] > 5 else "")
    codec = im["codec"] + (f" (quality {im['quality']})" if im["quality"] is not None else "")
    lines = [
        f"bundle      {s['path']} (hellofmt format {s['format_version']})",
        f"classes     {s['num_classes']}: {names}",
        (f"images      {im['count']} ({im['per_class_min']}-{im['per_class_max']} per class), "
         f"{im['width']}x{im['height']}, {codec}, {im['shards']} shard(s)"),
        f"foundation  {fd['reference']} [{fd['library']}, input {fd['image_size']}px, sha256 {fd['weights_sha256'][:12]}...]",
        (f"projector   {pr['targets']} targets, rank(s) {', '.join(map(str, pr['ranks'])) or '-'}, "
         f"head rank {pr['head_rank'] if pr['head_rank'] is not None else '-'}, {pr['dtype']}, "
         f"{pr['encoder_delta_parameters']:,} encoder delta parameters"),
        "files",
    ]
    width = max((len(n) for n in s["files"]), default=0)
    for name, size in s["files"].items():
        lines.append(f"  {name:<{width}}  {size:>14,} B  ({format_bytes(size)})")
    lines.append(f"  {'total':<{width}}  {s['total_bytes']:>14,} B  ({format_bytes(s['total_bytes'])})")
    lines += [
        "label payload",
        f"  projector      {format_bytes(lp['projector_bytes'])}",
        f"  stored labels  {format_bytes(lp['stored_label_bytes'])}  ({lp['stored_label_rule']})",
        f"  ratio          {ratio_text(lp['ratio'])}",
    ]
    if s["metrics"]:
        lines.append("metrics     " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(s["metrics"].items())))
    return "\n".join(lines)
