"""Batched augmentation: crop boxes, flips, one-pass crop+flip+resize, CutMix, MixUp, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hellofmt import augment as A
from hellofmt.errors import InputError
from hellofmt.manifest import MIX_MODES

CUDA = torch.cuda.is_available()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uint8(n=4, h=16, w=16, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=gen(seed))


def _float(n=4, h=16, w=16, seed=0):
    return torch.rand(n, 3, h, w, generator=gen(seed))


def _pixel_ratio(boxes, aspect):
    return (boxes[:, 2] - boxes[:, 0]) * aspect / (boxes[:, 3] - boxes[:, 1])


# ------------------------------------------------------------------------------------------------
# boxes and flips
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aspect", [1.0, 0.5, 16 / 9, 5.0])
def test_boxes_stay_inside_the_image(aspect):
    boxes = A.sample_boxes(20000, generator=gen(1), aspect=aspect)
    assert boxes.shape == (20000, 4) and boxes.dtype == torch.float32
    x0, y0, x1, y1 = boxes.unbind(1)
    assert bool((x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1).all() and (y1 <= 1).all())
    assert bool((x1 > x0).all() and (y1 > y0).all())
    r = _pixel_ratio(boxes, aspect)
    assert bool((r >= 3 / 4 - 1e-4).all() and (r <= 4 / 3 + 1e-4).all())


def test_box_area_and_ratio_follow_the_ranges():
    boxes = A.sample_boxes(20000, scale=(0.25, 0.5), ratio=(0.5, 2.0), generator=gen(2))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert area.min() >= 0.25 - 1e-5 and area.max() <= 0.5 + 1e-5
    # log-ratio is uniform: about half the boxes are wider than tall.
    wide = (_pixel_ratio(boxes, 1.0) > 1).float().mean()
    assert abs(float(wide) - 0.5) < 0.03
    # Positions are uniform over where the box fits: box centres spread over the whole range.
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    assert cx.min() < 0.3 and cx.max() > 0.7


def test_boxes_match_torchvision_statistics():
    tv = pytest.importorskip("torchvision.transforms")
    torch.manual_seed(0)
    img = torch.zeros(1, 100, 160)
    n = 3000
    areas, ratios = [], []
    for _ in range(n):  # torchvision's own per-sample reference, not the code under test
        i, j, h, w = tv.RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        areas.append(h * w / (100 * 160))
        ratios.append(math.log(w / h))
    boxes = A.sample_boxes(n, generator=gen(3), aspect=160 / 100)
    ours_area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).double()
    ours_ratio = torch.log(_pixel_ratio(boxes, 160 / 100)).double()
    assert abs(ours_area.mean() - torch.tensor(areas).mean()) < 0.03
    assert abs(ours_ratio.mean() - torch.tensor(ratios).mean()) < 0.03
    assert abs(ours_ratio.std() - torch.tensor(ratios, dtype=torch.float64).std()) < 0.03


@pytest.mark.parametrize(
    "aspect, ratio, want",
    [
        (1.0, (2.0, 2.0), [0.0, 0.25, 1.0, 0.75]),  # image narrower than allowed: full width
        (4.0, (2.0, 2.0), [0.25, 0.0, 0.75, 1.0]),  # image wider than allowed: full height
        (1.5, (1.0, 2.0), [0.0, 0.0, 1.0, 1.0]),  # image ratio allowed: whole image
    ],
)
def test_fallback_is_torchvision_centre_crop(aspect, ratio, want):
    # scale=(1, 1) with a ratio other than the image's never fits: every box falls back.
    boxes = A.sample_boxes(5, scale=(1.0, 1.0), ratio=ratio, generator=gen(), aspect=aspect)
    torch.testing.assert_close(boxes, torch.tensor([want] * 5), atol=1e-6, rtol=0)


@settings(max_examples=60, deadline=None)
@given(
    smin=st.floats(0.01, 1.0),
    sspan=st.floats(0.0, 1.0),
    rmin=st.floats(0.1, 4.0),
    rspan=st.floats(1.0, 4.0),
    aspect=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**20),
)
def test_boxes_property(smin, sspan, rmin, rspan, aspect, seed):
    smax = min(1.0, smin + sspan)
    rmax = rmin * rspan
    boxes = A.sample_boxes(64, scale=(smin, smax), ratio=(rmin, rmax), generator=gen(seed), aspect=aspect)
    x0, y0, x1, y1 = boxes.unbind(1)
    assert bool((x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1).all() and (y1 <= 1).all())
    assert bool((x1 > x0).all() and (y1 > y0).all())
    # Accepted boxes and the fallback (the image's ratio clamped into range) both respect ratio.
    r = _pixel_ratio(boxes, aspect)
    assert bool((r >= rmin * (1 - 1e-4)).all() and (r <= rmax * (1 + 1e-4)).all())


def test_flips():
    f = A.sample_flips(20000, generator=gen(4))
    assert f.dtype == torch.bool and abs(float(f.float().mean()) - 0.5) < 0.02
    assert not A.sample_flips(100, p=0.0, generator=gen()).any()
    assert A.sample_flips(100, p=1.0, generator=gen()).all()
    assert abs(float(A.sample_flips(20000, p=0.2, generator=gen(5)).float().mean()) - 0.2) < 0.02


@pytest.mark.parametrize(
    "call",
    [
        lambda: A.sample_boxes(-1),
        lambda: A.sample_boxes(4, scale=(0.0, 1.0)),
        lambda: A.sample_boxes(4, scale=(0.5, 0.2)),
        lambda: A.sample_boxes(4, scale=(0.5, 1.5)),
        lambda: A.sample_boxes(4, ratio=(0.0, 1.0)),
        lambda: A.sample_boxes(4, ratio=(2.0, 1.0)),
        lambda: A.sample_boxes(4, ratio="x"),
        lambda: A.sample_boxes(4, aspect=0.0),
        lambda: A.sample_flips(4, p=1.5),
        lambda: A.sample_flips(2.5),
    ],
)
def test_sampling_bad_input(call):
    with pytest.raises(InputError):
        call()


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: A.sample_flips(3, p="x"), "p"),
        (lambda: A.sample_flips(3, p=None), "p"),
        (lambda: A.sample_flips(3, p=float("nan")), "p"),
        (lambda: A.sample_boxes(3, aspect="x"), "aspect"),
        (lambda: A.sample_boxes(3, aspect=None), "aspect"),
        (lambda: A.sample_boxes(3, aspect=float("inf")), "aspect"),
        (lambda: A.sample_boxes(3, scale=(0.5, 10**400)), "scale"),
        (lambda: A.sample_boxes(3, scale=(0.5, None)), "scale"),
        (lambda: A.sample_boxes(3, ratio=(1.0, float("nan"))), "ratio"),
        (lambda: A.sample_boxes(3, ratio=(1.0, 2.0, 3.0)), "ratio"),
        (lambda: A.cutmix(torch.rand(2, 3, 4, 4), alpha="x"), "alpha"),
        (lambda: A.mixup(torch.rand(2, 3, 4, 4), alpha=None), "alpha"),
        (lambda: A.cutmix_boxes(2, alpha=10**400), "alpha"),
    ],
)
def test_sampling_non_numbers_are_input_errors(call, field):
    # float() of these raised a bare TypeError/ValueError/OverflowError before.
    with pytest.raises(InputError) as e:
        call()
    assert e.value.field == field


# ------------------------------------------------------------------------------------------------
# crop + flip + resize
# ------------------------------------------------------------------------------------------------
FULL = [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("h, w", [(16, 16), (17, 23), (224, 224), (1, 5), (31, 7)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_full_box_reproduces_the_image_exactly(h, w, mode):
    x = _float(3, h, w, seed=h * w)
    boxes = torch.tensor([FULL] * 3)
    no = torch.zeros(3, dtype=torch.bool)
    yes = torch.ones(3, dtype=torch.bool)
    assert torch.equal(A.crop_resize(x, boxes, no, (h, w), mode=mode), x)
    assert torch.equal(A.crop_resize(x, boxes, None, (h, w), mode=mode), x)
    assert torch.equal(A.crop_resize(x, boxes, yes, (h, w), mode=mode), torch.flip(x, dims=[-1]))
    u = _uint8(2, h, w)
    assert torch.equal(A.crop_resize(u, boxes[:2], no[:2], (h, w), mode=mode), u.float() / 255)


def test_fused_path_is_close_but_not_bit_exact():
    x = _float(2, 224, 224)
    boxes = torch.tensor([FULL] * 2)
    fused = A.crop_resize(x, boxes, None, 224, exact=False)
    torch.testing.assert_close(fused, x, atol=1e-4, rtol=0)
    assert torch.equal(A.crop_resize(x, boxes, None, 224), x)


def test_flip_is_per_sample():
    x = _float(4, 12, 10)
    flips = torch.tensor([True, False, False, True])
    y = A.crop_resize(x, torch.tensor([FULL] * 4), flips, (12, 10))
    for i in range(4):
        assert torch.equal(y[i], torch.flip(x[i], dims=[-1]) if flips[i] else x[i])


def test_crop_of_whole_pixels_is_exact():
    # Box edges are pixel edges: a box of whole pixels at its own size is exactly those pixels.
    x = _float(2, 16, 16)
    left = A.crop_resize(x[:1], torch.tensor([[0.0, 0.0, 0.5, 1.0]]), None, (16, 8))
    assert torch.equal(left[0], x[0, :, :, :8])
    part = A.crop_resize(x[1:], torch.tensor([[0.25, 0.5, 0.75, 1.0]]), torch.tensor([True]), (8, 8))
    assert torch.equal(part[0], torch.flip(x[1, :, 8:, 4:12], dims=[-1]))
    # Halving: each output pixel is the mean of a 2x2 block (bilinear at the block's centre).
    half = A.crop_resize(x[:1], torch.tensor([FULL]), None, 8)
    torch.testing.assert_close(half, F.avg_pool2d(x[:1], 2))


def _grid_sample_reference(x, boxes, flips, size):
    """The geometry the loader promises: per-sample affine grids, align_corners=False, border."""
    x0, y0, x1, y1 = boxes.unbind(1)
    sx = torch.where(flips, -(x1 - x0), x1 - x0)
    zero = torch.zeros_like(sx)
    theta = torch.stack(
        [torch.stack([sx, zero, x0 + x1 - 1], 1), torch.stack([zero, y1 - y0, y0 + y1 - 1], 1)], dim=1
    )
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@settings(max_examples=30, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    oh=st.integers(1, 40),
    ow=st.integers(1, 40),
    seed=st.integers(0, 2**20),
)
def test_crop_resize_matches_affine_grid_sample(h, w, oh, ow, seed):
    x = _float(5, h, w, seed=seed)
    g = gen(seed)
    boxes = A.sample_boxes(5, generator=g, aspect=w / h)
    flips = A.sample_flips(5, generator=g)
    y = A.crop_resize(x, boxes, flips, (oh, ow))
    assert y.shape == (5, 3, oh, ow)
    ref = _grid_sample_reference(x, boxes, flips, (oh, ow))
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=0)
    assert y.min() >= 0 and y.max() <= 1
    fused = A.crop_resize(x, boxes, flips, (oh, ow), exact=False)
    torch.testing.assert_close(fused, ref, atol=1e-6, rtol=0)


def test_crop_resize_upscale_uses_border_values():
    # A 2x2 checkerboard upscaled 4x: samples past the outer pixel centres take the border value
    # (zero padding would darken them), the centre blends.
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).repeat(1, 3, 1, 1)
    y = A.crop_resize(x, torch.tensor([FULL]), None, 8)
    assert y.shape == (1, 3, 8, 8)
    assert float(y[0, 0, 0, 0]) == 0.0 and float(y[0, 0, 0, 7]) == 1.0 and float(y[0, 0, 7, 7]) == 0.0
    # output pixel 3 reads input coordinate 3.5 / 4 - 0.5 = 0.375 on both axes
    assert float(y[0, 0, 3, 3]) == pytest.approx(2 * 0.375 * 0.625)


def test_crop_resize_keeps_float_dtype():
    x = _float(2, 8, 8).double()
    assert A.crop_resize(x, torch.tensor([FULL] * 2), None, 4).dtype == torch.float64
    assert A.crop_resize(_uint8(2, 8, 8), torch.tensor([FULL] * 2), None, 4).dtype == torch.float32
    h = _float(2, 8, 8).half()
    y = A.crop_resize(h, torch.tensor([FULL] * 2), None, 8)
    assert y.dtype == torch.float16 and torch.equal(y, h)


@pytest.mark.parametrize(
    "images, boxes, flips, size, mode",
    [
        (torch.rand(3, 8, 8), torch.zeros(3, 4), None, 8, "bilinear"),  # 3-D
        (torch.zeros(2, 3, 8, 8, dtype=torch.int32), torch.zeros(2, 4), None, 8, "bilinear"),
        ("not a tensor", torch.zeros(2, 4), None, 8, "bilinear"),
        (torch.rand(2, 3, 8, 8), torch.zeros(3, 4), None, 8, "bilinear"),  # boxes for 3 images
        (torch.rand(2, 3, 8, 8), torch.zeros(2, 4), torch.zeros(3, dtype=torch.bool), 8, "bilinear"),
        (torch.rand(2, 3, 8, 8), torch.zeros(2, 4), None, 0, "bilinear"),
        (torch.rand(2, 3, 8, 8), torch.zeros(2, 4), None, (8, 8, 8), "bilinear"),
        (torch.rand(2, 3, 8, 8), torch.zeros(2, 4), None, 8, "area"),
        (torch.rand(0, 3, 8, 8), torch.zeros(0, 4), None, 8, "bilinear"),
    ],
)
def test_crop_resize_bad_input(images, boxes, flips, size, mode):
    with pytest.raises(InputError):
        A.crop_resize(images, boxes, flips, size, mode=mode)


def test_random_resized_crop_is_deterministic():
    x = _uint8(6, 20, 30)
    a = A.random_resized_crop(x, 12, generator=gen(9))
    b = A.random_resized_crop(x, 12, generator=gen(9))
    c = A.random_resized_crop(x, 12, generator=gen(10))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (6, 3, 12, 12)


# ------------------------------------------------------------------------------------------------
# CutMix and MixUp
# ------------------------------------------------------------------------------------------------
def _is_derangement(perm, n):
    return sorted(perm.tolist()) == list(range(n)) and (n == 1 or bool((perm != torch.arange(n)).all()))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 8),
    h=st.integers(1, 24),
    w=st.integers(1, 24),
    alpha=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**20),
)
def test_cutmix_pasted_area_matches_lam(n, h, w, alpha, seed):
    # Distinct random floats: a pixel differs from the original exactly where the partner's shows.
    x = _float(n, h, w, seed=seed)
    mixed, perm, lam = A.cutmix(x, alpha=alpha, generator=gen(seed))
    assert mixed.shape == x.shape and lam.shape == (n,) and lam.dtype == torch.float32
    assert _is_derangement(perm, n)
    pasted = (mixed != x).any(dim=1)  # [n, h, w]
    torch.testing.assert_close(1 - pasted.float().mean(dim=(1, 2)), lam, atol=1e-6, rtol=0)
    assert bool((lam >= 0).all() and (lam <= 1).all())
    for i in range(n):
        m = pasted[i]
        # the pasted region is one rectangle, filled with the partner's pixels
        rows, cols = m.any(1), m.any(0)
        assert torch.equal(m, rows[:, None] & cols[None, :])
        assert torch.equal(mixed[i][:, m], x[perm[i]][:, m])
        assert torch.equal(mixed[i][:, ~m], x[i][:, ~m])


def test_cutmix_lam_follows_beta():
    x = torch.rand(4000, 1, 32, 32, generator=gen())
    _, _, lam = A.cutmix(x, alpha=1.0, generator=gen(1))
    # Independent continuous simulation of the same recipe: lam0 ~ Beta(1, 1) = U(0, 1), box of
    # sides sqrt(1 - lam0) centred uniformly, clipped to the image; lam = 1 - clipped area.
    g = gen(2)
    lam0, cx, cy = torch.rand(3, 200000, generator=g, dtype=torch.float64)
    half = torch.sqrt(1 - lam0) / 2
    side_x = (cx + half).clamp(max=1) - (cx - half).clamp(min=0)
    side_y = (cy + half).clamp(max=1) - (cy - half).clamp(min=0)
    want = float((1 - side_x * side_y).mean())
    assert abs(float(lam.mean()) - want) < 0.02
    assert float(lam.min()) < 0.1 and float(lam.max()) > 0.95


def test_cutmix_single_image_is_unchanged_and_uint8_scaled():
    u = _uint8(1, 8, 8)
    mixed, perm, lam = A.cutmix(u, generator=gen())
    assert perm.tolist() == [0]
    assert torch.equal(mixed, u.float() / 255)


def test_mixup_is_the_convex_combination():
    x = _float(6, 8, 8)
    mixed, perm, lam = A.mixup(x, alpha=0.8, generator=gen(3))
    assert _is_derangement(perm, 6)
    l4 = lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(mixed, l4 * x + (1 - l4) * x[perm])
    assert bool((lam > 0).all() and (lam < 1).all())
    assert mixed.min() >= 0 and mixed.max() <= 1
    assert len(set(lam.tolist())) == 6  # one lambda per sample


def test_blend_is_mixup_at_any_resolution():
    x = _float(5, 8, 8)
    mixed, perm, lam = A.mixup(x, generator=gen(4))
    torch.testing.assert_close(A.blend(x, perm, lam), mixed, rtol=0, atol=0)
    u = _uint8(5, 6, 6)
    l4 = lam.view(-1, 1, 1, 1)
    f = u.float() / 255
    torch.testing.assert_close(A.blend(u, perm, lam), (l4 * f + (1 - l4) * f[perm]).clamp(0, 1))


@pytest.mark.parametrize("fn", [A.cutmix, A.mixup])
def test_mix_bad_input(fn):
    with pytest.raises(InputError):
        fn(torch.rand(2, 3, 4, 4), alpha=0.0)
    with pytest.raises(InputError):
        fn(torch.rand(3, 4, 4))


def test_apply_mix_modes():
    x = _uint8(8, 12, 12)
    xf = x.float() / 255
    assert torch.equal(A.apply_mix(x, "none", generator=gen()), xf)
    assert torch.equal(A.apply_mix(x, "cutmix", generator=gen(1)), A.cutmix(x, generator=gen(1))[0])
    assert torch.equal(A.apply_mix(x, "mixup", generator=gen(1)), A.mixup(x, generator=gen(1))[0])
    kinds = set()
    for seed in range(30):
        y = A.apply_mix(x, "cutmix-mixup", generator=gen(seed))
        # CutMix only copies pixels: each is exactly the image's or one other image's value.
        copied = ((y[:, None] == xf[None]).all(dim=2)).any(dim=1).all()
        kinds.add("cutmix" if bool(copied) else "mixup")
    assert kinds == {"cutmix", "mixup"}
    assert set(MIX_MODES) == {"none", "cutmix", "mixup", "cutmix-mixup"}
    with pytest.raises(InputError, match="unknown mix mode"):
        A.apply_mix(x, "cutout", generator=gen())


@pytest.mark.parametrize("mode", ["cutmix", "mixup", "cutmix-mixup"])
def test_mix_is_deterministic(mode):
    x = _uint8(8, 10, 10)
    a = A.apply_mix(x, mode, generator=gen(5))
    b = A.apply_mix(x, mode, generator=gen(5))
    c = A.apply_mix(x, mode, generator=gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# devices
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cpu_and_cuda_agree():
    x = _uint8(16, 24, 32)
    out = {}
    for dev in ("cpu", "cuda"):
        xd = x.to(dev)
        g = gen(11)
        views, boxes, flips = A.random_resized_crop(xd, 20, generator=g)
        mixed, perm, lam = A.cutmix(views, generator=g)
        mixed2, perm2, lam2 = A.mixup(views, generator=g)
        assert views.device.type == dev and perm.device.type == dev
        out[dev] = [t.cpu() for t in (views, boxes, flips, mixed, perm, lam, mixed2, perm2, lam2)]
    for a, b in zip(out["cpu"], out["cuda"]):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(a, b)


def test_device_argument_places_samples():
    boxes = A.sample_boxes(4, generator=gen(), device="cpu")
    flips = A.sample_flips(4, generator=gen(), device="meta")
    assert boxes.device.type == "cpu" and flips.device.type == "meta"


def test_paste_at_two_resolutions_agrees_with_cutmix():
    x = torch.rand(6, 3, 16, 16)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    mixed, perm, lam = A.cutmix(x, generator=g1)
    perm2, boxes = A.cutmix_boxes(6, generator=g2)
    mixed2, lam2 = A.paste(x, perm2, boxes)
    assert torch.equal(perm, perm2) and torch.equal(mixed, mixed2) and torch.equal(lam, lam2)
    assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2] >= boxes[:, 0]).all()
