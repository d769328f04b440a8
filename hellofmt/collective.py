"""Collectives over ``torch.distributed`` that carry JSON values, for the few places where processes
exchange more than tensors (a folder listing, the error one rank hit): the value travels as UTF-8 JSON
bytes in a uint8 tensor. Not ``broadcast_object_list`` / ``all_gather_object``, which pickle: nothing is
ever unpickled in hellofmt, not even from a peer process.

Each function is a collective: every process of the group calls it, with tensors on ``device`` (a CUDA
device under NCCL, the CPU under gloo).
"""

from __future__ import annotations

import json
from typing import Any

import torch

__all__ = ["broadcast_json", "all_gather_json"]


def _tensor(data: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def _value(buf: torch.Tensor) -> Any:
    return json.loads(buf.cpu().numpy().tobytes())


def broadcast_json(obj: Any, src: int, device: torch.device) -> Any:
    """Rank ``src``'s ``obj`` (a JSON value) on every rank; ``obj`` is ignored on the others."""
    dist = torch.distributed
    mine = dist.get_rank() == src
    data = json.dumps(obj).encode() if mine else b""
    n = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(n, src)
    buf = _tensor(data, device) if mine else torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src)
    return obj if mine else _value(buf)


def all_gather_json(obj: Any, device: torch.device) -> list:
    """Every rank's ``obj`` (a JSON value), in rank order, on every rank."""
    dist = torch.distributed
    world = dist.get_world_size()
    data = json.dumps(obj).encode()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device))
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine[: len(data)] = _tensor(data, device)
    bufs = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(bufs, mine)
    return [_value(b[: int(s.item())]) for b, s in zip(bufs, sizes)]
