"""Label payload and label fidelity of each delta encoding (float32, float16, bfloat16, int8).

Three measurements, all on random weights (no download), printed as Markdown tables:

1. **Payload bytes for ImageNet-1K** (1,000 classes) at the paper's setting, counted, not computed by
   hand: the open_clip model is built at random weights (``open_clip.create_model(arch,
   pretrained=None)``), the deltas are attached with :func:`hellofmt.lowrank.attach` on the real
   parameter shapes (RN50: every bottleneck conv at rank 8; ViT-B/32: attention and MLP of every
   block at rank 8) plus a rank-128 head delta ``[1000, embed_dim]``, encoded with
   :func:`hellofmt.lowrank.delta_tensors` and serialised with safetensors exactly as
   ``BundleWriter.write_tensors`` writes ``projector.safetensors``; the bytes are that file's length.
   Ratios are against the stored labels of SRe2L (5.67 GB), LPLD (0.14 GB) and LPQLD (0.03 GB),
   decimal GB. For ViT-B/32 the same count is made for smaller settings (rank, targets, head rank).
2. **Label fidelity on a quickstart-like tiny bundle**: ``tests/bundles.py``'s ``make_tiny_bundle``
   (tiny ViT foundation, random deltas), re-encoded with :func:`hellofmt.compress.compress_bundle`,
   which measures KL at the recipe's temperature, top-1 agreement and the largest logit difference
   against the float32 deltas on augmented views of the bundle's own images.
3. **Label fidelity on ViT-B/32 shapes with deltas of trained magnitude**: the real ViT-B/32 at random
   weights; ``lora_A`` drawn as :func:`~hellofmt.lowrank.attach` initialises it (kaiming-uniform),
   ``lora_B`` random and scaled so that every target's ``||dW||_F = rho * ||W||_F`` (and the head's
   ``||dH||_F = rho * ||H||_F``, ``H = 100 * Z`` with ``Z`` random unit rows: logit scale 100 as in
   OpenAI's CLIP). ``rho`` is swept (see ``--rho``); a heavy-tailed variant draws A and B from a
   Student-t with 3 degrees of freedom (same RMS) to stress per-row scales with outliers. Logits
   ``normalize(encode_image(x)) @ (H + dH).T`` in float32 on random-resized-crop views of
   procedurally generated 224 px images; each encoding's deltas are the float32 ones put through
   ``encode_delta_tensors`` / ``decode_delta_tensors``, the same functions a bundle uses.

Run from the repository root (CPU is enough; a few minutes)::

    python benchmarks/payload.py                      # everything
    python benchmarks/payload.py --skip-fidelity      # bytes only (seconds)
    python benchmarks/payload.py --views 256 --rho 0.03 0.1 0.3
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch.nn.utils import parametrize

from hellofmt import lowrank
from hellofmt.augment import random_resized_crop
from hellofmt.lowrank import DEFAULT_TARGETS
from hellofmt.manifest import DELTA_ENCODINGS
from hellofmt.projector import LabelChange

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 1000
STORED = {"SRe2L": 5.67e9, "LPLD": 0.14e9, "LPQLD": 0.03e9}  # ImageNet-1K IPC10 stored labels, bytes
RN50_CONVS = [r"visual\.layer[1-4]\.\d+\.conv[123]\.weight"]
VIT_ATTN = [r"visual\.transformer\.resblocks\.\d+\.attn\.in_proj_weight",
            r"visual\.transformer\.resblocks\.\d+\.attn\.out_proj\.weight"]
VIT_MLP = [r"visual\.transformer\.resblocks\.\d+\.mlp\.c_fc\.weight",
           r"visual\.transformer\.resblocks\.\d+\.mlp\.c_proj\.weight"]
# (label, architecture, target patterns, rank, head rank); the first two are the paper's setting.
SETTINGS = [
    ("RN50: bottleneck convs r8, head r128 (paper)", "RN50", RN50_CONVS, 8, 128),
    ("ViT-B/32: attn+MLP r8, head r128 (paper)", "ViT-B-32", VIT_ATTN + VIT_MLP, 8, 128),
    ("ViT-B/32: attn+MLP r4, head r128", "ViT-B-32", VIT_ATTN + VIT_MLP, 4, 128),
    ("ViT-B/32: attn+MLP r4, head r64", "ViT-B-32", VIT_ATTN + VIT_MLP, 4, 64),
    ("ViT-B/32: attn r8, head r128", "ViT-B-32", VIT_ATTN, 8, 128),
    ("ViT-B/32: MLP r8, head r128", "ViT-B-32", VIT_MLP, 8, 128),
    # hellofmt's default targets (hellofmt.lowrank.DEFAULT_TARGETS) at the ranks the defaults sweep compares
    # (benchmarks/README.md, "Under the pretrained foundations"): 16/16 (the default), 8/8, 8 + head 128.
    ("RN50: default targets r16, head r16 (hellofmt default)", "RN50", DEFAULT_TARGETS["resnet"], 16, 16),
    ("RN50: default targets r8, head r8", "RN50", DEFAULT_TARGETS["resnet"], 8, 8),
    ("RN50: default targets r8, head r128", "RN50", DEFAULT_TARGETS["resnet"], 8, 128),
    ("ViT-B/32: default targets r16, head r16 (hellofmt default)", "ViT-B-32", DEFAULT_TARGETS["vit"], 16, 16),
    ("ViT-B/32: default targets r8, head r8", "ViT-B-32", DEFAULT_TARGETS["vit"], 8, 8),
]
VIT_UNDER_1MB = ("ViT-B/32: attn r8, head r128", VIT_ATTN, 8, 128)


def create(arch: str) -> torch.nn.Module:
    """The open_clip model at random weights, in eval mode (no download)."""
    import open_clip  # heavy: only when a model is built

    return open_clip.create_model(arch, pretrained=None).eval()


def attach(model, patterns, rank: int, head_rank: int, *, seed: int = 0):
    """Deltas on ``patterns`` at ``rank`` (training form) and a head delta ``[CLASSES, embed_dim]``."""
    g = torch.Generator().manual_seed(seed)
    deltas = lowrank.attach(model, lowrank.make_targets(model, patterns, rank=rank), generator=g)
    embed_dim = int(model.text_projection.shape[1])
    head = lowrank.LowRankDelta((CLASSES, embed_dim), head_rank, generator=g)
    return deltas, head


def payload_bytes(deltas, head, encoding: str) -> int:
    """Bytes of ``projector.safetensors`` holding these deltas in ``encoding``, as the bundle writes it."""
    tensors = lowrank.delta_tensors({**deltas, "head": head}, encoding=encoding)
    return len(save(tensors, metadata={"format": "hellofmt-projector"}))


def measure_payload() -> list[dict]:
    rows, models = [], {}
    for label, arch, patterns, rank, head_rank in SETTINGS:
        if arch not in models:
            models[arch] = create(arch)
        model = models[arch]
        deltas, head = attach(model, patterns, rank, head_rank)
        params = sum(p.numel() for d in [*deltas.values(), head] for p in d.parameters())
        row = {"setting": label, "targets": len(deltas), "params": params}
        for enc in DELTA_ENCODINGS:
            row[enc] = payload_bytes(deltas, head, enc)
        rows.append(row)
        lowrank.remove(model, merge=False)
    return rows


def print_payload(rows: list[dict]) -> None:
    print("\n### Payload bytes, ImageNet-1K (1,000 classes)\n")
    print("| setting | targets | delta parameters | " + " | ".join(DELTA_ENCODINGS) + " |")
    print("|---|---:|---:|" + "---:|" * len(DELTA_ENCODINGS))
    for r in rows:
        cells = " | ".join(f"{r[e]:,} B ({r[e] / 1e6:.3f} MB)" for e in DELTA_ENCODINGS)
        print(f"| {r['setting']} | {r['targets']} | {r['params']:,} | {cells} |")
    print("\n### Ratio against stored labels (stored bytes / payload bytes)\n")
    print("| setting | encoding | " + " | ".join(f"{k} {v / 1e9:g} GB" for k, v in STORED.items()) + " |")
    print("|---|---|" + "---:|" * len(STORED))
    for r in rows[:2]:
        for e in DELTA_ENCODINGS:
            print(f"| {r['setting']} | {e} | " + " | ".join(f"{v / r[e]:,.0f}x" for v in STORED.values()) + " |")


# ---- fidelity: tiny bundle ------------------------------------------------------------------------
def fidelity_tiny(views_per_image: int) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    import open_clip

    from hellofmt.compress import compress_bundle

    from bundles import make_tiny_bundle  # the tests' bundle factory

    open_clip.add_model_config(ROOT / "tests" / "data")  # the tiny test architectures
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = make_tiny_bundle(Path(tmp) / "f32", num_classes=10, ipc=4, size=32, rank=4)
        for enc in DELTA_ENCODINGS[1:]:
            res = compress_bundle(src, enc, Path(tmp) / enc, device="cpu", views_per_image=views_per_image)
            rows.append({"encoding": enc, **res["label_change"], "bytes": res["projector_bytes"]["after"],
                         "f32_bytes": res["projector_bytes"]["before"]})
    return rows


# ---- fidelity: ViT-B/32 shapes, deltas of trained magnitude --------------------------------------
def _draw(shape, dist: str, g: torch.Generator) -> torch.Tensor:
    if dist == "gaussian":
        return torch.randn(shape, generator=g)
    # Student-t with 3 degrees of freedom (variance 3), scaled to unit variance: a few large values.
    z = torch.randn(shape, generator=g)
    chi2 = sum(torch.randn(shape, generator=g) ** 2 for _ in range(3))
    return z / torch.sqrt(chi2 / 3) / math.sqrt(3)


def set_trained_magnitude(model, deltas, head, head_weight, rho: float, dist: str, seed: int = 1) -> None:
    """Scale each ``lora_B`` so that ``||B @ A * alpha / r||_F = rho * ||W||_F`` (the head: ``rho * ||H||_F``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, d in [*deltas.items(), ("head", head)]:
            if dist != "gaussian":  # A too: same RMS as its kaiming-uniform init, heavy tails
                d.lora_A.copy_(_draw(d.lora_A.shape, dist, g) * d.lora_A.pow(2).mean().sqrt())
            d.lora_B.copy_(_draw(d.lora_B.shape, dist, g))
            w = head_weight if name == "head" else lowrank._lookup(model, name)[2]
            d.lora_B.mul_(rho * w.norm() / d.delta().norm())


def vit_views(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` random-resized-crop views (float, [0, 1]) of procedurally generated images."""
    sys.path.insert(0, str(ROOT / "tests"))
    from bundles import make_images  # the tests' procedural images: coloured stripes + noise

    images, _ = make_images(max(1, n // 4), 4, size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n) % images.shape[0]
    views, _, _ = random_resized_crop(images[idx], size, generator=g)
    return views


def fidelity_vit(model, patterns, rank, head_rank, rhos, dists, views: torch.Tensor, temperature: float,
                 batch: int) -> list[dict]:
    deltas, head = attach(model, patterns, rank, head_rank)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"] if hasattr(model.visual, "preprocess_cfg")
                        else (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"] if hasattr(model.visual, "preprocess_cfg")
                       else (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(2)
    z = F.normalize(torch.randn(CLASSES, head.shape[1], generator=g), dim=-1)
    head_weight = 100.0 * z
    all_deltas = {**deltas, "head": head}

    @torch.no_grad()
    def logits() -> torch.Tensor:
        out = []
        with parametrize.cached():
            dh = head.delta()
            for s in range(0, views.shape[0], batch):
                f = model.encode_image((views[s:s + batch] - mean) / std)
                out.append(F.normalize(f.float(), dim=-1) @ (head_weight + dh).t())
        return torch.cat(out)

    rows = []
    for dist in dists:
        for rho in rhos:
            set_trained_magnitude(model, deltas, head, head_weight, rho, dist)
            float32 = lowrank.delta_tensors(all_deltas)
            ref = logits()
            for enc in DELTA_ENCODINGS[1:]:
                back = lowrank.decode_delta_tensors(lowrank.encode_delta_tensors(float32, enc), enc)
                with torch.no_grad():
                    for name, d in all_deltas.items():
                        d.lora_A.copy_(back[f"{name}.lora_A"])
                        d.lora_B.copy_(back[f"{name}.lora_B"])
                ch = LabelChange(temperature)
                ch.update(ref, logits())
                rows.append({"dist": dist, "rho": rho, "encoding": enc, **ch.result()})
                print(f"  {dist} rho={rho} {enc}: {rows[-1]}", flush=True)
            with torch.no_grad():  # back to float32 for the next encoding's reference
                for name, d in all_deltas.items():
                    d.lora_A.copy_(float32[f"{name}.lora_A"])
                    d.lora_B.copy_(float32[f"{name}.lora_B"])
    lowrank.remove(model, merge=False)
    return rows


def print_fidelity(title: str, rows: list[dict], keys=("encoding",)) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(keys) + " | KL | top-1 agreement | largest logit difference | views |")
    print("|" + "---|" * len(keys) + "---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) +
              f" | {r['kl']:.2e} | {r['top1_agreement']:.4f} | {r['max_logit_diff']:.2e} | {int(r['views'])} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-fidelity", action="store_true", help="Count bytes only.")
    ap.add_argument("--views", type=int, default=128, help="ViT-B/32 views per setting.")
    ap.add_argument("--tiny-views", type=int, default=8, help="Views per image of the tiny bundle.")
    ap.add_argument("--rho", type=float, nargs="+", default=[0.03, 0.1, 0.3],
                    help="||dW|| / ||W|| of the ViT-B/32 deltas.")
    ap.add_argument("--temperature", type=float, default=1.0, help="Label temperature of the KL (the recipe's).")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # open_clip's random init
    t0 = time.perf_counter()
    print_payload(measure_payload())
    if args.skip_fidelity:
        return
    print_fidelity("Label change against float32: tiny bundle (make_tiny_bundle, 10 classes x 4 images, rank 4)",
                   fidelity_tiny(args.tiny_views))
    model = create("ViT-B-32")
    views = vit_views(args.views, 224)
    rows = fidelity_vit(model, VIT_ATTN + VIT_MLP, 8, 128, args.rho, ["gaussian"], views, args.temperature,
                        args.batch)
    rows += fidelity_vit(model, VIT_ATTN + VIT_MLP, 8, 128, [0.1], ["student-t3"], views, args.temperature,
                         args.batch)
    print_fidelity("Label change against float32: ViT-B/32 shapes, attn+MLP r8, head r128 (paper), random "
                   "weights, deltas of trained magnitude", rows, keys=("dist", "rho", "encoding"))
    label, patterns, rank, head_rank = VIT_UNDER_1MB
    rows = fidelity_vit(model, patterns, rank, head_rank, [0.1, 0.3], ["gaussian"], views, args.temperature,
                        args.batch)
    print_fidelity(f"Label change against float32: {label} (under 1 MB in int8)", rows,
                   keys=("dist", "rho", "encoding"))
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
