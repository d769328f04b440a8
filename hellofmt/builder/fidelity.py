"""Fidelity: how closely the finished projector reproduces the teacher, on views it never trained on.

Two sets of views, both made with the loader's augmentation family and a fixed seed: augmented views
of the synthetic images (what a student will be labelled on) and of held-out original images (never
seen in distillation). For each: top-1 agreement, KL(teacher || projector) at the label temperature,
and accuracy against the hard labels of projector and teacher.
"""

from __future__ import annotations

import torch
from torch import nn

from .distill import kl_per_sample, make_views, step_generator

__all__ = ["measure"]


@torch.no_grad()
def measure(projector: nn.Module, teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
            view_size: int, views: int = 4, temperature: float = 1.0, seed: int = 4321, batch_size: int = 128,
            scale=(0.08, 1.0), mix: str = "cutmix") -> dict[str, float]:
    """Agreement, KL and accuracies on ``views`` augmented views of each uint8 image; an empty set
    gives an empty dict."""
    if images.shape[0] == 0:
        return {}
    dev = images.device
    agree = kl = p_acc = t_acc = 0.0
    n = 0
    for v in range(views):
        g = step_generator(seed, 0, v, dev)
        for s in range(0, images.shape[0], batch_size):
            x, y = images[s:s + batch_size], labels[s:s + batch_size]
            x, y, _, _ = make_views(x, y, size=view_size, generator=g, scale=scale, mix=mix)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                t = teacher(x).float()
            p = projector(x).float()
            T = temperature
            kl += kl_per_sample(p, t, T).sum().item()
            agree += (p.argmax(1) == t.argmax(1)).sum().item()
            p_acc += (p.argmax(1) == y).sum().item()
            t_acc += (t.argmax(1) == y).sum().item()
            n += x.shape[0]
    return {"top1_agreement": agree / n, "kl": kl / n, "projector_top1": p_acc / n, "teacher_top1": t_acc / n}
