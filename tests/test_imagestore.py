"""Image shards: codecs, shard cutting, defensive reading."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hellofmt.errors import ImageDecodeError, ImageStoreError, InputError, TensorFileError
from hellofmt.imagestore import (
    decode_image,
    encode_image,
    read_safetensors_header,
    read_shard,
    shard_name,
    write_shards,
)

from bundles import smooth_images


@pytest.fixture
def imgs():
    return smooth_images(6, 12, 10, seed=1)


@pytest.mark.parametrize("codec", ["png", "raw"])
def test_lossless_codecs_round_trip_exactly(imgs, codec):
    for img in imgs:
        buf = encode_image(img, codec)
        assert torch.equal(decode_image(buf, codec, 12, 10), img)


def test_raw_is_chw_bytes(imgs):
    assert encode_image(imgs[0], "raw") == imgs[0].numpy().tobytes()


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_lossy_codecs_are_close_and_quality_matters(codec):
    img = smooth_images(1, 64, 64, seed=2)[0]
    lo, hi = encode_image(img, codec, 20), encode_image(img, codec, 95)
    assert len(lo) < len(hi)
    back = decode_image(hi, codec, 64, 64).float()
    assert (back - img.float()).abs().mean() < 6


@pytest.mark.parametrize(
    "img, codec, quality",
    [
        (torch.zeros(3, 4, 4, dtype=torch.float32), "png", None),
        (torch.zeros(4, 4, 4, dtype=torch.uint8), "png", None),
        (torch.zeros(3, 4, 4, dtype=torch.uint8), "gif", None),
        (torch.zeros(3, 4, 4, dtype=torch.uint8), "png", 90),
        (torch.zeros(3, 4, 4, dtype=torch.uint8), "jpeg", 0),
    ],
)
def test_encode_rejects_bad_arguments(img, codec, quality):
    with pytest.raises(InputError):
        encode_image(img, codec, quality)


def test_decode_rejects_wrong_size_format_and_garbage(imgs):
    png = encode_image(imgs[0], "png")
    with pytest.raises(ImageDecodeError, match="expected 11x12"):
        decode_image(png, "png", 12, 11, file="s.safetensors", index=3)
    with pytest.raises(ImageDecodeError, match="image 3"):
        decode_image(png, "jpeg", 12, 10, file="s.safetensors", index=3)
    with pytest.raises(ImageDecodeError):
        decode_image(b"\x89PNG\r\n\x1a\n garbage", "png", 12, 10)
    with pytest.raises(ImageDecodeError, match="raw image has"):
        decode_image(b"\x00" * 7, "raw", 12, 10)


def test_grey_image_is_refused():
    import io

    from PIL import Image

    bio = io.BytesIO()
    Image.new("L", (10, 12)).save(bio, format="PNG")
    with pytest.raises(ImageDecodeError, match="mode"):
        decode_image(bio.getvalue(), "png", 12, 10)


def test_shards_are_cut_at_the_byte_limit(tmp_path, imgs):
    labels = torch.arange(6) % 3
    one = len(encode_image(imgs[0], "raw")) + 16
    shards = write_shards(tmp_path, imgs, labels, codec="raw", max_shard_bytes=2 * one)
    assert shards == [(shard_name(i, 3), 2) for i in range(3)]
    got = [read_shard(tmp_path / n, codec="raw", height=12, width=10, num_classes=3, expected_count=c)
           for n, c in shards]
    assert torch.equal(torch.cat([g[0] for g in got]), imgs)
    assert torch.equal(torch.cat([g[1] for g in got]), labels)


def test_an_image_over_the_limit_gets_its_own_shard(tmp_path, imgs):
    shards = write_shards(tmp_path, imgs[:3], torch.zeros(3, dtype=torch.long), codec="raw", max_shard_bytes=10)
    assert [c for _, c in shards] == [1, 1, 1]


def test_zero_images_give_one_empty_shard(tmp_path):
    shards = write_shards(tmp_path, torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    assert shards == [(shard_name(0, 1), 0)]
    x, y = read_shard(tmp_path / shards[0][0], codec="png", height=8, width=8, num_classes=2)
    assert x.shape == (0, 3, 8, 8) and y.shape == (0,)


def test_thread_count_does_not_change_the_result(tmp_path, imgs):
    (name, _), = write_shards(tmp_path, imgs, torch.zeros(6, dtype=torch.long), num_threads=3)
    a, _ = read_shard(tmp_path / name, codec="png", height=12, width=10, num_classes=1, num_threads=1)
    b, _ = read_shard(tmp_path / name, codec="png", height=12, width=10, num_classes=1, num_threads=4)
    assert torch.equal(a, b) and torch.equal(a, imgs)


def test_metadata_is_written(tmp_path, imgs):
    (name, _), = write_shards(tmp_path, imgs, torch.zeros(6, dtype=torch.long), codec="webp", quality=70)
    meta = read_safetensors_header(tmp_path / name)["__metadata__"]
    assert meta == {"format": "hellofmt-images", "codec": "webp", "height": "12", "width": "10",
                    "count": "6", "quality": "70"}


def test_codec_mismatch_with_the_manifest_is_refused(tmp_path, imgs):
    (name, _), = write_shards(tmp_path, imgs, torch.zeros(6, dtype=torch.long), codec="png")
    with pytest.raises(ImageStoreError, match="codec"):
        read_shard(tmp_path / name, codec="jpeg", height=12, width=10, num_classes=1)


def test_header_length_is_checked_before_reading(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(TensorFileError, match="claims"):
        read_safetensors_header(p)


def test_write_rejects_bad_inputs(tmp_path, imgs):
    with pytest.raises(InputError):
        write_shards(tmp_path, imgs.float(), torch.zeros(6, dtype=torch.long))
    with pytest.raises(InputError):
        write_shards(tmp_path, imgs, torch.zeros(5, dtype=torch.long))
    with pytest.raises(InputError):
        write_shards(tmp_path, imgs, torch.zeros(6))
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 5),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    num_classes=st.integers(1, 4),
    codec=st.sampled_from(["png", "raw"]),
    limit=st.integers(1, 600),
    seed=st.integers(0, 2**31),
)
def test_property_lossless_shards_round_trip(tmp_path_factory, n, h, w, num_classes, codec, limit, seed):
    d = tmp_path_factory.mktemp("shards")
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    shards = write_shards(d, images, labels, codec=codec, max_shard_bytes=limit)
    parts = [read_shard(d / name, codec=codec, height=h, width=w, num_classes=num_classes, expected_count=c)
             for name, c in shards]
    assert torch.equal(torch.cat([p[0] for p in parts]), images)
    assert torch.equal(torch.cat([p[1] for p in parts]), labels)
