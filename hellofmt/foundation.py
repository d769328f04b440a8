"""The foundation model: resolve a reference to an open_clip CLIP model, and fingerprint its weights.

Every way of naming a foundation model is parsed here, in one place:

``ARCH:TAG``
    open_clip's pretrained registry, e.g. ``ViT-B-32:openai`` or ``RN50:openai``.
``ARCH``
    a registered architecture with random weights (tests and benchmarks). The weights are pinned
    anyway: the reference gets source ``"embedded"``, so a bundle built on them carries them.
``hf-hub:ORG/REPO``
    an open_clip model on the Hugging Face Hub (``open_clip_config.json`` plus
    ``open_clip_model.safetensors``).
``CONFIG.json[:WEIGHTS.safetensors]``
    a model of your own: an open_clip model config (or a whole ``open_clip_config.json``) and its
    weights; without weights, random init as for a bare ``ARCH``.

A bundle's :class:`hellofmt.manifest.Foundation` reference resolves the same way, and may point at
weights embedded in the bundle (``foundation.safetensors``, source ``"embedded"``).

Weights are only ever read from safetensors files: nothing is unpickled. open_clip itself would
fall back to ``torch.load`` on ``.bin``/``.pt`` checkpoints, so hellofmt never hands it a
checkpoint path it has not checked, and refuses sources that only offer pickles.

Downloads go through ``huggingface_hub.hf_hub_download``, which honours ``HF_HUB_OFFLINE=1`` and
the usual cache variables; nothing here forces a network call when the cache has the files.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import manifest as mf
from .errors import FingerprintMismatchError, FoundationError, ModelConfigError, TensorFileError, UnsafePathError
from .fingerprint import FINGERPRINT_VERSION, canonical_state, fingerprint  # re-exported: public here before
from .tensorfile import header_shapes, load_safetensors, read_safetensors_header

__all__ = [
    "EMBEDDED_WEIGHTS_FILE",
    "FINGERPRINT_VERSION",
    "FoundationSpec",
    "LoadedFoundation",
    "parse_foundation_spec",
    "fingerprint",
    "load_foundation",
    "foundation_tensors",
    "foundation_metadata",
    "check_model_config",
    "estimate_model_cost",
    "MAX_CONFIG_PARAMETERS",
    "MAX_CONFIG_FLOPS",
]

EMBEDDED_WEIGHTS_FILE = mf.FOUNDATION_FILE
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npz", ".npy")
_HF_CONFIG_NAME = "open_clip_config.json"
_HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
_INTERPOLATIONS = ("bicubic", "bilinear")


# --------------------------------------------------------------------------------------------------
# Model config allow-list (spec section "Security")
# --------------------------------------------------------------------------------------------------
# A model config that comes from a manifest (or is recorded into one) is numbers only: every key
# must be listed here with its type and bounds, and is checked before open_clip sees the config.
# open_clip resolves names inside a config (hf_tokenizer_name -> transformers' AutoTokenizer,
# hf_model_name -> a Hub text model, timm_model_name -> timm or the Hub, *_kwargs -> passed through
# to constructors), so none of them is allowed: a bundle's model is built from numbers alone.
MAX_CONFIG_LAYERS = 256
MAX_CONFIG_WIDTH = 16384
MAX_CONFIG_HEADS = 256
MAX_CONFIG_CONTEXT = 1024
MAX_CONFIG_VOCAB = 1 << 20
MAX_CONFIG_PARAMETERS = 10_000_000_000  # ~40 GB in float32; open_clip's largest built-ins are ~5e9
MAX_CONFIG_FLOPS = 10**13  # one image and one text through the towers; ViT-bigG-14 at 224 is ~1e12

_INT, _NUM, _BOOL = "int", "number", "bool"


def _choice(*values: str) -> tuple[str, ...]:
    return values


# key -> (kind, low, high) or a tuple of allowed strings. Bounds are inclusive; None: no bound.
_TOP_KEYS: dict[str, Any] = {
    "embed_dim": (_INT, 1, MAX_CONFIG_WIDTH),
    "quick_gelu": (_BOOL, None, None),
    "init_logit_scale": (_NUM, -100.0, 100.0),
    "init_logit_bias": (_NUM, -1000.0, 1000.0),
    "nonscalar_logit_scale": (_BOOL, None, None),
    "custom_text": (_BOOL, None, None),
}
_COMMON_TOWER_KEYS: dict[str, Any] = {
    "width": (_INT, 1, MAX_CONFIG_WIDTH),
    "mlp_ratio": (_NUM, 0.0, 16.0),
    "ls_init_value": (_NUM, 0.0, 10.0),
    "final_ln_after_pool": (_BOOL, None, None),
    "output_tokens": (_BOOL, None, None),
    "block_type": _choice("default", "custom"),
    "qk_norm": (_BOOL, None, None),
    "scaled_cosine_attn": (_BOOL, None, None),
    "scale_heads": (_BOOL, None, None),
    "scale_attn_inner": (_BOOL, None, None),
    "scale_attn": (_BOOL, None, None),
    "scale_fc": (_BOOL, None, None),
    # The two keyword dictionaries open_clip's own configs use, narrowed to their one numeric or
    # enumerated entry: nothing else is passed through to a constructor.
    "norm_kwargs": {"eps": (_NUM, 1e-12, 1.0)},
    "act_kwargs": {"approximate": _choice("none", "tanh")},
}
_VISION_KEYS: dict[str, Any] = {
    **_COMMON_TOWER_KEYS,
    "layers": (_INT, 1, MAX_CONFIG_LAYERS),  # or 4 stage depths (ResNet), checked separately
    "head_width": (_INT, 1, MAX_CONFIG_WIDTH),
    "patch_size": (_INT, 1, mf.MAX_IMAGE_SIDE),  # null for a ResNet
    "image_size": (_INT, 8, mf.MAX_IMAGE_SIDE),  # or [h, w], checked separately
    "patch_dropout": (_NUM, 0.0, 0.99),
    "attentional_pool": (_BOOL, None, None),
    "attn_pooler_queries": (_INT, 1, 4096),
    "attn_pooler_heads": (_INT, 1, MAX_CONFIG_HEADS),
    "no_ln_pre": (_BOOL, None, None),
    "pos_embed_type": _choice("learnable", "sin_cos_2d"),
    "pool_type": _choice("tok", "avg", "none"),
}
_TEXT_KEYS: dict[str, Any] = {
    **_COMMON_TOWER_KEYS,
    "context_length": (_INT, 1, MAX_CONFIG_CONTEXT),
    "vocab_size": (_INT, 1, MAX_CONFIG_VOCAB),
    "heads": (_INT, 1, MAX_CONFIG_HEADS),
    "layers": (_INT, 1, MAX_CONFIG_LAYERS),
    "embed_cls": (_BOOL, None, None),
    "pad_id": (_INT, 0, MAX_CONFIG_VOCAB),
    "eos_id": (_INT, 0, MAX_CONFIG_VOCAB),
    "no_causal_mask": (_BOOL, None, None),
    "pool_type": _choice("first", "last", "argmax", "eos", "none"),
    "proj_bias": (_BOOL, None, None),
    "proj_type": _choice("linear", "none"),
}
# Keys open_clip knows that name code or data elsewhere; refused with a reason of their own.
_NAMED_KEYS = {
    "hf_tokenizer_name": "a tokenizer name (transformers would download and may run its code)",
    "tokenizer_mode": "a tokenizer setting",
    "tokenizer_kwargs": "keyword arguments passed to a tokenizer",
    "hf_model_name": "a Hugging Face text model name (downloaded through transformers)",
    "hf_model_pretrained": "a pretrained-download flag",
    "hf_proj_type": "a Hugging Face text tower setting",
    "hf_pooler_type": "a Hugging Face text tower setting",
    "timm_model_name": "a timm model name (timm may fetch it from the Hub)",
    "timm_model_pretrained": "a pretrained-download flag",
    "timm_pool": "a timm tower setting",
    "timm_proj": "a timm tower setting",
    "timm_proj_bias": "a timm tower setting",
    "timm_drop": "a timm tower setting",
    "timm_drop_path": "a timm tower setting",
    "multimodal_cfg": "a CoCa text decoder (not supported)",
}
_CONFIG_FIX = (
    "a bundle's model config holds numbers only (open_clip's ViT/ResNet CLIP keys); architectures that "
    "need a named tokenizer, timm or Hugging Face tower can only be referenced as ARCH:TAG (source 'pretrained')"
)


def check_model_config(config: Any, *, file=None, field: str = "foundation.model_config") -> dict:
    """Check an open_clip model config against hellofmt's allow-list and bounds; return a copy.

    Every key must be one open_clip's CLIP model reads as a number, a boolean or one of a few
    enumerated strings, with each value in its range (layers, widths, heads, image and patch
    size, vocabulary, context length). No tokenizer, Hugging Face or timm model name, no
    pretrained flag and no keyword dictionary beyond ``norm_kwargs.eps`` and
    ``act_kwargs.approximate`` is accepted. Then the parameter count and the cost of one forward
    pass are estimated from the numbers and capped (:data:`MAX_CONFIG_PARAMETERS`,
    :data:`MAX_CONFIG_FLOPS`), so nothing built from the config can exhaust memory or time.

    Args:
        config: the model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...).
        file: the file to name in errors (the manifest or the config file).
        field: the config's field path, prefixed to every key in errors.

    Returns:
        A deep copy of the config, safe to hand to open_clip.

    Raises:
        ModelConfigError: a key outside the allow-list, a value of the wrong type or out of its
            range, or a model over the size or cost caps; the error names the key.
    """
    if not isinstance(config, dict):
        raise ModelConfigError(f"expected an object, got {type(config).__name__}", file=file, field=field,
                               fix=_CONFIG_FIX)
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in config:
            raise ModelConfigError("missing required key", file=file, field=f"{field}.{key}",
                                   fix="an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    _check_section(config, _TOP_KEYS, file, field, towers=("vision_cfg", "text_cfg"))
    vision, text = config["vision_cfg"], config["text_cfg"]
    for name, sec, keys in (("vision_cfg", vision, _VISION_KEYS), ("text_cfg", text, _TEXT_KEYS)):
        if not isinstance(sec, dict):
            raise ModelConfigError(f"expected an object, got {type(sec).__name__}", file=file,
                                   field=f"{field}.{name}", fix=_CONFIG_FIX)
        _check_section(sec, keys, file, f"{field}.{name}")
    _check_vision_shape(vision, file, f"{field}.vision_cfg")
    _check_text_shape(text, file, f"{field}.text_cfg")
    params, flops = estimate_model_cost(config)
    if params > MAX_CONFIG_PARAMETERS or flops > MAX_CONFIG_FLOPS:
        raise ModelConfigError(
            f"describes a model of about {params:.3g} parameters and {flops:.3g} operations per image and text, "
            f"over the caps of {MAX_CONFIG_PARAMETERS:.3g} and {MAX_CONFIG_FLOPS:.3g}",
            file=file, field=field, fix="the config is hostile or corrupt: rebuild the bundle",
        )
    return copy.deepcopy(config)


def _check_section(sec: dict, keys: dict, file, path: str, towers: tuple[str, ...] = ()) -> None:
    for key, value in sec.items():
        where = f"{path}.{key}"
        if key in towers:
            continue
        if not isinstance(key, str) or key not in keys:
            why = _NAMED_KEYS.get(key) if isinstance(key, str) else None
            raise ModelConfigError(
                f"key not allowed in a bundle's model config: {why}" if why
                else "unknown key: not in hellofmt's allow-list of open_clip config keys",
                file=file, field=where, fix=_CONFIG_FIX,
            )
        rule = keys[key]
        if value is None and key in ("ls_init_value", "init_logit_bias", "patch_size", "block_type",
                                     "norm_kwargs", "act_kwargs"):
            continue  # open_clip's default
        if key == "layers" and isinstance(value, list):
            continue  # ResNet stage depths: _check_vision_shape
        if key == "image_size" and isinstance(value, list):
            continue  # [h, w]: _check_vision_shape
        if isinstance(rule, dict):  # a narrowed keyword dictionary
            if not isinstance(value, dict):
                raise ModelConfigError(f"expected an object, got {type(value).__name__}", file=file, field=where)
            _check_section(value, rule, file, where)
        elif isinstance(rule, tuple) and rule and rule[0] not in (_INT, _NUM, _BOOL):
            if value not in rule:
                raise ModelConfigError(f"expected one of {', '.join(rule)}, got {value!r}"[:200], file=file,
                                       field=where, fix=_CONFIG_FIX)
        else:
            _check_value(value, *rule, file=file, where=where)


def _check_value(value: Any, kind: str, lo, hi, *, file, where: str) -> None:
    if kind == _BOOL:
        ok = isinstance(value, bool)
    elif kind == _INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                ok = math.isfinite(float(value))
            except OverflowError:
                ok = False
    if not ok:
        want = {"bool": "true or false", "int": "an integer", "number": "a finite number"}[kind]
        raise ModelConfigError(f"expected {want}, got {str(value)[:40]!r}", file=file, field=where, fix=_CONFIG_FIX)
    if kind != _BOOL and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        shown = str(value) if len(str(value)) <= 40 else f"a number of {len(str(value))} digits"
        raise ModelConfigError(f"{shown} is outside the allowed range [{lo}, {hi}]", file=file, field=where,
                               fix="the config is hostile or corrupt: rebuild the bundle")


def _int_list(value: Any, n: int, lo: int, hi: int, file, where: str) -> list[int]:
    if not isinstance(value, list) or len(value) != n:
        raise ModelConfigError(f"expected an integer or a list of {n} integers", file=file, field=where,
                               fix=_CONFIG_FIX)
    for i, v in enumerate(value):
        _check_value(v, _INT, lo, hi, file=file, where=f"{where}[{i}]")
    return value


def _check_vision_shape(v: dict, file, path: str) -> None:
    size = v.get("image_size", 224)
    if isinstance(size, list):
        _int_list(size, 2, 8, mf.MAX_IMAGE_SIDE, file, f"{path}.image_size")
    layers = v.get("layers", 12)
    if isinstance(layers, list):  # a ResNet: four stage depths, no patches
        _int_list(layers, 4, 1, 64, file, f"{path}.layers")
        if v.get("width", 768) > 1024:
            raise ModelConfigError(f"a ResNet stem width of {v['width']} is over 1024", file=file,
                                   field=f"{path}.width", fix=_CONFIG_FIX)
        return
    width, head_width = v.get("width", 768), v.get("head_width", 64)
    if width % head_width:
        raise ModelConfigError(f"width {width} is not a multiple of head_width {head_width}", file=file,
                               field=f"{path}.head_width", fix=_CONFIG_FIX)
    if width // head_width > MAX_CONFIG_HEADS:
        raise ModelConfigError(f"{width // head_width} heads is over {MAX_CONFIG_HEADS}", file=file,
                               field=f"{path}.head_width", fix=_CONFIG_FIX)
    patch = v.get("patch_size", 16)
    if patch is None:
        raise ModelConfigError("a transformer vision tower needs a patch size", file=file,
                               field=f"{path}.patch_size", fix=_CONFIG_FIX)
    if patch > min(size if isinstance(size, list) else [size]):
        raise ModelConfigError(f"patch size {patch} is larger than the image", file=file,
                               field=f"{path}.patch_size", fix=_CONFIG_FIX)


def _check_text_shape(t: dict, file, path: str) -> None:
    width, heads = t.get("width", 512), t.get("heads", 8)
    if width % heads:
        raise ModelConfigError(f"width {width} is not a multiple of heads {heads}", file=file,
                               field=f"{path}.heads", fix=_CONFIG_FIX)
    vocab = t.get("vocab_size", 49408)
    for key in ("pad_id", "eos_id"):
        if key in t and t[key] >= vocab:
            raise ModelConfigError(f"{t[key]} is not below vocab_size {vocab}", file=file, field=f"{path}.{key}",
                                   fix=_CONFIG_FIX)


def estimate_model_cost(config: dict) -> tuple[float, float]:
    """Rough parameter count and multiply-adds (x2) of one image and one text through an open_clip
    config already checked by :func:`check_model_config`; generous (over-) estimates, used only
    against the caps, computed from the numbers without building anything."""
    embed = config["embed_dim"]
    v, t = config["vision_cfg"], config["text_cfg"]
    size = v.get("image_size", 224)
    side = max(size) if isinstance(size, list) else size
    width = v.get("width", 768)
    layers = v.get("layers", 12)
    if isinstance(layers, list):  # ModifiedResNet: 4 stages of bottlenecks, planes width * 2**i
        params = flops = 0.0
        spatial = (side / 4) ** 2
        for i, depth in enumerate(layers):
            planes = width * 2**i
            stage = depth * 25.0 * planes * planes
            params += stage
            flops += 2 * stage * spatial / 4**i
        out = width * 32
        params += 4.0 * out * out + out * embed
        flops += 2 * 4.0 * out * out * ((side / 32) ** 2 + 1)
    else:
        tokens = (side / v.get("patch_size", 16)) ** 2 + 1
        block = (4 + 2 * v.get("mlp_ratio", 4.0)) * width * width
        params = layers * block + 3.0 * v.get("patch_size", 16) ** 2 * width + tokens * width + width * embed
        flops = 2 * layers * (tokens * block + 2 * tokens * tokens * width)
    tw, tl, ctx = t.get("width", 512), t.get("layers", 12), t.get("context_length", 77)
    tblock = (4 + 2 * t.get("mlp_ratio", 4.0)) * tw * tw
    params += tl * tblock + (t.get("vocab_size", 49408) + ctx) * tw + tw * embed
    flops += 2 * tl * (ctx * tblock + 2 * ctx * ctx * tw)
    return float(params), float(flops)


# --------------------------------------------------------------------------------------------------
# Spec strings
# --------------------------------------------------------------------------------------------------
@dataclass
class FoundationSpec:
    """A parsed foundation spec string; see :func:`parse_foundation_spec`.

    ``kind`` is ``"pretrained"`` (``ARCH:TAG``), ``"hf-hub"``, ``"file"`` (a config JSON, with
    weights or not) or ``"random"`` (a bare ``ARCH``: random init). Only the fields of the kind are
    set. ``"embedded"`` is the kind of a reference read from a bundle, never of a spec string.
    """

    kind: str
    architecture: str | None = None
    pretrained: str | None = None
    hf_hub_id: str | None = None
    config_path: str | None = None
    weights_path: str | None = None
    spec: str | None = None  # the original string, for error messages

    def __str__(self) -> str:
        return self.spec or self.kind


def parse_foundation_spec(spec: str) -> FoundationSpec:
    """Parse a foundation spec string: ``ARCH:TAG`` (open_clip's pretrained registry), ``ARCH`` (a
    registered architecture with random weights, for tests and benchmarks), ``hf-hub:ORG/REPO``, or
    ``CONFIG.json[:WEIGHTS.safetensors]``. Architectures and tags are checked against open_clip's
    registries (``list_models()``, ``list_pretrained()``) and an unknown one raises
    :class:`FoundationError` naming the closest matches; a weights file that is not safetensors is
    refused. Files are not opened here."""
    import open_clip

    if not isinstance(spec, str) or not spec.strip():
        raise FoundationError(
            f"expected a foundation spec string, got {spec!r}",
            field="foundation",
            fix="use ARCH:TAG (e.g. ViT-B-32:openai), hf-hub:ORG/REPO or CONFIG.json[:WEIGHTS.safetensors]",
        )
    spec = spec.strip()

    if spec.startswith("hf-hub:"):
        repo = spec[len("hf-hub:") :]
        if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", repo):
            raise FoundationError(
                f"{spec!r} is not a Hub model id",
                field="foundation",
                fix="write it as hf-hub:ORG/REPO, e.g. hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
            )
        return FoundationSpec(kind="hf-hub", hf_hub_id=repo, architecture=f"hf-hub:{repo}", spec=spec)

    config, weights = _split_file_spec(spec)
    if config is not None:
        if weights is not None:
            _check_safetensors_name(weights)
        arch = Path(config).stem
        return FoundationSpec(kind="file", architecture=arch, config_path=config, weights_path=weights, spec=spec)

    lowered = spec.lower()
    if lowered.endswith(".safetensors"):
        raise FoundationError(
            f"{spec!r} is a weights file without its model config",
            field="foundation",
            fix="pass CONFIG.json:WEIGHTS.safetensors (the open_clip model config first)",
        )
    if lowered.endswith(_PICKLE_SUFFIXES):
        _check_safetensors_name(spec)

    arch, _, tag = spec.partition(":")
    _check_architecture(arch, open_clip.list_models())
    if not tag:
        return FoundationSpec(kind="random", architecture=arch, spec=spec)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    clean = tag.lower().replace("-", "_")  # open_clip's own tag normalisation
    if clean not in tags:
        close = difflib.get_close_matches(clean, tags, n=5, cutoff=0.4) or tags[:8]
        raise FoundationError(
            f"unknown pretrained tag {tag!r} for {arch}",
            field="foundation",
            fix=(
                f"closest tags: {', '.join(close)}" if tags else f"{arch} has no pretrained weights in open_clip"
            )
            + "; open_clip.list_pretrained() lists them all",
        )
    return FoundationSpec(kind="pretrained", architecture=arch, pretrained=clean, spec=spec)


def _split_file_spec(spec: str) -> tuple[str | None, str | None]:
    lowered = spec.lower()
    if lowered.endswith(".json"):
        return spec, None
    idx = lowered.rfind(".json:")
    if idx >= 0:
        return spec[: idx + len(".json")], spec[idx + len(".json:") :] or None
    return None, None


def _check_safetensors_name(path: str) -> None:
    if not str(path).lower().endswith(".safetensors"):
        raise FoundationError(
            "weights must be a .safetensors file: hellofmt never unpickles (.bin, .pt, .pth, .ckpt)",
            file=path,
            fix=(
                "convert the checkpoint once, in a trusted environment: "
                "safetensors.torch.save_file(state_dict, 'weights.safetensors')"
            ),
        )


def _check_architecture(arch: str, known: list[str]) -> None:
    if arch in known:
        return
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
    if not close:
        close = [m for m in known if m.lower().startswith(arch.lower()[:3])][:5]
    raise FoundationError(
        f"unknown open_clip architecture {arch!r}",
        field="foundation",
        fix=(f"closest: {', '.join(close)}; " if close else "")
        + "open_clip.list_models() lists architectures, open_clip.list_pretrained() ARCH:TAG pairs",
    )


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
@dataclass
class LoadedFoundation:
    """An open_clip model ready for the projector: ``model`` (eval mode, every parameter frozen),
    its ``tokenizer``, the preprocessing it expects (``image_size``, ``mean``, ``std``,
    ``interpolation``, from the model's own preprocess config), the weights' ``fingerprint`` and the
    ``reference`` a manifest records for it. When ``reference.source == "embedded"`` the builder
    must write :func:`foundation_tensors` of the model to ``reference.weights_file``."""

    model: nn.Module
    tokenizer: Callable
    image_size: int
    mean: list[float]
    std: list[float]
    interpolation: str
    fingerprint: str
    reference: mf.Foundation
    spec: FoundationSpec | None = None
    extra: dict = field(default_factory=dict)

    @property
    def embedded(self) -> bool:
        """True when a bundle built on this foundation must carry its weights."""
        return self.reference.source == "embedded"


def load_foundation(
    spec_or_ref: str | FoundationSpec | mf.Foundation,
    *,
    bundle_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    expected_fingerprint: str | None = None,
    allow_mismatch: bool = False,
    embed: bool = False,
    weights: str | os.PathLike[str] | None = None,
) -> LoadedFoundation:
    """Resolve a spec string, a parsed :class:`FoundationSpec` or a bundle's
    :class:`~hellofmt.manifest.Foundation` reference to a frozen open_clip model in eval mode on
    ``device``. The weights' :func:`fingerprint` is computed on load and compared with
    ``expected_fingerprint`` (for a reference, its ``weights_sha256`` when none is given): a
    difference raises :class:`FingerprintMismatchError`, or only warns when ``allow_mismatch``.
    ``bundle_dir`` locates embedded weights, and the weights of a ``file`` reference: a manifest
    never names a path outside its bundle, so those are ``weights`` (a path the caller chooses) or
    the reference's plain ``weights_file`` name inside ``bundle_dir``. ``embed=True`` makes the
    returned reference an embedded one (weights to be written into the bundle); a random-init model
    is always embedded so that its weights stay pinned. A model config from a reference (or one
    that will be recorded in a manifest) passes :func:`check_model_config` before open_clip sees it."""
    if weights is not None and not (isinstance(spec_or_ref, mf.Foundation) and spec_or_ref.source == "file"):
        raise FoundationError(
            "weights= applies to a bundle whose foundation source is 'file'", field="weights",
            fix="drop weights=, or give the weights in the spec string as CONFIG.json:WEIGHTS.safetensors",
        )
    if isinstance(spec_or_ref, mf.Foundation):
        loaded = _load_reference(spec_or_ref, bundle_dir, weights)
        expected = expected_fingerprint or spec_or_ref.weights_sha256
        where = Path(bundle_dir, mf.MANIFEST_NAME) if bundle_dir is not None else None
    else:
        spec = spec_or_ref if isinstance(spec_or_ref, FoundationSpec) else parse_foundation_spec(spec_or_ref)
        loaded = _load_spec(spec, bundle_dir, embed)
        expected = expected_fingerprint
        where = None
    if expected is not None and loaded.fingerprint != expected.lower():
        err = FingerprintMismatchError(
            f"the foundation weights have fingerprint {loaded.fingerprint[:16]}..., "
            f"not the {expected[:16]}... the bundle was built with",
            file=where,
            field="foundation.weights_sha256",
            fix=(
                "load the exact weights the bundle was built on (same source, tag and file); "
                "allow_mismatch=True uses these anyway, and the labels will differ"
            ),
        )
        if not allow_mismatch:
            raise err
        warnings.warn(str(err), stacklevel=2)
    loaded.model.to(device)
    return loaded


def foundation_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights as plain contiguous CPU tensors, ready for
    ``safetensors.torch.save_file`` into a bundle's ``foundation.safetensors``: the same tensors
    :func:`fingerprint` covers (``state_dict()``, without ``attn_mask``). They are copies, so later
    changes to the model (merged deltas) do not reach them. Call it before building a
    :class:`~hellofmt.projector.Projector`, which drops the text tower (the head is rebuilt from
    it at load, so it must be embedded too); afterwards it raises :class:`FoundationError`."""
    if any(model._modules.get(k, False) is None for k in ("text", "transformer")):
        raise FoundationError(
            "the model's text tower was dropped, so its weights are incomplete",
            field="foundation.weights_file",
            fix="call foundation_tensors before building the Projector (which drops the text tower), "
            "or build it with keep_text_tower=True",
        )
    # Fresh copies: merging deltas into the model later cannot change what gets written, and no
    # two tensors share storage (safetensors refuses that).
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in canonical_state(model).items()}


