"""The projector: images in, class logits out, from a foundation model plus low-rank deltas.

``Projector`` is an open_clip image encoder followed by a linear head. The head starts as zero-shot
CLIP: the normalised mean text embedding of each class over the prompt templates, times the model's
logit scale. It is recomputed from the class names whenever a projector is built (never stored), and
then the text tower is dropped. Low-rank deltas adapt encoder weights (:mod:`hellofmt.lowrank`) and
the head (``head.lora_A`` ``[r, D]``, ``head.lora_B`` ``[C, r]``).

The projector file stores the deltas in one of the encodings of spec 5.1 (``float32``, ``float16``,
``bfloat16``, ``int8`` with per-row scales): :meth:`Projector.delta_tensors` and
:meth:`Projector.projector_info` take the encoding, :meth:`Projector.load_deltas` dequantises to
float32 before anything is merged, and :meth:`Projector.round_deltas_` puts a trained projector's
deltas through an encoding, so that its labels and probe are those a loader of the file will get.
:class:`LabelChange` measures how far two sets of logits for the same views are apart.

Two forms, as in :mod:`hellofmt.lowrank`: the *training form* (:meth:`Projector.attach_deltas`,
deltas as parametrizations, trainable) and the *inference form* (:meth:`Projector.merge`,
:meth:`Projector.from_bundle`: deltas added into the weights once, so a label costs one plain
encoder forward).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import lowrank
from .errors import InputError, ProjectorError
from .foundation import LoadedFoundation, load_foundation
from .manifest import PROJECTOR_FILE, HeadDelta, LowRankTarget, ProjectorInfo

if TYPE_CHECKING:
    from .bundle import Bundle

__all__ = ["DEFAULT_TEMPLATES", "zeroshot_weights", "Projector", "check_label_input", "LabelChange"]

# The seven ImageNet prompts OpenAI selected as the best small subset of their 80 (CLIP's
# "Prompt_Engineering_for_ImageNet" notebook); open_clip ships them as
# open_clip.zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES. Strings rather than lambdas, so that the
# manifest can record them.
DEFAULT_TEMPLATES: list[str] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

_PLACEHOLDER = re.compile(r"\{c?\}")


def _template_fn(template: str) -> Callable[[str], str]:
    # One substitution pass for "{}" or "{c}" (both allowed by the manifest); str.format would
    # choke on any other brace in a template or a class name.
    return lambda c: _PLACEHOLDER.sub(lambda _: c, template)


def zeroshot_weights(
    model: nn.Module,
    tokenizer: Callable,
    classes: Sequence[str],
    templates: Sequence[str],
    *,
    device: str | torch.device | None = None,
) -> Tensor:
    """The zero-shot head ``[C, D]`` (float32): for each class, the text embeddings of every template
    filled with the class name, each L2-normalised, averaged, and normalised again; built by
    open_clip's ``build_zero_shot_classifier``. Templates hold ``{}`` (or ``{c}``) where the class
    name goes. ``device`` defaults to the model's."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    classes = list(classes)
    templates = list(templates)
    if not classes or not all(isinstance(c, str) and c for c in classes):
        raise InputError("classes must be a non-empty list of non-empty strings", field="classes")
    if not templates:
        raise InputError("templates must be a non-empty list", field="templates")
    for i, t in enumerate(templates):
        if not isinstance(t, str) or not _PLACEHOLDER.search(t):
            raise InputError(
                f"template {t!r} has no '{{}}' placeholder for the class name",
                field=f"templates[{i}]",
                fix="write templates like 'a photo of a {}.'",
            )
    if device is None:
        device = next(model.parameters()).device
    if getattr(model, "encode_text", None) is None or _text_tower_dropped(model):
        raise ProjectorError("the model's text tower was dropped", field="model", fix="load the foundation again")
    was_training = model.training
    model.eval()
    try:
        w = build_zero_shot_classifier(
            model, tokenizer, classes, [_template_fn(t) for t in templates], num_classes_per_batch=10, device=device
        )
    finally:
        model.train(was_training)
    return w.t().contiguous().float()


def _text_tower_dropped(model: nn.Module) -> bool:
    if "text" in model._modules:
        return model._modules["text"] is None
    return model._modules.get("transformer", False) is None


