"""torch.distributed set-up for builds launched with ``torchrun`` (one process per device).

Under torchrun (``WORLD_SIZE`` > 1 in the environment) the process group is NCCL on GPUs and gloo on
the CPU. Only rank 0 writes files (checkpoints, the bundle); the others wait at barriers.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "init_world"]


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

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
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