def foundation_metadata(reference: mf.Foundation) -> dict[str, str]:
    """The safetensors ``__metadata__`` of an embedded ``foundation.safetensors``."""
    return {"format": "hellofmt-foundation", "architecture": reference.architecture}


# ---- resolution ----------------------------------------------------------------------------------
def _load_spec(spec: FoundationSpec, bundle_dir, embed: bool) -> LoadedFoundation:
    import open_clip

    if spec.kind == "pretrained":
        arch, tag = spec.architecture, spec.pretrained
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
        config = copy.deepcopy(open_clip.get_model_config(arch))
        # The tag records the activation its weights were trained with (OpenAI's models use
        # QuickGELU); open_clip only warns on a mismatch, so honour the tag here.
        if tag_cfg.get("quick_gelu") and not config.get("quick_gelu"):
            config["quick_gelu"] = True
        preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        weights = _pretrained_weights(arch, tag, tag_cfg)
        ref_fields = dict(source="pretrained", pretrained=tag)
    elif spec.kind == "hf-hub":
        where = f"hf-hub:{spec.hf_hub_id}/{_HF_CONFIG_NAME}"
        config, preprocess = _split_config(_read_json(_hub_file(spec.hf_hub_id, _HF_CONFIG_NAME),
                                                      kind="open_clip config"), file=where)
        config = check_model_config(config, file=where, field="model_cfg")  # it will be recorded
        weights = _hub_file(spec.hf_hub_id, _HF_SAFE_WEIGHTS_NAME)
        ref_fields = dict(source="hf-hub", hf_hub_id=spec.hf_hub_id)
    elif spec.kind == "file":
        cfg_path = Path(spec.config_path).expanduser()
        if not cfg_path.is_file():
            raise FoundationError("model config not found", file=cfg_path, fix="check the path of CONFIG.json")
        config, preprocess = _split_config(_read_json(cfg_path, kind="model config"), file=cfg_path)
        config = check_model_config(config, file=cfg_path, field="model_cfg")  # it will be recorded
        weights = None
        ref_fields = dict(source="embedded")
        if spec.weights_path is not None:
            weights = Path(spec.weights_path).expanduser()
            _check_safetensors_name(str(weights))
            if not weights.is_file():
                raise FoundationError(
                    "weights file not found", file=weights, fix="check the path of WEIGHTS.safetensors"
                )
            # The manifest keeps the file's name only, as a hint: a bundle never points outside
            # itself, so at load time the user gives the path (weights=) or puts the file, under
            # this name, in the bundle directory.
            ref_fields = dict(source="file", weights_file=_plain_name(weights.name))
    elif spec.kind == "random":
        config = copy.deepcopy(open_clip.get_model_config(spec.architecture))
        config = check_model_config(config, field=f"{spec.architecture} model config")  # it will be recorded
        preprocess, weights = {}, None
        ref_fields = dict(source="embedded")
    else:
        raise FoundationError(f"unknown foundation spec kind {spec.kind!r}", field="foundation")

    if embed and spec.kind == "pretrained":  # the registry's config will be recorded: numbers only
        config = check_model_config(config, field=f"{spec.architecture} model config")
    # Only a registry config that is not recorded keeps open_clip's name-based choices (a SigLIP
    # tokenizer); anything a manifest will carry is built under a content-derived name.
    trusted = spec.kind == "pretrained" and not embed
    model, tokenizer = _build(
        spec.architecture, config, preprocess, weights=weights, error=FoundationError, trusted=trusted
    )
    if weights is not None:
        _load_weights(model, weights, error=FoundationError)
    if embed or ref_fields["source"] == "embedded":
        ref_fields = dict(source="embedded", weights_file=EMBEDDED_WEIGHTS_FILE)
    keep_config = ref_fields["source"] in ("embedded", "file", "hf-hub")
    return _finish(model, tokenizer, spec.architecture, ref_fields, config if keep_config else None, spec)


