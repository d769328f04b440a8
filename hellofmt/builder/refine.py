"""Image refinement: nudge the synthetic images so the projector agrees better with the teacher.

The student only ever sees these images, and on them the projector stands in for the teacher; so
what matters is the projector-teacher discrepancy *on augmented views of the synthetic images*. Adam
on the pixels minimises KL(teacher_T || projector_T) on random views plus ``prior`` x the mean
squared distance to the initial images in units of a 5% RMS change (so they stay natural-looking
RDED patches), clamped to [0, 1] after every step and quantised to uint8 at the end (what the
bundle stores).

The set is refined in chunks (blocks of ``chunk`` consecutive images), each for ``steps`` steps with
its own Adam state, so device memory is bounded by the chunk (its float images, their start and
Adam's two moments), not by the set: at ImageNet-1K scale the whole set in float32 with its optimiser
state is tens of GB. Under torchrun chunk ``i`` is refined on rank ``i % world_size`` and the results
are gathered. A chunk's randomness is seeded from ``(seed, chunk, step)``, so the result depends
neither on the world size nor on interruptions: a finished chunk is checkpointed as uint8 images
(stage ``refine.chunk<i>``), the chunk in progress every ``checkpoint_every`` steps with its float
state, and ``resume`` continues inside it.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .checkpoint import CheckpointStore
from .dist import World, all_gather_blocks
from .distill import kl_per_sample, make_views, step_generator

__all__ = ["refine_images", "discrepancy"]

_PRIOR_RMS = 0.05
_VIEW_SEED = 1234  # the fixed views on which the discrepancy before and after is measured


def _kl_sum(projector: nn.Module, teacher: nn.Module, images: torch.Tensor, *, view_size: int, views: int,
            temperature: float, seed: int, stream: int, batch_size: int, scale) -> tuple[float, int]:
    """Summed KL(teacher || projector) over ``views`` random views of each image, and the view count.
    The views of view ``v`` come from the generator ``(seed, stream, v)``."""
    dev = images.device
    total, n = 0.0, 0
    for v in range(views):
        g = step_generator(seed, stream, v, dev)
        for s in range(0, images.shape[0], batch_size):
            x = images[s:s + batch_size]
            lab = torch.zeros(x.shape[0], dtype=torch.int64, device=dev)
            x, *_ = make_views(x, lab, size=view_size, generator=g, scale=scale, mix="none")
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                t = teacher(x).float()
            p = projector(x).float()
            total += kl_per_sample(p, t, temperature).sum().item()
            n += x.shape[0]
    return total, n


@torch.no_grad()
def discrepancy(projector: nn.Module, teacher: nn.Module, images: torch.Tensor, *, view_size: int, views: int = 4,
                temperature: float = 1.0, seed: int = _VIEW_SEED, batch_size: int = 128,
                scale=(0.08, 1.0)) -> float:
    """Mean KL(teacher || projector) at ``temperature`` over ``views`` fixed random views per image
    (uint8 or float images); the same seed gives the same views, so before/after are comparable."""
    total, n = _kl_sum(projector, teacher, images, view_size=view_size, views=views, temperature=temperature,
                       seed=seed, stream=0, batch_size=batch_size, scale=scale)
    return total / max(1, n)


def _device(module: nn.Module, fallback: torch.device) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else fallback


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
    chunk: int = 256,
    store: CheckpointStore | None = None,
    resume: bool = False,
    checkpoint_every: int = 100,
    world: World | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Refine uint8 ``images`` [N,3,S,S] chunk by chunk (see the module docstring).

    Args:
        projector: the projector (frozen here); chunks are refined on its device.
        teacher: the teacher (ensemble), on the same device.
        images: uint8 [N,3,S,S] on any device (the CPU keeps the device's share to one chunk).
        labels: int64 [N].
        steps: optimiser steps per chunk.
        view_size: side of the views shown to teacher and projector.
        lr, prior, temperature, batch_size, scale, mix: the step's Adam learning rate, weight of the
            stay-near-init term, KL temperature, views per step (at most the chunk), crop area range and
            mixing.
        seed: the build's seed.
        chunk: images per chunk.
        store: where chunks are checkpointed (this rank writes the chunks it refines); None: nowhere.
        resume: continue from the checkpoints in ``store``.
        checkpoint_every: save the chunk in progress every this many steps (0: only finished chunks).
        world: the process group under torchrun (None: one process).
        progress: show a progress bar (rank 0).

    Returns:
        The refined uint8 images (on ``images``' device; the same on every rank) and stats: the mean
        discrepancy before and after (:func:`discrepancy`'s views, per chunk), steps per chunk, steps
        already done when this run started (summed over chunks) and the chunk count.
    """
    from tqdm.auto import tqdm

    world = world or World()
    dev = _device(projector, images.device)
    for p in projector.parameters():
        p.requires_grad_(False)
    n = images.shape[0]
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, max(1, chunk))]
    mine = list(range(world.rank, len(bounds), world.size))
    bar = tqdm(total=steps * len(mine), desc="refine images", disable=not (progress and world.is_main),
               dynamic_ncols=True)
    kw = dict(steps=steps, view_size=view_size, lr=lr, prior=prior, temperature=temperature, batch_size=batch_size,
              scale=scale, mix=mix, seed=seed, store=store, resume=resume, checkpoint_every=checkpoint_every)
    outs: dict[int, torch.Tensor] = {}
    stats: dict[int, torch.Tensor] = {}
    for i in mine:
        s, e = bounds[i]
        outs[i], stats[i] = _refine_chunk(projector, teacher, images[s:e].to(dev), labels[s:e].to(dev), index=i,
                                          start=s, bar=bar, **kw)
        outs[i] = outs[i].cpu()
    bar.close()
    shapes = [(e - s, *images.shape[1:]) for s, e in bounds]
    out = torch.cat(all_gather_blocks(world, outs, shapes, torch.uint8)).to(images.device) if bounds else images
    st = all_gather_blocks(world, stats, [(5,)] * len(bounds), torch.float64)
    views = sum(float(t[4]) for t in st)
    return out, {"refine_kl_before": sum(float(t[0]) for t in st) / max(1, views),
                 "refine_kl_after": sum(float(t[1]) for t in st) / max(1, views),
                 "refine_steps": float(steps), "refine_resumed_from": sum(float(t[2]) for t in st),
                 "refine_chunks": float(len(bounds))}


