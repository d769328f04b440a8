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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import manifest as mf
from .errors import FingerprintMismatchError, FoundationError, TensorFileError
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
]

EMBEDDED_WEIGHTS_FILE = mf.FOUNDATION_FILE
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npz", ".npy")
_HF_CONFIG_NAME = "open_clip_config.json"
_HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
_INTERPOLATIONS = ("bicubic", "bilinear")


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
) -> LoadedFoundation:
    """Resolve a spec string, a parsed :class:`FoundationSpec` or a bundle's
    :class:`~hellofmt.manifest.Foundation` reference to a frozen open_clip model in eval mode on
    ``device``. The weights' :func:`fingerprint` is computed on load and compared with
    ``expected_fingerprint`` (for a reference, its ``weights_sha256`` when none is given): a
    difference raises :class:`FingerprintMismatchError`, or only warns when ``allow_mismatch``.
    ``bundle_dir`` locates embedded weights (and relative ``file`` weights). ``embed=True`` makes
    the returned reference an embedded one (weights to be written into the bundle); a random-init
    model is always embedded so that its weights stay pinned."""
    if isinstance(spec_or_ref, mf.Foundation):
        loaded = _load_reference(spec_or_ref, bundle_dir)
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
        hub_cfg = _read_json(_hub_file(spec.hf_hub_id, _HF_CONFIG_NAME), kind="open_clip config")
        config, preprocess = _split_config(hub_cfg, file=f"hf-hub:{spec.hf_hub_id}/{_HF_CONFIG_NAME}")
        weights = _hub_file(spec.hf_hub_id, _HF_SAFE_WEIGHTS_NAME)
        ref_fields = dict(source="hf-hub", hf_hub_id=spec.hf_hub_id)
    elif spec.kind == "file":
        cfg_path = Path(spec.config_path).expanduser()
        if not cfg_path.is_file():
            raise FoundationError("model config not found", file=cfg_path, fix="check the path of CONFIG.json")
        config, preprocess = _split_config(_read_json(cfg_path, kind="model config"), file=cfg_path)
        weights = None
        ref_fields = dict(source="embedded")
        if spec.weights_path is not None:
            weights = Path(spec.weights_path).expanduser()
            _check_safetensors_name(str(weights))
            if not weights.is_file():
                raise FoundationError("weights file not found", file=weights, fix="check the path of WEIGHTS.safetensors")
            ref_fields = dict(source="file", weights_file=str(weights))
    elif spec.kind == "random":
        config = copy.deepcopy(open_clip.get_model_config(spec.architecture))
        preprocess, weights = {}, None
        ref_fields = dict(source="embedded")
    else:
        raise FoundationError(f"unknown foundation spec kind {spec.kind!r}", field="foundation")

    model, tokenizer = _build(
        spec.architecture, config, preprocess, weights=weights, error=FoundationError
    )
    if weights is not None:
        _load_weights(model, weights, error=FoundationError)
    if embed or ref_fields["source"] == "embedded":
        ref_fields = dict(source="embedded", weights_file=EMBEDDED_WEIGHTS_FILE)
    keep_config = ref_fields["source"] in ("embedded", "file", "hf-hub")
    return _finish(model, tokenizer, spec.architecture, ref_fields, config if keep_config else None, spec)