def _load_reference(ref: mf.Foundation, bundle_dir, weights_arg=None) -> LoadedFoundation:
    """A manifest's foundation reference -> the model. The manifest is untrusted: its model config
    passes :func:`check_model_config` before anything is fetched or built, names are resolved only
    in open_clip's registry, and weights are read only from the bundle, the pinned Hub repository
    or open_clip's registry (or ``weights_arg``, the caller's own path, for a ``file`` source)."""
    import open_clip

    if ref.library != "open_clip":
        raise FoundationError(f"unknown library {ref.library!r}", field="foundation.library", fix="upgrade hellofmt")
    preprocess = {"mean": list(ref.mean), "std": list(ref.std), "interpolation": ref.interpolation}
    manifest_file = Path(bundle_dir, mf.MANIFEST_NAME) if bundle_dir is not None else None
    if ref.source == "pretrained":
        # Only a name of open_clip's own registry: a manifest's "x.json" or "hf-hub:..." would
        # otherwise be read from disk or fetched by the spec parser.
        if ref.architecture not in open_clip.list_models():
            raise FoundationError(
                f"architecture {ref.architecture!r} is not registered in this open_clip", file=manifest_file,
                field="foundation.architecture", fix="upgrade open_clip, or rebuild the bundle",
            )
        spec = parse_foundation_spec(f"{ref.architecture}:{ref.pretrained}")
        loaded = _load_spec(spec, None, embed=False)
    elif ref.source == "hf-hub":
        if not ref.model_config:
            raise ModelConfigError(
                "an hf-hub foundation must carry its model_config: hellofmt does not fetch configs named by a manifest",
                file=manifest_file, field="foundation.model_config", fix="rebuild the bundle with this hellofmt",
            )
        config = _manifest_config(ref, manifest_file)
        if not isinstance(ref.hf_hub_id, str) or not re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", ref.hf_hub_id):
            raise FoundationError(f"{ref.hf_hub_id!r} is not a Hub model id", file=manifest_file,
                                  field="foundation.hf_hub_id", fix="rebuild the bundle")
        weights = _hub_file(ref.hf_hub_id, _HF_SAFE_WEIGHTS_NAME)
        model, tokenizer = _build(ref.architecture, config, preprocess, weights=weights, error=FoundationError)
        _load_weights(model, weights, error=FoundationError)
        loaded = _finish(model, tokenizer, ref.architecture, {}, config, None)
    elif ref.source in ("file", "embedded"):
        if ref.model_config:
            config = _manifest_config(ref, manifest_file)
        else:
            # A registered architecture's config, held to the same allow-list as a manifest's.
            known = ref.architecture in open_clip.list_models()
            config = copy.deepcopy(open_clip.get_model_config(ref.architecture)) if known else None
            if config is None:
                raise FoundationError(
                    f"architecture {ref.architecture!r} is not built into this open_clip and the manifest "
                    "has no model_config",
                    file=manifest_file,
                    field="foundation.model_config",
                    fix=(
                        "rebuild the bundle with a newer hellofmt, or register the config with "
                        "open_clip.add_model_config"
                    ),
                )
            config = check_model_config(config, file=manifest_file, field="foundation.model_config")
        if ref.source == "embedded":
            weights = _bundle_weights(ref, bundle_dir, manifest_file)
            error: type = TensorFileError
        elif weights_arg is not None:
            weights = Path(weights_arg).expanduser()
            error = FoundationError
        else:
            weights = _bundle_weights(ref, bundle_dir, manifest_file)
            error = FoundationError
        _check_safetensors_name(str(weights))
        if not weights.is_file():
            raise FoundationError("foundation weights file not found", file=weights, field="weights",
                                  fix="check the path given as weights=")
        model, tokenizer = _build(ref.architecture, config, preprocess, weights=weights, error=error)
        _load_weights(model, weights, error=error, embedded=ref.source == "embedded")
        loaded = _finish(model, tokenizer, ref.architecture, {}, config, None)
    else:
        raise FoundationError(f"unknown source {ref.source!r}", file=manifest_file, field="foundation.source")
    if loaded.image_size != ref.image_size:
        raise FoundationError(
            f"the manifest gives input size {ref.image_size} but the model takes {loaded.image_size}",
            file=manifest_file,
            field="foundation.image_size",
            fix="the manifest does not match its foundation model: rebuild the bundle",
        )
    # The manifest is authoritative for the normalisation the projector was built with.
    loaded.reference = ref
    loaded.mean, loaded.std, loaded.interpolation = list(ref.mean), list(ref.std), ref.interpolation
    return loaded


