"""Hostile image shards behind a consistent manifest: offsets, labels, undecodable images, counts
and sizes that disagree with the manifest."""

from __future__ import annotations

import pytest
import torch

from hellofmt.bundle import Bundle
from hellofmt.errors import ImageDecodeError, ImageStoreError, TensorFileError
from hellofmt.imagestore import encode_image

from _hostile import edit_manifest, replace_file, shard_bytes, snapshot
from bundles import make_format_bundle, smooth_images

SHARD = "images-00000-of-00001.safetensors"
META = {"format": "hellofmt-images", "codec": "png", "height": "16", "width": "16", "count": "6"}


@pytest.fixture
def bundle(tmp_path):
    return make_format_bundle(tmp_path / "b")  # 3 classes x 2 images, 16x16 png, one shard


@pytest.fixture
def encoded():
    return [encode_image(img, "png") for img in smooth_images(6, 16, 16, seed=9)]


LABELS = [0, 0, 1, 1, 2, 2]


def refused(bundle, error, match):
    b = Bundle.open(bundle, verify=True)  # files are consistent with the manifest
    before = snapshot(bundle.parent)
    with pytest.raises(error, match=match) as e:
        b.read_images()
    assert snapshot(bundle.parent) == before
    assert SHARD in e.value.file
    problems = b.verify()
    assert len(problems) == 1 and SHARD in problems[0]
    return e.value


def test_control_a_rewritten_shard_is_accepted(bundle, encoded):
    replace_file(bundle, SHARD, shard_bytes(encoded, LABELS, metadata=META))
    assert Bundle.open(bundle, verify=True).verify() == []


@pytest.mark.parametrize(
    "offsets, match",
    [
        (lambda o: [o[0] + 1, *o[1:]], "offsets\\[0\\] is 1"),
        (lambda o: [*o[:-1], o[-1] + 100], "offsets end at"),
        (lambda o: [*o[:-1], o[-1] - 1], "offsets end at"),
        (lambda o: [o[0], o[2], o[1], *o[3:]], "offsets decrease at image 1"),
        (lambda o: [0, -5, *o[2:]], "offsets decrease at image 0"),
        (lambda o: [0, 2**62, *o[2:]], "offsets decrease at image 1"),
    ],
)
def test_offsets_out_of_range_or_not_increasing(bundle, encoded, offsets, match):
    good = [0]
    for e in encoded:
        good.append(good[-1] + len(e))
    replace_file(bundle, SHARD, shard_bytes(encoded, LABELS, offsets=offsets(good), metadata=META))
    err = refused(bundle, ImageStoreError, match)
    assert err.field == "offsets"


def test_offsets_of_the_wrong_length(bundle, encoded):
    replace_file(bundle, SHARD, shard_bytes(encoded, LABELS, offsets=[0, len(encoded[0])], metadata=META))
    refused(bundle, ImageStoreError, "entries for 6 labels")


@pytest.mark.parametrize("bad", [3, -1, 2**40])
def test_label_outside_the_class_range(bundle, encoded, bad):
    labels = [0, 0, 1, bad, 2, 2]
    replace_file(bundle, SHARD, shard_bytes(encoded, labels, metadata=META))
    err = refused(bundle, ImageStoreError, f"image 3 has label {bad}, outside \\[0, 3\\)")
    assert err.field == "labels"


def test_image_that_fails_to_decode(bundle, encoded):
    encoded[4] = encoded[4][:20] + b"\x00" * (len(encoded[4]) - 20)
    replace_file(bundle, SHARD, shard_bytes(encoded, LABELS, metadata=META))
    err = refused(bundle, ImageDecodeError, "does not decode")
    assert err.field == "image 4"


def test_image_of_another_format(bundle, encoded):
    encoded[2] = encode_image(smooth_images(1, 16, 16)[0], "jpeg")
    replace_file(bundle, SHARD, shard_bytes(encoded, LABELS, metadata=META))
    assert refused(bundle, ImageDecodeError, "does not decode").field == "image 2"


def test_image_size_disagreeing_with_the_manifest(bundle, encoded):
    encoded[5] = encode_image(smooth_images(1, 16, 17)[0], "png")
    replace_file(bundle, SHARD, shard_bytes(encoded, LABELS, metadata=META))
    err = refused(bundle, ImageDecodeError, "image is 17x16, expected 16x16")
    assert err.field == "image 5"


@pytest.mark.parametrize("side, match", [(8000, "image is 8000x8000"), (60000, "does not decode|image is")])
def test_huge_declared_image_is_refused_before_decoding(bundle, encoded, side, match):
    import struct
    import zlib

    # A PNG header declaring side x side pixels (8000: 192 MB decoded; 60000: 10 GB, which PIL's
    # own bomb check refuses): the declared size is checked before any pixel is decoded.
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    def chunk_bytes(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk_bytes(b"IHDR", ihdr) + chunk_bytes(b"IDAT", zlib.compress(b"\0" * 64))
    png += chunk_bytes(b"IEND", b"")
    encoded[0] = png
    replace_file(bundle, SHARD, shard_bytes(encoded, LABELS, metadata=META))
    refused(bundle, ImageDecodeError, match)


def test_image_count_disagreeing_with_the_manifest(bundle, encoded):
    replace_file(bundle, SHARD, shard_bytes(encoded[:5], LABELS[:5], metadata={**META, "count": "5"}))
    refused(bundle, ImageStoreError, "shard holds 5 images but the manifest says 6")


def test_shard_metadata_disagreeing_with_the_manifest(bundle, encoded):
    replace_file(bundle, SHARD, shard_bytes(encoded, LABELS, metadata={**META, "height": "32"}))
    refused(bundle, ImageStoreError, "height")


def test_manifest_image_size_disagreeing_with_the_images(bundle):
    edit_manifest(bundle, lambda o: o["images"].update(height=20, width=20))
    b = Bundle.open(bundle)
    with pytest.raises(ImageStoreError):
        b.read_images()


def test_shard_without_its_tensors(bundle):
    from safetensors.torch import save

    replace_file(bundle, SHARD, save({"data": torch.zeros(3, dtype=torch.uint8)}))
    refused(bundle, TensorFileError, "no 'offsets' tensor|no 'labels' tensor")


def test_shard_with_wrong_dtypes(bundle, encoded):
    from safetensors.torch import save

    raw = b"".join(encoded)
    tensors = {"data": torch.frombuffer(bytearray(raw), dtype=torch.uint8),
               "offsets": torch.zeros(7, dtype=torch.int32), "labels": torch.zeros(6, dtype=torch.int64)}
    replace_file(bundle, SHARD, save(tensors))
    refused(bundle, ImageStoreError, "expected a 1-D I64 tensor")


def test_manifest_claiming_a_huge_image_count(bundle):
    # Consistent counts pass Bundle.open; read_images must not die in the allocator with a bare
    # RuntimeError when the claimed N x 3 x 4096 x 4096 bytes cannot be had.
    def claim(o):
        n = 10_000_000
        o["images"].update(count=n, height=4096, width=4096)
        o["images"]["shards"] = [dict(o["images"]["shards"][0], count=n)]
        o["images"]["per_class"] = [n] + [0] * (len(o["classes"]) - 1)

    edit_manifest(bundle, claim)
    b = Bundle.open(bundle)
    with pytest.raises(ImageStoreError, match="cannot allocate") as e:
        b.read_images()
    assert e.value.field == "images.count"
