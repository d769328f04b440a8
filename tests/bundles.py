"""The test bundle factory: every test, fixture and benchmark that needs a bundle makes it here.

Two kinds, both written through :class:`hellofmt.bundle.BundleWriter`, the writer the builder uses:

- :func:`make_format_bundle` writes a small valid bundle WITHOUT open_clip: smooth random images, a
  hand-made manifest (a made-up foundation) and a projector file of random low-rank tensors. Fast
  enough to call in every test of the format layer (manifest, image store, bundle, Hub, attacks).
- :func:`make_tiny_bundle` builds a REAL bundle the same way the builder does (only the training is
  skipped): a randomly initialised tiny open_clip foundation embedded in the bundle, low-rank deltas
  filled with small random values (so merging them changes the labels), procedurally generated
  images, and the probe recorded by :func:`hellofmt.probe.compute_probe` on the merged projector.
  Well under a second for the default size; conftest's ``tiny_bundle`` fixture builds one per session.

Import it as ``from bundles import ...``: pytest (and conftest) put ``tests/`` on ``sys.path``, and
the benchmarks add it themselves.

    from bundles import make_format_bundle, make_tiny_bundle
    path = make_format_bundle(tmp_path / "b", num_classes=3, per_class=2, codec="png")
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import torch

from hellofmt.bundle import BundleWriter
from hellofmt.manifest import (
    Foundation,
    Head,
    HeadDelta,
    LabelRecipe,
    LowRankTarget,
    Manifest,
    ProjectorInfo,
    Provenance,
)

# ---- format bundles (no open_clip) ---------------------------------------------------------------
# (parameter name, parameter shape) of a made-up tiny ViT: a fused attention projection, a conv
# kernel (flattened to out x in*k*k) and a bare matrix, as the format allows.
DEFAULT_TARGETS = [
    ("visual.transformer.resblocks.0.attn.in_proj_weight", [24, 8]),
    ("visual.conv1.weight", [8, 3, 4, 4]),
    ("visual.proj", [8, 6]),
]


def smooth_images(n: int, height: int, width: int, *, seed: int = 0) -> torch.Tensor:
    """Natural-looking uint8 images [n, 3, H, W]: random colour gradients plus mild noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(1, 1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, 1, width)
    a, b, c = (torch.rand(n, 3, 1, 1, generator=g) for _ in range(3))
    img = 255 * (0.2 + 0.6 * (a * x + b * y + c * x * y) / 3 * 2 + 0.1 * torch.sin(6.28 * (a * x + b * y)))
    img = img + 8 * torch.randn(n, 3, height, width, generator=g)
    return img.clamp(0, 255).round().to(torch.uint8)


