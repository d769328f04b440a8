"""Teachers: parse ``--teacher`` specs, load them safely, average several, check their outputs.

Two spec forms, parsed here and nowhere else:

- ``timm:NAME`` — a timm architecture, weights from ``--teacher-weights FILE.safetensors`` (never a
  pickle: nothing is unpickled anywhere in hellofmt). The model is wrapped so it takes images in
  [0, 1] and normalises them with the architecture's own mean and std.
- ``FILE.py:FACTORY`` — a Python file imported with importlib; ``FACTORY()`` returns an
  ``nn.Module`` that takes images in [0, 1]. It is code you wrote, run as such.

Several teachers are averaged in logit space (the "weak teachers" ensemble of HeLlO).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import HellofmtError, TeacherError
from ..tensorfile import load_safetensors

__all__ = ["TeacherSpec", "parse_teacher_spec", "load_teacher", "TeacherEnsemble", "check_teacher", "load_teachers"]


@dataclass
class TeacherSpec:
    kind: str  # "timm" | "file"
    name: str  # timm architecture, or FILE.py path
    factory: str | None = None
    weights: str | None = None

    def describe(self) -> str:
        if self.kind == "timm":
            return f"timm:{self.name}" + (f" ({Path(self.weights).name})" if self.weights else "")
        return f"{Path(self.name).name}:{self.factory}"


def parse_teacher_spec(spec: str, weights: str | None = None) -> TeacherSpec:
    """Parse ``timm:NAME`` or ``FILE.py:FACTORY`` into a :class:`TeacherSpec`; TeacherError for
    anything else."""
    if not isinstance(spec, str) or not spec:
        raise TeacherError("empty teacher spec", field="--teacher", fix="use timm:NAME or FILE.py:FACTORY")
    if spec.startswith("timm:"):
        name = spec[len("timm:"):]
        if not name:
            raise TeacherError("no architecture after 'timm:'", field="--teacher", fix="e.g. timm:resnet18")
        return TeacherSpec("timm", name, weights=weights)
    path, sep, factory = spec.rpartition(":")
    if sep and path.endswith(".py") and factory.isidentifier():
        if weights is not None:
            raise TeacherError(
                "--teacher-weights applies to timm teachers only", field="--teacher-weights",
                fix="load the weights inside your factory function",
            )
        return TeacherSpec("file", path, factory=factory)
    raise TeacherError(
        f"cannot parse teacher spec {spec!r}", field="--teacher",
        fix="use timm:NAME (with --teacher-weights FILE.safetensors) or FILE.py:FACTORY",
    )


class Normalize(nn.Module):
    """Wrap a model that expects mean/std-normalised input so that it takes images in [0, 1] (timm
    teachers here, timm students in :mod:`hellofmt.students`)."""

    def __init__(self, model: nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def check_timm_architecture(name: str, *, error: type[HellofmtError] = TeacherError, option: str = "--teacher"):
    """timm itself, after checking that it is installed and knows architecture ``name`` (a ``timm:``
    teacher or student); the error names ``option`` and the closest known names."""
    try:
        import timm  # only timm models need it
    except ImportError:
        raise error("timm is not installed", field=option, fix="pip install timm") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise error(
            f"timm has no architecture {name!r}" + (f" (closest: {', '.join(close)})" if close else ""),
            field=option, fix="see timm.list_models()",
        )
    return timm


def _check_timm(spec: TeacherSpec) -> Path:
    """The checks of a ``timm:`` teacher that need no model: timm present, architecture known,
    weights given as an existing safetensors file. Returns the weights path."""
    check_timm_architecture(spec.name)
    if spec.weights is None:
        raise TeacherError(
            f"timm:{spec.name} needs --teacher-weights FILE.safetensors", field="--teacher-weights",
            fix="a timm teacher is never downloaded; give its trained weights as safetensors",
        )
    wpath = Path(spec.weights)
    if wpath.suffix != ".safetensors":
        raise TeacherError(
            "teacher weights must be a .safetensors file", file=wpath, field="--teacher-weights",
            fix="convert once with safetensors.torch.save_file(model.state_dict(), 'teacher.safetensors')",
        )
    if not wpath.is_file():
        raise TeacherError("teacher weights not found", file=wpath, field="--teacher-weights")
    return wpath


def _load_timm(spec: TeacherSpec, num_classes: int) -> nn.Module:
    import timm

    wpath = _check_timm(spec)
    try:
        model = timm.create_model(spec.name, pretrained=False, num_classes=num_classes)
    except Exception as e:  # noqa: BLE001 - timm raises RuntimeError/KeyError for unknown names
        raise TeacherError(f"timm cannot build {spec.name!r}: {e}", field="--teacher",
                           fix="see timm.list_models()") from None
    try:
        state, _ = load_safetensors(wpath, file=wpath)  # the checked reader: header, dtypes, byte ranges
    except (HellofmtError, OSError) as e:
        raise TeacherError(f"cannot read safetensors: {getattr(e, 'message', e)}", file=wpath,
                           field="--teacher-weights") from None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = str(e).splitlines()
        raise TeacherError(
            f"weights do not fit timm:{spec.name} with {num_classes} classes: {' '.join(msg[:3])[:400]}",
            file=wpath, field="--teacher-weights",
            fix="check the architecture name and that the classifier has one output per class",
        ) from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return Normalize(model, mean, std)


def _check_file(spec: TeacherSpec) -> Path:
    path = Path(spec.name)
    if not path.is_file():
        raise TeacherError("teacher file not found", file=path, field="--teacher", fix="give FILE.py:FACTORY")
    return path


def _load_file(spec: TeacherSpec) -> nn.Module:
    path = _check_file(spec)
    mod_name = "hellofmt_teacher_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    try:
        ispec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(ispec)
        sys.modules[mod_name] = module  # dataclasses and pickling-free DDP need the module registered
        ispec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file can raise anything at import
        sys.modules.pop(mod_name, None)
        raise TeacherError(f"importing it failed: {type(e).__name__}: {e}", file=path, field="--teacher") from None
    factory = getattr(module, spec.factory, None)
    if not callable(factory):
        raise TeacherError(f"has no function {spec.factory!r}", file=path, field="--teacher",
                           fix="FACTORY must name a function defined in the file")
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001
        raise TeacherError(f"{spec.factory}() raised {type(e).__name__}: {e}", file=path, field="--teacher") from None
    if not isinstance(model, nn.Module):
        raise TeacherError(f"{spec.factory}() returned {type(model).__name__}, not a torch.nn.Module",
                           file=path, field="--teacher")
    return model


def load_teacher(
    spec: str | TeacherSpec | nn.Module, *, num_classes: int, weights: str | None = None
) -> tuple[nn.Module, str]:
    """Load one teacher from a spec string (or accept a module as is): returns (module in eval
    mode with frozen parameters, a one-line description for the manifest's provenance)."""
    if isinstance(spec, nn.Module):
        model, desc = spec, f"module:{type(spec).__name__}"
    else:
        ts = spec if isinstance(spec, TeacherSpec) else parse_teacher_spec(spec, weights)
        model = _load_timm(ts, num_classes) if ts.kind == "timm" else _load_file(ts)
        desc = ts.describe()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, desc


class TeacherEnsemble(nn.Module):
    """The mean of several teachers' logits; one teacher passes through unchanged."""

    def __init__(self, teachers: list[nn.Module]):
        super().__init__()
        if not teachers:
            raise TeacherError("no teacher given", field="--teacher", fix="give at least one --teacher")
        self.teachers = nn.ModuleList(teachers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.teachers) == 1:
            return self.teachers[0](x).float()
        return torch.stack([t(x).float() for t in self.teachers]).mean(0)


def check_teacher(teacher: nn.Module, num_classes: int, probe: torch.Tensor, *, name: str = "teacher") -> None:
    """Run ``teacher`` on a probe batch (float [B,3,H,W] in [0,1]) and raise TeacherError unless
    it returns finite logits of shape [B, num_classes]."""
    try:
        with torch.no_grad():
            out = teacher(probe)
    except Exception as e:  # noqa: BLE001 - the user's module can raise anything
        raise TeacherError(f"forward on a [{', '.join(map(str, probe.shape))}] batch failed: {type(e).__name__}: {e}",
                           field="--teacher", file=name,
                           fix="a teacher takes float images in [0,1], shape [B,3,H,W]") from None
    if not isinstance(out, torch.Tensor):
        raise TeacherError(f"returned {type(out).__name__}, not a tensor of logits", field="--teacher", file=name)
    if out.dim() != 2 or out.shape[0] != probe.shape[0]:
        raise TeacherError(f"returned shape {tuple(out.shape)}; expected [{probe.shape[0]}, {num_classes}]",
                           field="--teacher", file=name)
    if out.shape[1] != num_classes:
        raise TeacherError(
            f"outputs {out.shape[1]} classes but the training data has {num_classes}", field="--teacher", file=name,
            fix="the teacher's classifier needs one output per class folder, in sorted folder order",
        )
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).any(1).sum())
        raise TeacherError(f"returned NaN or infinite logits for {bad} of {out.shape[0]} probe images",
                           field="--teacher", file=name, fix="check the teacher's weights and input range")