def _manifest_config(ref: mf.Foundation, manifest_file) -> dict:
    config, _ = _split_config(ref.model_config, file=manifest_file, field="foundation.model_config")
    return check_model_config(config, file=manifest_file, field="foundation.model_config")


def _plain_name(name: str) -> str | None:
    try:
        return mf.check_file_name(name)
    except mf.UnsafeFileNameError:
        return None


def _bundle_weights(ref: mf.Foundation, bundle_dir, manifest_file) -> Path:
    """The weights file a reference names inside its bundle: a plain name, present, a regular file
    that is not a symlink leading out of the bundle (huggingface_hub's blob store of the same
    repository excepted, as for every bundle file)."""
    field = "foundation.weights_file"
    embedded = ref.source == "embedded"
    if not ref.weights_file or bundle_dir is None:
        if embedded:
            raise FoundationError(
                "missing weights_file" if not ref.weights_file
                else "the weights are embedded in the bundle but no bundle directory was given",
                file=manifest_file, field=field, fix="pass bundle_dir=, or open the bundle with Projector.from_bundle",
            )
        raise FoundationError(
            "the foundation weights are a file the user gives at load time, and none was given",
            file=manifest_file, field=field,
            fix="pass weights=PATH.safetensors, or put the file in the bundle directory"
            + (f" as {ref.weights_file}" if ref.weights_file else ""),
        )
    try:
        mf.check_file_name(ref.weights_file, str(manifest_file), field)
    except mf.UnsafeFileNameError as e:
        if embedded:
            raise
        # A bundle built before names were required records a local path: never followed.
        raise type(e)(e.message, file=e.file, field=e.field,
                      fix="a manifest never names a path outside its bundle: pass weights=PATH.safetensors "
                      "to give the foundation weights yourself") from None
    root = Path(bundle_dir)
    path = root / ref.weights_file
    if not os.path.lexists(path):
        raise FoundationError(
            "foundation weights file not found", file=path, field=field,
            fix="the bundle is incomplete: download it again" if embedded
            else "pass weights=PATH.safetensors, or put the weights file in the bundle directory under this name",
        )
    try:
        real, rroot = path.resolve(strict=True), root.resolve(strict=True)
    except (OSError, RuntimeError):
        raise UnsafePathError("is a broken or looping symlink", file=path, field=field) from None
    hf_blobs = rroot.parent.parent / "blobs" if rroot.parent.name == "snapshots" else None
    if real.parent != rroot and real.parent != hf_blobs:
        raise UnsafePathError(f"leads out of the bundle (to {real})", file=path, field=field,
                              fix="bundle files must be plain files inside the bundle directory; "
                              "weights kept elsewhere are given with weights=")
    if not real.is_file():
        raise UnsafePathError("is not a regular file", file=path, field=field)
    return path


