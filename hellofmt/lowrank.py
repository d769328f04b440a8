"""Low-rank deltas on foundation parameters: ``dW = lora_B @ lora_A * alpha / rank`` (PEFT's maths).

A delta can sit on any parameter of two or more dimensions. A parameter of shape ``(out, *rest)`` is
treated as the matrix ``(out, prod(rest))`` and the delta is reshaped back, so one rule covers a
Linear weight, the fused ``in_proj_weight`` of ``nn.MultiheadAttention``, a Conv2d kernel
(``(o, i, kh, kw)`` -> ``(o, i*kh*kw)``) and a bare Parameter such as open_clip's ``visual.proj``
(``(width, embed_dim)``: out=width, in=embed_dim).

Two forms:

* **training form** (:func:`attach`, :func:`load_deltas`): each target carries a
  :class:`LowRankDelta` registered with :func:`torch.nn.utils.parametrize.register_parametrization`,
  so ``module.<name>`` reads ``W + dW`` wherever the module uses it. A parametrization is used rather
  than wrapping modules (PEFT's approach) because several weights are never called as modules:
  ``nn.MultiheadAttention`` hands ``in_proj_weight`` and ``out_proj.weight`` straight to
  ``F.multi_head_attention_forward`` (or the fused fast path), ``ModifiedResNet``'s attention pool
  does the same with its ``q/k/v/c_proj`` weights, and ``visual.proj`` is a bare ``x @ proj``. All of
  these read the attribute, which is exactly what a parametrization intercepts. Checked on open_clip
  3.3: ``ResidualAttentionBlock``'s ``nn.MultiheadAttention`` reads the parametrized
  ``in_proj_weight``/``out_proj.weight`` on both its Python path and its fused inference fast path
  (tests/test_lowrank.py spies on the fused kernel). MHA reads each weight twice per forward (its
  fast-path checks, then the call), so a training step computes every ``dW`` twice; wrapping the
  forward in ``torch.nn.utils.parametrize.cached()`` computes each once (autograd-safe).
* **inference form** (:func:`merge_`, or :func:`remove` with ``merge=True``): ``dW`` is added into
  the weights in place once, so a forward costs exactly what the plain model costs.

Target names are parameter names as ``model.named_parameters()`` gives them on the *plain* model
(``visual.transformer.resblocks.0.attn.in_proj_weight``); names are the same whether or not deltas
are attached, because the ``parametrizations.<attr>.original`` spelling is mapped back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import ProjectorError
from .manifest import LowRankTarget

__all__ = [
    "DEFAULT_TARGETS",
    "HEAD_PREFIX",
    "model_family",
    "resolve_targets",
    "as_matrix_shape",
    "delta_weight",
    "LowRankDelta",
    "make_targets",
    "attach",
    "remove",
    "deltas_of",
    "delta_tensors",
    "check_delta_tensors",
    "load_deltas",
    "merge_",
    "num_delta_parameters",
]

# Default targets per family, as regular expressions matched in full against parameter names of an
# open_clip CLIP model (``re.fullmatch``).
#
# ViT: every visual residual block's attention (fused q/k/v ``in_proj_weight`` and ``out_proj``) and
# MLP (``c_fc``, ``c_proj``): the LoRA paper's and the HeLlO paper's choice; at rank 4 on ViT-B/32
# this is about 0.59M parameters, matching the paper's ~0.8M budget with the head delta. Left out:
# the patch embedding ``conv1`` (its input side is raw pixels; generic low-level filters transfer) and
# ``visual.proj`` (the head delta already adapts the last linear map into class space).
#
# ResNet (ModifiedResNet, RN50 etc.): the three convolutions (``conv1`` 1x1, ``conv2`` 3x3, ``conv3``
# 1x1) of every bottleneck in layer1-4, and the attention pool's q/k/v/c projections (the ResNet
# counterpart of the ViT's attention; ``c_proj`` is the projection into the embedding space). Left
# out: the three stem convolutions (``visual.conv1`` has in*k*k = 27, so a rank-4 delta is close to a
# full update of generic edge filters) and the ``downsample`` 1x1 convolutions (they only re-project
# the identity path; the bottleneck's own convs already adapt each stage).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "vit": [
        r"visual\.transformer\.resblocks\.\d+\.attn\.in_proj_weight",
        r"visual\.transformer\.resblocks\.\d+\.attn\.out_proj\.weight",
        r"visual\.transformer\.resblocks\.\d+\.mlp\.c_fc\.weight",
        r"visual\.transformer\.resblocks\.\d+\.mlp\.c_proj\.weight",
    ],
    "resnet": [
        r"visual\.layer[1-4]\.\d+\.conv[123]\.weight",
        r"visual\.attnpool\.[qkvc]_proj\.weight",
    ],
}

# Tensors of projector.safetensors under this prefix belong to the projector's head delta (handled by
# hellofmt.projector), not to a foundation parameter; load_deltas/merge_ leave them alone.
HEAD_PREFIX = "head."

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FIX_REBUILD = "the projector file does not fit the manifest: rebuild the bundle"


# --------------------------------------------------------------------------------------------------
# Names and shapes
# --------------------------------------------------------------------------------------------------
def model_family(model: nn.Module) -> str:
    """Return ``"vit"`` or ``"resnet"`` for an open_clip CLIP model (or its visual tower).

    The family picks :data:`DEFAULT_TARGETS`. Raises :class:`ProjectorError` for any other image tower
    (timm towers, ...): for those, pass explicit target patterns to :func:`resolve_targets`.
    """
    visual = getattr(model, "visual", model)
    # Imported here so that checking a projector file (check_delta_tensors) needs no open_clip.
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return "vit"
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    raise ProjectorError(
        f"no default low-rank targets for an image tower of type {type(visual).__name__}",
        field="targets",
        fix="pass explicit target patterns (regular expressions over parameter names)",
    )


def _canonical_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``named_parameters`` with parametrized tensors under their plain names and without the
    parametrizations' own parameters (the deltas)."""
    for mod_name, module in model.named_modules():
        plist = getattr(module, "parametrizations", None) if parametrize.is_parametrized(module) else None
        for p_name, p in module.named_parameters(recurse=False):
            yield (f"{mod_name}.{p_name}" if mod_name else p_name), p
        if plist is not None:
            for attr, entry in plist.items():
                yield (f"{mod_name}.{attr}" if mod_name else attr), entry.original


