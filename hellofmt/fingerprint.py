"""The foundation weights' fingerprint: a canonical sha256 over tensors, independent of file format.

A bundle pins its foundation model by this fingerprint (``foundation.weights_sha256``). Both the
format layer (checking embedded weights in :meth:`hellofmt.bundle.Bundle.verify`) and the model
layer (checking loaded weights in :mod:`hellofmt.foundation`) compute it, so it lives here, at the
bottom, needing nothing but torch. The rule is spec section 6.1; :func:`fingerprint` states it.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import torch
from torch import Tensor, nn

from .errors import FoundationError

__all__ = ["FINGERPRINT_VERSION", "canonical_state", "fingerprint"]

FINGERPRINT_VERSION = "hellofmt-fingerprint-v1"


def canonical_state(state: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors a fingerprint covers: a module's ``state_dict()`` (a model carrying low-rank
    deltas in the training form counts as its base weights) or a dict, without ``attn_mask``
    entries. Returns name -> tensor; the tensors are not copied."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
        # A model carrying low-rank deltas (training form) fingerprints as its base weights:
        # "<m>.parametrizations.<w>.original" is the base "<m>.<w>"; the deltas are not foundation.
        if any(".parametrizations." in k for k in state):
            plain = {}
            for k, v in state.items():
                if ".parametrizations." not in k and not k.startswith("parametrizations."):
                    plain[k] = v
                elif k.endswith(".original"):
                    prefix, _, rest = k.partition("parametrizations.")
                    plain[prefix + rest.removesuffix(".original")] = v
            state = plain
    # attn_mask is a derived constant (the causal mask), a non-persistent buffer in open_clip's
    # CLIP and so absent from state_dict(); dropped from plain dicts too so both forms agree.
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] != "attn_mask"}


def fingerprint(state: nn.Module | dict[str, Tensor]) -> str:
    """Canonical sha256 fingerprint of foundation weights (lowercase hex), independent of the file
    format or device they came from. For a module, its ``state_dict()`` is used (parameters and
    persistent buffers; non-persistent buffers are not in it; a model carrying low-rank deltas in
    the training form counts as its base weights); from a dict, any entry whose last
    name component is ``attn_mask`` is dropped as well, so both forms agree. The hash is SHA-256
    over: the ASCII line ``hellofmt-fingerprint-v1\\n``, then for each tensor in ascending order of
    name (Python ``sorted``, i.e. Unicode code point order) the UTF-8 text
    ``NAME\\nDTYPE\\nSHAPE\\nNBYTES\\n`` followed by NBYTES raw bytes. DTYPE is the torch dtype
    without the ``torch.`` prefix (``float32``, ``bfloat16``, ``int64``), SHAPE the sizes joined by
    ``,`` (empty for a 0-d tensor), NBYTES the decimal byte count, and the bytes are the tensor's
    elements in C (row-major, contiguous) order, each in little-endian byte order (a bool is one
    byte, 0 or 1).
    hellofmt fingerprints a model as loaded (float32 parameters), so the fingerprint of a float16
    checkpoint is that of its float32 upcast.

    Raises:
        FoundationError: an entry of the dict is not a tensor.
    """
    h = hashlib.sha256()
    h.update(f"{FINGERPRINT_VERSION}\n".encode("ascii"))
    canon = canonical_state(state)
    for name in sorted(canon):
        t = canon[name]
        if not isinstance(t, Tensor):
            raise FoundationError(f"expected a tensor, got {type(t).__name__}", field=name)
        t = t.detach()
        dtype = str(t.dtype).removeprefix("torch.")
        shape = ",".join(str(s) for s in t.shape)
        raw = _le_bytes(t)
        h.update(f"{name}\n{dtype}\n{shape}\n{raw.nbytes}\n".encode())
        h.update(raw)
    return h.hexdigest()


def _le_bytes(t: Tensor) -> np.ndarray:
    """The tensor's elements as a little-endian uint8 numpy array (no copy when already CPU+contiguous)."""
    t = t.to("cpu").contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.numel() == 0:
        return np.zeros(0, dtype=np.uint8)
    u8 = t.reshape(-1).view(torch.uint8)
    if sys.byteorder == "big" and t.element_size() > 1:  # pragma: no cover - no big-endian CI
        u8 = u8.reshape(-1, t.element_size()).flip(1).reshape(-1)
    return u8.numpy()