def _finish(model, tokenizer, architecture, ref_fields, config, spec) -> LoadedFoundation:
    import open_clip

    model.eval()
    model.requires_grad_(False)
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise FoundationError(
                f"non-square input size {tuple(size)} is not supported",
                field="foundation.image_size",
                fix="use a model with a square input size",
            )
        size = size[0]
    interpolation = pp.get("interpolation", "bicubic")
    if interpolation not in _INTERPOLATIONS:  # e.g. 'random' (a training-time option)
        interpolation = "bicubic"
    mean = [float(x) for x in pp.get("mean", open_clip.OPENAI_DATASET_MEAN)]
    std = [float(x) for x in pp.get("std", open_clip.OPENAI_DATASET_STD)]
    fp = fingerprint(model)
    ref = mf.Foundation(
        architecture=architecture,
        source=ref_fields.get("source", "embedded"),
        weights_sha256=fp,
        image_size=int(size),
        mean=mean,
        std=std,
        pretrained=ref_fields.get("pretrained"),
        hf_hub_id=ref_fields.get("hf_hub_id"),
        weights_file=ref_fields.get("weights_file"),
        model_config=copy.deepcopy(config) if config is not None else None,
        library_version=getattr(open_clip, "__version__", None),
        interpolation=interpolation,
    )
    return LoadedFoundation(
        model=model,
        tokenizer=tokenizer,
        image_size=int(size),
        mean=mean,
        std=std,
        interpolation=interpolation,
        fingerprint=fp,
        reference=ref,
        spec=spec,
    )


