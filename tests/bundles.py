"""A factory for REAL test bundles: a tiny open_clip foundation, random deltas, generated images.

``make_tiny_bundle(path)`` builds a complete, valid bundle the same way the builder does (only the
training is skipped): the foundation is a randomly initialised tiny open_clip model embedded in the
bundle, the projector carries low-rank deltas filled with small random values (so merging them
changes the labels), the images are procedurally generated, the probe is recorded by
:func:`hellofmt.probe.compute_probe` on the merged projector, and everything is written through
:class:`hellofmt.bundle.BundleWriter`. It takes well under a second for the default size.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import torch

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
) -> Path:
    """Build a complete bundle at ``path`` and return its path.

    ``random_deltas=False`` leaves ``lora_B`` at zero (the projector is then exactly zero-shot
    CLIP). ``delta_std`` is the standard deviation of the random ``lora_B`` entries.
    """
    import hellofmt
    from hellofmt.bundle import BundleWriter
    from hellofmt.foundation import foundation_metadata, foundation_tensors, load_foundation
    from hellofmt.manifest import Head, LabelRecipe, Manifest, Provenance
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
        images_info = w.write_images(images, labels, num_classes=num_classes, codec=codec)
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
