"""Batched augmentation on the tensors' device: random resized crop, flip, CutMix, MixUp.

Everything works on a whole batch with tensor ops; there is no per-sample Python. Crop, flip and
resize are one batched resampling (:func:`crop_resize`), with the geometry of per-sample affine
grids (``F.affine_grid`` + ``F.grid_sample``, ``align_corners=False``) but computed as a separable
bilinear filter so that the identity box is exact (see there).

Randomness: every function takes a ``torch.Generator``. Random numbers are drawn on the
generator's device (the CPU for a CPU generator, the usual case) with a fixed count per call that
does not depend on the values drawn, and only then moved to the images' device. So the same seed
gives the same boxes, flips, partners and lambdas on the CPU and on CUDA, and the outputs agree
within float tolerance (the resampling itself runs on the device). ``generator=None`` uses torch's
global CPU generator. :func:`sample_epoch` draws a whole epoch's numbers at once (the same values a
batch-by-batch loop of the same calls draws) and sends them to the device in one non-blocking copy,
so a training loop makes no blocking host-to-device copy per batch.

Images come in as ``uint8`` (scaled by 1/255) or floating point (assumed already in [0, 1]); images
go out as floating point in [0, 1] (float32 for ``uint8`` input, otherwise the input's dtype).
Labels are not mixed here: the projector labels the final view itself.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError
from .manifest import MIX_MODES

__all__ = [
    "to_float",
    "sample_boxes",
    "sample_flips",
    "crop_resize",
    "random_resized_crop",
    "cutmix",
    "cutmix_boxes",
    "paste",
    "mixup",
    "sample_mixup",
    "blend",
    "apply_mix",
    "BatchDraws",
    "sample_epoch",
    "CUTMIX_ALPHA",
    "MIXUP_ALPHA",
]

# timm's defaults.
CUTMIX_ALPHA = 1.0
MIXUP_ALPHA = 0.8

# torchvision's RandomResizedCrop makes 10 attempts before falling back to a centre crop.
_ATTEMPTS = 10


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _check_images(images, what: str = "images") -> None:
    if not isinstance(images, Tensor):
        raise InputError(f"expected a torch.Tensor, got {type(images).__name__}", field=what)
    if images.dim() != 4:
        raise InputError(
            f"expected a 4-D batch [B, C, H, W], got shape {list(images.shape)}",
            field=what,
            fix="add a batch dimension with images.unsqueeze(0)",
        )
    if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
        raise InputError(f"expected uint8 or floating-point images, got {images.dtype}", field=what)
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise InputError(f"empty batch or image: shape {list(images.shape)}", field=what)


def to_float(images: Tensor) -> Tensor:
    """``uint8`` images scaled to float32 in [0, 1]; floating-point images returned as they are."""
    _check_images(images)
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(shape, generator, dtype=torch.float64) -> Tensor:
    return torch.rand(shape, generator=generator, device=_gen_device(generator), dtype=dtype)


def _check_n(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise InputError(f"expected a count >= 0, got {n!r}", field="n")
    return n


def _number(name: str, x) -> float:
    """``float(x)``, or :class:`InputError` naming ``name`` when ``x`` is not a finite number."""
    try:
        v = float(x)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"expected a number, got {x!r}", field=name) from None
    if not math.isfinite(v):
        raise InputError(f"expected a finite number, got {x!r}", field=name)
    return v


def check_range(name: str, pair, lo_exclusive: float, hi: float | None) -> tuple[float, float]:
    try:
        a, b = pair
    except (TypeError, ValueError):
        raise InputError(f"expected two numbers, got {pair!r}", field=name) from None
    a, b = _number(name, a), _number(name, b)
    if not (lo_exclusive < a <= b and (hi is None or b <= hi)):
        bound = f"{lo_exclusive} < min <= max" + (f" <= {hi}" if hi is not None else "")
        raise InputError(f"expected {bound}, got ({a}, {b})", field=name)
    return a, b


# --------------------------------------------------------------------------------------------------
# random resized crop + flip
# --------------------------------------------------------------------------------------------------
def sample_boxes(
    n: int,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    aspect: float = 1.0,
) -> Tensor:
    """``n`` random-resized-crop boxes ``(x0, y0, x1, y1)`` as fractions of the image, float32 ``[n, 4]``.

    torchvision's ``RandomResizedCrop`` semantics for an image of aspect ``aspect`` (width / height):
    the box covers a fraction ``U(scale)`` of the image area with aspect ratio (width / height, in
    pixels) ``exp(U(log ratio))``, at a uniformly random position. Like torchvision, 10 attempts are
    made per box; all 10 are drawn at once and the first that fits inside the image is kept
    (vectorised rejection). A box for which none fits gets torchvision's fallback: the whole image,
    centre-cropped to the nearest allowed ratio. Unlike torchvision, sizes and positions are not
    rounded to whole pixels (the resampler handles sub-pixel boxes), so boxes are image-size free.
    """
    n = _check_n(n)
    smin, smax = check_range("scale", scale, 0.0, 1.0)
    rmin, rmax = check_range("ratio", ratio, 0.0, None)
    aspect = _number("aspect", aspect)
    if not aspect > 0:
        raise InputError(f"expected aspect (width / height) > 0, got {aspect}", field="aspect")
    # A fixed number of draws per call, whatever is accepted, keeps the generator's stream (and so
    # every later batch) independent of the values.
    u = _rand((4, n, _ATTEMPTS), generator)
    area = smin + (smax - smin) * u[0]
    log_r = math.log(rmin) + (math.log(rmax) - math.log(rmin)) * u[1]
    r = torch.exp(log_r)
    # Pixel box w x h with w*h = area*W*H and w/h = r; as fractions fw = w/W, fh = h/H.
    fw = torch.sqrt(area * r / aspect)
    fh = torch.sqrt(area * aspect / r)
    ok = (fw <= 1.0) & (fh <= 1.0)
    first = torch.argmax(ok.to(torch.int8), dim=1)  # first True; 0 when none (masked below)
    any_ok = ok.any(dim=1)
    pick = lambda t: t.gather(1, first[:, None]).squeeze(1)  # noqa: E731
    w, h = pick(fw), pick(fh)
    # torchvision's fallback: whole image, cropped to the closest ratio in range, centred.
    if aspect < rmin:
        fb_w, fb_h = 1.0, aspect / rmin
    elif aspect > rmax:
        fb_w, fb_h = rmax / aspect, 1.0
    else:
        fb_w, fb_h = 1.0, 1.0
    w = torch.where(any_ok, w, torch.full_like(w, fb_w))
    h = torch.where(any_ok, h, torch.full_like(h, fb_h))
    pos = _rand((2, n), generator)
    x0 = torch.where(any_ok, pos[0] * (1.0 - w), (1.0 - w) / 2)
    y0 = torch.where(any_ok, pos[1] * (1.0 - h), (1.0 - h) / 2)
    # min() guards the last ulp: x0 + w may round above 1.
    boxes = torch.stack([x0, y0, torch.clamp(x0 + w, max=1.0), torch.clamp(y0 + h, max=1.0)], dim=1)
    return boxes.to(dtype=torch.float32, device=device)


def sample_flips(
    n: int, *, p: float = 0.5, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """``n`` horizontal-flip decisions, bool ``[n]``, each True with probability ``p``."""
    n = _check_n(n)
    p = _number("p", p)
    if not 0.0 <= p <= 1.0:
        raise InputError(f"expected a probability in [0, 1], got {p}", field="p")
    return (_rand((n,), generator) < p).to(device)


def _size(size) -> tuple[int, int]:
    if isinstance(size, bool):
        raise InputError(f"expected an int or (height, width), got {size!r}", field="size")
    try:
        h = w = operator.index(size)  # int, numpy and 0-d tensor integers
    except TypeError:
        try:
            h, w = (operator.index(s) for s in size)
        except (TypeError, ValueError):
            raise InputError(f"expected an int or (height, width), got {size!r}", field="size") from None
    if h < 1 or w < 1:
        raise InputError(f"expected a positive size, got {size!r}", field="size")
    return h, w


def _taps(lo: Tensor, hi: Tensor, n_in: int, n_out: int, flip: Tensor | None):
    """Source pixel coordinates of ``n_out`` output pixels spanning the box edge ``lo``..``hi``
    (fractions) of an axis of ``n_in`` pixels, float64 ``[B, n_out]``, clamped to the pixel centres.

    Written so that the full box at the same size gives exact integers: the step is
    ``(hi - lo) * n_in / n_out`` (exactly 1.0 there) and every other term is exact, which a
    normalised affine grid cannot guarantee (its round trip through [-1, 1] leaves ~1e-5 pixel).
    """
    lo = lo.double()[:, None] * n_in
    hi = hi.double()[:, None] * n_in
    step = (hi - lo) / n_out
    j = torch.arange(n_out, device=lo.device, dtype=torch.float64)[None, :] + 0.5
    s = lo + j * step - 0.5
    if flip is not None:
        s = torch.where(flip[:, None], hi - j * step - 0.5, s)
    return s.clamp_(0.0, n_in - 1)


def _resample_axis(x: Tensor, s: Tensor, dim: int, mode: str) -> Tensor:
    """Linear (or nearest) interpolation of ``x`` along ``dim`` (2 or 3) at coordinates ``s [B, n]``."""
    b, c, h, w = x.shape
    shape = [b, c, h, w]
    shape[dim] = s.shape[1]
    view = [b, 1, 1, 1]
    view[dim] = s.shape[1]
    if mode == "nearest":
        # floor(s + 0.5) on edge-aligned coordinates is F.interpolate's "nearest-exact".
        idx = torch.floor(s + 0.5).clamp_(max=x.shape[dim] - 1).long()
        return torch.gather(x, dim, idx.view(view).expand(shape))
    i0 = torch.floor(s)
    frac = (s - i0).to(x.dtype).view(view)
    i0 = i0.long()
    i1 = (i0 + 1).clamp_(max=x.shape[dim] - 1)
    a = torch.gather(x, dim, i0.view(view).expand(shape))
    bb = torch.gather(x, dim, i1.view(view).expand(shape))
    # lerp returns a exactly where frac == 0, i.e. where the coordinate is a whole pixel.
    return torch.lerp(a, bb, frac.expand(shape))


def crop_resize(
    images: Tensor,
    boxes: Tensor,
    flips: Tensor | None,
    size: int | tuple[int, int],
    *,
    mode: str = "bilinear",
    exact: bool = True,
) -> Tensor:
    """Crop box ``boxes[i]`` (fractions ``x0, y0, x1, y1``) of ``images[i]``, flip it horizontally
    where ``flips[i]``, and resample it to ``size``: one batched resampling for the whole batch.

    Geometry is that of ``F.affine_grid`` + ``F.grid_sample`` with ``align_corners=False`` and
    ``padding_mode="border"`` (a box edge is a pixel *edge*, as in ``F.interpolate`` and
    torchvision; samples past the outer pixel centres take the border value). The bilinear filter
    is separable for axis-aligned boxes, so it runs as one gather-and-lerp pass per axis with coordinates
    computed in float64: unlike ``grid_sample``, whose normalised grid is off by up to ~1e-5 pixel
    in float32, the full box with no flip at the input's size reproduces the input exactly and a
    flipped full box equals ``torch.flip``. No antialiasing (strong downscaling aliases, as with
    ``grid_sample``). ``mode``: ``"bilinear"`` or ``"nearest"``. ``exact=False`` runs the same
    geometry as one fused ``affine_grid`` + ``grid_sample`` instead: about twice as fast on the CPU,
    but off by up to ~3e-5 at 224 px (float32 grid round-off), so not bit-exact at the identity.
    Boxes are not range-checked (that would cost a device sync per batch): coordinates outside the
    image read border values. Returns floating point in [0, 1], ``[B, C, h, w]`` (float32 for
    ``uint8`` input, otherwise the input's dtype).
    """
    _check_images(images)
    out_h, out_w = _size(size)
    b, _, h, w = images.shape
    if mode not in ("bilinear", "nearest"):
        raise InputError(f"expected bilinear or nearest, got {mode!r}", field="mode")
    if not isinstance(boxes, Tensor) or tuple(boxes.shape) != (b, 4):
        got = list(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise InputError(f"expected boxes of shape [{b}, 4], got {got}", field="boxes")
    if flips is not None and (not isinstance(flips, Tensor) or tuple(flips.shape) != (b,)):
        raise InputError(f"expected flips of shape [{b}]", field="flips")
    x = to_float(images)
    bx = boxes.to(device=x.device)
    fl = flips.to(device=x.device, dtype=torch.bool) if flips is not None else None
    x0, y0, x1, y1 = bx.unbind(1)
    if not exact:
        return _grid_sample(x, bx, fl, out_h, out_w, mode)
    # Half precision would round the interpolation weights; compute in float32 and round once.
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    sx = _taps(x0, x1, w, out_w, fl)
    sy = _taps(y0, y1, h, out_h, None)
    # The pass that shrinks more goes first, so the intermediate is the smaller of the two.
    if out_w * h <= out_h * w:
        out = _resample_axis(_resample_axis(work, sx, 3, mode), sy, 2, mode)
    else:
        out = _resample_axis(_resample_axis(work, sy, 2, mode), sx, 3, mode)
    return out.to(x.dtype)


def _grid_sample(x: Tensor, boxes: Tensor, flips: Tensor | None, out_h: int, out_w: int, mode: str) -> Tensor:
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    bx = boxes.to(work.dtype)
    x0, y0, x1, y1 = bx.unbind(1)
    sx = x1 - x0
    if flips is not None:
        sx = torch.where(flips, -sx, sx)
    zero = torch.zeros_like(sx)
    # Output coordinate u in [-1, 1] reads input coordinate (x0 + x1 - 1) + sx * u: the box's
    # edges -1 + 2 * x0 and -1 + 2 * x1 at u = -1 and u = 1 (swapped when flipped).
    theta = torch.stack(
        [torch.stack([sx, zero, x0 + x1 - 1.0], 1), torch.stack([zero, y1 - y0, y0 + y1 - 1.0], 1)], dim=1
    )
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], out_h, out_w], align_corners=False)
    out = F.grid_sample(work, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.to(x.dtype)


def random_resized_crop(
    images: Tensor,
    size: int | tuple[int, int],
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
    mode: str = "bilinear",
) -> tuple[Tensor, Tensor, Tensor]:
    """Random resized crop and horizontal flip of a batch: :func:`sample_boxes`, :func:`sample_flips`
    (in that order, from ``generator``) then :func:`crop_resize`. Returns ``(views, boxes, flips)``."""
    _check_images(images)
    n, _, h, w = images.shape
    boxes = sample_boxes(n, scale=scale, ratio=ratio, generator=generator, device=images.device, aspect=w / h)
    flips = sample_flips(n, p=flip_p, generator=generator, device=images.device)
    return crop_resize(images, boxes, flips, size, mode=mode), boxes, flips


# --------------------------------------------------------------------------------------------------
# CutMix and MixUp
# --------------------------------------------------------------------------------------------------
def _check_alpha(alpha) -> float:
    alpha = _number("alpha", alpha)
    if not alpha > 0:
        raise InputError(f"expected alpha > 0, got {alpha}", field="alpha")
    return alpha


def _beta(n: int, alpha: float, generator: torch.Generator | None) -> Tensor:
    # torch's Beta/Gamma samplers take no generator, so a numpy generator is seeded from the torch
    # one: deterministic for a seed, drawn on the CPU whatever the device.
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=_gen_device(generator)).item())
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n))


def _partners(n: int, generator: torch.Generator | None, device) -> Tensor:
    # A random permutation with no fixed point (for n > 1): shuffle, then pair each image with the
    # next one in shuffled order. An image mixed with itself would be a wasted, unchanged view.
    order = torch.randperm(n, generator=generator, device=_gen_device(generator))
    perm = torch.empty_like(order)
    perm[order] = order.roll(-1)
    return perm.to(device)


def cutmix_boxes(
    n: int, *, alpha: float = CUTMIX_ALPHA, generator: torch.Generator | None = None, device=None
) -> tuple[Tensor, Tensor]:
    """The random part of CutMix for a batch of ``n``: ``(perm, boxes)``, where ``boxes [n, 4]`` are
    the pasted boxes ``(x0, y0, x1, y1)`` as fractions of the image, clipped to it.

    Per sample, ``lam ~ Beta(alpha, alpha)`` sets a box of area ``1 - lam`` (sides ``sqrt(1 - lam)``
    times the image's) centred uniformly at random. Fractions make the same cut applicable at any
    resolution (:func:`paste`), so a student view and the foundation's view of it can be mixed
    identically. ``perm`` is a random permutation without fixed points (for ``n > 1``).
    """
    alpha = _check_alpha(alpha)
    lam0 = _beta(n, alpha, generator)
    centre = _rand((2, n), generator)
    perm = _partners(n, generator, device if device is not None else _gen_device(generator))
    half = torch.sqrt(1.0 - lam0) / 2
    boxes = torch.stack(
        [centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half], dim=1
    ).clamp(0.0, 1.0)
    return perm, boxes.to(device=perm.device, dtype=torch.float64)


def paste(images: Tensor, perm: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Paste into each image the box ``boxes[i]`` (fractions, as from :func:`cutmix_boxes`) of
    ``images[perm[i]]``, snapped to whole pixels at this resolution; returns ``(mixed, lam)`` with
    ``lam`` the actual fraction of each image kept, ``1 - pasted_pixels / (H * W)``."""
    _check_images(images)
    x = to_float(images)
    b, _, h, w = x.shape
    dev = x.device
    bx = boxes.to(device=dev, dtype=torch.float64)
    bx0 = torch.round(bx[:, 0] * w).long()
    by0 = torch.round(bx[:, 1] * h).long()
    bx1 = torch.round(bx[:, 2] * w).long()
    by1 = torch.round(bx[:, 3] * h).long()
    lam = 1.0 - ((bx1 - bx0) * (by1 - by0)).double() / (h * w)
    cols = torch.arange(w, device=dev)
    rows = torch.arange(h, device=dev)
    in_x = (cols[None, :] >= bx0[:, None]) & (cols[None, :] < bx1[:, None])
    in_y = (rows[None, :] >= by0[:, None]) & (rows[None, :] < by1[:, None])
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # [B, 1, H, W]
    mixed = torch.where(mask, x[perm.to(dev)], x)
    return mixed, lam.to(device=dev, dtype=torch.float32)


def cutmix(
    images: Tensor, *, alpha: float = CUTMIX_ALPHA, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """CutMix: paste into each image a box of its partner ``images[perm[i]]``; returns
    ``(mixed, perm, lam)``: :func:`cutmix_boxes` then :func:`paste`.

    Per sample, ``lam ~ Beta(alpha, alpha)`` sets a box of area ``1 - lam`` (sides
    ``sqrt(1 - lam)`` times the image's) centred uniformly at random; the box is clipped to the
    image and snapped to whole pixels, and ``lam`` returned is the *actual* fraction of the image
    kept, ``1 - pasted_pixels / (H * W)``. ``perm`` is a random permutation without fixed points
    (for a batch of more than one), so every image gets another image's box.
    """
    _check_images(images)
    perm, boxes = cutmix_boxes(images.shape[0], alpha=alpha, generator=generator, device=images.device)
    mixed, lam = paste(images, perm, boxes)
    return mixed, perm, lam


def sample_mixup(
    n: int, *, alpha: float = MIXUP_ALPHA, generator: torch.Generator | None = None, device=None
) -> tuple[Tensor, Tensor]:
    """The random part of MixUp for a batch of ``n``: ``(perm, lam)``, ``lam ~ Beta(alpha, alpha)``
    per sample (float64 ``[n]``) and ``perm`` as in :func:`cutmix_boxes`; :func:`blend` applies them."""
    n = _check_n(n)
    alpha = _check_alpha(alpha)
    lam = _beta(n, alpha, generator)
    perm = _partners(n, generator, device if device is not None else _gen_device(generator))
    return perm, lam.to(device=perm.device)


def mixup(
    images: Tensor, *, alpha: float = MIXUP_ALPHA, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """MixUp: ``mixed[i] = lam[i] * images[i] + (1 - lam[i]) * images[perm[i]]`` with a per-sample
    ``lam ~ Beta(alpha, alpha)``; returns ``(mixed, perm, lam)``, ``perm`` as in :func:`cutmix`:
    :func:`sample_mixup` then :func:`blend`."""
    _check_images(images)
    x = to_float(images)
    perm, lam = sample_mixup(x.shape[0], alpha=alpha, generator=generator, device=x.device)
    lam = lam.to(x.dtype)
    return blend(x, perm, lam), perm, lam.float()


def blend(images: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    """Blend each image with its partner: ``lam[i] * images[i] + (1 - lam[i]) * images[perm[i]]``,
    clamped to [0, 1] (the MixUp counterpart of :func:`paste`, so the same mix can be redone at
    another resolution). Returns floating point in [0, 1]."""
    x = to_float(images)
    lam4 = lam.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    mixed = x * lam4 + x.index_select(0, perm.to(x.device)) * (1.0 - lam4)
    return mixed.clamp_(0.0, 1.0)


def apply_mix(
    images: Tensor,
    mode: str,
    *,
    generator: torch.Generator | None = None,
    cutmix_alpha: float = CUTMIX_ALPHA,
    mixup_alpha: float = MIXUP_ALPHA,
) -> Tensor:
    """Mix a batch by ``mode`` (one of :data:`hellofmt.manifest.MIX_MODES`): ``"none"`` (only
    converted to float), ``"cutmix"``, ``"mixup"``, or ``"cutmix-mixup"`` (one of the two for the
    whole batch, each with probability 0.5, as timm does). Returns float images in [0, 1]."""
    if mode not in MIX_MODES:
        raise InputError(f"unknown mix mode {mode!r}; expected one of {', '.join(MIX_MODES)}", field="mix")
    if mode == "none":
        return to_float(images)
    if mode == "cutmix-mixup":
        mode = "cutmix" if bool(_rand((1,), generator)[0] < 0.5) else "mixup"
    if mode == "cutmix":
        return cutmix(images, alpha=cutmix_alpha, generator=generator)[0]
    return mixup(images, alpha=mixup_alpha, generator=generator)[0]


# --------------------------------------------------------------------------------------------------
# a whole epoch's random numbers at once
# --------------------------------------------------------------------------------------------------
class BatchDraws(NamedTuple):
    """One batch's random choices from :func:`sample_epoch`, on the device (slices of epoch tensors).

    ``boxes``: float32 ``[n, 4]`` crop boxes (:func:`sample_boxes`); ``flips``: bool ``[n]`` or
    ``None`` (no flipping); ``mode``: ``"none"``, ``"cutmix"`` or ``"mixup"`` (a batch of
    ``"cutmix-mixup"`` is one of the two); ``perm``: int64 ``[n]`` partners (``None`` without a
    mix); ``cut``: float64 ``[n, 4]`` CutMix boxes for :func:`paste` (``None`` unless cutmix);
    ``lam``: float32 ``[n]`` MixUp weights for :func:`blend` (``None`` unless mixup).
    """

    boxes: Tensor
    flips: Tensor | None
    mode: str
    perm: Tensor | None
    cut: Tensor | None
    lam: Tensor | None


# Columns of sample_epoch's one float64 buffer: integers up to 2**53 and float32 values are exact
# in float64, so one buffer (one copy) carries every kind of draw.
_BOX, _FLIP, _CUT, _LAM, _PERM, _COLUMNS = slice(0, 4), 4, slice(5, 9), 9, 10, 11


def _host_buffer(rows: int, pin: bool) -> Tensor:
    if pin:
        try:
            return torch.zeros((rows, _COLUMNS), dtype=torch.float64, pin_memory=True)
        except RuntimeError:  # pinning can fail under tight locked-memory limits: a plain copy then
            pass
    return torch.zeros((rows, _COLUMNS), dtype=torch.float64)


def sample_epoch(
    batch_sizes: Sequence[int],
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    aspect: float = 1.0,
    flip: bool = True,
    mix: str = "none",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    cutmix_alpha: float = CUTMIX_ALPHA,
    mixup_alpha: float = MIXUP_ALPHA,
) -> list[BatchDraws]:
    """Every batch's random choices for one epoch, drawn up front and sent to ``device`` in one copy.

    Per batch, in this order from ``generator``: :func:`sample_boxes`, :func:`sample_flips` (if
    ``flip``), for ``"cutmix-mixup"`` one ``torch.rand(())`` choosing CutMix (< 0.5) or MixUp, then
    :func:`cutmix_boxes` or :func:`sample_mixup`. That is the stream a per-batch loop drawing the
    same calls would consume, so the values are the same, and (with a CPU generator) the same on
    every device. They are written into one host buffer (pinned when ``device`` is CUDA), copied
    with ``non_blocking=True`` and sliced per batch: a training loop then makes no blocking
    host-to-device copy per batch.

    Args:
        batch_sizes: the size of each batch of the epoch, in order.
        scale: ``(min, max)`` area fraction of the random resized crop.
        ratio: ``(min, max)`` aspect ratio of the random resized crop.
        aspect: the images' width / height.
        flip: draw horizontal flips (probability 0.5); ``False`` gives ``flips=None``.
        mix: one of :data:`hellofmt.manifest.MIX_MODES`.
        generator: the random stream (a CPU generator for CPU/CUDA agreement).
        device: where the returned tensors live (default: the CPU).
        cutmix_alpha: CutMix's Beta parameter.
        mixup_alpha: MixUp's Beta parameter.

    Returns:
        One :class:`BatchDraws` per batch.

    Raises:
        InputError: a batch size, range, ``aspect`` or ``mix`` out of range.
    """
    sizes = [_check_n(n) for n in batch_sizes]
    if mix not in MIX_MODES:
        raise InputError(f"unknown mix mode {mix!r}; expected one of {', '.join(MIX_MODES)}", field="mix")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    host = _host_buffer(sum(sizes), pin=dev.type == "cuda")
    modes = []
    start = 0
    for n in sizes:
        rows = host[start : start + n]
        rows[:, _BOX] = sample_boxes(n, scale=scale, ratio=ratio, generator=generator, aspect=aspect).double()
        if flip:
            rows[:, _FLIP] = sample_flips(n, generator=generator).double()
        mode = mix
        if mode == "cutmix-mixup":  # one of the two per batch, as timm does
            mode = "cutmix" if bool(torch.rand((), generator=generator, device=_gen_device(generator)) < 0.5) \
                else "mixup"
        if mode == "cutmix":
            perm, cut = cutmix_boxes(n, alpha=cutmix_alpha, generator=generator)
            rows[:, _CUT] = cut
            rows[:, _PERM] = perm.double()
        elif mode == "mixup":
            perm, lam = sample_mixup(n, alpha=mixup_alpha, generator=generator)
            rows[:, _LAM] = lam.to(torch.float32).double()
            rows[:, _PERM] = perm.double()
        modes.append(mode)
        start += n
    # One copy for the epoch; on CUDA it is queued on the stream and the host carries on. The
    # columns are then made contiguous with their own dtype on the device, once per epoch.
    on = host.to(dev, non_blocking=True)
    boxes = on[:, _BOX].to(torch.float32)
    flips = on[:, _FLIP] > 0.5 if flip else None
    cut = on[:, _CUT].contiguous()
    lam = on[:, _LAM].to(torch.float32)
    perm = on[:, _PERM].to(torch.int64)
    out = []
    start = 0
    for n, mode in zip(sizes, modes):
        end = start + n
        mixed = mode != "none"
        out.append(BatchDraws(
            boxes=boxes[start:end],
            flips=flips[start:end] if flips is not None else None,
            mode=mode,
            perm=perm[start:end] if mixed else None,
            cut=cut[start:end] if mode == "cutmix" else None,
            lam=lam[start:end] if mode == "mixup" else None,
        ))
        start = end
    return out