# ---- model construction --------------------------------------------------------------------------
_REGISTER_LOCK = threading.Lock()


def _register_config(config: dict) -> str:
    """Register a model config with open_clip under a name derived from its content.

    Content-addressed names never clobber a built-in (a user's ``ViT-B-32.json`` would otherwise
    replace open_clip's own for the whole process) and make re-registration idempotent.
    """
    import open_clip

    blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode("utf-8")
    name = f"hellofmt-{hashlib.sha256(blob).hexdigest()[:16]}"
    with _REGISTER_LOCK:
        if name in open_clip.list_models():
            return name
        # open_clip registers files; its registry keeps entries once scanned, so the file can go.
        with tempfile.TemporaryDirectory(prefix="hellofmt-config-") as tmp:
            path = Path(tmp) / f"{name}.json"
            path.write_bytes(blob)
            open_clip.add_model_config(path)
    return name


@functools.lru_cache(maxsize=16)
def _tokenizer(name: str) -> Callable:
    # Building open_clip's BPE tokenizer reads and parses its vocabulary (~0.6 s); the name fixes
    # the config (built-in or content-addressed), so one tokenizer per name is shared.
    import open_clip

    return open_clip.get_tokenizer(name)


def _build(
    architecture: str | None,
    config: dict,
    preprocess: dict,
    *,
    weights: Path | None = None,
    error: type = FoundationError,
    trusted: bool = False,
) -> tuple[nn.Module, Callable]:
    import open_clip

    # A trusted built-in name (a registry config that no manifest carries) keeps open_clip's
    # name-based tokenizer choice (e.g. SigLIP). Every other config, already through
    # check_model_config, is registered under a content-derived name ("hellofmt-<hex>"), so
    # neither the name nor the config can select a tokenizer, a schema ("hf-hub:", "local-dir:")
    # or anything but open_clip's local BPE tokenizer.
    builtin = open_clip.get_model_config(architecture) if trusted and architecture in open_clip.list_models() else None
    name = architecture if builtin is not None and builtin == config else _register_config(config)
    if weights is not None:
        _check_size(name, weights, error=error)
    try:
        with warnings.catch_warnings(), _quiet_random_init():
            warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
            model = open_clip.create_model(
                name,
                pretrained=None,
                load_weights=False,
                pretrained_image=False,
                pretrained_text=False,
                force_preprocess_cfg=preprocess or None,
            )
        tokenizer = _tokenizer(name)
    except FoundationError:
        raise
    except Exception as e:  # a malformed config surfaces as anything from KeyError to TypeError
        raise FoundationError(
            f"open_clip cannot build the model: {type(e).__name__}: {e}",
            field="foundation.model_config",
            fix="check the model config (embed_dim, vision_cfg, text_cfg)",
        ) from e
    return model, tokenizer


