"""Stage checkpoints: tensors (and optimiser state) in safetensors, scalars in JSON, atomic writes.

A checkpoint of stage ``S`` at step ``k`` is two files in the checkpoint folder:
``S-00000k.safetensors`` (every tensor, including the optimiser's moment estimates flattened to
names ``optim.state.<param index>.<key>``) and ``S.json`` (step, done flag, optimiser param groups,
scheduler state, stage scalars, and the name of the tensor file). The JSON is written last and
atomically, so it always points at a complete tensor file; an interruption at any moment leaves the
previous checkpoint usable. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import BuildError, HellofmtError
from ..manifest import check_file_name
from ..tensorfile import load_safetensors

__all__ = ["Checkpoint", "CheckpointStore", "flatten_optimizer", "unflatten_optimizer", "atomic_write_text"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser ``state_dict()`` into named tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in state_dict["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.state.{idx}.{key}"] = v
            else:
                scalars.setdefault(str(idx), {})[key] = v
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        if not name.startswith("optim.state."):
            continue
        idx, key = name[len("optim.state."):].split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    for idx, st in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": rest["param_groups"]}


@dataclass
class Checkpoint:
    stage: str
    step: int
    done: bool
    tensors: dict[str, torch.Tensor]
    scalars: dict[str, Any] = field(default_factory=dict)

    def optimizer_state(self) -> dict | None:
        rest = self.scalars.get("optimizer")
        return None if rest is None else unflatten_optimizer(self.tensors, rest)

    def params(self, prefix: str = "param.") -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


class CheckpointStore:
    """The checkpoint folder of one build (``--checkpoint-dir``, by default ``OUT.ckpt``)."""

    def __init__(self, directory: str | os.PathLike[str], *, enabled: bool = True):
        self.dir = Path(directory)
        self.enabled = enabled  # created on the first write: a build that fails its input checks leaves nothing

    def save(
        self,
        stage: str,
        step: int,
        *,
        params: dict[str, torch.Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scalars: dict[str, Any] | None = None,
        done: bool = False,
    ) -> None:
        """Write stage ``stage``'s state at ``step`` (params under ``param.<name>``)."""
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{k}": v for k, v in (params or {}).items()}
        meta: dict[str, Any] = {"stage": stage, "step": int(step), "done": bool(done), "scalars": scalars or {}}
        if optimizer is not None:
            t, rest = flatten_optimizer(optimizer.state_dict())
            tensors.update(t)
            meta["scalars"]["optimizer"] = rest
        if scheduler is not None:
            meta["scalars"]["scheduler"] = scheduler.state_dict()
        name = f"{stage}-{int(step):08d}.safetensors"
        _atomic_save_tensors(self.dir / name, tensors, {"format": "hellofmt-checkpoint", "stage": stage})
        meta["tensors"] = name
        old = self._read_json(stage)
        atomic_write_text(self.dir / f"{stage}.json", json.dumps(meta, indent=1, default=_json_default) + "\n")
        if old and old.get("tensors") not in (None, name):
            (self.dir / old["tensors"]).unlink(missing_ok=True)

    def _read_json(self, stage: str) -> dict | None:
        return _read_json_file(self.dir / f"{stage}.json", stage=True)

    def load(self, stage: str) -> Checkpoint | None:
        """The last checkpoint of ``stage``, or None when there is none."""
        meta = self._read_json(stage)
        if meta is None:
            return None
        path = self.dir / meta["tensors"]
        try:
            tensors, _ = load_safetensors(path, file=path)  # the checked reader: header, dtypes, byte ranges
        except (HellofmtError, OSError) as e:  # missing or truncated file
            raise BuildError(f"unreadable checkpoint tensors: {getattr(e, 'message', e)}", file=path,
                             fix=_FIX) from None
        return Checkpoint(stage=stage, step=meta["step"], done=meta["done"], tensors=tensors,
                          scalars=meta.get("scalars", {}))

    def write_json(self, name: str, obj: dict) -> None:
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / name, json.dumps(obj, indent=1, default=_json_default) + "\n")

    def read_json(self, name: str) -> dict | None:
        return _read_json_file(self.dir / name)


_FIX = "delete the checkpoint folder to start over"


def _read_json_file(p: Path, *, stage: bool = False) -> dict | None:
    """A checkpoint JSON object, or None when the file does not exist. ``stage`` files must also hold
    an integer ``step``, a boolean ``done`` and ``tensors``, a plain file name in the folder."""
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BuildError(f"unreadable checkpoint: {e}", file=p, fix=_FIX) from None
    if not isinstance(meta, dict):
        raise BuildError(f"expected a JSON object, got {type(meta).__name__}", file=p, fix=_FIX)
    if stage:
        step, done, tensors = meta.get("step"), meta.get("done"), meta.get("tensors")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise BuildError(f"expected an integer step >= 0, got {step!r}", file=p, field="step", fix=_FIX)
        if not isinstance(done, bool):
            raise BuildError(f"expected true or false, got {done!r}", file=p, field="done", fix=_FIX)
        try:
            check_file_name(tensors, file=str(p), field_path="tensors")
        except HellofmtError as e:
            raise BuildError(e.message, file=p, field="tensors", fix=_FIX) from None
        if not isinstance(meta.get("scalars", {}), dict):
            raise BuildError("expected a JSON object", file=p, field="scalars", fix=_FIX)
    return meta


def _json_default(o: Any):
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
