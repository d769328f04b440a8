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

Saved deltas are stored in one of the encodings of spec 5.1 (the manifest's ``projector.dtype``):
``float32``, ``float16``, ``bfloat16``, or ``int8``, symmetric with one float32 scale per row
(:func:`quantize_int8`; the scale sits beside its tensor as ``<name>.lora_A.scale``). Files are
checked against their encoding (:func:`check_delta_tensors`) and decoded to float32
(:func:`decode_delta_tensors`) before any ``dW`` is computed; :func:`encode_delta_tensors` writes them.

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
from .manifest import DELTA_ENCODINGS, QUANTIZED_ENCODINGS, SCALE_SUFFIX, LowRankTarget

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
    "quantize_int8",
    "dequantize_int8",
    "encode_delta_tensors",
    "decode_delta_tensors",
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
# Symmetric int8: values in [-INT8_MAX, INT8_MAX]; -128 is never written, so negating a value is exact.
INT8_MAX = 127
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
    ) -> LowRankDelta:
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


def delta_tensors(
    deltas: Mapping[str, LowRankDelta], *, dtype: torch.dtype | None = None, encoding: str | None = None
) -> dict[str, Tensor]:
    """``{"<name>.lora_A": [r, in], "<name>.lora_B": [out, r]}`` for saving: detached, contiguous
    CPU copies, ready for ``safetensors.torch.save_file``.

    Args:
        deltas: the deltas by target name (:func:`attach`, :func:`deltas_of`).
        dtype: cast the copies to this dtype (default: the deltas' own).
        encoding: instead, encode them for a projector file (:func:`encode_delta_tensors`): one of
            :data:`~hellofmt.manifest.DELTA_ENCODINGS`; ``int8`` adds each tensor's ``.scale``.
    """
    out: dict[str, Tensor] = {}
    for name, d in deltas.items():
        for key, p in (("lora_A", d.lora_A), ("lora_B", d.lora_B)):
            t = p.detach().to("cpu", dtype=dtype or p.dtype).contiguous().clone()
            out[f"{name}.{key}"] = t
    return encode_delta_tensors(out, encoding) if encoding is not None else out