def _drop_text_tower(model: nn.Module) -> None:
    """Free the text tower: the projector only encodes images once the head is built."""
    names = ("text", "text_decoder") if "text" in model._modules else (
        "transformer",
        "token_embedding",
        "ln_final",
        "positional_embedding",
        "text_projection",
        "attn_mask",
    )
    for name in names:
        if name in model._modules or name in model._parameters or name in model._buffers:
            setattr(model, name, None)


def check_label_input(images: Tensor, *, file=None) -> None:
    """Raise :class:`InputError` unless ``images`` is a non-empty float tensor ``[B, 3, H, W]`` with
    every value in ``[0, 1]`` (NaN fails). The range check is one min/max reduction, which waits for
    the device; :meth:`Projector.forward` itself checks only dtype and shape."""
    _check_structure(images, file=file)
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))
    if not (lo >= 0.0 and hi <= 1.0):
        raise InputError(
            f"image values range over [{lo:g}, {hi:g}], expected [0, 1]",
            file=file,
            field="images",
            fix="pass un-normalised images scaled to [0, 1] (uint8 / 255); the projector normalises itself",
        )


def _check_structure(images: Tensor, *, file=None) -> None:
    if not isinstance(images, Tensor):
        raise InputError(f"expected a torch.Tensor, got {type(images).__name__}", file=file, field="images")
    if not images.dtype.is_floating_point:
        raise InputError(
            f"expected a floating-point tensor in [0, 1], got dtype {str(images.dtype).removeprefix('torch.')}",
            file=file,
            field="images",
            fix="convert uint8 images with images.float() / 255",
        )
    if images.dim() != 4:
        raise InputError(
            f"expected a batch [B, 3, H, W], got shape {list(images.shape)}",
            file=file,
            field="images",
            fix="add a batch dimension with images.unsqueeze(0)" if images.dim() == 3 else None,
        )
    if images.shape[1] != 3:
        raise InputError(
            f"expected 3 channels in dimension 1, got shape {list(images.shape)}",
            file=file,
            field="images",
            fix="channels-last input: use images.permute(0, 3, 1, 2)" if images.shape[-1] == 3 else "pass RGB images",
        )
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise InputError(f"empty batch: shape {list(images.shape)}", file=file, field="images")


