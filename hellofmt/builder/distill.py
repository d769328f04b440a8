"""Projector distillation: train the low-rank deltas so the projector imitates the teacher(s).

Views are made exactly as the loader makes them (random resized crop + flip as one batched
resampling, then CutMix/MixUp), so the projector learns the teacher on the distribution of views it
will label at training time. Loss (default ``kl``): KL(teacher_T || projector_T) x T^2 plus
``ce_weight`` x cross-entropy on the (mixed) hard labels; ``mse`` replaces the KL with MSE between
projector and teacher logits. KL is the default because it is what students gain from: on the
quickstart (same steps, views and learning rate) KL-distilled labels trained students to 39.1%
against 29.8% with MSE (teacher online: 40%, hard labels: 22%). Students learn the teacher's whole
distribution at the training temperature, and KL matches that distribution directly, while MSE
spends its capacity on logit offsets that softmax ignores.

Resuming: the view randomness of step ``k`` is seeded from ``(seed, rank, k)`` and the data order
of an epoch from ``(seed, epoch)`` through a DistributedSampler, so a resumed run replays the exact
batches it would have seen, starting at the checkpointed step rather than at zero.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import augment
from .checkpoint import CheckpointStore
from .dist import World

__all__ = ["DistillConfig", "distill_projector", "make_views", "step_generator", "cosine_lr", "kl_per_sample"]


@dataclass
class DistillConfig:
    steps: int | None = None  # total optimiser steps; None -> epochs x steps per epoch, at least min_steps
    epochs: float = 10.0
    min_steps: int = 0  # floor on the epoch-derived length: small training sets still get enough steps
    batch_size: int = 64  # per process
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.03  # fraction of steps
    loss: str = "kl"  # "kl" | "mse" (see the module docstring for why KL)
    ce_weight: float = 0.1
    temperature: float = 1.0
    view_size: int = 32
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mix: str = "cutmix"
    checkpoint_every: int = 200
    num_workers: int = 0
    seed: int = 0
    grad_clip: float = 1.0


def step_generator(seed: int, rank: int, step: int, device=None) -> torch.Generator:
    """A CPU generator seeded from (seed, rank, step): the randomness of a step survives a restart.

    Always on the CPU (``device`` is ignored, kept for callers): :mod:`hellofmt.augment` draws its
    few random numbers per batch on the generator's device and moves them over, so the same seed gives
    the same views on the CPU and on CUDA and no draw needs a device->host sync."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1))
    return g


def make_views(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    size: int,
    generator: torch.Generator,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    mix: str = "cutmix",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loader's augmentation family on a batch: returns (views float [B,3,size,size] in [0,1],
    labels, partner labels, lam = fraction of the view that shows ``labels``)."""
    n = images.shape[0]
    dev = images.device
    boxes = augment.sample_boxes(n, scale=tuple(scale), ratio=tuple(ratio), generator=generator, device=dev)
    flips = augment.sample_flips(n, generator=generator, device=dev)
    views = augment.crop_resize(images, boxes, flips, size)
    ones = torch.ones(n, device=dev)
    if mix == "none" or n < 2:
        return views, labels, labels, ones
    if mix == "cutmix-mixup":
        use = "cutmix" if torch.rand((), generator=generator, device=generator.device).item() < 0.5 else "mixup"
    else:
        use = mix
    fn = augment.cutmix if use == "cutmix" else augment.mixup
    views, perm, lam = fn(views, generator=generator)
    return views, labels, labels[perm], lam.to(dev).float()  # per-sample lam [n] from cutmix and mixup


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def kl_per_sample(p: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(p/T)) per sample [B] (teacher logits ``t``, projector logits ``p``)."""
    return F.kl_div(F.log_softmax(p / T, 1), F.log_softmax(t / T, 1), log_target=True, reduction="none").sum(1)