# --------------------------------------------------------------------------------------------------
# Encodings (spec 5.1): float32, float16, bfloat16, int8 (symmetric, one float32 scale per row)
# --------------------------------------------------------------------------------------------------
def _encoding(dtype: str | torch.dtype | None, file=None) -> str | None:
    """The encoding name for a ``projector.dtype`` value (a torch dtype is taken by its name)."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if name not in DELTA_ENCODINGS:
        raise ProjectorError(
            f"unknown delta encoding {name!r} (known: {', '.join(DELTA_ENCODINGS)})",
            file=file,
            field="projector.dtype",
            fix="use one of the known encodings; a bundle naming another was written by a newer hellofmt: upgrade",
        )
    return name


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per row of the matrix ``x`` ``[rows, cols]``.

    ``scale[i] = max_j |x[i, j]| / 127`` (1 for an all-zero row, so that every scale is positive) and
    ``q = round(x / scale)`` in ``[-127, 127]``; :func:`dequantize_int8` gives back ``x`` within half
    a step (``scale / 2``) per element. Computed in float32 on ``x``'s device.

    Returns:
        ``(q, scale)``: int8 ``[rows, cols]`` and float32 ``[rows]``, contiguous.

    Raises:
        ProjectorError: ``x`` is not a 2-D floating-point tensor, or holds NaN or infinite values.
    """
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
        raise ProjectorError(f"int8 encoding needs a 2-D floating-point matrix, got {getattr(x, 'shape', x)!r}")
    x = x.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ProjectorError("cannot encode NaN or infinite delta values", fix="the deltas diverged: retrain them")
    amax = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0], device=x.device)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(x / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """The float32 matrix ``q * scale[:, None]`` (spec 5.1's dequantisation rule), on ``q``'s device."""
    return q.to(torch.float32) * scale.to(q.device, torch.float32)[:, None]


def encode_delta_tensors(tensors: Mapping[str, Tensor], encoding: str) -> dict[str, Tensor]:
    """Float ``lora_A``/``lora_B`` tensors (any names, e.g. :func:`delta_tensors`' or the head's) as
    a projector file stores them in ``encoding``: cast (``float32``, ``float16``, ``bfloat16``), or
    :func:`quantize_int8` with the scale beside each as ``<name>.scale`` (``int8``). Detached,
    contiguous CPU tensors.

    Raises:
        ProjectorError: an unknown encoding, a tensor that is not a floating-point tensor, a name that
            already ends in ``.scale`` (the input is encoded already), or NaN/inf values for int8.
    """
    enc = _encoding(encoding)
    out: dict[str, Tensor] = {}
    for name, x in tensors.items():
        if name.endswith(SCALE_SUFFIX) or not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise ProjectorError(
                "expected float lora tensors to encode", field=name,
                fix="decode an encoded file first (hellofmt.lowrank.decode_delta_tensors)",
            )
        x = x.detach().to("cpu")
        if enc in QUANTIZED_ENCODINGS:
            q, scale = quantize_int8(x)
            out[name] = q
            out[name + SCALE_SUFFIX] = scale
        else:
            out[name] = x.to(_DTYPES[enc]).contiguous().clone()
    return out


def decode_delta_tensors(tensors: Mapping[str, Tensor], encoding: str | None) -> dict[str, Tensor]:
    """A projector file's tensors in ``encoding`` as float32 ``lora_A``/``lora_B`` (scales applied
    and dropped); ``None``: cast each tensor to float32. Checks nothing: call
    :func:`check_delta_tensors` first (as :func:`load_deltas` and :func:`merge_` do)."""
    quantized = _encoding(encoding) in QUANTIZED_ENCODINGS
    out: dict[str, Tensor] = {}
    for name, x in tensors.items():
        if name.endswith(SCALE_SUFFIX) and quantized:
            continue
        out[name] = dequantize_int8(x, tensors[name + SCALE_SUFFIX]) if quantized else x.to(torch.float32)
    return out


# --------------------------------------------------------------------------------------------------
# Loading and merging
# --------------------------------------------------------------------------------------------------
_DISAGREE = "the manifest's projector.dtype and the file disagree on the encoding: rebuild or re-encode the bundle"


def _check_scale(tensors: Mapping[str, Tensor], key: str, rows: int, file) -> None:
    """The per-row scale of the int8 tensor ``key``: float32 ``[rows]``, finite, > 0."""
    skey = key + SCALE_SUFFIX
    if skey not in tensors:
        raise ProjectorError("missing tensor: int8 deltas need one float32 scale per row beside each tensor",
                             file=file, field=skey, fix=_FIX_REBUILD)
    s = tensors[skey]
    if not isinstance(s, Tensor):
        raise ProjectorError(f"expected a tensor, got {type(s).__name__}", file=file, field=skey)
    if s.dtype != torch.float32:
        raise ProjectorError(f"dtype {str(s.dtype).removeprefix('torch.')}, int8 scales are float32",
                             file=file, field=skey, fix=_FIX_REBUILD)
    if tuple(s.shape) != (rows,):
        raise ProjectorError(f"shape {list(s.shape)}, expected one scale per row of {key}: [{rows}]",
                             file=file, field=skey, fix=_FIX_REBUILD)
    if not bool(torch.isfinite(s).all()):
        raise ProjectorError("contains NaN or infinite scales", file=file, field=skey, fix=_FIX_REBUILD)
    if rows and not bool((s > 0).all()):
        raise ProjectorError(f"scale {float(s.min()):g} is not > 0: every int8 scale must be positive",
                             file=file, field=skey, fix=_FIX_REBUILD)


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

    ``dtype`` is the manifest's ``projector.dtype``, the delta encoding (spec 5.1); ``None`` accepts
    float tensors of any one dtype. Raises :class:`ProjectorError` naming ``file`` and the tensor
    for: an unknown encoding; a target without its ``lora_A``/``lora_B`` (or, for ``int8``, their
    ``.scale``); a tensor no target accounts for (names under ``ignore_prefixes``, the head delta's,
    are skipped), including a scale under a float encoding; a value that is not a tensor; a dtype
    other than the encoding's (``int8`` for int8, else floating, the same for A and B, and equal
    to ``dtype`` when given); shapes other than ``[rank, in]``/``[out, rank]``; a rank disagreeing
    with the manifest's; non-finite values, or an int8 value of -128 (the encoding is symmetric);
    scales that are not float32 ``[rows]``, finite and > 0; and, with ``model``, a target missing
    from the model or of another shape there. Used by :func:`load_deltas` and :func:`merge_`;
    callable without a model (``hellofmt verify``).
    """
    enc = _encoding(dtype, file)
    quantized = enc in QUANTIZED_ENCODINGS
    want_dtype = _DTYPES.get(enc) if enc is not None else None
    if len({t.name for t in targets}) != len(targets):
        raise ProjectorError("a target is listed twice", file=file, field="projector.targets")
    expected: dict[str, LowRankTarget] = {}
    for t in targets:
        expected[f"{t.name}.lora_A"] = t
        expected[f"{t.name}.lora_B"] = t
    for key in tensors:
        if key.startswith(ignore_prefixes):
            continue
        if quantized and key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in expected:
            continue
        if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in expected:
            raise ProjectorError(
                f"an int8 scale, but the manifest's projector.dtype is {enc or 'a float encoding'}, which stores none",
                file=file, field=key, fix=_DISAGREE,
            )
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
                raise ProjectorError(
                    "missing tensor for a target of the manifest", file=file, field=key, fix=_FIX_REBUILD
                )
            x = tensors[key]
            if not isinstance(x, Tensor):
                raise ProjectorError(f"expected a tensor, got {type(x).__name__}", file=file, field=key)
            got = str(x.dtype).removeprefix("torch.")
            if quantized and x.dtype != torch.int8:
                raise ProjectorError(f"dtype {got}, but the manifest's projector.dtype int8 needs int8 tensors",
                                     file=file, field=key, fix=_DISAGREE)
            if not quantized and not x.dtype.is_floating_point:
                fix = _DISAGREE if x.dtype == torch.int8 else _FIX_REBUILD
                raise ProjectorError(f"dtype {got} is not a floating-point type", file=file, field=key, fix=fix)
            if want_dtype is not None and x.dtype != want_dtype:
                raise ProjectorError(
                    f"dtype {got} differs from the manifest's projector.dtype {enc}",
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
            if quantized:
                if x.numel() and int(x.min()) < -INT8_MAX:
                    raise ProjectorError(f"value {int(x.min())} is outside the symmetric int8 range "
                                         f"[-{INT8_MAX}, {INT8_MAX}]", file=file, field=key, fix=_FIX_REBUILD)
                _check_scale(tensors, key, want[0], file)
            elif not bool(torch.isfinite(x).all()):
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
    them by target name. ``dtype`` is the file's encoding (the manifest's ``projector.dtype``).
    Everything is checked first (:func:`check_delta_tensors`), so a bad file leaves ``model``
    untouched. ``trainable=True`` makes A and B trainable (to resume training); bases are frozen
    either way. Tensors are dequantised or cast to float32 (:func:`decode_delta_tensors`) and copied
    to each target's device."""
    check_delta_tensors(tensors, targets, file=file, dtype=dtype, model=model)
    _refuse_merged(model, targets, file)
    decoded = decode_delta_tensors(_own(tensors, targets), dtype)
    deltas: dict[str, LowRankDelta] = {}
    for t in targets:
        module, attr, base = _lookup(model, t.name)
        # float32 like merge_, so the training and inference forms of a half-precision file agree.
        a = decoded[f"{t.name}.lora_A"].to(base.device, torch.float32)
        b = decoded[f"{t.name}.lora_B"].to(base.device, torch.float32)
        delta = LowRankDelta.from_tensors(a, b, t.alpha, t.shape, trainable=trainable)
        _register(module, attr, delta)
        deltas[t.name] = delta
    return deltas


