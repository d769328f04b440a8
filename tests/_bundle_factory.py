"""Build small, valid bundles for tests without open_clip: random images, a hand-made manifest and a
fake projector file (small random low-rank tensors). Fast enough to call in every test.

    from tests._bundle_factory import make_format_bundle
    path = make_format_bundle(tmp_path / "b", num_classes=3, per_class=2, codec="png")
"""

from __future__ import annotations

import math
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
