"""torch.distributed set-up for builds launched with ``torchrun`` (one process per device).

Under torchrun (``WORLD_SIZE`` > 1 in the environment) the process group is NCCL on GPUs and gloo on
the CPU. Only rank 0 writes files (checkpoints, the bundle), except that each rank checkpoints the
refinement chunks it refines; the others wait at barriers. Work split across ranks (selection by class,
refinement by chunk) comes back together through :func:`all_gather_blocks`.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import collective

__all__ = ["World", "all_gather_blocks", "all_gather_json", "broadcast_json", "init_world"]


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self, *, sync: bool = False) -> None:
        """Leave the process group if this world created it. ``sync`` (the success path only): a
        barrier first, so that no rank tears down its connections while a peer still has a transfer
        in flight (gloo then aborts the peer: "terminate called without an active exception"). A
        failing rank closes without it; torchrun stops the others."""
        if not (self.owns_group and dist.is_initialized()):
            return
        if sync:
            self.barrier()
        dist.destroy_process_group()
        self.owns_group = False


def init_world(device: str | torch.device | None = None) -> World:
    """Join the process group torchrun set up the environment for, or return a one-process world.
    ``device`` None picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local if size > 1 else torch.cuda.current_device())
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
    except (RuntimeError, AssertionError, TypeError, ValueError) as e:  # unknown name, no CUDA, bad index
        from ..errors import BuildInputError

        raise BuildInputError(f"cannot use device {device!r}: {e}", field="--device",
                              fix="use cpu, cuda or cuda:N (N below the number of visible GPUs)") from None
    if size <= 1:
        return World(0, 1, 0, dev, False)
    owns = False
    if not dist.is_initialized():
        # Long stages on rank 0 alone (image selection, refinement) must not trip the default timeout.
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=6))
        owns = True
    return World(dist.get_rank(), dist.get_world_size(), local, dev, owns)


def all_gather_blocks(
    world: World, blocks: Mapping[int, torch.Tensor], shapes: Sequence[tuple[int, ...]], dtype: torch.dtype
) -> list[torch.Tensor]:
    """Gather work split across ranks: block ``i`` (of ``len(shapes)``, shape ``shapes[i]``) is computed on
    rank ``i % world.size``, which holds it in ``blocks``; every rank gets every block, on the CPU, in
    block order. One ``all_gather`` per round of ``world.size`` blocks, so no more than one round is in
    flight (not the whole set); tensors only, nothing pickled.

    Args:
        world: the process group (one process: ``blocks`` is returned in order).
        blocks: this rank's blocks, by block index.
        shapes: the shape of every block (known on every rank).
        dtype: the blocks' dtype.

    Returns:
        The blocks, ``len(shapes)`` CPU tensors.
    """
    if world.size == 1:
        return [blocks[i].cpu() for i in range(len(shapes))]
    dev = world.device if world.device.type == "cuda" else torch.device("cpu")  # NCCL: CUDA; gloo: CPU
    out: list[torch.Tensor] = []
    for first in range(0, len(shapes), world.size):
        ids = range(first, min(first + world.size, len(shapes)))
        numel = max(math.prod(shapes[i]) for i in ids)  # all_gather takes equal sizes: pad to the largest
        send = torch.zeros(numel, dtype=dtype, device=dev)
        if first + world.rank in ids:
            own = blocks[first + world.rank]
            send[:own.numel()] = own.reshape(-1).to(dev, dtype)
        recv = [torch.empty_like(send) for _ in range(world.size)]
        dist.all_gather(recv, send)
        out.extend(recv[j][:math.prod(shapes[i])].view(shapes[i]).cpu().clone() for j, i in enumerate(ids))
    return out


def broadcast_json(world: World, obj=None):
    """Rank 0's ``obj`` (a JSON value) on every rank; ``obj`` is ignored elsewhere
    (:func:`hellofmt.collective.broadcast_json`: JSON bytes, nothing pickled)."""
    if world.size <= 1:
        return obj
    return collective.broadcast_json(obj, 0, world.device)


def all_gather_json(world: World, obj) -> list:
    """Every rank's ``obj`` (a JSON value), in rank order, on every rank
    (:func:`hellofmt.collective.all_gather_json`: JSON bytes, nothing pickled)."""
    if world.size <= 1:
        return [obj]
    return collective.all_gather_json(obj, world.device)
