"""The bundle manifest (``hellofmt.json``): typed dataclasses, JSON round trip, validation.

The normative description is ``spec/hellofmt-v1.md``; ``spec/manifest.schema.json`` is its JSON
Schema. Validation here is hand-written rather than schema-driven so that every error names the
field path and the fix, e.g. ``foundation.weights_sha256: expected 64 hex characters``.

Versioning: ``format_version`` is ``"MAJOR.MINOR"``. A reader refuses a newer MAJOR; fields it does
not know are kept (in each object's ``extra``) and written back unchanged, so a round trip through
an older reader loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import FormatVersionError, ManifestDigestError, ManifestError, UnsafeFileNameError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CARD_NAME",
    "PREVIEW_NAME",
    "VIEWER_TABLE_NAME",
    "EXTRA_NAMES",
    "PROJECTOR_FILE",
    "FOUNDATION_FILE",
    "MAX_MANIFEST_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_IMAGE_SIDE",
    "MAX_IMAGE_COUNT",
    "MAX_SHARD_BYTES",
    "MAX_FILE_NAME_BYTES",
    "CODECS",
    "UnsafeFileNameError",
    "check_file_name",
    "FileEntry",
    "Foundation",
    "Head",
    "LowRankTarget",
    "HeadDelta",
    "DELTA_ENCODINGS",
    "ProjectorInfo",
    "Shard",
    "ImagesInfo",
    "LabelRecipe",
    "Provenance",
    "ProbeView",
    "Probe",
    "Evaluation",
    "Manifest",
    "DIGEST_FIELD",
    "MissingDigestWarning",
    "canonical_manifest",
    "manifest_digest",
    "check_manifest_digest",
]

FORMAT_NAME = "hellofmt"
# The newest version this hellofmt reads and writes; a bundle declares the lowest it needs (spec 8).
FORMAT_VERSION = "2.1"
FORMAT_MAJOR = 2
# The manifest digest (spec 2.1): the top-level field holding the sha256 of the manifest's canonical
# form. It is new in MINOR 1 of each MAJOR (1.1, 2.1): a manifest declaring MAJOR.1 or later MUST
# carry it, so a bit flip that renames the field is refused rather than read as an older bundle.
DIGEST_FIELD = "manifest_sha256"
DIGEST_MINOR = 1
MANIFEST_NAME = "hellofmt.json"
CARD_NAME = "README.md"  # the dataset card: written by push, neither listed in the manifest nor hashed
PREVIEW_NAME = "preview.png"  # the card's contact sheet (push): unlisted, unhashed, ignored by readers
VIEWER_TABLE_NAME = "viewer.parquet"  # the Hub viewer's copy of the images (push --viewer-table): likewise
# The unlisted files a bundle may carry (spec section 1): for people and the Hub page, never read as data.
EXTRA_NAMES = (CARD_NAME, PREVIEW_NAME, VIEWER_TABLE_NAME)
PROJECTOR_FILE = "projector.safetensors"  # the low-rank deltas (the manifest's projector.file default)
FOUNDATION_FILE = "foundation.safetensors"  # embedded foundation weights

# Limits (spec section "Limits"). They bound what a reader allocates before any hash is checked.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# A safetensors header (JSON) is refused over this before a byte of it is read; safetensors' own
# reader has the same cap.
MAX_HEADER_BYTES = 100 * 1000 * 1000
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_COUNT = 10_000_000
MAX_SHARD_BYTES = 4 * 1024**3
MAX_CLASSES = 100_000
MAX_FILE_NAME_BYTES = 255  # NAME_MAX of common filesystems: a longer name fails with ENAMETOOLONG

CODECS = ("png", "jpeg", "webp", "raw")
FOUNDATION_SOURCES = ("pretrained", "hf-hub", "file", "embedded")
MIX_MODES = ("none", "cutmix", "mixup", "cutmix-mixup")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^(\d+)\.(\d+)$")


# --------------------------------------------------------------------------------------------------
# A small typed reader: each accessor names the full field path in its error.
# --------------------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, obj: Any, path: str, file: str | None):
        if not isinstance(obj, dict):
            raise ManifestError(
                f"expected an object, got {_kind(obj)}", file=file, field=path or "<root>"
            )
        self.obj = obj
        self.path = path
        self.file = file

    def _p(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str, fix: str | None = None) -> ManifestError:
        return ManifestError(message, file=self.file, field=self._p(key), fix=fix)

    def has(self, key: str) -> bool:
        return key in self.obj and self.obj[key] is not None

    def raw(self, key: str, required: bool = True) -> Any:
        if key not in self.obj or self.obj[key] is None:
            if required:
                raise self.error(key, "missing required field", "rebuild the bundle with hellofmt build")
            return None
        return self.obj[key]

    def str(self, key: str, required: bool = True, choices: tuple[str, ...] | None = None):
        v = self.raw(key, required)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self.error(key, f"expected a string, got {_kind(v)}")
        if choices is not None and v not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {v!r}")
        return v

    def int(self, key: str, required: bool = True, lo: int | None = None, hi: int | None = None):
        v = self.raw(key, required)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.error(key, f"expected an integer, got {_kind(v)}")
        if lo is not None and v < lo:
            raise self.error(key, f"expected an integer >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise self.error(key, f"expected an integer <= {hi}, got {v}")
        return v

    def _number(self, v: Any, field_path: str) -> float:
        # JSON integers are unbounded: a 400-digit one overflows float() rather than failing
        # isfinite, so the conversion itself is guarded.
        try:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        except OverflowError:
            ok = False
        if not ok:
            raise ManifestError(f"expected a finite number, got {_kind(v)}", file=self.file, field=field_path)
        return float(v)

    def float(self, key: str, required: bool = True, positive: bool = False):
        v = self.raw(key, required)
        if v is None:
            return None
        f = self._number(v, self._p(key))
        if positive and f <= 0:
            raise self.error(key, f"expected a number > 0, got {v}")
        return f

    def bool(self, key: str, required: bool = True, default: bool = False):
        v = self.raw(key, required)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.error(key, f"expected true or false, got {_kind(v)}")
        return v

    def list(self, key: str, required: bool = True) -> list | None:
        v = self.raw(key, required)
        if v is None:
            return None
        if not isinstance(v, list):
            raise self.error(key, f"expected a list, got {_kind(v)}")
        return v

    def str_list(self, key: str, required: bool = True, nonempty: bool = False):
        v = self.list(key, required)
        if v is None:
            return None
        for i, s in enumerate(v):
            if not isinstance(s, str):
                raise ManifestError(
                    f"expected a string, got {_kind(s)}", file=self.file, field=f"{self._p(key)}[{i}]"
                )
        if nonempty and not v:
            raise self.error(key, "expected a non-empty list")
        return list(v)

    def float_list(self, key: str, length: int | None = None, required: bool = True):
        v = self.list(key, required)
        if v is None:
            return None
        if length is not None and len(v) != length:
            raise self.error(key, f"expected {length} numbers, got {len(v)}")
        return [self._number(x, f"{self._p(key)}[{i}]") for i, x in enumerate(v)]

    def int_list(self, key: str, required: bool = True, lo: int | None = None):
        v = self.list(key, required)
        if v is None:
            return None
        for i, x in enumerate(v):
            if not isinstance(x, int) or isinstance(x, bool) or (lo is not None and x < lo):
                want = "an integer" if lo is None else f"an integer >= {lo}"
                raise ManifestError(
                    f"expected {want}, got {x!r}", file=self.file, field=f"{self._p(key)}[{i}]"
                )
        return list(v)

    def dict(self, key: str, required: bool = True) -> dict | None:
        v = self.raw(key, required)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.error(key, f"expected an object, got {_kind(v)}")
        return v

    def sub(self, key: str, required: bool = True) -> _Reader | None:
        v = self.raw(key, required)
        if v is None:
            return None
        return _Reader(v, self._p(key), self.file)

    def extra(self, known: tuple[str, ...]) -> dict:
        return {k: v for k, v in self.obj.items() if k not in known}


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return f"the string {v!r}" if len(v) < 40 else "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name != "extra")


def _to_dict(obj) -> dict:
    """Dataclass to a JSON-ready dict; ``None`` optional fields are omitted, ``extra`` is merged."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        if f.name == "extra":
            continue
        v = getattr(obj, f.name)
        if v is None:
            continue
        out[f.name] = _plain(v)
    out.update(getattr(obj, "extra", {}) or {})
    return out


