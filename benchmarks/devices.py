"""What the benchmark scripts share about devices: ``--device`` as a device this machine has (or a one-line
error that names it), ``--clock``, and waiting for the device before a clock is read.

    python benchmarks/label_throughput.py --device cuda     # on a machine without CUDA:
    label_throughput.py: error: --device cuda: no CUDA device is visible (torch.cuda.is_available() is False); ...
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch


def fail(prog: str, message: str, code: int = 2):
    """One line on stderr, ``code`` as the exit status, no traceback."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def check_device(text: str, prog: str) -> torch.device:
    """``text`` (``cpu``, ``cuda``, ``cuda:N``) as a device this machine has (``cuda`` becomes the current
    CUDA device), or exit with a one-line error naming it."""
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        fail(prog, f"--device {text}: not a torch device; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            fail(prog, f"--device {text}: no CUDA device is visible (torch.cuda.is_available() is False); "
                       "use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            fail(prog, f"--device {text}: only {n} CUDA device(s) visible (cuda:0 to cuda:{n - 1})")
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    if dev.type != "cpu":
        fail(prog, f"--device {text}: these benchmarks run on cpu or cuda")
    return dev


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA), so that a clock read next measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_clock_option(parser: argparse.ArgumentParser) -> None:
    """``--clock auto|wall|cpu``; :func:`clock` resolves it."""
    parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                        help="wall: elapsed time; cpu: this process's CPU time, steadier on a shared machine (auto: "
                             "cpu on a CPU device, wall on CUDA)")


def clock(name: str, device: torch.device) -> tuple[str, Callable[[], float]]:
    """``--clock`` for ``device``: (the clock's name, the function to read it)."""
    name = name if name != "auto" else ("cpu" if device.type == "cpu" else "wall")
    return name, (time.process_time if name == "cpu" else time.perf_counter)
