"""The probe: the projector's top-k logits on a few fixed views, recorded by the builder.

A bundle stores no labels, so a loader must prove that the projector it assembled (foundation
weights + open_clip code + deltas) reproduces the labels the builder saw. The manifest's ``probe``
holds, for a handful of deterministic views of the bundle's own images, the top-k logits the
builder's projector gave. :func:`check_probe` recomputes them and refuses a projector that differs,
naming the view, the class and both values.

The views are fixed (not random) so that they need no RNG agreement between builder and loader:
the first ``min(n, N)`` images, each seen whole or through a centred box of 0.6 of its side,
mirrored or not, resampled with :func:`hellofmt.augment.crop_resize` at ``probe.size``.

Both sides run in float32 with autocast and TF32 off: the probe compares arithmetic, and bf16 would
hide small differences behind rounding noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from .augment import crop_resize
from .errors import ProbeMismatchError
from .manifest import MANIFEST_NAME, Probe, ProbeView
from .projector import Projector

if TYPE_CHECKING:  # pragma: no cover
    from .bundle import Bundle

__all__ = [
    "PROBE_VIEWS",
    "DEFAULT_K",
    "probe_views",
    "probe_inputs",
    "probe_logits",
    "compute_probe",
    "check_probe",
    "check_bundle_probe",
]

FULL_BOX = [0.0, 0.0, 1.0, 1.0]
CENTER_BOX = [0.2, 0.2, 0.8, 0.8]
# The four variants a view can take; an image gets a different variant in each round.
_VARIANTS: list[tuple[list[float], bool]] = [
    (FULL_BOX, False),
    (CENTER_BOX, False),
    (FULL_BOX, True),
    (CENTER_BOX, True),
]
PROBE_VIEWS = 8
DEFAULT_K = 5
_CAUSE = "the foundation weights, the open_clip version or the deltas differ from the builder's"


def probe_views(num_images: int, n: int = PROBE_VIEWS) -> list[tuple[int, list[float], bool]]:
    """The deterministic probe views ``(image, box, flip)`` of a set of ``num_images`` images.

    Round ``r`` visits images ``0 .. num_images-1`` and gives image ``i`` variant ``(i + r) % 4``
    (full or centre box, flipped or not), so a large set spreads the views over ``n`` different
    images with all four variants, and a set of one or two images still gets distinct views. At most
    ``4 * num_images`` views exist; fewer than ``n`` are returned when that is smaller.
    """
    if num_images <= 0 or n <= 0:
        return []
    views: list[tuple[int, list[float], bool]] = []
    for r in range(len(_VARIANTS)):
        for i in range(num_images):
            if len(views) >= n:
                return views
            box, flip = _VARIANTS[(i + r) % len(_VARIANTS)]
            views.append((i, list(box), flip))
    return views


@contextlib.contextmanager
def exact_float32(device: torch.device | str) -> Iterator[None]:
    """Run the enclosed code in plain float32: autocast and TF32 matmuls/convolutions off."""
    device = torch.device(device)
    old_matmul = torch.backends.cuda.matmul.allow_tf32
    old_cudnn = torch.backends.cudnn.allow_tf32
    old_precision = torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_matmul
        torch.backends.cudnn.allow_tf32 = old_cudnn
        torch.set_float32_matmul_precision(old_precision)


def _projector_device(projector: torch.nn.Module) -> torch.device:
    for p in projector.parameters():
        return p.device
    for b in projector.buffers():
        return b.device
    return torch.device("cpu")


def probe_inputs(
    images: torch.Tensor, views: Sequence[tuple[int, Sequence[float], bool]], size: int
) -> torch.Tensor:
    """The probe views as float images ``[V, 3, size, size]`` in [0, 1] (one batched resampling)."""
    idx = torch.tensor([v[0] for v in views], dtype=torch.long, device=images.device)
    boxes = torch.tensor([list(v[1]) for v in views], dtype=torch.float32, device=images.device)
    flips = torch.tensor([bool(v[2]) for v in views], dtype=torch.bool, device=images.device)
    return crop_resize(images.index_select(0, idx), boxes, flips, size)


def probe_logits(
    projector: torch.nn.Module,
    images: torch.Tensor,
    views: Sequence[tuple[int, Sequence[float], bool]],
    size: int,
) -> torch.Tensor:
    """Float32 logits ``[V, C]`` of ``projector`` on the probe views, computed without autocast."""
    device = _projector_device(projector)
    with exact_float32(device), torch.no_grad():
        # Only the probed rows go to the device: the image set may live in (pinned) host memory
        # precisely because it does not fit there.
        idx = torch.tensor([v[0] for v in views], dtype=torch.long, device=images.device)
        picked = images.index_select(0, idx).to(device)
        x = probe_inputs(picked, [(i, v[1], v[2]) for i, v in enumerate(views)], size)
        forward = getattr(projector, "forward_float32", None)
        out = forward(x) if callable(forward) else projector(x)
    return out.float()


def compute_probe(
    projector: torch.nn.Module,
    images: torch.Tensor,
    *,
    n: int = PROBE_VIEWS,
    k: int = DEFAULT_K,
    size: int | None = None,
) -> Probe:
    """Record the probe of ``projector`` on the uint8 images ``[N, 3, H, W]`` of a bundle.

    ``size`` is the side the views are resampled to (default: the foundation's input size, so the
    projector does not resize again). The tolerance is 2e-3 of the largest absolute logit seen
    (at least 1e-3): float32 on another device or BLAS differs by far less, while a different
    foundation, open_clip resampling or delta moves logits by far more.
    """
    if size is None:
        size = int(getattr(getattr(projector, "foundation", None), "image_size", 0) or images.shape[-1])
    views = probe_views(int(images.shape[0]), n)
    if not views:
        return Probe(size=int(size), atol=1e-3, views=[])
    logits = probe_logits(projector, images, views, int(size)).cpu()
    k = max(1, min(int(k), logits.shape[1]))
    top = logits.topk(k, dim=1)
    atol = max(1e-3, 2e-3 * float(logits.abs().max()))
    return Probe(
        size=int(size),
        atol=float(atol),
        views=[
            ProbeView(
                image=int(img),
                box=[float(b) for b in box],
                flip=bool(flip),
                topk_indices=[int(c) for c in top.indices[j]],
                topk_logits=[float(v) for v in top.values[j]],
            )
            for j, (img, box, flip) in enumerate(views)
        ],
    )


def check_probe(
    projector: torch.nn.Module,
    images: torch.Tensor,
    probe: Probe,
    *,
    file: str | None = None,
    classes: Sequence[str] | None = None,
) -> None:
    """Recompute the probe and raise :class:`ProbeMismatchError` if the projector differs.

    For each view, the recomputed logits at the recorded top-k classes must equal the recorded
    logits within ``probe.atol``, and no other class may exceed the k-th recorded logit by more than
    ``probe.atol`` (a class that climbed into the top-k is a difference too). Comparing values at
    fixed indices rather than re-ranking keeps near-ties from failing a correct projector.
    """
    if not probe.views:
        return
    views = [(v.image, v.box, v.flip) for v in probe.views]
    n = int(images.shape[0])
    for j, v in enumerate(probe.views):
        if v.image >= n:
            raise ProbeMismatchError(
                f"view {j} uses image {v.image} but the bundle has {n} images",
                file=file,
                field=f"probe.views[{j}].image",
                fix="rebuild the bundle",
            )
    logits = probe_logits(projector, images, views, probe.size).cpu()
    num_classes = logits.shape[1]
    atol = probe.atol

    def name(c: int) -> str:
        return f"class {c} ({classes[c]!r})" if classes is not None and c < len(classes) else f"class {c}"

    for j, v in enumerate(probe.views):
        where = f"view {j} (image {v.image}, box {v.box}, {'flipped' if v.flip else 'not flipped'})"
        bad = [c for c in v.topk_indices if c >= num_classes]
        if bad:
            raise ProbeMismatchError(
                f"{where}: recorded {name(bad[0])} but the projector has {num_classes} classes",
                file=file,
                field=f"probe.views[{j}]",
                fix=_CAUSE,
            )
        row = logits[j]
        recorded = torch.tensor(v.topk_logits, dtype=torch.float32)
        idx = torch.tensor(v.topk_indices, dtype=torch.long)
        got = row[idx]
        diff = (got - recorded).abs()
        worst = int(diff.argmax())
        if not bool(torch.isfinite(got).all()) or float(diff[worst]) > atol:
            c = v.topk_indices[worst]
            raise ProbeMismatchError(
                f"{where}: {name(c)} logit {float(got[worst]):.4f} vs recorded "
                f"{v.topk_logits[worst]:.4f} (tolerance {atol:.4g}); {_CAUSE}",
                file=file,
                field=f"probe.views[{j}].topk_logits[{worst}]",
                fix="use the foundation weights and open_clip version the bundle was built with, or rebuild it",
            )
        others = row.clone()
        others[idx] = -float("inf")
        kth = float(recorded.min())
        if others.numel() and float(others.max()) > kth + atol:
            c = int(others.argmax())
            raise ProbeMismatchError(
                f"{where}: {name(c)} now has logit {float(others[c]):.4f}, above the recorded "
                f"top-{len(v.topk_indices)} (lowest {kth:.4f}, tolerance {atol:.4g}); {_CAUSE}",
                file=file,
                field=f"probe.views[{j}].topk_indices",
                fix="use the foundation weights and open_clip version the bundle was built with, or rebuild it",
            )


def check_bundle_probe(
    bundle: Bundle, *, device: str | torch.device = "cpu", images: torch.Tensor | None = None
) -> list[str]:
    """Rebuild the merged projector of ``bundle`` and check its probe; one line per problem.

    ``[]`` means the projector reproduces the recorded logits (or the bundle has no probe). A probe
    mismatch comes back as its :class:`ProbeMismatchError` message; an error that stops the
    projector from loading at all (missing foundation, fingerprint mismatch) is raised. This is
    what ``hellofmt verify`` runs after the file checks (see :func:`hellofmt.verify.verify_bundle`).
    """
    probe = bundle.manifest.probe
    if probe is None or not probe.views:
        return []
    if images is None:
        images, _ = bundle.read_images()
    projector = Projector.from_bundle(bundle, device=device)
    try:
        check_probe(
            projector,
            images,
            probe,
            file=str(bundle.path / MANIFEST_NAME),
            classes=bundle.manifest.classes,
        )
    except ProbeMismatchError as e:
        return [str(e)]
    return []