def _refine_chunk(projector, teacher, images, labels, *, index: int, start: int, steps: int, view_size: int,
                  lr: float, prior: float, temperature: float, batch_size: int, scale, mix: str, seed: int,
                  store: CheckpointStore | None, resume: bool, checkpoint_every: int,
                  bar) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine one chunk (uint8 ``images`` on the device) from its checkpoint, if any. Returns the uint8
    images and float64 [KL sum before, KL sum after, step resumed from, images, views measured]."""
    dev = images.device
    n = images.shape[0]
    stage = f"refine.chunk{index}"
    where = {"start": start, "count": n}
    ck = store.load(stage) if (store is not None and resume) else None
    saved = ck.params().get("images") if ck is not None else None
    if saved is None or saved.shape != images.shape or any(ck.scalars.get(k) != v for k, v in where.items()):
        ck = saved = None  # not this chunk (another --refine-chunk): start it over
    if ck is not None and ck.done and ck.step == steps and saved.dtype == torch.uint8:
        # A finished chunk stored its final uint8 images and both figures: nothing to redo.
        bar.update(steps)
        return saved.to(dev), torch.tensor([float(ck.scalars.get("before", float("nan"))),
                                            float(ck.scalars.get("after", float("nan"))), float(steps), float(n),
                                            float(ck.scalars.get("views", 0))], dtype=torch.float64)
    measure = dict(view_size=view_size, views=4, temperature=temperature, seed=_VIEW_SEED, stream=index,
                   batch_size=128, scale=scale)
    with torch.no_grad():
        before, views = _kl_sum(projector, teacher, images, **measure)
    init = images.float() / 255
    x = nn.Parameter(init.clone())
    opt = torch.optim.Adam([x], lr=lr)
    first = 0
    if ck is not None and not ck.done:
        with torch.no_grad():
            # unfinished checkpoints hold the float parameter in [0, 1]; scale uint8 just in case
            x.copy_(saved.to(dev, torch.float32) / (255 if saved.dtype == torch.uint8 else 1))
        st = ck.optimizer_state()
        if st is not None:
            opt.load_state_dict(st)
        first = ck.step
        bar.update(first)
    shown = None
    for step in range(first, steps):
        g = step_generator(seed + 17, index, step, dev)
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
            store.save(stage, step + 1, params={"images": x.detach()}, optimizer=opt, scalars=dict(where))
    out = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    with torch.no_grad():
        after, _ = _kl_sum(projector, teacher, out, **measure)
    if store is not None:
        store.save(stage, steps, params={"images": out}, done=True,
                   scalars={**where, "before": before, "after": after, "views": views})
    return out, torch.tensor([before, after, float(first), float(n), float(views)], dtype=torch.float64)
