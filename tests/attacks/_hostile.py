"""Helpers for the attack tests: snapshot a directory tree, and rewrite a bundle file while keeping
the manifest consistent (an attacker controls both), so each attack reaches the check it targets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save

from hellofmt.manifest import MANIFEST_NAME

from bundles import write_manifest


def snapshot(root: Path) -> dict:
    """Every path under ``root`` (not following symlinks) with its bytes' sha256 and mtime."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_symlink():
            out[str(p)] = ("link", str(p.readlink()))
        elif p.is_file():
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        else:
            out[str(p)] = "dir"
    return out


def edit_manifest(bundle: Path, fn) -> None:
    """Edit the manifest's JSON values with ``fn`` and write it back resealed: an attacker can
    recompute ``manifest_sha256`` too (it proves integrity, not authorship)."""
    obj = json.loads((bundle / MANIFEST_NAME).read_text())
    fn(obj)
    write_manifest(bundle, obj)


def replace_file(bundle: Path, name: str, data: bytes) -> None:
    """Overwrite ``name`` and record its new size and sha256 in the manifest."""
    (bundle / name).write_bytes(data)

    def fix(obj):
        obj["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    edit_manifest(bundle, fix)


def shard_bytes(encoded: list[bytes], labels: list[int], *, offsets: list[int] | None = None,
                metadata: dict | None = None) -> bytes:
    """A shard file with the given encoded images, labels and (possibly hostile) offsets."""
    data = b"".join(encoded)
    if offsets is None:
        offsets = [0]
        for e in encoded:
            offsets.append(offsets[-1] + len(e))
    tensors = {
        "data": torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    return save(tensors, metadata=metadata)
