"""Image shards: encoded images back to back in one safetensors file, decoded with a thread pool.

A shard (``images-00000-of-00004.safetensors``) holds three tensors: uint8 ``data`` (the encoded
images back to back), int64 ``offsets`` (N+1; image i is ``data[offsets[i]:offsets[i+1]]``) and
int64 ``labels`` (N). Codecs: ``png`` (lossless, the default), ``jpeg`` and ``webp`` (lossy, with a
quality), ``raw`` (CHW uint8 bytes). Every image of a bundle has the same height and width, so a
whole shard decodes into one uint8 tensor [N, 3, H, W].

Nothing read from a file is trusted before it is checked: the safetensors header length against
the file size, every tensor's dtype, shape and byte range (by :mod:`hellofmt.tensorfile`), the
offsets, the labels, and each image's declared size before its pixels are decoded (so a hostile
image cannot make us allocate much).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save

from .errors import ImageDecodeError, ImageStoreError, InputError, TensorFileError
from .manifest import CODECS, MAX_HEADER_BYTES, MAX_IMAGE_COUNT, MAX_IMAGE_SIDE, MAX_SHARD_BYTES

# Re-exported: they lived here before the one checked reader got its own module.
from .tensorfile import load_safetensors, read_safetensors_header

__all__ = [
    "DEFAULT_QUALITY",
    "DEFAULT_SHARD_BYTES",
    "IMAGES_FORMAT",
    "MAX_HEADER_BYTES",
    "encode_image",
    "decode_image",
    "shard_name",
    "encode_shards",
    "write_shards",
    "read_shard",
    "read_safetensors_header",
    "load_safetensors",
]

IMAGES_FORMAT = "hellofmt-images"
DEFAULT_SHARD_BYTES = 512 * 1024**2
DEFAULT_QUALITY = 90  # jpeg / webp when no quality is given
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_INDEX_BYTES_PER_IMAGE = 16  # one int64 offset + one int64 label


def _threads(num_threads: int | None) -> int:
    if num_threads is not None:
        return max(1, int(num_threads))
    return max(1, min(8, os.cpu_count() or 1))


def check_codec(codec: str, quality: int | None) -> int | None:
    if codec not in CODECS:
        raise InputError(f"unknown codec {codec!r}", field="codec", fix=f"use one of {', '.join(CODECS)}")
    if codec in ("jpeg", "webp"):
        q = DEFAULT_QUALITY if quality is None else quality
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100:
            raise InputError(f"quality must be an integer in 1..100, got {q!r}", field="quality")
        return q
    if quality is not None:
        raise InputError(f"codec {codec!r} is lossless and takes no quality", field="quality", fix="pass quality=None")
    return None


# --------------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------------
def encode_image(img: torch.Tensor, codec: str = "png", quality: int | None = None) -> bytes:
    """Encode one uint8 image tensor [3, H, W] with ``codec`` (png, jpeg, webp or raw).

    ``quality`` (1..100) applies to jpeg and webp only and defaults to 90 for them; png and raw are
    lossless and take none. raw is the CHW bytes as they are in memory. Raises InputError for a
    tensor that is not uint8 [3, H, W] or an unknown codec.
    """
    q = check_codec(codec, quality)
    if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
        got = f"{img.dtype} {list(img.shape)}" if isinstance(img, torch.Tensor) else type(img).__name__
        raise InputError(f"expected a uint8 tensor [3, H, W], got {got}", field="images")
    img = img.detach().cpu()
    if codec == "raw":
        return img.contiguous().numpy().tobytes()
    pil = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy())
    bio = io.BytesIO()
    if codec == "png":
        pil.save(bio, format="PNG")
    else:
        pil.save(bio, format=_PIL_FORMAT[codec], quality=q)
    return bio.getvalue()


def _decode_to(out: np.ndarray, buf, codec: str, height: int, width: int, file, index) -> None:
    def fail(msg: str) -> ImageDecodeError:
        return ImageDecodeError(msg, file=file, field=f"image {index}" if index is not None else None,
                                fix="the shard is corrupt: re-download or rebuild the bundle")

    if codec == "raw":
        if len(buf) != 3 * height * width:
            raise fail(f"raw image has {len(buf)} bytes, expected 3*{height}*{width} = {3 * height * width}")
        out[...] = np.frombuffer(buf, dtype=np.uint8).reshape(3, height, width)
        return
    try:
        pil = Image.open(io.BytesIO(buf), formats=[_PIL_FORMAT[codec]])
        # The declared size is checked before any pixel is decoded, so a hostile header cannot make us
        # allocate a huge image.
        if pil.size != (width, height):
            raise fail(f"image is {pil.size[0]}x{pil.size[1]}, expected {width}x{height} (width x height)")
        if pil.mode != "RGB":
            raise fail(f"image mode is {pil.mode}, expected RGB")
        arr = np.asarray(pil)
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        raise fail(f"{codec} data does not decode: {e}") from None
    if arr.shape != (height, width, 3):
        raise fail(f"decoded to shape {list(arr.shape)}, expected [{height}, {width}, 3]")
    out[...] = arr.transpose(2, 0, 1)


def decode_image(
    buf: bytes | memoryview,
    codec: str,
    height: int,
    width: int,
    *,
    file: str | os.PathLike[str] | None = None,
    index: int | None = None,
) -> torch.Tensor:
    """Decode one encoded image to a uint8 tensor [3, height, width].

    The image must be of exactly that size and RGB; anything else (bad bytes, another format than
    ``codec``, another size) raises ImageDecodeError naming ``file`` and image ``index``.
    """
    check_codec(codec, None if codec in ("png", "raw") else DEFAULT_QUALITY)
    out = np.empty((3, height, width), dtype=np.uint8)
    _decode_to(out, buf, codec, height, width, file, index)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------
def shard_name(index: int, total: int) -> str:
    """The file name of shard ``index`` of ``total``: ``images-00000-of-00004.safetensors``."""
    return f"images-{index:05d}-of-{total:05d}.safetensors"


def _check_images(images, labels) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"expected a uint8 tensor [N, 3, H, W], got {got}", field="images")
    n, _, h, w = images.shape
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise InputError(f"image side must be in 1..{MAX_IMAGE_SIDE}, got {h}x{w}", field="images")
    if n > MAX_IMAGE_COUNT:
        raise InputError(f"{n} images is over the limit of {MAX_IMAGE_COUNT}", field="images")
    if (
        not isinstance(labels, torch.Tensor)
        or labels.ndim != 1
        or labels.shape[0] != n
        or labels.dtype.is_floating_point
        or labels.dtype.is_complex
        or labels.dtype == torch.bool
    ):
        got = f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InputError(f"expected an integer tensor [{n}] of labels, got {got}", field="labels")


def encode_shards(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    codec: str = "png",
    quality: int | None = None,
    max_shard_bytes: int | None = None,
    num_threads: int | None = None,
) -> Iterator[tuple[str, int, bytes]]:
    """Encode images into shards; yield ``(file name, image count, safetensors bytes)`` per shard.

    This is the writing core shared by :func:`write_shards` and ``BundleWriter`` (which hashes the
    bytes as it writes them). A shard is cut before the image that would take its encoded data and
    index past ``max_shard_bytes``; an image larger than the limit gets a shard of its own. Zero
    images give one empty shard.
    """
    q = check_codec(codec, quality)
    _check_images(images, labels)
    limit = DEFAULT_SHARD_BYTES if max_shard_bytes is None else int(max_shard_bytes)
    if not 1 <= limit <= MAX_SHARD_BYTES:
        raise InputError(f"max_shard_bytes must be in 1..{MAX_SHARD_BYTES}, got {limit}", field="max_shard_bytes")
    n, _, h, w = images.shape
    images = images.detach().cpu()
    labels = labels.detach().cpu().to(torch.int64)
    with ThreadPoolExecutor(_threads(num_threads)) as pool:
        encoded = list(pool.map(lambda i: encode_image(images[i], codec, q), range(n)))
    groups: list[list[int]] = [[]]
    size = 0
    for i, buf in enumerate(encoded):
        cost = len(buf) + _INDEX_BYTES_PER_IMAGE
        if groups[-1] and size + cost > limit:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += cost
    meta = {"format": IMAGES_FORMAT, "codec": codec, "height": str(h), "width": str(w)}
    if q is not None:
        meta["quality"] = str(q)
    for k, idx in enumerate(groups):
        lengths = [len(encoded[i]) for i in idx]
        offsets = torch.zeros(len(idx) + 1, dtype=torch.int64)
        if idx:
            offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        data = torch.frombuffer(bytearray().join(encoded[i] for i in idx), dtype=torch.uint8) if sum(lengths) \
            else torch.empty(0, dtype=torch.uint8)
        tensors = {
            "data": data,
            "offsets": offsets,
            "labels": labels[idx] if idx else torch.empty(0, dtype=torch.int64),
        }
        yield shard_name(k, len(groups)), len(idx), save(tensors, metadata={**meta, "count": str(len(idx))})


def write_shards(
    directory: str | os.PathLike[str],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    codec: str = "png",
    quality: int | None = None,
    max_shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    num_threads: int | None = None,
) -> list[tuple[str, int]]:
    """Write ``images`` (uint8 [N, 3, H, W]) and ``labels`` (int [N]) as image shards in ``directory``.

    Images are encoded with ``codec`` in a thread pool and cut into shards of at most
    ``max_shard_bytes`` of encoded data and index. Returns ``(file name, count)`` for each shard, in
    order. To write a whole bundle, use ``hellofmt.bundle.BundleWriter`` instead (atomic, hashed).
    """
    directory = Path(directory)
    out = []
    for name, count, payload in encode_shards(
        images, labels, codec=codec, quality=quality, max_shard_bytes=max_shard_bytes, num_threads=num_threads
    ):
        with open(directory / name, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        out.append((name, count))
    return out


def _int_meta(meta: dict, key: str):
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        return None


def read_shard(
    path: str | os.PathLike[str],
    *,
    codec: str,
    height: int,
    width: int,
    num_classes: int,
    expected_count: int | None = None,
    num_threads: int | None = None,
    out: torch.Tensor | None = None,
    file: str | os.PathLike[str] | None = None,
    select: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one shard and decode all its images with a thread pool: (uint8 [n, 3, H, W], int64 [n]).

    Checks before decoding: the safetensors header, the three tensors' dtypes and shapes, the
    ``__metadata__`` codec and size, offsets (start at 0, never decrease, end at ``len(data)``),
    labels in ``[0, num_classes)``, and the count against ``expected_count``. Every image must
    decode to exactly ``height`` x ``width`` RGB. ``out``, if given, is a uint8 CPU tensor
    [n, 3, H, W] to decode into (saves a copy when concatenating shards). ``select=(a, b)`` decodes
    only images ``a`` to ``b - 1`` and returns those and their labels (``out`` is then
    ``[b - a, 3, H, W]``); every check above still covers the whole shard. Raises ImageStoreError
    (ImageDecodeError for one image) or TensorFileError naming the shard file and image index.
    """
    file = path if file is None else file
    if not os.path.exists(path):
        raise ImageStoreError("shard file is missing", file=file, fix="re-download or rebuild the bundle")
    # The default dtype allow-list, not just U8/I64: a shard with, say, int32 offsets then gets the
    # precise per-tensor message below.
    header = read_safetensors_header(path, file=file, max_bytes=MAX_SHARD_BYTES + MAX_HEADER_BYTES)

    def bad(field: str, msg: str) -> ImageStoreError:
        return ImageStoreError(
            msg, file=file, field=field, fix="the shard is corrupt: re-download or rebuild the bundle"
        )

    want = {"data": "U8", "offsets": "I64", "labels": "I64"}
    for name, dtype in want.items():
        info = header.get(name)
        if info is None:
            raise TensorFileError(f"image shard has no {name!r} tensor", file=file, field=name)
        if info["dtype"] != dtype or len(info["shape"]) != 1:
            raise bad(name, f"expected a 1-D {dtype} tensor, got {info['dtype']} {info['shape']}")
    extra = sorted(set(header) - set(want) - {"__metadata__"})
    if extra:
        raise bad(extra[0], "unexpected tensor in an image shard")
    n = header["labels"]["shape"][0]
    if header["offsets"]["shape"][0] != n + 1:
        raise bad("offsets", f"has {header['offsets']['shape'][0]} entries for {n} labels, expected {n + 1}")
    if expected_count is not None and n != expected_count:
        raise bad("count", f"shard holds {n} images but the manifest says {expected_count}")
    meta = header.get("__metadata__", {})
    if meta.get("format", IMAGES_FORMAT) != IMAGES_FORMAT:
        raise bad("__metadata__.format", f"expected {IMAGES_FORMAT!r}, got {meta.get('format')!r}")
    if "codec" in meta and meta["codec"] != codec:
        raise bad("__metadata__.codec", f"shard says codec {meta['codec']!r}, the manifest says {codec!r}")
    for key, val in (("height", height), ("width", width), ("count", n)):
        if key in meta and _int_meta(meta, key) != val:
            raise bad(f"__metadata__.{key}", f"shard says {key} {meta[key]!r}, expected {val}")

    tensors, _ = load_safetensors(path, file=file, header=header)
    data, offsets, labels = tensors["data"], tensors["offsets"], tensors["labels"]
    if int(offsets[0]) != 0:
        raise bad("offsets", f"offsets[0] is {int(offsets[0])}, expected 0")
    steps = offsets[1:] - offsets[:-1]
    if bool((steps < 0).any()):
        i = int(torch.nonzero(steps < 0)[0])
        raise bad("offsets", f"offsets decrease at image {i} ({int(offsets[i])} -> {int(offsets[i + 1])})")
    if int(offsets[-1]) != data.numel():
        raise bad("offsets", f"offsets end at {int(offsets[-1])} but data has {data.numel()} bytes")
    if n:
        wrong = (labels < 0) | (labels >= num_classes)
        if bool(wrong.any()):
            i = int(torch.nonzero(wrong)[0])
            raise bad("labels", f"image {i} has label {int(labels[i])}, outside [0, {num_classes})")

    a, b = (0, n) if select is None else select
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int) or not isinstance(b, int) \
            or not 0 <= a <= b <= n:
        raise InputError(f"select must be a range (a, b) with 0 <= a <= b <= {n}, got {select!r}", field="select")
    m = b - a
    if out is None:
        arr = np.empty((m, 3, height, width), dtype=np.uint8)
    else:
        if out.dtype != torch.uint8 or tuple(out.shape) != (m, 3, height, width) or out.device.type != "cpu":
            raise InputError(f"out must be a uint8 CPU tensor [{m}, 3, {height}, {width}]", field="out")
        arr = out.numpy()
    raw = data.numpy()
    offs = offsets.tolist()

    def one(i: int) -> None:
        _decode_to(arr[i - a], memoryview(raw[offs[i] : offs[i + 1]]), codec, height, width, file, i)

    if m:
        with ThreadPoolExecutor(_threads(num_threads)) as pool:
            # list() re-raises the first failure in image order
            list(pool.map(one, range(a, b)))
    images = out if out is not None else torch.from_numpy(arr)
    return images, labels if select is None else labels[a:b]