def projector_tensors(targets, *, rank: int, head_rank: int | None, num_classes: int, embed_dim: int,
                      seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random ``lora_A``/``lora_B`` tensors for ``targets`` (and the head when ``head_rank``)."""
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for name, shape in targets:
        rows, cols = shape[0], math.prod(shape[1:])
        out[f"{name}.lora_A"] = torch.randn(rank, cols, generator=g).to(dtype)
        out[f"{name}.lora_B"] = torch.randn(rows, rank, generator=g).to(dtype)
    if head_rank:
        out["head.lora_A"] = torch.randn(head_rank, embed_dim, generator=g).to(dtype)
        out["head.lora_B"] = torch.randn(num_classes, head_rank, generator=g).to(dtype)
    return out


def make_manifest(classes: list[str], *, targets=DEFAULT_TARGETS, rank: int = 2, head_rank: int | None = 2,
                  image_size: int = 32, seed: int = 0) -> Manifest:
    """A complete manifest except ``images`` and ``files`` (filled by the writer)."""
    return Manifest(
        classes=list(classes),
        foundation=Foundation(
            architecture="hf-test-tiny-vit", source="pretrained", pretrained="fake",
            weights_sha256="ab" * 32, image_size=image_size,
            mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711],
        ),
        head=Head(templates=["a photo of a {}."], logit_scale=100.0),
        projector=ProjectorInfo(
            targets=[LowRankTarget(name=n, rank=rank, alpha=float(rank), shape=list(s)) for n, s in targets],
            head=HeadDelta(rank=head_rank, alpha=float(head_rank)) if head_rank else None,
        ),
        images=None,  # type: ignore[arg-type]
        labels=LabelRecipe(),
        provenance=Provenance(hellofmt_version="0.1.0", created="2026-01-01T00:00:00Z", seed=seed),
    )


def make_format_bundle(
    path,
    *,
    num_classes: int = 3,
    per_class: int = 2,
    classes: list[str] | None = None,
    height: int = 16,
    width: int | None = None,
    codec: str = "png",
    quality: int | None = None,
    max_shard_bytes: int | None = None,
    targets=DEFAULT_TARGETS,
    rank: int = 2,
    head_rank: int | None = 2,
    embed_dim: int = 6,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a small valid bundle at ``path`` with BundleWriter and return its path.

    Images are smooth random gradients (``per_class`` per class, ``height`` x ``width``) unless
    ``images``/``labels`` are given; the projector file holds random lora tensors of the shapes the
    manifest's ``targets`` imply. ``extra_files`` are written and listed (e.g. a fake foundation).
    """
    classes = list(classes) if classes is not None else [f"class {i}" for i in range(num_classes)]
    width = height if width is None else width
    if images is None:
        labels = torch.arange(len(classes)).repeat_interleave(per_class)
        images = smooth_images(len(labels), height, width, seed=seed)
    man = make_manifest(classes, targets=targets, rank=rank, head_rank=head_rank, seed=seed)
    with BundleWriter(path, overwrite=overwrite) as w:
        man.images = w.write_images(images, labels, num_classes=len(classes), codec=codec, quality=quality,
                                    max_shard_bytes=max_shard_bytes)
        w.write_tensors(
            "projector.safetensors",
            projector_tensors(targets, rank=rank, head_rank=head_rank, num_classes=len(classes),
                              embed_dim=embed_dim, seed=seed),
            {"format": "hellofmt-projector"},
        )
        for name, data in (extra_files or {}).items():
            w.write_bytes(name, data)
        return w.commit(man)


# ---- real bundles (tiny open_clip foundation) ----------------------------------------------------
DEFAULT_ARCH = "hf-test-tiny-vit"
CLASS_NAMES = ["cat", "dog", "car", "tree", "boat", "bird", "house", "flower", "fish", "plane"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def class_names(num_classes: int) -> list[str]:
    """Readable, unique class names (the text tower builds the head from them)."""
    return [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"thing {i}" for i in range(num_classes)]


def make_images(num_classes: int, ipc: int, size: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[num_classes * ipc, 3, size, size]`` images and int64 labels, class-major order.

    Each class has its own colour and stripe orientation; each image its own phase and noise, so
    crops, flips and the probe's views all differ.
    """
    g = torch.Generator().manual_seed(seed)
    n = num_classes * ipc
    labels = torch.arange(num_classes).repeat_interleave(ipc)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = torch.empty(n, 3, size, size)
    for i in range(n):
        c = int(labels[i])
        angle = math.pi * c / max(num_classes, 1)
        phase = float(torch.rand((), generator=g)) * 2 * math.pi
        stripes = torch.sin(2 * math.pi * 3 * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
        colour = torch.tensor([(c * 0.37) % 1, (c * 0.61 + 0.2) % 1, (c * 0.13 + 0.5) % 1])
        img = colour.view(3, 1, 1) * (0.6 + 0.3 * stripes) + 0.3 * xx  # left-right asymmetry: flips matter
        img = img + 0.05 * torch.randn(3, size, size, generator=g)
        images[i] = img.clamp(0, 1)
    return (images * 255).round().to(torch.uint8), labels


def make_tiny_bundle(
    path: str | Path,
    *,
    arch: str = DEFAULT_ARCH,
    num_classes: int = 3,
    ipc: int = 2,
    size: int = 32,
    codec: str = "png",
    seed: int = 0,
    random_deltas: bool = True,
    rank: int = 2,
    delta_std: float = 0.05,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> Path:
    """Build a complete bundle at ``path`` and return its path.

    ``random_deltas=False`` leaves ``lora_B`` at zero (the projector is then exactly zero-shot
    CLIP). ``delta_std`` is the standard deviation of the random ``lora_B`` entries.
    ``max_shard_bytes`` cuts the images into several shards (default: one).
    """
    # The model layer imports open_clip: kept out of the format-only tests' start-up.
    import hellofmt
    from hellofmt.foundation import foundation_metadata, foundation_tensors, load_foundation
    from hellofmt.probe import compute_probe
    from hellofmt.projector import Projector

    torch.manual_seed(seed)  # open_clip's random init draws from the global generator
    foundation = load_foundation(arch, embed=True)
    # The text tower may be dropped once the head is built; embed the whole model before that.
    weights = {k: v.detach().clone().contiguous() for k, v in foundation_tensors(foundation.model).items()}
    classes = class_names(num_classes)
    projector = Projector(foundation, classes, TEMPLATES)
    g = torch.Generator().manual_seed(seed + 1)
    projector.attach_deltas(rank=rank, head_rank=rank, generator=g)
    if random_deltas:
        with torch.no_grad():
            for name, p in projector.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * delta_std)
    tensors = {k: v.detach().clone().contiguous() for k, v in projector.delta_tensors().items()}
    info = projector.projector_info()
    projector.merge()
    projector.eval()

    images, labels = make_images(num_classes, ipc, size, seed=seed)
    probe = compute_probe(projector, images)
    reference = foundation.reference
    with BundleWriter(path, overwrite=overwrite) as w:
        images_info = w.write_images(images, labels, num_classes=num_classes, codec=codec,
                                       max_shard_bytes=max_shard_bytes)
        w.write_tensors(info.file, tensors, {"format": "hellofmt-projector"})
        w.write_tensors(
            reference.weights_file or "foundation.safetensors",
            weights,
            foundation_metadata(reference),
        )
        manifest = Manifest(
            classes=classes,
            foundation=reference,
            head=Head(templates=list(TEMPLATES), logit_scale=float(projector_logit_scale(projector))),
            projector=info,
            images=images_info,
            labels=LabelRecipe(temperature=1.0, mix="cutmix"),
            provenance=Provenance(
                hellofmt_version=hellofmt.__version__,
                created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                teachers=["none (tests/bundles.py: random deltas)"],
                build_args={"factory": "tests.bundles.make_tiny_bundle", "arch": arch, "seed": seed},
                seed=seed,
            ),
            probe=probe,
        )
        return Path(w.commit(manifest))


def projector_logit_scale(projector) -> float:
    """The logit scale the projector's head uses (attribute name per hellofmt.projector)."""
    for attr in ("logit_scale_value", "logit_scale"):
        v = getattr(projector, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return float(v)
    return float(projector.clip.logit_scale.exp())


# ---- edited manifests ----------------------------------------------------------------------------
def reseal(text: str) -> str:
    """Give edited manifest text a matching ``manifest_sha256``, as an attacker (or a user who then runs
    ``hellofmt verify --fix-digest``) can: the digest proves integrity, not authorship. So a test that
    edits a manifest on purpose reaches the check it targets instead of the digest check."""
    import re

    from hellofmt.manifest import DIGEST_FIELD, manifest_digest

    digest = manifest_digest(text)
    new, n = re.subn(rf'"{DIGEST_FIELD}":\s*"[0-9a-f]*"', f'"{DIGEST_FIELD}": "{digest}"', text)
    if n == 0:  # no digest yet: add one as the last member of the top-level object
        body = text.rstrip()
        new = f'{body[:-1].rstrip()}, "{DIGEST_FIELD}": "{digest}"}}\n'
    return new


def write_manifest(bundle: Path, manifest: dict | str) -> None:
    """Write ``bundle/hellofmt.json`` from edited JSON values or text, resealed (:func:`reseal`)."""
    import json

    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (Path(bundle) / "hellofmt.json").write_text(reseal(text))