def _check_size(name: str, weights: Path, *, error: type) -> None:
    """Refuse a config that describes far more weights than the file holds, before allocating it.

    The config may come from a bundle's manifest; built on the meta device first, a hostile one
    (a width of 10**6) costs nothing, where building it for real would exhaust memory.
    """
    import open_clip

    shapes = _header_shapes(weights, error=error)
    in_file = sum(math.prod(shape) for shape in shapes.values())
    try:
        with torch.device("meta"), warnings.catch_warnings(), _quiet_random_init():
            warnings.simplefilter("ignore")
            meta = open_clip.create_model(
                name, pretrained=None, load_weights=False, pretrained_image=False, pretrained_text=False, device="meta"
            )
    except Exception as e:
        raise FoundationError(
            f"open_clip cannot build the model: {type(e).__name__}: {e}",
            field="foundation.model_config",
            fix="check the model config (embed_dim, vision_cfg, text_cfg)",
        ) from e
    own = meta.state_dict()
    wanted = sum(t.numel() for t in own.values())
    # Slack for the few scalars open_clip adds when converting third-party checkpoints (logit_bias).
    if wanted > in_file + 1024:
        # Name the first tensor (in the model's order) whose shape differs, where the names agree.
        first = next((k for k in own if k in shapes and tuple(shapes[k]) != tuple(own[k].shape)), None)
        where = (f"; first mismatching tensor: {first} is {tuple(shapes[first])} in the file, "
                 f"{tuple(own[first].shape)} in the config") if first else ""
        raise error(
            f"the model config describes {wanted:,} weights but the file holds {in_file:,}{where}",
            file=weights,
            field="foundation.model_config",
            fix="pair the weights with the model config they were trained with",
        )


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init():
    """open_clip logs "initialized randomly" for every model built without a checkpoint; hellofmt
    always builds that way and loads the weights itself, so the notice would be wrong."""
    filt = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)


def _split_config(obj: Any, *, file=None, field: str = "model_config") -> tuple[dict, dict]:
    """(model config, preprocess config) from a plain model config or a whole open_clip_config.json."""
    if isinstance(obj, dict) and "model_cfg" in obj:
        model_cfg, pp = obj["model_cfg"], obj.get("preprocess_cfg") or {}
    else:
        model_cfg, pp = obj, {}
    if not isinstance(model_cfg, dict) or not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise FoundationError(
            "not an open_clip model config: needs embed_dim, vision_cfg and text_cfg",
            file=file,
            field=field,
            fix="use a config from open_clip/model_configs/ as a template",
        )
    if not isinstance(pp, dict):
        pp = {}
    # "size" is left out on purpose: as in open_clip, the vision tower's own image_size wins.
    return copy.deepcopy(model_cfg), {
        k: v for k, v in pp.items() if k in ("mean", "std", "interpolation", "resize_mode")
    }


def _read_json(path, *, kind: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FoundationError(f"cannot read the {kind}: {e}", file=path) from None


# ---- weights -------------------------------------------------------------------------------------
def _pretrained_weights(arch: str, tag: str, tag_cfg: dict) -> Path:
    """The safetensors checkpoint of an open_clip pretrained tag, from the Hub cache or the Hub.

    open_clip's own ``download_pretrained`` prefers the tag's Hub repo and, there, a
    ``.safetensors`` twin of the checkpoint, but falls back to ``open_clip_pytorch_model.bin`` or
    the original ``.pt`` URL, which it then ``torch.load``s. hellofmt asks the Hub for the
    safetensors file only and refuses a tag that has none.
    """
    if "file" in tag_cfg:  # a tag registered locally with a file path
        path = Path(tag_cfg["file"])
        _check_safetensors_name(str(path))
        return path
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        raise FoundationError(
            f"{arch}:{tag} is only published as a pickled checkpoint (URL {tag_cfg.get('url', '?')})",
            field="foundation",
            fix="hellofmt never unpickles: convert it to safetensors once and pass CONFIG.json:WEIGHTS.safetensors",
        )
    # open_clip's convention: "org/repo/" means the repo's default file, "org/repo/name.pt" a file.
    repo, filename = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)
    if not filename or filename == "open_clip_pytorch_model.bin":
        filename = _HF_SAFE_WEIGHTS_NAME
    elif filename.endswith((".bin", ".pth", ".pt")):
        filename = filename.rsplit(".", 1)[0] + ".safetensors"
    return _hub_file(repo, filename, spec=f"{arch}:{tag}")