def _own(tensors: Mapping[str, Tensor], targets: Sequence[LowRankTarget]) -> dict[str, Tensor]:
    """The tensors of ``targets`` (with their scales), leaving out the head's."""
    names = {t.name for t in targets}
    return {k: v for k, v in tensors.items() if k.removesuffix(SCALE_SUFFIX).rpartition(".")[0] in names}


def merge_(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    targets: Sequence[LowRankTarget],
    *,
    file=None,
    dtype: str | torch.dtype | None = None,
) -> None:
    """Inference form: ``W += dW`` in place for every target, once. ``dtype`` is the file's encoding
    (the manifest's ``projector.dtype``). Everything is checked first (:func:`check_delta_tensors`),
    so a bad file leaves ``model`` untouched.

    The deltas are dequantised or cast to float32 first (:func:`decode_delta_tensors`); ``dW`` is
    computed in float32 and added to ``W`` in float32 before rounding back to ``W``'s dtype, so a
    half-precision base loses no more than one rounding. Merging a target a second time (or one
    that carries a parametrization) raises :class:`ProjectorError`.
    """
    check_delta_tensors(tensors, targets, file=file, dtype=dtype, model=model)
    _refuse_merged(model, targets, file)
    decoded = decode_delta_tensors(_own(tensors, targets), dtype)
    merged = _merged_names(model)
    with torch.no_grad():
        for t in targets:
            _, _, base = _lookup(model, t.name)
            a = decoded[f"{t.name}.lora_A"].to(base.device, torch.float32)
            b = decoded[f"{t.name}.lora_B"].to(base.device, torch.float32)
            dw = delta_weight(a, b, t.alpha, t.shape)
            base.copy_((base.float() + dw).to(base.dtype))
            merged.add(t.name)