def _plain(v: Any) -> Any:
    if hasattr(v, "__dataclass_fields__"):
        return _to_dict(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def check_file_name(name: str, file: str | None = None, field_path: str = "files") -> str:
    """Refuse names that could escape the bundle directory: absolute, ``..``, backslashes, empty.

    Bundle file names are flat (no sub-directories) in format v1.
    """
    bad = (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name.startswith("~")
        or os.path.isabs(name)
        or ":" in name
        or len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES
    )
    if bad:
        raise UnsafeFileNameError(
            f"unsafe file name {name!r}: bundle files are plain names inside the bundle directory",
            file=file,
            field=field_path,
            fix=f"file names may not contain '/', '\\', '..' or ':' nor be absolute, and are at most "
            f"{MAX_FILE_NAME_BYTES} bytes",
        )
    return name


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
@dataclass
class FileEntry:
    """Size and sha256 of one file of the bundle (over its exact bytes on disk)."""

    sha256: str
    size: int
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> FileEntry:
        sha = r.str("sha256")
        if not _HEX64.match(sha):
            raise r.error("sha256", "expected 64 lowercase hex characters")
        return cls(sha256=sha, size=r.int("size", lo=0), extra=r.extra(_names(cls)))


@dataclass
class Foundation:
    """Pinned reference to the open_clip foundation model the projector adapts.

    ``weights_sha256`` is the canonical *fingerprint* of the weights (spec: "Foundation
    fingerprint"): sha256 over the sorted tensor names, dtypes, shapes and bytes, independent of the
    file format the weights came in.
    """

    architecture: str
    source: str  # pretrained | hf-hub | file | embedded
    weights_sha256: str
    image_size: int
    mean: list[float]
    std: list[float]
    library: str = "open_clip"
    pretrained: str | None = None  # open_clip pretrained tag, source == "pretrained"
    hf_hub_id: str | None = None  # "org/repo", source == "hf-hub"
    weights_file: str | None = None  # file name; inside the bundle when source == "embedded"
    model_config: dict | None = None  # full open_clip model config when not built into open_clip
    library_version: str | None = None
    interpolation: str = "bicubic"
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> Foundation:
        source = r.str("source", choices=FOUNDATION_SOURCES)
        sha = r.str("weights_sha256")
        if not _HEX64.match(sha):
            raise r.error("weights_sha256", "expected 64 hex characters", "rebuild the bundle")
        f = cls(
            library=r.str("library", choices=("open_clip",)),
            architecture=r.str("architecture"),
            source=source,
            weights_sha256=sha,
            image_size=r.int("image_size", lo=8, hi=MAX_IMAGE_SIDE),
            mean=r.float_list("mean", 3),
            std=r.float_list("std", 3),
            pretrained=r.str("pretrained", required=source == "pretrained"),
            hf_hub_id=r.str("hf_hub_id", required=source == "hf-hub"),
            weights_file=r.str("weights_file", required=source == "embedded"),
            model_config=r.dict("model_config", required=False),
            library_version=r.str("library_version", required=False),
            interpolation=r.str("interpolation", required=False, choices=("bicubic", "bilinear")) or "bicubic",
            extra=r.extra(_names(cls)),
        )
        if any(s <= 0 for s in f.std):
            raise r.error("std", "expected positive numbers")
        if source == "embedded":
            check_file_name(f.weights_file, r.file, r._p("weights_file"))
        return f


@dataclass
class Head:
    """The zero-shot head: text embeddings of ``templates`` x class names, recomputed at load."""

    templates: list[str]
    logit_scale: float
    source: str = "zeroshot"
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> Head:
        templates = r.str_list("templates", nonempty=True)
        for i, t in enumerate(templates):
            if "{}" not in t and "{c}" not in t:
                raise ManifestError(
                    "template has no '{}' placeholder for the class name",
                    file=r.file,
                    field=f"{r._p('templates')}[{i}]",
                )
        return cls(
            source=r.str("source", choices=("zeroshot",)),
            templates=templates,
            logit_scale=r.float("logit_scale", positive=True),
            extra=r.extra(_names(cls)),
        )


@dataclass
class LowRankTarget:
    """One adapted foundation parameter: ``dW = lora_B @ lora_A * alpha / rank``."""

    name: str
    rank: int
    alpha: float
    shape: list[int]  # shape of the foundation parameter the delta is added to
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> LowRankTarget:
        t = cls(
            name=r.str("name"),
            rank=r.int("rank", lo=1, hi=4096),
            alpha=r.float("alpha", positive=True),
            shape=r.int_list("shape", lo=1),
            extra=r.extra(_names(cls)),
        )
        if not t.shape:
            raise r.error("shape", "expected at least one dimension (the parameter's output size)")
        return t


@dataclass
class HeadDelta:
    rank: int
    alpha: float
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> HeadDelta:
        return cls(rank=r.int("rank", lo=1, hi=4096), alpha=r.float("alpha", positive=True), extra=r.extra(_names(cls)))


# Delta encodings (spec 5.1): the values of ``projector.dtype``. Each maps to the element dtype of
# the lora tensors in the projector file; a quantised encoding also stores one float32 scale per row
# of each tensor, as ``<tensor>.scale``. A reader MUST refuse an encoding it does not know.
DELTA_ENCODINGS = ("float32", "float16", "bfloat16", "int8")
QUANTIZED_ENCODINGS = ("int8",)
SCALE_SUFFIX = ".scale"
SCALE_DTYPE = "float32"
# The lowest format version whose readers know each encoding (spec 8): int8 is new in 2.0, so a
# bundle with float deltas stays readable by every 1.x reader and an int8 one is refused by them
# with FormatVersionError ("upgrade") rather than misread.
ENCODING_FORMAT_VERSION = {"float32": "1.0", "float16": "1.0", "bfloat16": "1.0", "int8": "2.0"}


@dataclass
class ProjectorInfo:
    """Where the low-rank deltas live, what they adapt, and how they are encoded.

    ``dtype`` is the delta encoding (:data:`DELTA_ENCODINGS`): ``float32``, ``float16`` and
    ``bfloat16`` store the tensors in that dtype; ``int8`` stores them as symmetric int8 with one
    float32 scale per row beside each (``<name>.lora_A.scale``), dequantised to float32 at load.
    """

    targets: list[LowRankTarget]
    file: str = PROJECTOR_FILE
    dtype: str = "float32"
    head: HeadDelta | None = None
    extra: dict = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        """True for an encoding stored with per-row scales (``int8``)."""
        return self.dtype in QUANTIZED_ENCODINGS

    @property
    def format_version(self) -> str:
        """The lowest ``format_version`` a bundle with these deltas may declare (spec 8)."""
        return ENCODING_FORMAT_VERSION[self.dtype]

    def tensor_layout(self, num_classes: int) -> dict[str, tuple[list[int | None], str]]:
        """Every tensor the projector file must hold: name -> (shape, element dtype name).

        Args:
            num_classes: the manifest's class count (the head delta's ``lora_B`` rows).

        Returns:
            ``<name>.lora_A`` ``[rank, in]`` and ``<name>.lora_B`` ``[out, rank]`` for each target,
            ``head.lora_A`` ``[rank, None]`` (None: the foundation's embedding width, which the
            manifest does not record) and ``head.lora_B`` ``[num_classes, rank]``, each in the
            encoding's dtype; for a quantised encoding also each one's ``.scale`` ``[rows]`` in
            float32. Dtype names are torch's without the prefix (``"int8"``, ``"float32"``).
        """
        element = "int8" if self.quantized else self.dtype
        mats: list[tuple[str, int, int | None, int]] = []
        for t in self.targets:
            mats.append((t.name, t.shape[0], math.prod(t.shape[1:]), t.rank))
        if self.head is not None:
            mats.append(("head", num_classes, None, self.head.rank))
        out: dict[str, tuple[list[int | None], str]] = {}
        for name, rows, cols, rank in mats:
            for key, shape in ((f"{name}.lora_A", [rank, cols]), (f"{name}.lora_B", [rows, rank])):
                out[key] = (shape, element)
                if self.quantized:
                    out[key + SCALE_SUFFIX] = ([shape[0]], SCALE_DTYPE)
        return out

    @classmethod
    def parse(cls, r: _Reader) -> ProjectorInfo:
        targets = []
        for i, t in enumerate(r.list("targets")):
            targets.append(LowRankTarget.parse(_Reader(t, f"{r._p('targets')}[{i}]", r.file)))
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise r.error("targets", "a parameter is listed twice")
        file = r.str("file")
        check_file_name(file, r.file, r._p("file"))
        head = r.sub("head", required=False)
        dtype = r.str("dtype")
        if dtype not in DELTA_ENCODINGS:
            raise r.error(
                "dtype",
                f"unknown delta encoding {dtype!r} (this hellofmt knows {', '.join(DELTA_ENCODINGS)})",
                "the bundle was written by a newer hellofmt: upgrade with pip install -U hellofmt",
            )
        return cls(
            file=file,
            dtype=dtype,
            targets=targets,
            head=HeadDelta.parse(head) if head else None,
            extra=r.extra(_names(cls)),
        )


@dataclass
class Shard:
    file: str
    count: int
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> Shard:
        file = r.str("file")
        check_file_name(file, r.file, r._p("file"))
        return cls(file=file, count=r.int("count", lo=0, hi=MAX_IMAGE_COUNT), extra=r.extra(_names(cls)))


@dataclass
class ImagesInfo:
    """The synthetic images: all ``height`` x ``width`` RGB, sharded, encoded with ``codec``."""

    count: int
    codec: str
    height: int
    width: int
    shards: list[Shard]
    per_class: list[int]
    quality: int | None = None  # jpeg / webp only
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> ImagesInfo:
        shards = [Shard.parse(_Reader(s, f"{r._p('shards')}[{i}]", r.file)) for i, s in enumerate(r.list("shards"))]
        info = cls(
            count=r.int("count", lo=0, hi=MAX_IMAGE_COUNT),
            codec=r.str("codec", choices=CODECS),
            quality=r.int("quality", required=False, lo=1, hi=100),
            height=r.int("height", lo=1, hi=MAX_IMAGE_SIDE),
            width=r.int("width", lo=1, hi=MAX_IMAGE_SIDE),
            shards=shards,
            per_class=r.int_list("per_class", lo=0),
            extra=r.extra(_names(cls)),
        )
        files = [s.file for s in shards]
        if len(set(files)) != len(files):
            raise r.error("shards", "a shard file is listed twice")
        if sum(s.count for s in shards) != info.count:
            raise r.error("shards", f"shard counts add up to {sum(s.count for s in shards)}, not count={info.count}")
        if sum(info.per_class) != info.count:
            raise r.error("per_class", f"per-class counts add up to {sum(info.per_class)}, not count={info.count}")
        return info


@dataclass
class LabelRecipe:
    """How labels are meant to be generated at training time (the builder's defaults)."""

    temperature: float = 1.0
    augmentation: str = "random-resized-crop+flip"
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    mix: str = "cutmix"
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> LabelRecipe:
        rec = cls(
            temperature=r.float("temperature", positive=True),
            augmentation=r.str("augmentation"),
            scale=r.float_list("scale", 2),
            ratio=r.float_list("ratio", 2),
            mix=r.str("mix", choices=MIX_MODES),
            extra=r.extra(_names(cls)),
        )
        if not (0 < rec.scale[0] <= rec.scale[1] <= 1):
            raise r.error("scale", "expected 0 < min <= max <= 1")
        if not (0 < rec.ratio[0] <= rec.ratio[1]):
            raise r.error("ratio", "expected 0 < min <= max")
        return rec


@dataclass
class Provenance:
    hellofmt_version: str
    created: str  # ISO 8601, UTC
    teachers: list[str] = field(default_factory=list)
    build_args: dict = field(default_factory=dict)
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> Provenance:
        return cls(
            hellofmt_version=r.str("hellofmt_version"),
            created=r.str("created"),
            teachers=r.str_list("teachers", required=False) or [],
            build_args=r.dict("build_args", required=False) or {},
            seed=r.int("seed", required=False),
            extra=r.extra(_names(cls)),
        )


@dataclass
class ProbeView:
    """One fixed view: image ``image``, crop ``box`` (x0, y0, x1, y1 as fractions), optional flip,
    resampled to ``size`` x ``size``; with the projector's top-k logits on it."""

    image: int
    box: list[float]
    flip: bool
    topk_indices: list[int]
    topk_logits: list[float]
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> ProbeView:
        v = cls(
            image=r.int("image", lo=0),
            box=r.float_list("box", 4),
            flip=r.bool("flip"),
            topk_indices=r.int_list("topk_indices", lo=0),
            topk_logits=r.float_list("topk_logits"),
            extra=r.extra(_names(cls)),
        )
        x0, y0, x1, y1 = v.box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise r.error("box", "expected 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        if len(v.topk_indices) != len(v.topk_logits) or not v.topk_indices:
            raise r.error("topk_logits", "expected as many logits as indices (at least one)")
        return v


@dataclass
class Probe:
    """The projector's outputs on a few fixed views, so a loader can prove it reproduces them."""

    size: int
    atol: float
    views: list[ProbeView]
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> Probe:
        return cls(
            size=r.int("size", lo=8, hi=MAX_IMAGE_SIDE),
            atol=r.float("atol", positive=True),
            views=[ProbeView.parse(_Reader(v, f"{r._p('views')}[{i}]", r.file)) for i, v in enumerate(r.list("views"))],
            extra=r.extra(_names(cls)),
        )


@dataclass
class Evaluation:
    """One student evaluation of the bundle, appended by ``hellofmt eval --record``.

    ``arms`` maps each arm (``bundle``, ``hard``, ``teacher``, ``random``) to its held-out top-1
    accuracies, one per seed, as fractions in [0, 1], in the order of ``seeds``.
    """

    protocol: str
    student: str
    arms: dict[str, list[float]]
    seeds: list[int]
    hellofmt_version: str
    date: str  # ISO 8601, UTC
    hyperparameters: dict = field(default_factory=dict)
    val_count: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> Evaluation:
        arms_r = r.sub("arms")
        arms = {}
        for name in arms_r.obj:
            accs = arms_r.float_list(name)
            if not accs or any(not 0.0 <= a <= 1.0 for a in accs):
                raise arms_r.error(name, "expected a non-empty list of accuracies in [0, 1]")
            arms[name] = accs
        ev = cls(
            protocol=r.str("protocol"),
            student=r.str("student"),
            arms=arms,
            seeds=r.int_list("seeds", lo=0),
            hellofmt_version=r.str("hellofmt_version"),
            date=r.str("date"),
            hyperparameters=r.dict("hyperparameters", required=False) or {},
            val_count=r.int("val_count", required=False, lo=0),
            extra=r.extra(_names(cls)),
        )
        for name, accs in ev.arms.items():
            if len(accs) != len(ev.seeds):
                raise arms_r.error(name, f"has {len(accs)} accuracies for {len(ev.seeds)} seeds")
        return ev


@dataclass
class Manifest:
    """The whole manifest. ``files`` maps every file of the bundle except the manifest itself (and
    an optional ``README.md`` dataset card) to its size and sha256."""

    classes: list[str]
    foundation: Foundation
    head: Head
    projector: ProjectorInfo
    images: ImagesInfo
    labels: LabelRecipe
    provenance: Provenance
    files: dict[str, FileEntry] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    probe: Probe | None = None
    evaluations: list[Evaluation] = field(default_factory=list)
    class_folders: list[str] | None = None  # the image-folder name of each class, when built from folders
    format: str = FORMAT_NAME
    format_version: str = FORMAT_VERSION
    # The digest read from the file (None: an older bundle without one). Never written back as it is:
    # to_json computes a fresh one over what it writes.
    manifest_sha256: str | None = field(default=None, compare=False)
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The manifest as JSON values, without its digest (:meth:`to_json` adds a fresh one)."""
        d = _to_dict(self)
        d.pop(DIGEST_FIELD, None)
        d["files"] = {k: _to_dict(v) for k, v in sorted(self.files.items())}
        if not self.evaluations:  # optional: a bundle nobody evaluated keeps the field absent
            d.pop("evaluations", None)
        return d

    def to_json(self) -> str:
        """The manifest as written to ``hellofmt.json``: pretty JSON ending with its ``manifest_sha256``,
        computed over exactly the text written (spec 2.1). A manifest that carries a digest declares
        at least ``MAJOR.1``, whose readers require one, so the written ``format_version`` is raised to
        that when it is lower; the in-memory object is left as it is."""
        d = self.to_dict()
        d["format_version"] = digest_format_version(d["format_version"])
        text = json.dumps(d, indent=2, ensure_ascii=False, allow_nan=False)
        d[DIGEST_FIELD] = manifest_digest(text)
        return json.dumps(d, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, file: str | None = None, *, check_digest: bool = True) -> Manifest:
        """Parse and validate ``hellofmt.json``'s text, checking its digest first (spec 2.1).

        Args:
            text: the file's bytes (or text).
            file: the path to name in errors.
            check_digest: check ``manifest_sha256`` (a mismatch raises ManifestDigestError; a manifest
                of version 1.0 or 2.0 without one gives a MissingDigestWarning). Turned off only to
                report on a manifest whose digest was already found wrong (``hellofmt info``,
                ``hellofmt verify``) or to re-seal one edited on purpose (``--fix-digest``).

        Raises:
            ManifestError: the text is not a valid manifest (ManifestDigestError: its digest).
        """
        if isinstance(text, bytes):
            if len(text) > MAX_MANIFEST_BYTES:
                raise ManifestError(
                    f"manifest is {len(text)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit", file=file
                )
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ManifestError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=file) from None
        obj = _load_json(text, file)
        if check_digest:
            _check_version(obj, file)  # a newer MAJOR may define its digest otherwise: "upgrade" first
            check_manifest_digest(obj, text, file)
        return cls.from_dict(obj, file=file)

    @classmethod
    def from_dict(cls, obj: Any, file: str | None = None) -> Manifest:
        """Validate parsed JSON values as a manifest. The digest is not checked here (it needs the
        text: :meth:`from_json`); its value is kept in ``manifest_sha256`` if well-formed."""
        _check_finite(obj, file)
        fmt, version = _check_version(obj, file)
        r = _Reader(obj, "", file)
        digest = obj.get(DIGEST_FIELD)
        classes = r.str_list("classes", nonempty=True)
        if len(classes) > MAX_CLASSES:
            raise r.error("classes", f"{len(classes)} classes is over the limit of {MAX_CLASSES}")
        if any(not c for c in classes):
            raise r.error("classes", f"class {classes.index('')} has an empty name", "every class needs a name")
        if len(set(classes)) != len(classes):
            dup = sorted({c for c in classes if classes.count(c) > 1})[:3]
            raise r.error("classes", f"class names must be unique; repeated: {dup}")
        files_r = r.sub("files")
        files = {}
        for name in files_r.obj:
            check_file_name(name, file, f"files.{name}")
            files[name] = FileEntry.parse(files_r.sub(name))
        probe = r.sub("probe", required=False)
        metrics_r = r.sub("metrics", required=False)
        metrics = {k: metrics_r.float(k) for k in metrics_r.obj} if metrics_r else {}
        man = cls(
            format=fmt,
            format_version=version,
            classes=classes,
            foundation=Foundation.parse(r.sub("foundation")),
            head=Head.parse(r.sub("head")),
            projector=ProjectorInfo.parse(r.sub("projector")),
            images=ImagesInfo.parse(r.sub("images")),
            labels=LabelRecipe.parse(r.sub("labels")),
            provenance=Provenance.parse(r.sub("provenance")),
            files=files,
            metrics=metrics,
            probe=Probe.parse(probe) if probe else None,
            class_folders=r.str_list("class_folders", required=False),
            evaluations=[
                Evaluation.parse(_Reader(e, f"evaluations[{i}]", file))
                for i, e in enumerate(r.list("evaluations", required=False) or [])
            ],
            manifest_sha256=digest if isinstance(digest, str) and _HEX64.match(digest) else None,
            extra=r.extra(_names(cls)),
        )
        man._check_cross_fields(file)
        return man

    def validate(self, file: str | None = None) -> Manifest:
        """Validate an in-memory manifest exactly as a reader would; returns it for chaining."""
        return Manifest.from_dict(json.loads(self.to_json()), file=file)

    def _check_cross_fields(self, file: str | None) -> None:
        if self.class_folders is not None and len(self.class_folders) != self.num_classes:
            raise ManifestError(
                f"has {len(self.class_folders)} entries for {self.num_classes} classes",
                file=file,
                field="class_folders",
                fix="give one folder name per class, in label order, or drop the field",
            )
        if len(self.images.per_class) != self.num_classes:
            raise ManifestError(
                f"has {len(self.images.per_class)} entries for {self.num_classes} classes",
                file=file,
                field="images.per_class",
            )
        need = self.projector.format_version
        if _version_key(self.format_version) < _version_key(need):
            raise ManifestError(
                f"{self.projector.dtype} deltas need format_version {need} or later, the manifest says "
                f"{self.format_version}",
                file=file, field="projector.dtype",
                fix="a reader of the declared version would not know the encoding: rewrite it with hellofmt compress",
            )
        listed = set(self.files)
        needed = [self.projector.file, *(s.file for s in self.images.shards)]
        if self.foundation.source == "embedded":
            needed.append(self.foundation.weights_file)
        for name in needed:
            if name not in listed:
                raise ManifestError(
                    f"{name!r} is used but has no entry in files", file=file, field="files", fix="rebuild the bundle"
                )
        if self.probe is not None:
            for i, v in enumerate(self.probe.views):
                if v.image >= self.images.count:
                    raise ManifestError(
                        f"image {v.image} is out of range for {self.images.count} images",
                        file=file,
                        field=f"probe.views[{i}].image",
                    )
                bad = [c for c in v.topk_indices if c >= self.num_classes]
                if bad:
                    raise ManifestError(
                        f"class index {bad[0]} is out of range for {self.num_classes} classes",
                        file=file,
                        field=f"probe.views[{i}].topk_indices",
                    )


class MissingDigestWarning(UserWarning):
    """A manifest of format 1.0 or 2.0 has no ``manifest_sha256`` (written before hellofmt 0.3):
    it opens, unchecked; ``hellofmt verify --fix-digest`` adds one."""


def _check_version(obj: Any, file: str | None) -> tuple[str, str]:
    """``format`` and ``format_version``, checked: a newer MAJOR raises FormatVersionError."""
    r = _Reader(obj, "", file)
    fmt = r.str("format")
    if fmt != FORMAT_NAME:
        raise r.error("format", f"expected {FORMAT_NAME!r}, got {fmt!r}", "this is not a hellofmt bundle")
    version = r.str("format_version")
    m = _VERSION.match(version)
    if not m:
        raise r.error("format_version", f"expected 'MAJOR.MINOR', got {version!r}")
    if int(m.group(1)) > FORMAT_MAJOR:
        raise FormatVersionError(
            f"format version {version} is newer than this hellofmt reads ({FORMAT_VERSION})",
            file=file,
            field="format_version",
            fix="upgrade hellofmt: pip install -U hellofmt",
        )
    if int(m.group(1)) < 1:
        raise r.error("format_version", f"unknown format version {version}")
    return fmt, version


def digest_format_version(version: str) -> str:
    """The version a manifest carrying a digest declares: ``version``, raised to ``MAJOR.1`` when
    lower (1.0 -> 1.1, 2.0 -> 2.1), the first MINOR whose readers require the digest (spec 8)."""
    major, minor = _version_key(version)
    return f"{major}.{max(minor, DIGEST_MINOR)}"


class _Number(str):
    """A JSON number kept as its exact text, for the canonical form (spec 2.1)."""


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _duplicate_error(key: str, file: str | None) -> ManifestError:
    if key == DIGEST_FIELD:
        return ManifestDigestError("the manifest holds two digests", file=file, field=DIGEST_FIELD,
                                   fix=_digest_fix(file))
    return ManifestError(f"the key {key!r} appears twice in one object", file=file, field=key,
                         fix="a manifest names each field once: get the bundle again")


def _load_json(text: str | bytes, file: str | None, *, exact_numbers: bool = False) -> Any:
    """Parse manifest text, refusing NaN/Infinity and a key repeated in an object. With
    ``exact_numbers`` every number is kept as its text (:class:`_Number`), for the digest."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=file) from None
    hooks = {"parse_int": _Number, "parse_float": _Number} if exact_numbers else {}
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys, **hooks)
    except _DuplicateKey as e:
        raise _duplicate_error(e.key, file) from None
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        # RecursionError: hostile nesting ("[[[[..."), which json.loads does not turn into a ValueError
        raise ManifestError(f"not valid JSON: {type(e).__name__}: {str(e)[:200]}", file=file,
                            fix="the manifest must be a JSON object") from None


def _canonical(v: Any, out: list[str]) -> None:
    if isinstance(v, dict):
        out.append("{")
        for i, k in enumerate(sorted(v)):  # code point order (= the UTF-8 bytes' order)
            out.append("," if i else "")
            out.append(json.dumps(k, ensure_ascii=False))
            out.append(":")
            _canonical(v[k], out)
        out.append("}")
    elif isinstance(v, list):
        out.append("[")
        for i, x in enumerate(v):
            out.append("," if i else "")
            _canonical(x, out)
        out.append("]")
    elif isinstance(v, _Number):
        out.append(str(v))
    elif isinstance(v, str):
        out.append(json.dumps(v, ensure_ascii=False))
    elif v is True or v is False or v is None:
        out.append({True: "true", False: "false", None: "null"}[v])
    else:  # parsed with exact_numbers, nothing else can occur
        raise TypeError(f"unexpected {type(v).__name__} in a parsed manifest")


def canonical_manifest(text: str | bytes, file: str | None = None) -> bytes:
    """The canonical form of a manifest's text (spec 2.1), over which ``manifest_sha256`` is computed:
    the top-level ``manifest_sha256`` member removed; objects with their members sorted by key in
    code point order; no whitespace; every number exactly as written in the file; strings with only
    ``"``, ``\\`` and U+0000..U+001F escaped (``\\b \\f \\n \\r \\t``, else ``\\u00xx``); UTF-8.

    Raises:
        ManifestError: the text is not JSON, repeats a key, or holds a lone surrogate.
    """
    obj = _load_json(text, file, exact_numbers=True)
    if isinstance(obj, dict):
        obj.pop(DIGEST_FIELD, None)
    out: list[str] = []
    try:
        _canonical(obj, out)
        return "".join(out).encode("utf-8")
    except RecursionError:
        raise ManifestError("nested too deeply", file=file, fix="the manifest is corrupt or hostile") from None
    except UnicodeEncodeError as e:
        raise ManifestError(f"a string holds a lone surrogate ({e.object[e.start:e.end]!r})", file=file,
                            fix="the manifest is corrupt: get the bundle again") from None


def manifest_digest(text: str | bytes, file: str | None = None) -> str:
    """``manifest_sha256`` of a manifest's text: the sha256 (lowercase hex) of :func:`canonical_manifest`."""
    return hashlib.sha256(canonical_manifest(text, file)).hexdigest()


def _digest_fix(file: str | None) -> str:
    where = os.path.dirname(file) if file else ""
    return (f"if you edited it on purpose, run `hellofmt verify --fix-digest {where or 'BUNDLE'}`; "
            "otherwise get the bundle again")


def check_manifest_digest(obj: Any, text: str | bytes, file: str | None = None) -> str | None:
    """Check ``manifest_sha256`` of a parsed manifest ``obj`` against its ``text`` (spec 2.1).

    Returns:
        The digest, or None for a manifest of version MAJOR.0 without one (a MissingDigestWarning is
        given: it opens unchecked).

    Raises:
        ManifestDigestError: the digest does not match (the manifest changed after it was written),
            is not 64 lowercase hex characters, or is missing from a manifest of version MAJOR.1 or later.
    """
    if not isinstance(obj, dict):
        return None  # from_dict refuses it, naming the root
    digest = obj.get(DIGEST_FIELD)
    version = obj.get("format_version")
    m = _VERSION.match(version) if isinstance(version, str) else None
    if digest is None:
        if m and int(m.group(2)) >= DIGEST_MINOR:
            raise ManifestDigestError(
                f"missing, but format_version {version} requires it: the manifest changed after it was written",
                file=file, field=DIGEST_FIELD, fix=_digest_fix(file))
        warnings.warn(f"{file or MANIFEST_NAME}: {DIGEST_FIELD}: the manifest has no digest (written before "
                      f"hellofmt 0.3), so a change to it cannot be detected; add one with "
                      f"`hellofmt verify --fix-digest {os.path.dirname(file) if file else 'BUNDLE'}`",
                      MissingDigestWarning, stacklevel=3)
        return None
    if not isinstance(digest, str) or not _HEX64.match(digest):
        shown = f"{len(digest)} characters" if isinstance(digest, str) else _kind(digest)
        raise ManifestDigestError(f"expected 64 lowercase hex characters, got {shown}: the manifest changed after "
                                  "it was written", file=file, field=DIGEST_FIELD, fix=_digest_fix(file))
    got = manifest_digest(text, file)
    if got != digest:
        raise ManifestDigestError(
            f"the manifest changed after it was written: its canonical form has sha256 {got[:16]}..., "
            f"the manifest says {digest[:16]}...", file=file, field=DIGEST_FIELD, fix=_digest_fix(file))
    return digest


def _version_key(version: str) -> tuple[int, int]:
    """``"MAJOR.MINOR"`` as a tuple of integers, for ordering versions (checked by the caller)."""
    major, _, minor = version.partition(".")
    return int(major), int(minor)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


def _check_finite(obj: Any, file: str | None) -> None:
    """Refuse a number that parsed as inf (``1e999``) anywhere, unknown fields included: no check
    expects one, and the manifest could not be written back as JSON. Iterative: nesting is deep
    only in a hostile manifest."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise ManifestError("expected a finite number, got one out of the 64-bit float range", file=file,
                                field=path or "<root>", fix="the manifest is corrupt or hostile: rebuild the bundle")
        if isinstance(v, dict):
            stack.extend((f"{path}.{k}" if path else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