def _load_reference(ref: mf.Foundation, bundle_dir) -> LoadedFoundation:
    import open_clip

    if ref.library != "open_clip":
        raise FoundationError(f"unknown library {ref.library!r}", field="foundation.library", fix="upgrade hellofmt")
    preprocess = {"mean": list(ref.mean), "std": list(ref.std), "interpolation": ref.interpolation}
    manifest_file = Path(bundle_dir, mf.MANIFEST_NAME) if bundle_dir is not None else None
    if ref.source == "pretrained":
        spec = parse_foundation_spec(f"{ref.architecture}:{ref.pretrained}")
        loaded = _load_spec(spec, bundle_dir, embed=False)
    elif ref.source == "hf-hub":
        if ref.model_config:
            config, _ = _split_config(ref.model_config, file=manifest_file, field="foundation.model_config")
        else:
            config, _ = _split_config(
                _read_json(_hub_file(ref.hf_hub_id, _HF_CONFIG_NAME), kind="open_clip config"),
                file=f"hf-hub:{ref.hf_hub_id}/{_HF_CONFIG_NAME}",
            )
        weights = _hub_file(ref.hf_hub_id, _HF_SAFE_WEIGHTS_NAME)
        model, tokenizer = _build(ref.architecture, config, preprocess, weights=weights, error=FoundationError)
        _load_weights(model, weights, error=FoundationError)
        loaded = _finish(model, tokenizer, ref.architecture, {}, config, None)
    elif ref.source in ("file", "embedded"):
        if ref.model_config:
            config, _ = _split_config(ref.model_config, file=manifest_file, field="foundation.model_config")
        else:
            config = copy.deepcopy(open_clip.get_model_config(ref.architecture))
            if config is None:
                raise FoundationError(
                    f"architecture {ref.architecture!r} is not built into this open_clip and the manifest "
                    "has no model_config",
                    file=manifest_file,
                    field="foundation.model_config",
                    fix="rebuild the bundle with a newer hellofmt, or register the config with open_clip.add_model_config",
                )
        if not ref.weights_file:
            raise FoundationError("missing weights_file", file=manifest_file, field="foundation.weights_file")
        if ref.source == "embedded":
            if bundle_dir is None:
                raise FoundationError(
                    "the weights are embedded in the bundle but no bundle directory was given",
                    field="foundation.weights_file",
                    fix="pass bundle_dir=, or open the bundle with Projector.from_bundle",
                )
            mf.check_file_name(ref.weights_file, str(manifest_file), "foundation.weights_file")
            weights = Path(bundle_dir) / ref.weights_file
            error: type = TensorFileError
        else:
            weights = Path(ref.weights_file).expanduser()
            if not weights.is_absolute() and bundle_dir is not None and (Path(bundle_dir) / weights).is_file():
                weights = Path(bundle_dir) / weights
            error = FoundationError
        _check_safetensors_name(str(weights))
        if not weights.is_file():
            raise FoundationError(
                "foundation weights file not found",
                file=weights,
                field="foundation.weights_file",
                fix="the bundle is incomplete: download it again" if ref.source == "embedded" else "put the weights file there",
            )
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
) -> tuple[nn.Module, Callable]:
    import open_clip

    # get_model_config("hf-hub:...") would fetch from the Hub: look only at registered names.
    builtin = open_clip.get_model_config(architecture) if architecture in open_clip.list_models() else None
    # A built-in name keeps open_clip's name-based tokenizer choice (e.g. SigLIP); otherwise the
    # config is registered under a content-derived name.
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

    in_file = sum(math.prod(shape) for shape in _header_shapes(weights, error=error).values())
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
    wanted = sum(t.numel() for t in meta.state_dict().values())
    # Slack for the few scalars open_clip adds when converting third-party checkpoints (logit_bias).
    if wanted > in_file + 1024:
        raise error(
            f"the model config describes {wanted:,} weights but the file holds {in_file:,}",
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
    return copy.deepcopy(model_cfg), {k: v for k, v in pp.items() if k in ("mean", "std", "interpolation", "resize_mode")}


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
    return _hub_file(repo, filename)


def _hub_file(repo: str, filename: str) -> Path:
    """Download (or find in the cache) one file of a Hub model repo, with errors that say what to do."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import errors as hf_errors
    except ImportError as e:  # pragma: no cover - open_clip depends on huggingface_hub
        raise FoundationError("huggingface_hub is not installed", fix="pip install huggingface_hub") from e
    where = f"hf-hub:{repo}/{filename}"
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except hf_errors.LocalEntryNotFoundError:
        raise FoundationError(
            "not in the local Hugging Face cache, and the Hub cannot be reached (offline, or HF_HUB_OFFLINE=1)",
            file=where,
            fix="run once with network access to populate the cache (HF_HOME / HF_HUB_CACHE)",
        ) from None
    except hf_errors.GatedRepoError:
        raise FoundationError("the repository is gated", file=where, fix="accept its terms on the Hub and set HF_TOKEN") from None
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
        raise FoundationError(f"download failed: {e}", file=where, fix="check the network, or set HF_HUB_OFFLINE=1 to use the cache") from None


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
            parts.append(f"{len(wrong)} of the wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
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
        if key in state and isinstance(own, Tensor) and state[key].ndim != own.ndim and state[key].numel() == own.numel():
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    state.pop("text.transformer.embeddings.position_ids", None)
    return state