class Projector(nn.Module):
    """Foundation image encoder plus zero-shot head plus low-rank deltas: float images
    ``[B, 3, h, w]`` in ``[0, 1]`` of any size to float32 logits ``[B, C]``.

    Building it computes the head (``head_weight = logit_scale * zeroshot_weights(...)``, a
    non-persistent buffer) through the text tower, then drops the text tower from
    ``foundation.model`` unless ``keep_text_tower``. ``logit_scale`` defaults to the model's own
    (``exp(model.logit_scale)``). Attributes: ``foundation``, ``clip`` (the open_clip model),
    ``classes``, ``templates``, ``num_classes``, ``logit_scale`` (float), ``head_weight``,
    ``head`` (the head's :class:`~hellofmt.lowrank.LowRankDelta` in the training form, else None),
    ``autocast`` (bf16 autocast on CUDA, default True).
    """

    def __init__(
        self,
        foundation: LoadedFoundation,
        classes: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        *,
        logit_scale: float | None = None,
        keep_text_tower: bool = False,
    ) -> None:
        super().__init__()
        self.foundation = foundation
        self.clip = foundation.model
        self.classes = list(classes)
        self.templates = list(templates)
        self.num_classes = len(self.classes)
        if logit_scale is None:
            logit_scale = float(self.clip.logit_scale.detach().exp().reshape(-1)[0])
        if not (logit_scale > 0 and logit_scale < float("inf")):
            raise InputError(f"logit_scale must be a positive finite number, got {logit_scale!r}", field="logit_scale")
        self.logit_scale = float(logit_scale)
        zs = zeroshot_weights(self.clip, foundation.tokenizer, self.classes, self.templates)
        self.embed_dim = int(zs.shape[1])
        self.register_buffer("head_weight", zs * self.logit_scale, persistent=False)
        if not keep_text_tower:
            _drop_text_tower(self.clip)
        self.image_size = int(foundation.image_size)
        self.interpolation = foundation.interpolation
        self.register_buffer(
            "mean", torch.tensor(foundation.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(foundation.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.head: lowrank.LowRankDelta | None = None
        self.autocast = True
        self._deltas: dict[str, lowrank.LowRankDelta] = {}
        self._targets: list[LowRankTarget] = []
        self._head_info: HeadDelta | None = None
        self._merged_tensors: dict[str, Tensor] | None = None  # kept for delta_tensors() after merge
        self._encode: Callable[[Tensor], Tensor] = self._features
        self.clip.eval()

    def train(self, mode: bool = True) -> Projector:
        """Set the training flag; the foundation model itself stays in eval mode, always. Its
        BatchNorm statistics (ResNet towers) are part of the pinned weights: updating them while
        the deltas train would make the saved deltas fit weights no loader has."""
        super().train(mode)
        self.clip.eval()
        return self

    # ---- forward ----------------------------------------------------------------------------------
    def preprocess(self, images: Tensor) -> Tensor:
        """Resize float images in ``[0, 1]`` to the foundation's square input size (its own
        interpolation, antialiased) and normalise with its mean and std."""
        x = images.to(torch.float32)
        size = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
            if self.interpolation == "bicubic":
                # Bicubic overshoots; open_clip's reference pipeline resamples 8-bit images, which clip.
                x = x.clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    def _features(self, x: Tensor) -> Tensor:
        return self.clip.encode_image(x)

    def head_matrix(self) -> Tensor:
        """The head ``[C, D]`` in use: ``head_weight`` plus the head delta in the training form."""
        if self.head is None:
            return self.head_weight
        return self.head_weight + self.head.delta().to(self.head_weight.dtype)

    def _logits(self, images: Tensor, autocast: bool) -> Tensor:
        _check_structure(images)
        if images.device != self.head_weight.device:
            raise InputError(
                f"images are on {images.device} but the projector is on {self.head_weight.device}",
                field="images",
                fix=f"move them with images.to({str(self.head_weight.device)!r})",
            )
        x = self.preprocess(images)
        if autocast and x.is_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats = self._encode(x)
        else:
            feats = self._encode(x)
        # Normalised and projected in float32 whatever the autocast: the head is cheap and the
        # logits are what students learn from.
        feats = F.normalize(feats.float(), dim=-1)
        return feats @ self.head_matrix().t()

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, C]`` (float32) for float images ``[B, 3, h, w]`` in ``[0, 1]``; bf16 autocast
        on CUDA when ``self.autocast``. Checks dtype and shape (not the value range: see
        :func:`check_label_input`)."""
        return self._logits(images, self.autocast)

    def forward_float32(self, images: Tensor) -> Tensor:
        """:meth:`forward` without autocast: the reference numbers (probe, tests)."""
        return self._logits(images, False)

    def compile_encoder(self, **kwargs) -> Projector:
        """``torch.compile`` the image encoder (``kwargs`` go to ``torch.compile``); returns self."""
        self._encode = torch.compile(self._features, **kwargs)
        return self

    # ---- deltas -----------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        """True once deltas were merged into the weights (inference form)."""
        return self._merged_tensors is not None

    def _refuse_twice(self) -> None:
        if self._deltas or self.head is not None or self.merged:
            raise ProjectorError(
                "this projector already has deltas",
                field="projector",
                fix="build a new Projector from a freshly loaded foundation",
            )

    def attach_deltas(
        self,
        *,
        rank: int = 4,
        alpha: float | None = None,
        targets: Sequence[str] | None = None,
        head_rank: int | None = None,
        head_alpha: float | None = None,
        generator: torch.Generator | None = None,
    ) -> ProjectorInfo:
        """Training form: fresh low-rank deltas (``lora_B = 0``, so outputs are unchanged) on the
        encoder parameters matched by ``targets`` (regular expressions; ``None``: the family's
        defaults, :data:`hellofmt.lowrank.DEFAULT_TARGETS`) and on the head, with ``head_rank``
        (default ``rank``; 0 for none). ``alpha`` defaults to the rank (scaling 1). The foundation is
        frozen; only ``lora_A``/``lora_B`` train. Returns the manifest's projector section."""
        self._refuse_twice()
        if targets is not None and isinstance(targets, str):
            targets = [targets]
        tlist = lowrank.make_targets(self.clip, list(targets) if targets is not None else None, rank=rank, alpha=alpha)
        head_rank = rank if head_rank is None else head_rank
        head = None
        if head_rank:
            head = lowrank.LowRankDelta(
                (self.num_classes, self.embed_dim), head_rank, head_alpha, generator=generator,
                device=self.head_weight.device,
            )
        self._deltas = lowrank.attach(self.clip, tlist, generator=generator)
        self._targets = tlist
        self.head = head
        self._head_info = HeadDelta(rank=head.rank, alpha=head.alpha) if head is not None else None
        return self.projector_info()

    def delta_parameters(self) -> list[nn.Parameter]:
        """The attached deltas' ``lora_A``/``lora_B`` parameters (encoder targets, then the head): what
        distillation trains. Empty once merged."""
        mods = list(self._deltas.values()) + ([self.head] if self.head is not None else [])
        return [p for m in mods for p in (m.lora_A, m.lora_B)]

    def delta_tensors(self, encoding: str | None = None) -> dict[str, Tensor]:
        """What goes in ``projector.safetensors``: ``<param>.lora_A`` ``[r, in]``,
        ``<param>.lora_B`` ``[out, r]`` and ``head.lora_A`` ``[r, D]``, ``head.lora_B`` ``[C, r]``;
        detached contiguous CPU copies (also after :meth:`merge`).

        Args:
            encoding: ``None``: float32 values; else one of
                :data:`~hellofmt.manifest.DELTA_ENCODINGS`, as the file stores them
                (:func:`hellofmt.lowrank.encode_delta_tensors`; ``int8`` adds each tensor's ``.scale``).
        """
        if self._merged_tensors is not None:
            out = {k: v.clone() for k, v in self._merged_tensors.items()}
        else:
            out = lowrank.delta_tensors(self._deltas, dtype=torch.float32)
            if self.head is not None:
                out.update(lowrank.delta_tensors({"head": self.head}, dtype=torch.float32))
        return lowrank.encode_delta_tensors(out, encoding) if encoding is not None else out

    def projector_info(self, encoding: str = "float32") -> ProjectorInfo:
        """The manifest's ``projector`` section for these deltas (file ``projector.safetensors``)
        stored in ``encoding`` (its ``dtype``; write the tensors with ``delta_tensors(encoding)``)."""
        lowrank.encode_delta_tensors({}, encoding)  # an unknown encoding raises ProjectorError here
        return ProjectorInfo(
            targets=[
                LowRankTarget(name=t.name, rank=t.rank, alpha=t.alpha, shape=list(t.shape)) for t in self._targets
            ],
            file=PROJECTOR_FILE,
            dtype=encoding,
            head=HeadDelta(rank=self._head_info.rank, alpha=self._head_info.alpha) if self._head_info else None,
        )

    def round_deltas_(
        self,
        encoding: str,
        views: Callable[[], Iterable[Tensor]] | None = None,
        *,
        temperature: float = 1.0,
    ) -> dict[str, float]:
        """Replace every delta of the training form by what a file in ``encoding`` gives back
        (encoded, then decoded to float32), in place; ``float32`` changes nothing. Run it before the
        probe (and any fidelity measurement) of a bundle whose deltas are written in ``encoding``:
        the labels recorded are then the loader's. The deltas stay trainable if they were.

        Args:
            encoding: one of :data:`~hellofmt.manifest.DELTA_ENCODINGS`.
            views: a function returning the same batches of float views ``[B, 3, h, w]`` in [0, 1]
                each time it is called; the logits (:meth:`forward_float32`) on them before and after
                are compared with :class:`LabelChange`. Wrap the call in
                :func:`hellofmt.probe.exact_float32` on a GPU, so that TF32 noise is not counted.
            temperature: the label temperature of the comparison.

        Returns:
            :meth:`LabelChange.result` on ``views`` (``{}`` without views).
        """
        if self.merged:
            raise ProjectorError(
                "the deltas are already merged", field="projector",
                fix="round the deltas before merge(), or load the encoded file with load_deltas",
            )
        change = LabelChange(temperature)  # checks the temperature before anything changes
        deltas = dict(self._deltas)
        if self.head is not None:
            deltas["head"] = self.head
        decoded = lowrank.decode_delta_tensors(lowrank.delta_tensors(deltas, encoding=encoding), encoding)
        with torch.no_grad():
            reference = [self.forward_float32(x).cpu() for x in views()] if views is not None else []
            for name, d in deltas.items():
                d.lora_A.copy_(decoded[f"{name}.lora_A"])
                d.lora_B.copy_(decoded[f"{name}.lora_B"])
            if views is not None:
                for ref, x in zip(reference, views(), strict=True):
                    change.update(ref, self.forward_float32(x).cpu())
        return change.result() if views is not None else {}

    def merge(self) -> None:
        """Training form to inference form: add every delta into its weight (and the head delta
        into ``head_weight``) once and drop the parametrizations, so a forward is the plain encoder
        plus one matrix product. Everything is frozen afterwards."""
        if self.merged:
            raise ProjectorError("the deltas are already merged", field="projector")
        saved = self.delta_tensors()
        lowrank.remove(self.clip, merge=True)
        if self.head is not None:
            with torch.no_grad():
                self.head_weight += self.head.delta().to(self.head_weight.dtype)
            self.head = None
        self._deltas = {}
        self._merged_tensors = saved
        self.requires_grad_(False)

    def _check_head_tensors(self, tensors: Mapping[str, Tensor], info: ProjectorInfo, file) -> dict[str, Tensor]:
        head = {k: v for k, v in tensors.items() if k.startswith(lowrank.HEAD_PREFIX)}
        if info.head is None:
            if head:
                raise ProjectorError(
                    "the file has a head delta but the manifest's projector.head is absent",
                    file=file,
                    field=sorted(head)[0],
                    fix="the projector file does not fit the manifest: rebuild the bundle",
                )
            return {}
        target = LowRankTarget(
            name="head", rank=info.head.rank, alpha=info.head.alpha, shape=[self.num_classes, self.embed_dim]
        )
        lowrank.check_delta_tensors(head, [target], file=file, dtype=info.dtype, ignore_prefixes=())
        return lowrank.decode_delta_tensors(head, info.dtype)

    def load_deltas(
        self,
        tensors: Mapping[str, Tensor],
        info: ProjectorInfo,
        *,
        file=None,
        merge: bool = True,
        trainable: bool = False,
    ) -> None:
        """Load saved deltas (a projector file's tensors and the manifest's ``projector`` section),
        merged into the weights (``merge=True``, the inference form) or attached in the training
        form (``trainable`` makes them trainable, to resume training). The tensors are in the
        encoding ``info.dtype`` and are dequantised (``int8``) or cast to float32 before anything
        is merged. Everything is checked first, so a bad file raises :class:`ProjectorError` and
        leaves the projector untouched."""
        self._refuse_twice()
        head = self._check_head_tensors(tensors, info, file)
        body = {k: v for k, v in tensors.items() if not k.startswith(lowrank.HEAD_PREFIX)}
        targets = list(info.targets)
        if merge:
            lowrank.merge_(self.clip, body, targets, file=file, dtype=info.dtype)
            if head:
                with torch.no_grad():
                    dev = self.head_weight.device
                    dw = lowrank.delta_weight(
                        head["head.lora_A"].to(dev, torch.float32),
                        head["head.lora_B"].to(dev, torch.float32),
                        info.head.alpha,
                        (self.num_classes, self.embed_dim),
                    )
                    self.head_weight += dw
            decoded = {**lowrank.decode_delta_tensors(body, info.dtype), **head}
            self._merged_tensors = {
                k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in decoded.items()
            }
            self.requires_grad_(False)
        else:
            self._deltas = lowrank.load_deltas(
                self.clip, body, targets, file=file, trainable=trainable, dtype=info.dtype
            )
            if head:
                dev = self.head_weight.device
                self.head = lowrank.LowRankDelta.from_tensors(
                    head["head.lora_A"].to(dev, torch.float32),
                    head["head.lora_B"].to(dev, torch.float32),
                    info.head.alpha,
                    (self.num_classes, self.embed_dim),
                    trainable=trainable,
                )
        self._targets = targets
        self._head_info = info.head

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        *,
        device: str | torch.device = "cpu",
        check_fingerprint: bool = True,
        compile: bool = False,
        trainable: bool = False,
    ) -> Projector:
        """The bundle's projector in the inference form: foundation resolved from the manifest
        (fingerprint checked; ``check_fingerprint=False`` only warns on a mismatch), head rebuilt
        from the manifest's classes, templates and logit scale, deltas merged from the projector
        file; eval mode, every parameter frozen, optionally ``torch.compile``d. Not under
        ``torch.inference_mode``: its logits are loss targets, and autograd refuses to save
        inference tensors for backward.

        ``trainable=True`` gives the training form instead: the deltas attached unmerged with only
        their ``lora_A``/``lora_B`` trainable (the foundation frozen), to fine-tune them further (what
        ``hellofmt eval`` does to a copy for its random arm when the bundle's projector was adapted to
        its own images); ``compile`` is ignored then."""
        man = bundle.manifest
        if man.foundation.source == "embedded":
            bundle.foundation_path()  # the bundle's own safe-path and presence checks
        foundation = load_foundation(
            man.foundation, bundle_dir=bundle.path, device=device, allow_mismatch=not check_fingerprint
        )
        proj = cls(foundation, man.classes, man.head.templates, logit_scale=man.head.logit_scale)
        tensors = bundle.projector_tensors(device="cpu")
        proj.load_deltas(tensors, man.projector, file=bundle.file(man.projector.file), merge=not trainable,
                         trainable=trainable)
        proj.to(device)
        proj.eval()
        proj.requires_grad_(False)
        if trainable:
            for p in proj.delta_parameters():
                p.requires_grad_(True)
            return proj
        if compile:
            proj.compile_encoder()
        return proj

    def extra_repr(self) -> str:
        form = "merged" if self.merged else ("training" if self._deltas or self.head is not None else "zero-shot")
        return (
            f"classes={self.num_classes}, embed_dim={self.embed_dim}, image_size={self.image_size}, "
            f"logit_scale={self.logit_scale:g}, form={form}"
        )


class LabelChange:
    """How far labels moved: a running comparison of reference logits and new logits for the same views.

    Feed batches with :meth:`update`; :meth:`result` gives, over every view seen: ``kl``, the mean of
    ``KL(softmax(reference / T) || softmax(logits / T))`` at the label temperature ``T``;
    ``top1_agreement``, the fraction of views whose arg-max class is the same; ``max_logit_diff``,
    the largest absolute difference of any logit; and ``views``, the count. Used to measure what a
    delta encoding does to a bundle's labels (``hellofmt compress``, ``hellofmt build --delta-dtype``).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise InputError(f"temperature must be a positive finite number, got {temperature!r}", field="temperature")
        self.temperature = float(temperature)
        self._kl = 0.0
        self._agree = 0
        self._max = 0.0
        self._n = 0

    @torch.no_grad()
    def update(self, reference: Tensor, logits: Tensor) -> None:
        """Add a batch: ``reference`` and ``logits`` ``[B, C]`` for the same ``B`` views."""
        if reference.shape != logits.shape or reference.dim() != 2:
            raise InputError(f"expected two [B, C] logits of one shape, got {list(reference.shape)} and "
                             f"{list(logits.shape)}", field="logits")
        ref, new = reference.double(), logits.to(reference.device).double()
        t = self.temperature
        kl = F.kl_div(F.log_softmax(new / t, 1), F.log_softmax(ref / t, 1), log_target=True, reduction="none").sum(1)
        self._kl += float(kl.sum())
        self._agree += int((ref.argmax(1) == new.argmax(1)).sum())
        if ref.numel():
            self._max = max(self._max, float((ref - new).abs().max()))
        self._n += int(ref.shape[0])

    def result(self) -> dict[str, float]:
        """``{"kl", "top1_agreement", "max_logit_diff", "views"}`` over every batch so far (zeros before any)."""
        n = max(self._n, 1)
        return {"kl": self._kl / n, "top1_agreement": self._agree / n if self._n else 0.0,
                "max_logit_diff": self._max, "views": float(self._n)}