def _split(name: str) -> tuple[str, str]:
    prefix, _, attr = name.rpartition(".")
    return prefix, attr


def _lookup(model: nn.Module, name: str, *, file=None) -> tuple[nn.Module, str, Tensor]:
    """Module owning parameter ``name``, the attribute name, and the base tensor (``original`` when
    parametrized)."""
    prefix, attr = _split(name)
    try:
        module = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        module = None
    if module is not None and "parametrizations" not in prefix.split("."):
        if parametrize.is_parametrized(module, attr):
            return module, attr, module.parametrizations[attr].original
        p = module._parameters.get(attr)
        if p is not None:
            return module, attr, p
    raise ProjectorError(
        f"target {name!r} is not a parameter of the foundation model",
        file=file,
        field=name,
        fix="the deltas were made for another architecture: use the bundle's foundation model",
    )


def resolve_targets(model: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """Parameter names of ``model`` matched in full by any of the regular expressions ``patterns``
    (``None``: :data:`DEFAULT_TARGETS` of :func:`model_family`), in the model's parameter order.

    Raises :class:`ProjectorError` when a pattern is not a valid expression or matches nothing, or
    when it matches a parameter of fewer than two dimensions (a bias or a norm scale cannot carry a
    low-rank delta). When ``model`` is a bare visual tower rather than a CLIP model, the default
    patterns are used without their ``visual.`` prefix.
    """
    if patterns is None:
        patterns = DEFAULT_TARGETS[model_family(model)]
        if not hasattr(model, "visual"):
            patterns = [p.removeprefix(r"visual\.") for p in patterns]
    if isinstance(patterns, str):
        patterns = [patterns]
    params = list(_canonical_parameters(model))
    chosen: dict[str, None] = {}
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ProjectorError(f"{pattern!r} is not a valid regular expression: {e}", field="targets") from None
        hits = [(n, p) for n, p in params if rx.fullmatch(n)]
        if not hits:
            raise ProjectorError(
                f"target pattern {pattern!r} matches no parameter of the model",
                field="targets",
                fix="patterns are matched in full against model.named_parameters() names, "
                "e.g. visual\\.transformer\\.resblocks\\.\\d+\\.attn\\.in_proj_weight",
            )
        for n, p in hits:
            if p.dim() < 2:
                raise ProjectorError(
                    f"target pattern {pattern!r} matches {n!r} of shape {tuple(p.shape)}; "
                    "a low-rank delta needs a parameter of at least 2 dimensions",
                    field="targets",
                    fix="narrow the pattern to weight matrices or kernels (e.g. end it in \\.weight)",
                )
            chosen[n] = None
    return [n for n, _ in params if n in chosen]


def as_matrix_shape(shape: Sequence[int] | torch.Size) -> tuple[int, int]:
    """The ``(out, in)`` matrix a parameter of ``shape`` is treated as: ``(shape[0], prod(shape[1:]))``.

    Raises :class:`ProjectorError` for fewer than two dimensions or a non-positive size.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise ProjectorError(
            f"a low-rank delta needs a parameter shape of >= 2 positive dimensions, got {list(shape)}",
            field="shape",
        )
    return shape[0], math.prod(shape[1:])


def _check_ab(lora_A: Tensor, lora_B: Tensor, shape: Sequence[int] | torch.Size) -> None:
    out_f, in_f = as_matrix_shape(shape)
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
        raise ProjectorError(
            f"lora_A {list(lora_A.shape)} and lora_B {list(lora_B.shape)} are not [rank, in] and [out, rank]",
            field="lora_A",
        )
    if lora_A.shape[1] != in_f or lora_B.shape[0] != out_f:
        raise ProjectorError(
            f"lora_B @ lora_A is {lora_B.shape[0]}x{lora_A.shape[1]}, but the parameter {list(shape)} "
            f"needs {out_f}x{in_f}",
            field="lora_A",
        )


def delta_weight(lora_A: Tensor, lora_B: Tensor, alpha: float, shape: Sequence[int] | torch.Size) -> Tensor:
    """Pure maths: ``(lora_B @ lora_A) * alpha / rank`` reshaped to ``shape``.

    ``lora_A`` is ``[rank, in]`` and ``lora_B`` is ``[out, rank]`` where ``(out, in)`` is
    :func:`as_matrix_shape` of ``shape``; the result has ``lora_A``'s dtype and device and is
    differentiable. The projector's head delta uses it with ``shape = (num_classes, embed_dim)``.
    """
    _check_ab(lora_A, lora_B, shape)
    rank = lora_A.shape[0]
    return (lora_B @ lora_A).mul(alpha / rank).reshape(tuple(shape))


# --------------------------------------------------------------------------------------------------
# The delta module
# --------------------------------------------------------------------------------------------------
class LowRankDelta(nn.Module):
    """A trainable low-rank delta for one parameter of shape ``shape``; ``forward(W) = W + dW``.

    ``lora_A`` ``[rank, in]`` is kaiming-uniform initialised (PEFT's and ``nn.Linear``'s choice,
    ``a=sqrt(5)``, i.e. uniform in ``+-1/sqrt(in)``) from ``generator`` when given; ``lora_B``
    ``[out, rank]`` starts at zero, so a fresh delta leaves the model unchanged (``init=False``:
    A starts at zero too and no random number is drawn). Used as a
    :mod:`torch.nn.utils.parametrize` parametrization by :func:`attach`, or standalone through
    :meth:`delta` (the projector's head delta). ``dW`` is computed in the deltas' dtype (float32 by
    default, even on a half-precision base) and cast to ``W``'s dtype only when added.
    """

    def __init__(
        self,
        shape: Sequence[int] | torch.Size,
        rank: int,
        alpha: float | None = None,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        out_f, in_f = as_matrix_shape(shape)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ProjectorError(f"rank must be an integer >= 1, got {rank!r}", field="rank")
        alpha = float(rank if alpha is None else alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ProjectorError(f"alpha must be a finite number > 0, got {alpha!r}", field="alpha")
        self.shape = tuple(int(s) for s in shape)
        self.rank = rank
        self.alpha = alpha
        # Draw on the generator's own device, then move: the same seed gives the same A on CPU and
        # CUDA when a CPU generator is passed (the usual case).
        gen_device = generator.device if generator is not None else "cpu"
        a = torch.zeros(rank, in_f, dtype=torch.float32, device=gen_device)
        if init:
            bound = 1.0 / math.sqrt(in_f)
            a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, dtype=dtype, device=device))

    @classmethod
    def from_tensors(
        cls, lora_A: Tensor, lora_B: Tensor, alpha: float, shape: Sequence[int] | torch.Size, *, trainable: bool = False
    ) -> "LowRankDelta":
        """A delta holding copies of ``lora_A``/``lora_B`` (shapes checked by :func:`delta_weight`)."""
        _check_ab(lora_A, lora_B, shape)
        # init=False: loading saved deltas must not consume the global random stream.
        mod = cls(shape, int(lora_A.shape[0]), alpha, dtype=lora_A.dtype, device=lora_A.device, init=False)
        with torch.no_grad():
            mod.lora_A.copy_(lora_A)
            mod.lora_B.copy_(lora_B)
        mod.requires_grad_(trainable)
        return mod

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        """``dW`` with the target's shape, in the deltas' dtype."""
        return delta_weight(self.lora_A, self.lora_B, self.alpha, self.shape)

    def forward(self, W: Tensor) -> Tensor:
        return W + self.delta().to(W.dtype)

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, rank={self.rank}, alpha={self.alpha:g}"


def num_delta_parameters(targets: Iterable[LowRankTarget]) -> int:
    """Number of delta parameters ``sum(rank * (out + in))`` over ``targets``."""
    total = 0
    for t in targets:
        o, i = as_matrix_shape(t.shape)
        total += t.rank * (o + i)
    return total


def make_targets(
    model: nn.Module, names: Sequence[str] | None = None, *, rank: int = 4, alpha: float | None = None
) -> list[LowRankTarget]:
    """Manifest entries for ``names`` (``None``: the family defaults via :func:`resolve_targets`)
    with one ``rank`` and ``alpha`` (default ``alpha = rank``, i.e. a scaling of 1), shapes read
    from ``model``. ``names`` may be exact parameter names or patterns."""
    resolved = resolve_targets(model, names)
    alpha = float(rank if alpha is None else alpha)
    out = []
    for n in resolved:
        _, _, p = _lookup(model, n)
        out.append(LowRankTarget(name=n, rank=rank, alpha=alpha, shape=list(p.shape)))
    return out


# --------------------------------------------------------------------------------------------------
# Training form
# --------------------------------------------------------------------------------------------------
def _merged_names(model: nn.Module) -> set[str]:
    names = model.__dict__.get("_hellofmt_merged")
    if names is None:
        names = set()
        model.__dict__["_hellofmt_merged"] = names
    return names


def _refuse_merged(model: nn.Module, targets: Sequence[LowRankTarget], file) -> None:
    # Saved deltas are relative to the plain foundation weights; applying them to weights that
    # already hold a merged delta would count it twice.
    merged = _merged_names(model)
    again = [t.name for t in targets if t.name in merged]
    if again:
        raise ProjectorError(
            "deltas were already merged into this parameter",
            file=file,
            field=again[0],
            fix="load deltas once, into a freshly loaded foundation model",
        )


def _check_target_fits(model: nn.Module, t: LowRankTarget, *, file=None) -> tuple[nn.Module, str, Tensor]:
    module, attr, base = _lookup(model, t.name, file=file)
    if list(base.shape) != list(t.shape):
        raise ProjectorError(
            f"the manifest gives shape {list(t.shape)} but the model's parameter is {list(base.shape)}",
            file=file,
            field=t.name,
            fix="the deltas were made for another architecture: use the bundle's foundation model",
        )
    if base.dim() < 2:
        raise ProjectorError(
            f"parameter of shape {list(base.shape)} cannot carry a low-rank delta", file=file, field=t.name
        )
    if parametrize.is_parametrized(module, attr):
        raise ProjectorError(
            "already carries a delta",
            file=file,
            field=t.name,
            fix="call hellofmt.lowrank.remove(model, merge=...) before attaching or merging again",
        )
    return module, attr, base


def _register(module: nn.Module, attr: str, delta: LowRankDelta) -> None:
    # The base is frozen *before* registering so the ``original`` the parametrization keeps is frozen.
    getattr(module, attr).requires_grad_(False)
    # remove_parametrizations re-registers the parameter last; remembering the order lets remove()
    # put it back, so a merged model's state_dict lists its names exactly like the foundation's.
    delta._param_order = list(module._parameters.keys())
    parametrize.register_parametrization(module, attr, delta)


def attach(
    model: nn.Module,
    targets: Sequence[LowRankTarget],
    *,
    generator: torch.Generator | None = None,
    freeze: bool = True,
) -> dict[str, LowRankDelta]:
    """Training form: register a fresh :class:`LowRankDelta` (B = 0, so the output is unchanged) on
    each target of ``model``; returns them by target name, A and B trainable.

    ``freeze=True`` (the default, as PEFT does) sets ``requires_grad=False`` on every parameter of
    ``model`` that is not a delta; target bases are frozen in any case. Deltas are created in
    float32 on the target's device, in ``targets`` order, drawing ``lora_A`` from ``generator``.
    Raises :class:`ProjectorError` when a target is missing, has another shape, or already has a delta.
    """
    fitted = [(t, *_check_target_fits(model, t)) for t in targets]
    if len({t.name for t in targets}) != len(targets):
        raise ProjectorError("a target is listed twice", field="targets")
    if freeze:
        model.requires_grad_(False)
    deltas: dict[str, LowRankDelta] = {}
    for t, module, attr, base in fitted:
        delta = LowRankDelta(t.shape, t.rank, t.alpha, generator=generator, device=base.device)
        _register(module, attr, delta)
        deltas[t.name] = delta
    return deltas


def deltas_of(model: nn.Module) -> dict[str, LowRankDelta]:
    """Every :class:`LowRankDelta` attached to ``model``, by target name, in module order."""
    out: dict[str, LowRankDelta] = {}
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, LowRankDelta):
                    out[f"{mod_name}.{attr}" if mod_name else attr] = p
    return out


def remove(model: nn.Module, *, merge: bool) -> None:
    """Drop every :class:`LowRankDelta` parametrization from ``model``; ``merge=True`` leaves
    ``W + dW`` in the weights (the inference form), ``merge=False`` restores the base weights.

    Bases stay frozen (``requires_grad=False``). Other parametrizations are refused with
    :class:`ProjectorError` rather than silently removed.
    """
    merged = _merged_names(model)
    for mod_name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        for attr in list(module.parametrizations.keys()):
            plist = module.parametrizations[attr]
            if not any(isinstance(p, LowRankDelta) for p in plist):
                continue
            name = f"{mod_name}.{attr}" if mod_name else attr
            if not all(isinstance(p, LowRankDelta) for p in plist):
                raise ProjectorError(
                    "carries a low-rank delta together with another parametrization; remove that first",
                    field=name,
                )
            order = getattr(plist[0], "_param_order", None)
            with torch.no_grad():
                parametrize.remove_parametrizations(module, attr, leave_parametrized=merge)
            if order:
                for key in order:
                    if key in module._parameters:
                        module._parameters[key] = module._parameters.pop(key)
                for key in [k for k in module._parameters if k not in order]:
                    module._parameters[key] = module._parameters.pop(key)
            if merge:
                merged.add(name)


def delta_tensors(deltas: Mapping[str, LowRankDelta], *, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """``{"<name>.lora_A": [r, in], "<name>.lora_B": [out, r]}`` for saving: detached, contiguous
    CPU copies (cast to ``dtype`` when given), ready for ``safetensors.torch.save_file``."""
    out: dict[str, Tensor] = {}
    for name, d in deltas.items():
        for key, p in (("lora_A", d.lora_A), ("lora_B", d.lora_B)):
            t = p.detach().to("cpu", dtype=dtype or p.dtype).contiguous().clone()
            out[f"{name}.{key}"] = t
    return out


# --------------------------------------------------------------------------------------------------
# Loading and merging
# --------------------------------------------------------------------------------------------------
def check_delta_tensors(
    tensors: Mapping[str, Tensor],
    targets: Sequence[LowRankTarget],
    *,
    file=None,
    dtype: str | torch.dtype | None = None,
    model: nn.Module | None = None,
    ignore_prefixes: tuple[str, ...] = (HEAD_PREFIX,),
) -> None:
    """Check a projector file's tensors against the manifest's targets (and ``model`` if given).

    Raises :class:`ProjectorError` naming ``file`` and the tensor for: a target without its
    ``lora_A``/``lora_B``; a tensor no target accounts for (names under ``ignore_prefixes``, the
    head delta's, are skipped); a value that is not a tensor; a dtype that is not floating, differs
    between A and B, or differs from ``dtype`` (the manifest's ``projector.dtype``); shapes other
    than ``[rank, in]``/``[out, rank]``; a rank disagreeing with the manifest's; non-finite values;
    and, with ``model``, a target missing from the model or of another shape there. Used by
    :func:`load_deltas` and :func:`merge_`; callable without a model (``hellofmt verify``).
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ProjectorError(f"unknown dtype {dtype!r}", file=file, field="projector.dtype")
        dtype = _DTYPES[dtype]
    if len({t.name for t in targets}) != len(targets):
        raise ProjectorError("a target is listed twice", file=file, field="projector.targets")
    expected: dict[str, LowRankTarget] = {}
    for t in targets:
        expected[f"{t.name}.lora_A"] = t
        expected[f"{t.name}.lora_B"] = t
    for key in tensors:
        if key.startswith(ignore_prefixes):
            continue
        if key not in expected:
            raise ProjectorError(
                "unexpected tensor: no target in the manifest's projector.targets accounts for it",
                file=file,
                field=key,
                fix=_FIX_REBUILD,
            )
    for t in targets:
        try:
            out_f, in_f = as_matrix_shape(t.shape)
        except ProjectorError:
            raise ProjectorError(
                f"target shape {list(t.shape)} has fewer than 2 dimensions", file=file, field=t.name
            ) from None
        if model is not None:
            _check_target_fits(model, t, file=file)
        for key, want in ((f"{t.name}.lora_A", (t.rank, in_f)), (f"{t.name}.lora_B", (out_f, t.rank))):
            if key not in tensors:
                raise ProjectorError("missing tensor for a target of the manifest", file=file, field=key, fix=_FIX_REBUILD)
            x = tensors[key]
            if not isinstance(x, Tensor):
                raise ProjectorError(f"expected a tensor, got {type(x).__name__}", file=file, field=key)
            if not x.dtype.is_floating_point:
                raise ProjectorError(f"dtype {x.dtype} is not a floating-point type", file=file, field=key, fix=_FIX_REBUILD)
            if dtype is not None and x.dtype != dtype:
                raise ProjectorError(
                    f"dtype {x.dtype} differs from the manifest's projector.dtype {dtype}",
                    file=file,
                    field=key,
                    fix=_FIX_REBUILD,
                )
            if tuple(x.shape) != want:
                which = "lora_A [rank, in]" if key.endswith("lora_A") else "lora_B [out, rank]"
                rank_axis = 0 if key.endswith("lora_A") else 1
                other = 1 - rank_axis
                if x.dim() == 2 and x.shape[other] == want[other] and x.shape[rank_axis] != t.rank:
                    msg = f"rank {x.shape[rank_axis]} in the tensor, but the manifest says rank {t.rank}"
                else:
                    msg = f"shape {list(x.shape)}, expected {which} = {list(want)}"
                raise ProjectorError(msg, file=file, field=key, fix=_FIX_REBUILD)
            if not bool(torch.isfinite(x).all()):
                raise ProjectorError("contains NaN or infinite values", file=file, field=key, fix=_FIX_REBUILD)
        a, b = tensors[f"{t.name}.lora_A"], tensors[f"{t.name}.lora_B"]
        if a.dtype != b.dtype:
            raise ProjectorError(
                f"lora_A is {a.dtype} but lora_B is {b.dtype}", file=file, field=f"{t.name}.lora_B", fix=_FIX_REBUILD
            )


def load_deltas(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    targets: Sequence[LowRankTarget],
    *,
    file=None,
    trainable: bool = False,
    dtype: str | torch.dtype | None = None,
) -> dict[str, LowRankDelta]:
    """Attach saved deltas to ``model`` in the training form (parametrized, not merged); returns
    them by target name. Everything is checked first (:func:`check_delta_tensors`), so a bad file
    leaves ``model`` untouched. ``trainable=True`` makes A and B trainable (to resume training);
    bases are frozen either way. Tensors are copied to each target's device as float32."""
    check_delta_tensors(tensors, targets, file=file, dtype=dtype, model=model)
    _refuse_merged(model, targets, file)
    deltas: dict[str, LowRankDelta] = {}
    for t in targets:
        module, attr, base = _lookup(model, t.name)
        # float32 like merge_, so the training and inference forms of a half-precision file agree.
        a = tensors[f"{t.name}.lora_A"].to(base.device, torch.float32)
        b = tensors[f"{t.name}.lora_B"].to(base.device, torch.float32)
        delta = LowRankDelta.from_tensors(a, b, t.alpha, t.shape, trainable=trainable)
        _register(module, attr, delta)
        deltas[t.name] = delta
    return deltas


def merge_(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    targets: Sequence[LowRankTarget],
    *,
    file=None,
    dtype: str | torch.dtype | None = None,
) -> None:
    """Inference form: ``W += dW`` in place for every target, once. Everything is checked first
    (:func:`check_delta_tensors`), so a bad file leaves ``model`` untouched.

    ``dW`` is computed in float32 and added to ``W`` in float32 before rounding back to ``W``'s
    dtype, so a half-precision base loses no more than one rounding. Merging a target a second time
    (or one that carries a parametrization) raises :class:`ProjectorError`.
    """
    check_delta_tensors(tensors, targets, file=file, dtype=dtype, model=model)
    _refuse_merged(model, targets, file)
    merged = _merged_names(model)
    with torch.no_grad():
        for t in targets:
            _, _, base = _lookup(model, t.name)
            a = tensors[f"{t.name}.lora_A"].to(base.device, torch.float32)
            b = tensors[f"{t.name}.lora_B"].to(base.device, torch.float32)
            dw = delta_weight(a, b, t.alpha, t.shape)
            base.copy_((base.float() + dw).to(base.dtype))
            merged.add(t.name)