_OFFLINE_FIX = (
    "connect to the network and run again (the download is then cached); or, offline, set HF_HUB_OFFLINE=1 "
    "with a Hugging Face cache (HF_HOME / HF_HUB_CACHE) that holds the files; or use local weights: "
    "--foundation CONFIG.json:WEIGHTS.safetensors"
)


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` means the Hub could not be reached at all (no network, DNS failure, connection
    refused or timed out, huggingface_hub's offline mode), as opposed to an HTTP answer from it."""
    for cls in type(err).__mro__:
        lib = cls.__module__.split(".")[0]
        if cls.__name__ == "OfflineModeIsEnabled":
            return True
        if (lib in ("httpx", "httpx2") and cls.__name__ == "TransportError") or (
            lib == "requests" and cls.__name__ in ("ConnectionError", "Timeout")
        ):
            return True
    return isinstance(err, (ConnectionError, TimeoutError))


def _hub_file(repo: str, filename: str, spec: str | None = None) -> Path:
    """Download (or find in the cache) one file of a Hub model repo, with errors that say what to do.

    A file not in the cache costs one quick request first: with no network, ``hf_hub_download`` would
    otherwise retry with back-off (about 25 s of "Retrying in 8s" warnings) before giving up, and its
    error would name the internal Hub file rather than the foundation the user asked for.

    Args:
        repo: the Hub model repository (``ORG/NAME``).
        filename: the file in it.
        spec: the foundation as the user wrote it (``ViT-B-32:openai``), for the errors
            (default: ``hf-hub:REPO``).

    Returns:
        The path of the file in the Hugging Face cache.

    Raises:
        FoundationError: not cached and the Hub cannot be reached (naming ``spec`` and the ways out), gated,
            missing, or no safetensors weights.
    """
    try:
        from huggingface_hub import constants as hf_constants
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    except ImportError as e:  # pragma: no cover - open_clip depends on huggingface_hub
        raise FoundationError("huggingface_hub is not installed", fix="pip install huggingface_hub") from e
    where = f"hf-hub:{repo}/{filename}"
    name = spec or f"hf-hub:{repo}"

    def offline(why: str) -> FoundationError:
        return FoundationError(
            f"cannot get {name}: {filename} (from the Hub model {repo}) is not in the local Hugging Face cache, "
            f"and {why}", field="foundation", fix=_OFFLINE_FIX,
        )

    if not hf_constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(repo, filename), str):
        try:  # one attempt, no retries: fail in seconds when there is no network
            get_hf_file_metadata(hf_hub_url(repo, filename), timeout=hf_constants.HF_HUB_ETAG_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - only "unreachable" is decided here; the download reports the rest
            if _unreachable(e):
                raise offline(f"the Hub ({hf_constants.ENDPOINT}) cannot be reached: {type(e).__name__}") from None
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except hf_errors.LocalEntryNotFoundError:
        raise offline("the Hub cannot be reached (no network, or HF_HUB_OFFLINE=1)") from None
    except hf_errors.GatedRepoError:
        raise FoundationError(
            "the repository is gated", file=where, fix="accept its terms on the Hub and set HF_TOKEN"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise FoundationError(
            "no such model repository on the Hub (or it is private)",
            file=where,
            fix="check the repo id; set HF_TOKEN for a private repository",
        ) from None
    except hf_errors.EntryNotFoundError:
        if filename.endswith(".safetensors"):
            raise FoundationError(
                "the repository has no safetensors weights, and hellofmt never unpickles .bin/.pt files",
                file=where,
                fix="convert the checkpoint to safetensors once and pass CONFIG.json:WEIGHTS.safetensors",
            ) from None
        raise FoundationError("file not found in the repository", file=where) from None
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        raise FoundationError(
            f"download failed: {e}", file=where, fix="check the network, or set HF_HUB_OFFLINE=1 to use the cache"
        ) from None


def _as(error: type, e: TensorFileError) -> Exception:
    """The checked reader's TensorFileError as the caller's error type, same message and fix."""
    if error is TensorFileError:
        return e
    return error(e.message, file=e.file, field=e.field, fix=e.fix)


def _header_shapes(path: Path, *, error: type) -> dict[str, list[int]]:
    """Tensor shapes from a checked safetensors header, without reading the data."""
    try:
        return header_shapes(path)
    except TensorFileError as e:
        raise _as(error, e) from None


def _read_safetensors(path: Path, *, error: type, embedded: bool) -> dict[str, Tensor]:
    """Every tensor of a weights file, through the one checked reader (header, dtypes, byte ranges);
    embedded weights must also say they are a hellofmt foundation."""
    try:
        header = read_safetensors_header(path)
    except TensorFileError as e:
        raise _as(error, e) from None
    meta = header.get("__metadata__", {})
    if embedded and meta.get("format", "hellofmt-foundation") != "hellofmt-foundation":
        raise error(
            f"metadata format is {meta.get('format')!r}, not 'hellofmt-foundation'",
            file=path,
            field="__metadata__.format",
            fix="rebuild the bundle",
        )
    try:
        state, _ = load_safetensors(path, header=header)
    except TensorFileError as e:
        raise _as(error, e) from None
    return state


def _load_weights(model: nn.Module, path: Path, *, error: type, embedded: bool = False) -> None:
    _check_safetensors_name(str(path))
    state = _read_safetensors(path, error=error, embedded=embedded)
    if not embedded:
        state = _adapt_state(model, state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of the wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise error(
            "the weights do not fit the model config: " + "; ".join(parts),
            file=path,
            fix="pair the weights with the model config they were trained with",
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise error(f"non-finite values in {bad[0]}", file=path, fix="the weights are corrupt")
    model.load_state_dict(state, strict=True)


def _adapt_state(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The renames open_clip's ``load_checkpoint`` applies to third-party state dicts, minus the
    ``torch.load``: ``module.`` prefixes, OpenAI/timm layouts (``convert_state_dict``), old text
    layouts, scalar/1-d ``logit_scale``, a missing ``logit_bias``, stale ``position_ids``."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    if "state_dict" in state and len(state) == 1:  # pragma: no cover - not possible in safetensors
        state = state["state_dict"]
    if state and next(iter(state)).startswith("module."):
        state = {k[len("module.") :]: v for k, v in state.items()}
    try:
        state = convert_state_dict(model, state)
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
    except Exception:  # leave the names alone; the fit check below reports what is wrong
        pass
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if (
            key in state
            and isinstance(own, Tensor)
            and state[key].ndim != own.ndim
            and state[key].numel() == own.numel()
        ):
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    state.pop("text.transformer.embeddings.position_ids", None)
    return state