def distill_loss(p: torch.Tensor, t: torch.Tensor, y: torch.Tensor, y2: torch.Tensor, lam: torch.Tensor,
                 cfg: DistillConfig) -> torch.Tensor:
    """Imitation term + weighted hard-label cross-entropy (lam-mixed for CutMix/MixUp views)."""
    if cfg.loss == "kl":
        T = cfg.temperature
        imit = kl_per_sample(p, t, T).sum() / p.shape[0] * T * T  # "batchmean"
    else:
        imit = F.mse_loss(p, t)
    if cfg.ce_weight > 0:
        ce = lam * F.cross_entropy(p, y, reduction="none") + (1 - lam) * F.cross_entropy(p, y2, reduction="none")
        imit = imit + cfg.ce_weight * ce.mean()
    return imit


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def distill_projector(
    projector: nn.Module,
    teacher: nn.Module,
    dataset: torch.utils.data.Dataset,
    cfg: DistillConfig,
    *,
    world: World,
    store: CheckpointStore,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Train the deltas attached to ``projector`` (its trainable parameters) on ``dataset`` (uint8
    squares, int labels). Returns stats: steps run, the step resumed from, final loss, agreement."""
    from tqdm.auto import tqdm

    dev = world.device
    params = _trainable(projector)
    if not params:
        raise RuntimeError("the projector has no trainable parameters; attach deltas first")
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=len(dataset) >= world.size * cfg.batch_size)
    per_epoch = max(1, len(sampler) // cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else max(1, cfg.min_steps, round(cfg.epochs * per_epoch))
    warmup = round(cfg.warmup * total)

    start = 0
    ck = store.load("distill") if resume else None
    if ck is not None:
        named = ck.params()
        with torch.no_grad():
            for n, p in params.items():
                if n in named:
                    p.copy_(named[n].to(p.device, p.dtype))
        st = ck.optimizer_state()
        if st is not None:
            opt.load_state_dict(st)
        start = ck.step
        if ck.done:
            return {"distill_steps": float(total), "distill_resumed_from": float(start), **{
                k: float(v) for k, v in ck.scalars.get("stats", {}).items()}}

    model = projector
    if world.size > 1:
        model = nn.parallel.DistributedDataParallel(
            projector, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=False
        )
    amp = dev.type == "cuda"
    bar = tqdm(total=total, initial=start, desc="distil projector", disable=not (progress and world.is_main),
               dynamic_ncols=True)
    step = start
    ema_loss = ema_agree = None  # device tensors: read back only when shown or checkpointed
    shown = None
    t0 = time.perf_counter()
    model.train()
    while step < total:
        epoch = step // per_epoch
        sampler.set_epoch(epoch)
        skip = (step % per_epoch) * cfg.batch_size
        indices = list(iter(sampler))[skip:]
        loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=cfg.batch_size, shuffle=False,
                            drop_last=False, num_workers=cfg.num_workers, pin_memory=dev.type == "cuda",
                            persistent_workers=False)
        for images, labels in loader:
            if step >= total or step // per_epoch != epoch:
                break
            images = images.to(dev, non_blocking=True)
            labels = labels.to(dev, non_blocking=True)
            g = step_generator(cfg.seed, world.rank, step, dev)
            views, y, y2, lam = make_views(images, labels, size=cfg.view_size, generator=g, scale=cfg.scale,
                                           ratio=cfg.ratio, mix=cfg.mix)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                t = teacher(views).float()
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, cfg.lr, warmup)
            p = model(views).float()
            loss = distill_loss(p, t, y, y2, lam, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            opt.step()
            step += 1
            with torch.no_grad():
                agree = (p.argmax(1) == t.argmax(1)).double().mean()
                lossd = loss.detach().double()  # float64, as the Python floats were
                ema_loss = lossd if ema_loss is None else 0.9 * ema_loss + 0.1 * lossd
                ema_agree = agree if ema_agree is None else 0.9 * ema_agree + 0.1 * agree
            bar.update(1)
            now = time.perf_counter()
            if not bar.disable and (shown is None or now - shown >= 0.5 or step >= total):
                shown = now
                bar.set_postfix(loss=f"{ema_loss.item():.4f}", agree=f"{ema_agree.item():.3f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                if world.is_main:
                    store.save("distill", step, params=params, optimizer=opt,
                               scalars={"total": total, "stats": {"loss": ema_loss.item(),
                                                                   "agreement": ema_agree.item()}})
                world.barrier()
    bar.close()
    stats = {"loss": float(ema_loss.item()) if ema_loss is not None else 0.0,
             "agreement": float(ema_agree.item()) if ema_agree is not None else 0.0}
    if world.is_main:
        store.save("distill", step, params=params, optimizer=opt, scalars={"total": total, "stats": stats}, done=True)
    world.barrier()
    model.eval()
    return {"distill_steps": float(total), "distill_resumed_from": float(start),
            "distill_seconds_this_run": time.perf_counter() - t0, **stats}