def _pair_weights(specs: list, weights) -> list[tuple[object, str | None]]:
    """Pair ``--teacher-weights`` in order with the ``timm:`` teachers (TeacherError if too many)."""
    if weights is None:
        weights = []
    elif not isinstance(weights, list):
        weights = [weights]
    n_timm = sum(isinstance(s, str) and s.startswith("timm:") for s in specs)
    if len(weights) > n_timm:
        raise TeacherError(f"{len(weights)} --teacher-weights for {n_timm} timm teacher(s)", field="--teacher-weights",
                           fix="give one --teacher-weights per timm:NAME teacher, in the same order")
    pending = list(weights)
    return [(s, pending.pop(0) if isinstance(s, str) and s.startswith("timm:") and pending else None) for s in specs]


def check_teacher_specs(
    specs: list[str | nn.Module] | str | nn.Module, weights: list[str | None] | str | None = None
) -> None:
    """Check every teacher spec without building any model: syntax, files present, a known timm
    architecture, weights as safetensors. Run before the foundation is loaded, so a typo costs
    nothing (a real foundation can be a large download)."""
    if isinstance(specs, (str, nn.Module)):
        specs = [specs]
    for spec, w in _pair_weights(list(specs), weights):
        if isinstance(spec, nn.Module):
            continue
        ts = parse_teacher_spec(spec, w)
        if ts.kind == "timm":
            _check_timm(ts)
        else:
            _check_file(ts)


def load_teachers(
    specs: list[str | nn.Module] | str | nn.Module,
    *,
    num_classes: int,
    weights: list[str | None] | str | None = None,
    probe: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> tuple[TeacherEnsemble, list[str]]:
    """Load and check every teacher, then average them. ``weights`` are paired, in order, with
    the ``timm:`` teachers (a ``FILE.py:FACTORY`` teacher loads its own weights)."""
    if isinstance(specs, (str, nn.Module)):
        specs = [specs]
    models, descs = [], []
    for spec, w in _pair_weights(list(specs), weights):
        m, d = load_teacher(spec, num_classes=num_classes, weights=w)
        m = m.to(device)
        if probe is not None:
            check_teacher(m, num_classes, probe.to(device), name=d)
        models.append(m)
        descs.append(d)
    return TeacherEnsemble(models).eval(), descs
