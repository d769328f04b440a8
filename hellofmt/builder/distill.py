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

Data: one DataLoader for the whole run (worker processes started once and kept, each with batches
prefetched), driven by a :class:`StepBatchSampler` that yields the batch of every step from the first to
the last. Resuming: the view randomness of step ``k`` is seeded from ``(seed, rank, k)`` and the data
order of an epoch from ``(seed, epoch)`` as a DistributedSampler orders it, so a resumed run replays the
exact batches it would have seen, starting at the checkpointed step rather than at zero.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .. import augment
from .checkpoint import CheckpointStore
from .dist import World, all_gather_json
from .inputs import collate_samples

__all__ = ["DistillConfig", "StepBatchSampler", "distill_projector", "make_views", "step_generator", "cosine_lr",
           "kl_per_sample"]


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
    prefetch_factor: int | None = None  # batches each worker keeps ready; None: enough for 8 in flight (at least 2)
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
    labels, partner labels, lam = fraction of the view that shows ``labels``).

    The step's random numbers are drawn from ``generator`` (a CPU generator: the same views on every
    device) by :func:`hellofmt.augment.sample_epoch`, in the order the per-call functions draw them,
    and reach the device in one non-blocking copy from pinned memory: no blocking host-to-device copy
    that would make the host wait for the previous step's GPU work before queueing this one."""
    n = images.shape[0]
    dev = images.device
    d = augment.sample_epoch([n], scale=tuple(scale), ratio=tuple(ratio), mix=mix if n >= 2 else "none",
                             generator=generator, device=dev)[0]
    views = augment.crop_resize(images, d.boxes, d.flips, size)
    if d.mode == "none":
        return views, labels, labels, torch.ones(n, device=dev)
    if d.mode == "cutmix":
        views, lam = augment.paste(views, d.perm, d.cut)
    else:
        views, lam = augment.blend(views, d.perm, d.lam), d.lam
    return views, labels, labels[d.perm], lam.float()  # per-sample lam [n]


