"""Re-encode a bundle's low-rank deltas: :func:`compress_bundle`, what ``hellofmt compress`` runs.

A bundle's label payload is its projector file. Storing the deltas as int8 with one float32 scale per
row (spec 5.1) makes it about a quarter of float32; whether the labels survive is measured, not
assumed: the projector is rebuilt from the bundle, its labels on augmented views of the bundle's own
images are taken with the deltas as stored and again with the re-encoded deltas, and the difference
(KL at the recipe's temperature, top-1 agreement, largest logit difference) goes into the new
manifest's ``metrics`` as ``delta_encoding.*``. The probe is recomputed on the re-encoded projector,
so a loader proves it reproduces the new labels. Every other file is copied byte for byte, and the
new bundle is written atomically through :class:`~hellofmt.bundle.BundleWriter`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from .augment import random_resized_crop
from .bundle import Bundle, BundleWriter
from .errors import BundleExistsError, InputError
from .foundation import load_foundation
from .manifest import DELTA_ENCODINGS, MANIFEST_NAME, Manifest
from .probe import DEFAULT_K, PROBE_VIEWS, compute_probe, exact_float32
from .projector import Projector
from .summary import format_bytes

__all__ = ["CompressResult", "compress_bundle", "format_compress_result"]


class CompressResult(dict):
    """What :func:`compress_bundle` returns: ``path`` (the new bundle), ``encoding`` (``from``, ``to``),
    ``projector_bytes`` (``before``, ``after``) and ``label_change`` (``kl``, ``top1_agreement``,
    ``max_logit_diff``, ``views``)."""

    @property
    def path(self) -> Path:
        return self["path"]


def _version_at_least(version: str, need: str) -> str:
    """The later of two ``MAJOR.MINOR`` versions."""

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("."))

    return version if key(version) >= key(need) else need


def _view_batches(images: torch.Tensor, *, count: int, size: int, scale, ratio, seed: int, batch_size: int,
                  device: torch.device):
    """A function yielding the same ``count`` random-resized-crop-and-flip views of ``images`` (uint8,
    on the CPU) every time it is called: view ``j`` is of image ``j % N``, with the recipe's
    scale and ratio, resampled to ``size``."""

    def views():
        g = torch.Generator().manual_seed(seed)
        n = images.shape[0]
        for start in range(0, count, batch_size):
            idx = torch.arange(start, min(start + batch_size, count)) % n
            x, _, _ = random_resized_crop(images.index_select(0, idx).to(device), size, scale=scale, ratio=ratio,
                                          generator=g)
            yield x

    return views


def compress_bundle(
    bundle: str | os.PathLike[str],
    delta_dtype: str = "int8",
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    views_per_image: int = 4,
    max_views: int = 2048,
    seed: int = 0,
) -> CompressResult:
    """Write a copy of ``bundle`` whose deltas are stored in ``delta_dtype``, with the label change measured.

    The bundle is opened with every hash checked; its projector is rebuilt with the deltas as stored
    (dequantised to float32), then the deltas are put through ``delta_dtype``
    (:meth:`~hellofmt.projector.Projector.round_deltas_`) and both projectors' float32 logits are
    compared on the same views of the bundle's images. The new manifest has the new
    ``projector.dtype``, the ``format_version`` it needs (spec 8), a probe recomputed on the new
    projector (same size, view count and k as the old one), the ``delta_encoding.*`` metrics, and no
    ``evaluations`` (they were measured on the old labels). Other files are copied unchanged.

    Args:
        bundle: the bundle directory.
        delta_dtype: the new encoding, one of :data:`~hellofmt.manifest.DELTA_ENCODINGS`.
        out: where to write the new bundle (default: ``bundle`` itself, replaced atomically).
        overwrite: replace ``out`` if it exists (needed to re-encode in place), as
            :class:`~hellofmt.bundle.BundleWriter` does.
        device: where the projector runs (default: ``cuda`` when available, else ``cpu``).
        views_per_image: views of each image the labels are compared on ...
        max_views: ... but at most this many in all.
        seed: the seed of the views.

    Returns:
        A :class:`CompressResult`.

    Raises:
        InputError: an unknown encoding, the bundle's own encoding, or a view count below 1.
        BundleExistsError: ``out`` exists and ``overwrite`` is False (checked before any work).
        HellofmtError: the bundle fails its checks (hashes, projector file, foundation fingerprint).
    """
    if delta_dtype not in DELTA_ENCODINGS:
        raise InputError(f"unknown delta encoding {delta_dtype!r}", field="--delta-dtype",
                         fix=f"use one of {', '.join(DELTA_ENCODINGS)}")
    for name, v in (("views_per_image", views_per_image), ("max_views", max_views)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"expected an integer >= 1, got {v!r}", field=name)
    b = Bundle.open(bundle, verify=True)
    man = b.manifest
    if man.projector.dtype == delta_dtype:
        raise InputError(f"the bundle's deltas are already {delta_dtype}", file=b.path / MANIFEST_NAME,
                         field="projector.dtype", fix="choose another --delta-dtype")
    out = Path(out) if out is not None else b.path
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise BundleExistsError("already exists", file=out,
                                fix="pass --overwrite to replace it (re-encoding in place needs it too), or --out")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"not a device: {device!r} ({e})", field="--device", fix="use cpu, cuda or cuda:N") from None

    images, _ = b.read_images()
    foundation = load_foundation(man.foundation, bundle_dir=b.path, device=device)
    proj = Projector(foundation, man.classes, man.head.templates, logit_scale=man.head.logit_scale)
    proj.load_deltas(b.projector_tensors(), man.projector, file=b.file(man.projector.file), merge=False)
    proj.to(device).eval()
    rec = man.labels
    views = _view_batches(images, count=min(images.shape[0] * views_per_image, max_views),
                          size=int(foundation.image_size), scale=tuple(rec.scale), ratio=tuple(rec.ratio),
                          seed=seed, batch_size=64, device=device)
    with exact_float32(device):
        change = proj.round_deltas_(delta_dtype, views if images.shape[0] else None, temperature=rec.temperature)
    proj.merge()
    old_probe = man.probe
    if old_probe is not None and old_probe.views:
        probe = compute_probe(proj, images, n=len(old_probe.views), k=len(old_probe.views[0].topk_indices),
                              size=old_probe.size)
    else:
        probe = compute_probe(proj, images, n=PROBE_VIEWS, k=DEFAULT_K)
    info = dataclasses.replace(man.projector, dtype=delta_dtype)
    tensors = proj.delta_tensors(delta_dtype)

    new = Manifest.from_dict(json.loads(man.to_json()))  # a deep copy that keeps unknown fields
    new.projector = info
    new.format_version = _version_at_least(man.format_version, info.format_version)
    new.probe = probe
    new.evaluations = []
    new.metrics = {k: v for k, v in new.metrics.items() if not k.startswith("delta_encoding.")}
    new.metrics.update({f"delta_encoding.{k}": float(v) for k, v in change.items()})
    new.provenance.extra["delta_encoding_from"] = man.projector.dtype
    with BundleWriter(out, overwrite=overwrite) as w:
        for name in man.files:
            if name != man.projector.file:
                w.write_bytes(name, b.file(name).read_bytes())
        entry = w.write_tensors(info.file, tensors, {"format": "hellofmt-projector"})
        path = w.commit(new)
    return CompressResult(
        path=path,
        encoding={"from": man.projector.dtype, "to": delta_dtype},
        projector_bytes={"before": man.files[man.projector.file].size, "after": entry.size},
        label_change=dict(change),
    )


def format_compress_result(result: dict[str, Any]) -> str:
    """The lines ``hellofmt compress`` prints for a :class:`CompressResult`."""
    enc, size, ch = result["encoding"], result["projector_bytes"], result["label_change"]
    before, after = size["before"], size["after"]
    if after < before:
        change = f"{before / max(after, 1):.2f}x smaller"
    elif after > before:  # e.g. int8 -> float32: say so, not "0.25x smaller"
        change = f"{after / max(before, 1):.2f}x larger"
    else:
        change = "the same size"
    lines = [
        f"deltas      {enc['from']} -> {enc['to']}",
        f"projector   {format_bytes(before)} -> {format_bytes(after)} ({change})",
    ]
    if ch:
        lines.append(f"labels      KL {ch['kl']:.3g}, top-1 agreement {ch['top1_agreement']:.4f}, "
                     f"largest logit difference {ch['max_logit_diff']:.3g} on {int(ch['views'])} views")
    lines.append(f"wrote {result['path']}")
    return "\n".join(lines)
