"""Image refinement: nudge the synthetic images so the projector agrees better with the teacher.

The student only ever sees these images, and on them the projector stands in for the teacher; so
what matters is the projector-teacher discrepancy *on augmented views of the synthetic images*. Adam
on the pixels minimises KL(teacher_T || projector_T) on random views plus ``prior`` x the mean
squared distance to the initial images in units of a 5% RMS change (so they stay natural-looking
RDED patches), clamped to [0, 1] after every step and quantised to uint8 at the end (what the
bundle stores).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .checkpoint import CheckpointStore
from .distill import kl_per_sample, make_views, step_generator

__all__ = ["refine_images", "discrepancy"]

_PRIOR_RMS = 0.05


@torch.no_grad()
def discrepancy(projector: nn.Module, teacher: nn.Module, images: torch.Tensor, *, view_size: int, views: int = 4,
                temperature: float = 1.0, seed: int = 1234, batch_size: int = 128,
                scale=(0.08, 1.0)) -> float:
    """Mean KL(teacher || projector) at ``temperature`` over ``views`` fixed random views per image
    (uint8 or float images); the same seed gives the same views, so before/after are comparable."""
    dev = images.device
    total, n = 0.0, 0
    for v in range(views):
        g = step_generator(seed, 0, v, dev)
        for s in range(0, images.shape[0], batch_size):
            x = images[s:s + batch_size]
            lab = torch.zeros(x.shape[0], dtype=torch.int64, device=dev)
            x, *_ = make_views(x, lab, size=view_size, generator=g, scale=scale, mix="none")
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                t = teacher(x).float()
            p = projector(x).float()
            total += kl_per_sample(p, t, temperature).sum().item()
            n += x.shape[0]
    return total / max(1, n)


def refine_images(
    projector: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    view_size: int,
    lr: float = 0.01,
    prior: float = 1.0,
    temperature: float = 1.0,
    batch_size: int = 64,
    scale=(0.08, 1.0),
    mix: str = "cutmix",
    seed: int = 0,
    store: CheckpointStore | None = None,
    resume: bool = False,
    checkpoint_every: int = 100,
    progress: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Refine uint8 ``images`` [N,3,S,S] (on the projector's device) for ``steps`` steps; returns the
    refined uint8 images and stats (discrepancy before and after, steps, step resumed from)."""
    from tqdm.auto import tqdm

    dev = images.device
    for p in projector.parameters():
        p.requires_grad_(False)
    ck = store.load("refine") if (store is not None and resume) else None
    saved = ck.params().get("images") if ck is not None else None
    if saved is not None and saved.shape != images.shape:
        saved = None
    if ck is not None and ck.done and ck.step == steps and saved is not None and saved.dtype == torch.uint8:
        # A finished refinement stored the final uint8 images and both figures: nothing to redo.
        before = float(ck.scalars.get("before", float("nan")))
        after = float(ck.scalars.get("after", float("nan")))
        return saved.to(dev), {"refine_kl_before": before, "refine_kl_after": after,
                               "refine_steps": float(steps), "refine_resumed_from": float(ck.step)}
    init = images.float() / 255
    before = discrepancy(projector, teacher, images, view_size=view_size, temperature=temperature, scale=scale)
    x = nn.Parameter(init.clone())
    opt = torch.optim.Adam([x], lr=lr)
    start = 0
    if saved is not None and not ck.done:
        with torch.no_grad():
            # unfinished checkpoints hold the float parameter in [0, 1]; scale uint8 just in case
            x.copy_(saved.to(dev, torch.float32) / (255 if saved.dtype == torch.uint8 else 1))
        st = ck.optimizer_state()
        if st is not None:
            opt.load_state_dict(st)
        start = ck.step
    bar = tqdm(total=steps, initial=start, desc="refine images", disable=not progress, dynamic_ncols=True)
    n = images.shape[0]
    shown = None
    for step in range(start, steps):
        g = step_generator(seed + 17, 0, step, dev)
        idx = torch.randperm(n, generator=g)[:batch_size].to(dev)
        v, *_ = make_views(x[idx], labels[idx], size=view_size, generator=g, scale=scale, mix=mix)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            t = teacher(v).float()
        p = projector(v).float()
        # The prior costs ``prior`` at an RMS pixel change of 5%, whatever the resolution.
        drift = (x[idx] - init[idx]).pow(2).mean() / _PRIOR_RMS**2
        loss = kl_per_sample(p, t, temperature).mean() + prior * drift
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        bar.update(1)
        now = time.perf_counter()
        if not bar.disable and (shown is None or now - shown >= 0.5 or step + 1 >= steps):
            shown = now  # the loss is read back (a host sync) only when the bar shows it
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if store is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            store.save("refine", step + 1, params={"images": x.detach()}, optimizer=opt)
    bar.close()
    out = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    after = discrepancy(projector, teacher, out, view_size=view_size, temperature=temperature, scale=scale)
    if store is not None:
        store.save("refine", steps, params={"images": out}, scalars={"before": before, "after": after}, done=True)
    return out, {"refine_kl_before": before, "refine_kl_after": after, "refine_steps": float(steps),
                 "refine_resumed_from": float(start)}