def planned_steps(per_epoch: int, *, steps: int | None, epochs: float, min_steps: int, world_size: int = 1) -> int:
    """The distillation steps each process runs: ``steps`` if given, else ``epochs`` passes of
    ``per_epoch`` steps (one process's share, :attr:`StepBatchSampler.per_epoch`), but at least the floor
    ``min_steps``. The floor is counted in steps of one process's batch and shared among the processes:
    each of ``world_size`` runs ``ceil(min_steps / world_size)``, so that the floor asks for the same views
    on 8 GPUs as on one (and 8 GPUs finish it 8 times sooner)."""
    if steps is not None:
        return steps
    return max(1, -(-min_steps // max(1, world_size)), round(epochs * per_epoch))


class StepBatchSampler(Sampler[list[int]]):
    """The batches (lists of dataset indices) of optimiser steps ``start`` to ``stop - 1`` of one rank.

    An epoch orders the dataset as ``DistributedSampler(shuffle=True, seed=seed)`` does after
    ``set_epoch(epoch)`` (so step ``k``'s batch is a pure function of seed, epoch, rank, world size and
    ``k``) and gives :attr:`per_epoch` batches of ``batch_size``: the rank's share cut into whole batches,
    the remainder left out, or the whole share as one batch when it is smaller than a batch. Starting at
    ``start`` yields the rest of that step's epoch, then the following epochs: a resumed run sees the
    batches the uninterrupted run saw, and one DataLoader serves the whole run.

    Args:
        n: the dataset's length.
        batch_size: samples per batch (per rank).
        rank: this process's rank.
        world_size: the processes sharing the data.
        seed: the shuffling seed.
        start: the first step to yield.
        stop: the step to stop before (None: until :meth:`set_stop` is called, at most 2**62 steps).
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start: int = 0, stop: int | None = None):
        self.n, self.batch_size, self.rank, self.world_size, self.seed = n, batch_size, rank, world_size, seed
        self.drop_last = n >= world_size * batch_size
        self._sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                           drop_last=self.drop_last)
        self.per_epoch = max(1, len(self._sampler) // batch_size)
        self.start = start
        self.stop = 2**62 if stop is None else stop

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's share of the dataset in epoch ``epoch``, in order."""
        self._sampler.set_epoch(epoch)
        return list(iter(self._sampler))

    def batch(self, step: int) -> list[int]:
        """The indices of step ``step``'s batch."""
        j = step % self.per_epoch
        return self.epoch_indices(step // self.per_epoch)[j * self.batch_size:(j + 1) * self.batch_size]

    def __iter__(self):
        epoch, order = None, []
        for step in range(self.start, self.stop):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                order = self.epoch_indices(epoch)
            j = step % self.per_epoch
            yield order[j * self.batch_size:(j + 1) * self.batch_size]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


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


def _share_skipped(skipped, world: World) -> None:
    """Give every rank the images that failed to decode on any rank (a collective: all ranks call it)."""
    if skipped is not None and world.size > 1:
        for part in all_gather_json(world, list(skipped.files.items())):
            skipped.add(part)


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
    stage: str = "distill",
) -> dict[str, float]:
    """Train the deltas attached to ``projector`` (its trainable parameters) on ``dataset`` (uint8
    squares, int labels). Returns stats: steps run, the step resumed from, final loss, agreement.

    ``stage`` names the checkpoint (and the progress bar): ``"distill"`` for the distillation on the
    original data, ``"adapt"`` for the adaptation to the bundle's own images that follows it.

    A dataset with a ``skipped`` attribute (a :class:`~hellofmt.builder.inputs.SkippedImages`, as
    :class:`~hellofmt.builder.inputs.FolderDataset` has) gets the images that failed to decode, from every
    rank and from the checkpoint resumed; past its limit the build stops with a BuildInputError."""
    from tqdm.auto import tqdm

    dev = world.device
    params = _trainable(projector)
    if not params:
        raise RuntimeError("the projector has no trainable parameters; attach deltas first")
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = StepBatchSampler(len(dataset), cfg.batch_size, rank=world.rank, world_size=world.size, seed=cfg.seed)
    per_epoch = batches.per_epoch
    total = planned_steps(per_epoch, steps=cfg.steps, epochs=cfg.epochs, min_steps=cfg.min_steps,
                          world_size=world.size)
    warmup = round(cfg.warmup * total)

    start = 0
    skipped = getattr(dataset, "skipped", None)  # a SkippedImages: images that failed to decode are counted there
    ck = store.load(stage) if resume else None
    if ck is not None:
        if skipped is not None:
            skipped.add(ck.scalars.get("skipped", {}).items())
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
    desc = "distil projector" if stage == "distill" else f"{stage} projector"
    bar = tqdm(total=total, initial=start, desc=desc, disable=not (progress and world.is_main),
               dynamic_ncols=True)
    step = start
    ema_loss = ema_agree = None  # device tensors: read back only when shown or checkpointed
    shown = None
    t0 = time.perf_counter()
    model.train()
    batches.start, batches.stop = start, total
    workers = cfg.num_workers
    prefetch = (cfg.prefetch_factor or max(2, -(-8 // workers))) if workers > 0 else None
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_samples,
                        pin_memory=dev.type == "cuda", persistent_workers=workers > 0, prefetch_factor=prefetch)
    try:
        for images, labels, failed in loader:
            if failed and skipped is not None:
                skipped.add(failed)  # raises past --max-bad-images
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
                _share_skipped(skipped, world)
                if world.is_main:
                    store.save(stage, step, params=params, optimizer=opt,
                               scalars={"total": total, "stats": {"loss": ema_loss.item(),
                                                                   "agreement": ema_agree.item()},
                                        "skipped": dict(skipped.files) if skipped is not None else {}})
                world.barrier()
    finally:
        del loader  # ends its worker processes, which persistent_workers keeps otherwise
    bar.close()
    _share_skipped(skipped, world)
    stats = {"loss": float(ema_loss.item()) if ema_loss is not None else 0.0,
             "agreement": float(ema_agree.item()) if ema_agree is not None else 0.0}
    if world.is_main:
        store.save(stage, step, params=params, optimizer=opt, done=True,
                   scalars={"total": total, "stats": stats,
                            "skipped": dict(skipped.files) if skipped is not None else {}})
    world.barrier()
    model.eval()
    return {"distill_steps": float(total), "distill_resumed_from": float(start),
            "distill_seconds_this_run": time.perf_counter() - t0, **stats}
