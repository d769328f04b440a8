"""The one safetensors reader: every tensor hellofmt reads goes through :func:`load_safetensors`.

Image shards, the projector's deltas, embedded and local foundation weights, build checkpoints and
teacher weights are all read here, so each gets the same checks before a tensor is made:

- the 8-byte header length against the file size and :data:`~hellofmt.manifest.MAX_HEADER_BYTES`
  (a header claiming a huge length never causes a huge allocation);
- the header as a JSON object of well-formed entries, ``__metadata__`` mapping strings to strings;
- every tensor's dtype against an allow-list (:data:`DEFAULT_DTYPES`; callers narrow it) and its
  byte range against the data region, which the tensors must cover exactly, without overlap;
- optionally the whole file against a per-call byte cap.

Only then does safetensors itself (memory-mapped, never pickle) make the tensors. A problem raises
:class:`~hellofmt.errors.TensorFileError` naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Collection

import torch
from safetensors import safe_open

from .errors import TensorFileError
from .manifest import MAX_HEADER_BYTES

__all__ = [
    "DTYPE_BYTES",
    "DEFAULT_DTYPES",
    "FLOAT_DTYPES",
    "PROJECTOR_DTYPES",
    "read_safetensors_header",
    "header_shapes",
    "load_safetensors",
]

# Every dtype of the safetensors format, with its element size in bytes.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
# What hellofmt itself stores or loads: float weights, uint8 image bytes, int64 offsets and labels,
# int32/int8/bool buffers some models carry.
DEFAULT_DTYPES = frozenset({"F32", "F16", "BF16", "I8", "U8", "I32", "I64", "BOOL"})
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})
# The projector file: float deltas (float32/float16/bfloat16 encodings), or int8 deltas with their F32
# per-row scales (the int8 encoding, spec 5.1). Which of these a given bundle may use is its
# manifest's projector.dtype, checked by hellofmt.lowrank against each tensor.
PROJECTOR_DTYPES = frozenset({"F32", "F16", "BF16", "I8"})
_FIX = "the file is truncated, corrupt or hostile: re-download or rebuild it"


def read_safetensors_header(
    path: str | os.PathLike[str],
    *,
    file: str | os.PathLike[str] | None = None,
    dtypes: Collection[str] = DEFAULT_DTYPES,
    max_bytes: int | None = None,
) -> dict:
    """Read and check the header of a safetensors file without trusting it; return it as a dict.

    Args:
        path: the file to read.
        file: the name to give in errors (default: ``path``).
        dtypes: the safetensors dtype names (``"F32"``, ``"I64"``, ...) a tensor may have.
        max_bytes: refuse a file larger than this before reading it (None: no cap).

    Returns:
        The header: tensor name -> ``{"dtype", "shape", "data_offsets"}``, plus ``__metadata__``
        when the file has one.

    Raises:
        TensorFileError: the file cannot be read, is over ``max_bytes``, its header length does not
            fit the file or the cap, the header is not a JSON object of well-formed entries, a
            dtype is not allowed, or the tensors' byte ranges do not tile the data region exactly.
    """
    file = path if file is None else file
    try:
        size = os.path.getsize(path)
        if max_bytes is not None and size > max_bytes:
            raise TensorFileError(f"file is {size} bytes, over the {max_bytes}-byte limit for it", file=file, fix=_FIX)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TensorFileError(f"file is {size} bytes, too short for a safetensors header", file=file,
                                      fix="the file is truncated: re-download or rebuild it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise TensorFileError(f"safetensors header claims {n} bytes but the file has {size} bytes",
                                      file=file, fix=_FIX)
            raw = f.read(n)
    except OSError as e:
        raise TensorFileError(f"cannot read: {e.strerror or e}", file=file) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: hostile nesting
        raise TensorFileError(
            f"safetensors header is not JSON: {type(e).__name__}: {str(e)[:200]}", file=file
        ) from None
    if not isinstance(header, dict):
        raise TensorFileError("safetensors header is not a JSON object", file=file)
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in info.items()
            ):
                raise TensorFileError("__metadata__ must map strings to strings", file=file, field="__metadata__")
            continue
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in DTYPE_BYTES
            and isinstance(info.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) for d in info["data_offsets"])
        )
        if not ok:
            raise TensorFileError("malformed tensor entry in the safetensors header", file=file, field=name)
        if info["dtype"] not in dtypes:
            raise TensorFileError(
                f"dtype {info['dtype']} is not allowed here (allowed: {', '.join(sorted(dtypes))})",
                file=file, field=name, fix="write the tensor in one of the allowed dtypes",
            )
        begin, end = info["data_offsets"]
        nbytes = math.prod(info["shape"]) * DTYPE_BYTES[info["dtype"]]
        if not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise TensorFileError(
                f"tensor bytes [{begin}, {end}) do not fit shape {info['shape']} {info['dtype']} in a "
                f"{data_len}-byte data region", file=file, field=name, fix=_FIX,
            )
        spans.append((begin, end))
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise TensorFileError("tensor data overlaps or leaves gaps", file=file, fix=_FIX)
        pos = end
    if pos != data_len:
        raise TensorFileError(f"data region is {data_len} bytes but the tensors cover {pos}", file=file,
                              fix="the file is truncated or has trailing bytes: re-download or rebuild it")
    return header


def header_shapes(
    path: str | os.PathLike[str],
    *,
    file: str | os.PathLike[str] | None = None,
    dtypes: Collection[str] = DEFAULT_DTYPES,
) -> dict[str, list[int]]:
    """Each tensor's shape from a checked header (:func:`read_safetensors_header`), reading no data.

    Returns:
        Tensor name -> shape, in header order.
    """
    header = read_safetensors_header(path, file=file, dtypes=dtypes)
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def load_safetensors(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    file: str | os.PathLike[str] | None = None,
    header: dict | None = None,
    dtypes: Collection[str] = DEFAULT_DTYPES,
    max_bytes: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a safetensors file after :func:`read_safetensors_header` has checked it.

    Args:
        path: the file to read.
        device: where the tensors go.
        file: the name to give in errors (default: ``path``).
        header: the result of :func:`read_safetensors_header` when the caller already has it (then
            ``dtypes`` and ``max_bytes`` were applied by that call), so the header is read once.
        dtypes: the safetensors dtype names a tensor may have (see :data:`DEFAULT_DTYPES`).
        max_bytes: refuse a file larger than this (None: no cap).

    Returns:
        ``(tensors, metadata)``: tensor name -> tensor, and the file's ``__metadata__`` ({} when
        absent).

    Raises:
        TensorFileError: any problem with the file.
    """
    file = path if file is None else file
    if header is None:
        header = read_safetensors_header(path, file=file, dtypes=dtypes, max_bytes=max_bytes)
    try:
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError / OSError with its own message
        raise TensorFileError(f"cannot read safetensors file: {e}", file=file) from None
    return tensors, dict(header.get("__metadata__", {}))
