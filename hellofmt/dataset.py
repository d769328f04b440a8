"""``DistilledDataset``: a distilled image set whose soft labels are computed on the fly.

A bundle stores images and a projector, never labels. Opening one decodes every image once into a
single uint8 tensor on the device and assembles the projector with its deltas merged into the
weights, so a label costs one plain encoder forward. :meth:`DistilledDataset.loader` then produces,
per batch and entirely on the device, the student's augmented view (random resized crop and flip
as one batched resampling, optional CutMix/MixUp), the projector's soft label for exactly that view
and the hard label. There is no per-sample Python and no host round trip in that path: the
epoch's random numbers are drawn up front and reach the device in one non-blocking copy.

Under ``torchrun`` each rank decodes only its share of the images and the shares are gathered over
the process group (``shard_decode``), so opening costs each rank ``1/world_size`` of the decoding.
Gathering was chosen over one copy per node in shared memory: the images must end up on each rank's
own GPU anyway, a gather is one collective on the group the job already has (no shared-memory
segment to name, size and clean up after a crash), and it works the same across nodes.

``ds[i]`` returns a CPU ``(uint8 CHW tensor, class)`` pair, so a plain
``torch.utils.data.DataLoader`` works too for users with their own pipeline, who then call
:meth:`DistilledDataset.soft_labels` (or :meth:`DistilledDataset.logits`) on their batches.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import BundleNotFoundError, InputError
from .manifest import MANIFEST_NAME, MAX_IMAGE_SIDE, MIX_MODES
from .teacher import IMAGENET_MEAN, IMAGENET_STD, ProjectorTeacher
from .units import format_bytes  # the package's one byte formatter; re-exported (it was defined here)

if TYPE_CHECKING:  # pragma: no cover
    from .bundle import Bundle
    from .projector import Projector

__all__ = ["DistilledDataset", "DistilledLoader", "shard_indices", "resolve_distributed", "format_bytes"]

logger = logging.getLogger(__name__)

# Images stay on the device only when they take at most this share of its free memory: the
# projector's activations and the student need the rest.
DEVICE_MEMORY_FRACTION = 0.5
DEFAULT_LABEL_BATCH = 256
# Training views take augment's fused grid_sample path: 2-4x faster on the CPU than the float64
# separable one, and its ~3e-5 round-off is far below what a random crop changes. The probe keeps
# the exact path, where builder and loader must agree to the last bit that matters.
_EXACT = False
# shard_indices seeds a torch.Generator with seed + epoch, which must fit in an int64.
_SEED_LIMIT = 2**63
_EPOCH_LIMIT = 2**62


# The release that drops the deprecated ``label``/``soft_label`` aliases.
_ALIASES_REMOVED_IN = "0.3.0"


def _deprecated(old: str, new: str) -> None:
    # FutureWarning, not DeprecationWarning: Python hides the latter outside __main__ and tests,
    # and this rename is for users' own training scripts (pandas and timm do the same).
    warnings.warn(
        f"DistilledDataset.{old}() is deprecated and will be removed in hellofmt {_ALIASES_REMOVED_IN}; "
        f"use DistilledDataset.{new} instead",
        FutureWarning,
        stacklevel=3,
    )


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def resolve_distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: the arguments, or ``torch.distributed``'s where left ``None``.

    Without an initialised process group the defaults are ``(0, 1)``. Raises :class:`InputError`
    when ``world_size < 1`` or ``rank`` is not in ``[0, world_size)``.
    """
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if dist_on else 1
    if rank is None:
        rank = torch.distributed.get_rank() if dist_on else 0
    if not _is_int(world_size) or world_size < 1:
        raise InputError(f"world_size must be an integer >= 1, got {world_size!r}", field="world_size")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise InputError(
            f"rank must be an integer in [0, {world_size}), got {rank!r}",
            field="rank",
            fix="pass rank < world_size, or leave both to torch.distributed",
        )
    return rank, world_size


def shard_indices(
    n: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> torch.Tensor:
    """The image indices (int64, CPU) one rank visits in one epoch, like ``DistributedSampler``.

    All ranks draw the same permutation (from ``seed + epoch``) and take every ``world_size``-th
    element starting at ``rank``, so shards are disjoint and together cover the set. When ``n`` is
    not a multiple of ``world_size``: ``drop_last=False`` pads the permutation with its own first
    elements (so a few images appear twice in that epoch, on different ranks, and every rank gets
    the same count), ``drop_last=True`` cuts the tail instead (a few images are skipped that
    epoch). With one process nothing is padded or cut.
    """
    if shuffle:
        g = torch.Generator()
        g.manual_seed(int(seed) + int(epoch))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    if world_size > 1:
        if drop_last:
            order = order[: (n // world_size) * world_size]
        else:
            total = math.ceil(n / world_size) * world_size
            if total > n and n > 0:
                order = order.repeat(math.ceil(total / n))[:total]
    return order[rank::world_size].contiguous()


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(
            f"not a torch device: {device!r}", field="device", fix="use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "device 'cuda' was asked for but CUDA is not available", field="device", fix="use device='cpu'"
        )
    return dev


# Rows of each gather step: at most this many bytes per rank, so that the staging buffer of a
# gather through another device than the images' stays small.
_GATHER_CHUNK_BYTES = 64 * 1024**2


def _shard_comm_device(device: torch.device) -> torch.device | None:
    """Where ``shard_decode`` gathers (the device with NCCL, else the CPU), or ``None`` when there is
    nothing to split (no process group, one process) or the backend cannot reach ``device``."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    backend = str(dist.get_backend()).lower()
    if device.type == "cuda" and "nccl" in backend:
        return device
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    logger.info("hellofmt: process group backend %s cannot gather %s tensors; every rank decodes all images",
                backend, device.type)
    return None


def _error_info(error: BaseException) -> dict:
    """What another rank needs to raise ``error`` again (a JSON object)."""
    from .errors import HellofmtError

    if isinstance(error, HellofmtError):
        return {"type": type(error).__name__, "message": error.message, "file": error.file, "field": error.field,
                "fix": error.fix}
    return {"type": type(error).__name__, "message": str(error)}


def _remote_error(info: dict, rank: int, source: str) -> Exception:
    """The error another rank raised, rebuilt from :func:`_error_info` (JSON, nothing unpickled)."""
    from . import errors

    cls = getattr(errors, str(info.get("type")), None)
    if isinstance(cls, type) and issubclass(cls, errors.HellofmtError):
        return cls(f"[rank {rank}] {info.get('message')}", file=info.get("file"), field=info.get("field"),
                   fix=info.get("fix"))
    return errors.BundleError(
        f"rank {rank} failed while opening its share: {info.get('type')}: {info.get('message')}", file=source,
        fix="see that rank's error for the cause",
    )


def _agree(error: BaseException | None, comm: torch.device, source: str) -> None:
    """Collective: return when no rank failed; otherwise raise on every rank. A rank that failed
    raises its own error, the others the first failed rank's (same class, file, field and fix)."""
    from . import collective

    dist = torch.distributed
    world = dist.get_world_size()
    flags = torch.zeros(world, dtype=torch.int64, device=comm)
    dist.all_gather(list(flags.chunk(world)), torch.tensor([int(error is not None)], device=comm))
    failed = [r for r, f in enumerate(flags.tolist()) if f]
    if not failed:
        return
    src = failed[0]
    info = collective.broadcast_json(_error_info(error) if dist.get_rank() == src else None, src, comm)
    if error is not None:
        raise error
    raise _remote_error(info, src, source)


def _gather_shares(whole: torch.Tensor, share: torch.Tensor, per: int, comm: torch.device) -> None:
    """Collective: every rank's ``share`` (at most ``per`` rows, padded) into ``whole[r * per :]``
    (``world * per`` rows) in rank order, in steps of at most :data:`_GATHER_CHUNK_BYTES` per rank.
    The number of steps depends only on ``per`` and the row size, the same on every rank."""
    dist = torch.distributed
    world = dist.get_world_size()
    rest = tuple(whole.shape[1:])
    row = max(1, math.prod(rest) * whole.element_size())
    step = max(1, _GATHER_CHUNK_BYTES // row)
    direct = whole.device == comm
    for j in range(0, per, step):
        k = min(step, per - j)
        have = max(0, min(k, share.shape[0] - j))
        if have == k and share.device == comm:
            piece = share[j : j + k]
        else:
            piece = torch.zeros((k, *rest), dtype=whole.dtype, device=comm)
            piece[:have].copy_(share[j : j + have])
        if direct:
            dist.all_gather([whole[r * per + j : r * per + j + k] for r in range(world)], piece.contiguous())
        else:
            stage = torch.empty((world, k, *rest), dtype=whole.dtype, device=comm)
            dist.all_gather(list(stage.unbind(0)), piece.contiguous())
            for r in range(world):
                whole[r * per + j : r * per + j + k].copy_(stage[r])


class DistilledDataset:
    """A distilled image set: images from a bundle, soft labels from its projector, on ``device``.

    Args:
        source: a local bundle directory, or a Hugging Face Hub dataset id (``user/name``), which is
            downloaded (and cached) by :func:`hellofmt.hub.pull`.
        device: where images live and labels are computed (default: ``"cuda"`` if available).
        revision: Hub branch, tag or commit (Hub ids only).
        verify: check every file's sha256 and the manifest's probe (the projector must reproduce
            the builder's logits); ``False`` skips both, e.g. for a bundle already verified.
        num_threads: threads used to decode the images (default: one per core).
        label_batch_size: the largest batch :meth:`logits` sends through the projector at once.
        compile: ``torch.compile`` the projector.
        check_fingerprint: refuse foundation weights whose fingerprint differs from the manifest's
            (``False`` only warns; the probe still catches labels that would differ).
        token: Hugging Face token for a private Hub repository (default: the logged-in one).
        shard_decode: under ``torch.distributed`` (an initialised process group of more than one
            process, every rank opening the same bundle), each rank decodes and hash-checks only
            its contiguous ``1/world_size`` share of the images and the shares are gathered over
            the process group (on the device with NCCL, on the CPU with gloo), so every rank ends
            with the whole set at ``1/world_size`` of the decoding. An error on any rank is raised
            on every rank. ``False`` decodes everything on every rank, as a single process does.

    Raises:
        InputError: a bad argument (device, thread count, batch size, ``revision`` with a local path).
        BundleNotFoundError: ``source`` is neither a bundle directory nor a Hub id.
        ManifestError: the manifest is malformed, or of a newer major format version.
        IntegrityError, MissingFileError: a file differs from its manifest entry, or is absent.
        ImageStoreError: an image shard or an image in it is malformed.
        FoundationError: the foundation weights cannot be resolved or do not match the manifest.
        ProjectorError: the projector file does not fit the manifest or the foundation.
        ProbeMismatchError: the assembled projector does not reproduce the builder's probe.
        HubError: (Hub ids) the download failed; see :func:`hellofmt.hub.pull`.

    Attributes: ``bundle``, ``manifest``, ``projector``, ``images`` (uint8 ``[N,3,H,W]``),
    ``targets`` (int64 ``[N]``), ``device``, ``memory_bytes`` (bytes the images and targets take),
    ``image_storage`` (``"device"``, ``"pinned host"`` or ``"host"``), ``decoded_range`` (the
    ``(start, stop)`` image indices this process decoded itself: all of them unless shard-decoded).

    ``ds[i]`` copies one image to the CPU. For a multi-worker ``torch.utils.data.DataLoader``, open
    the dataset with ``device="cpu"`` (worker processes cannot share a parent's CUDA tensors) and
    send its batches to :meth:`soft_labels` on the GPU; :meth:`loader` is the fast path.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        device: str | torch.device | None = None,
        revision: str | None = None,
        verify: bool = True,
        *,
        num_threads: int | None = None,
        label_batch_size: int = DEFAULT_LABEL_BATCH,
        compile: bool = False,
        check_fingerprint: bool = True,
        token: str | bool | None = None,
        shard_decode: bool = True,
    ) -> None:
        from .bundle import Bundle
        from .projector import Projector

        if not _is_int(label_batch_size) or label_batch_size <= 0:
            raise InputError(
                f"label_batch_size must be a positive integer, got {label_batch_size!r}", field="label_batch_size"
            )
        if num_threads is not None and (not _is_int(num_threads) or num_threads < 1):
            raise InputError(f"num_threads must be None or an integer >= 1, got {num_threads!r}", field="num_threads")
        self.device = _resolve_device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.label_batch_size = label_batch_size
        if not isinstance(source, (str, os.PathLike)):
            raise InputError(
                f"expected a bundle path or a Hub id, got {type(source).__name__}",
                field="source",
                fix='pass a directory ("path/to/bundle") or a Hub dataset id ("user/name")',
            )
        self.source = os.fspath(source)
        self.bundle: Bundle
        self.projector: Projector
        comm = _shard_comm_device(self.device) if shard_decode else None
        if comm is not None:
            targets = self._open_sharded(revision, token, verify, num_threads, check_fingerprint, compile, comm)
        else:
            path, pulled = self._resolve(self.source, revision, token, verify)
            # With verify, hub.pull has just checked every sha256; hashing the files a second time
            # buys nothing. Without it, neither hashes.
            self.bundle = Bundle.open(path, verify=verify and not pulled)
            self.manifest = self.bundle.manifest
            self.path = Path(self.bundle.path)

            images, targets = self.bundle.read_images(num_threads=num_threads)
            self.decoded_range = (0, int(images.shape[0]))
            # The projector goes on the device first, so that the images' placement sees the memory
            # that is really left.
            self.projector = Projector.from_bundle(
                self.bundle, device=self.device, check_fingerprint=check_fingerprint, compile=compile
            )
            self.images, self.image_storage = self._place(images)
        self.targets = targets.to(self.images.device)
        # ds[i] reads labels from a CPU copy: one small tensor, and no device sync per item.
        self._targets_cpu = targets.cpu()
        self.memory_bytes = int(self.images.numel() * self.images.element_size() + self.targets.numel() * 8)
        logger.info(
            "hellofmt: %d images of %dx%d take %s in %s memory (%s)",
            len(self),
            self.images.shape[-2],
            self.images.shape[-1],
            format_bytes(self.memory_bytes),
            self.image_storage,
            self.images.device,
        )
        self.verified_probe = False
        if verify:
            from .probe import check_probe

            probe = self.manifest.probe
            if probe is None or not probe.views:
                logger.warning(
                    "hellofmt: %s has no probe; its labels cannot be checked against the builder's", self.path
                )
            else:
                check_probe(
                    self.projector,
                    self.images,
                    probe,
                    file=str(self.path / MANIFEST_NAME),
                    classes=self.manifest.classes,
                )
                self.verified_probe = True

    # ---- opening ---------------------------------------------------------------------------------
    @staticmethod
    def _resolve(source: str, revision: str | None, token, verify: bool = True) -> tuple[Path, bool]:
        if os.path.isdir(source):
            if revision is not None:
                raise InputError(
                    f"revision={revision!r} was given but {source!r} is a local directory",
                    field="revision",
                    fix="revision applies to Hub ids only; drop it or pass a Hub id",
                )
            return Path(source), False
        try:
            from . import hub
        except ImportError:  # pragma: no cover - hub module missing from a partial install
            hub = None
        if hub is not None and hub.is_hub_id(source):
            return Path(hub.pull(source, revision=revision, token=token, verify=verify)), True
        raise BundleNotFoundError(
            "no bundle directory here, and not a Hub id (user/name)",
            file=source,
            fix="pass the path of a bundle directory (with hellofmt.json) or a Hub dataset id",
        )

    def _storage(self, nbytes: int) -> str:
        """Where images of ``nbytes`` go: ``"device"``, or ``"pinned host"`` when they would take
        more than :data:`DEVICE_MEMORY_FRACTION` of the GPU's free memory."""
        if self.device.type != "cuda":
            return "device"
        free, _total = torch.cuda.mem_get_info(self.device)
        if nbytes <= DEVICE_MEMORY_FRACTION * free:
            return "device"
        logger.warning(
            "hellofmt: images take %s, more than half of the %s free on %s; keeping them in pinned host memory",
            format_bytes(nbytes),
            format_bytes(free),
            self.device,
        )
        return "pinned host"

    def _place(self, images: torch.Tensor) -> tuple[torch.Tensor, str]:
        storage = self._storage(images.numel() * images.element_size())
        if storage == "device":
            return (images if self.device.type == "cpu" else images.to(self.device)), "device"
        try:
            return images.pin_memory(), "pinned host"
        except RuntimeError:  # pinning can fail under tight locked-memory limits
            return images, "host"

    def _open_sharded(self, revision, token, verify, num_threads, check_fingerprint, compile, comm) -> torch.Tensor:
        """Open the bundle with this rank decoding its share and the shares gathered (``shard_decode``).

        Everything a rank can fail at (the files, its share's hashes and images, the projector, the
        memory for the whole set) happens before the first collective; the ranks then agree on
        success (:func:`_agree`), so an error on one rank is raised on all instead of leaving the
        others waiting in the gather. Sets ``bundle``, ``manifest``, ``path``, ``projector``,
        ``images``, ``image_storage`` and ``decoded_range``; returns the targets (int64, CPU).
        """
        from .bundle import Bundle
        from .projector import Projector

        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        error = None
        try:
            path, pulled = self._resolve(self.source, revision, token, verify)
            hashes = verify and not pulled
            self.bundle = Bundle.open(path, verify=False)
            self.manifest = self.bundle.manifest
            self.path = Path(self.bundle.path)
            im = self.manifest.images
            if hashes:
                # Every rank checks the files it reads whole; of the image shards, only its own.
                shard_files = {s.file for s in im.shards}
                for name in self.manifest.files:
                    if name not in shard_files:
                        self.bundle.check_hash(name)
            n = im.count
            per = -(-n // world)  # contiguous shares: rank r decodes [r * per, (r + 1) * per)
            self.decoded_range = (min(rank * per, n), min((rank + 1) * per, n))
            share, share_targets = self.bundle.read_images(
                num_threads=num_threads, start=self.decoded_range[0], stop=self.decoded_range[1], verify=hashes
            )
            self.projector = Projector.from_bundle(
                self.bundle, device=self.device, check_fingerprint=check_fingerprint, compile=compile
            )
            storage = self._storage(n * 3 * im.height * im.width)
            # Room for every rank's padded share; the images are its first n rows.
            shape = (world * per, 3, im.height, im.width)
            if storage == "device":
                whole = torch.empty(shape, dtype=torch.uint8, device=self.device)
            else:
                try:
                    whole = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
                except RuntimeError:  # pinning can fail under tight locked-memory limits
                    whole, storage = torch.empty(shape, dtype=torch.uint8), "host"
        except Exception as e:  # every rank must learn of it: _agree raises it again
            error = e
        _agree(error, comm, self.source)
        _gather_shares(whole, share, per, comm)
        targets = torch.empty(world * per, dtype=torch.int64, device=comm)
        _gather_shares(targets, share_targets, per, comm)
        targets = targets[:n].cpu()
        # Each rank saw only its share's labels: the per-class counts are checked on the whole set.
        self.bundle.check_per_class(targets)
        self.images, self.image_storage = whole[:n], storage
        return targets

    # ---- the dataset protocol --------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Image ``i`` as a CPU uint8 ``[3, H, W]`` tensor and its class index."""
        if not _is_int(i) and not (isinstance(i, torch.Tensor) and i.numel() == 1 and not i.is_floating_point()):
            raise TypeError(f"dataset index must be an integer, got {type(i).__name__}")
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"image index out of range for {n} images")
        return self.images[i].cpu(), int(self._targets_cpu[i])

    @property
    def classes(self) -> list[str]:
        """The class names, in label order."""
        return list(self.manifest.classes)

    @property
    def num_classes(self) -> int:
        return len(self.manifest.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the stored images."""
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    @property
    def temperature(self) -> float:
        """The label temperature of the bundle's recipe (the builder's default)."""
        return float(self.manifest.labels.temperature)

    def __repr__(self) -> str:
        h, w = self.image_size
        return (
            f"DistilledDataset({str(self.path)!r}, images={len(self)}x{h}x{w}, classes={self.num_classes}, "
            f"device={self.device}, memory={format_bytes(self.memory_bytes)} ({self.image_storage}))"
        )

    # ---- labels ----------------------------------------------------------------------------------
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The projector's logits for a batch of images: raw scores, not probabilities.

        Any ``h, w``: the projector resizes to its foundation's input size. Large batches go through
        in chunks of ``label_batch_size`` to bound memory; the result does not depend on the split
        beyond float rounding. For training targets use :meth:`soft_labels`, which applies the
        recipe's temperature and the softmax.

        Args:
            images: float ``[B, 3, h, w]`` in [0, 1], on any device.

        Returns:
            float32 logits ``[B, C]`` on ``ds.device``.

        Raises:
            InputError: ``images`` is not a float ``[B, 3, h, w]`` tensor in [0, 1].
        """
        from .projector import check_label_input

        check_label_input(images)
        outs = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.label_batch_size):
                chunk = images[start : start + self.label_batch_size].to(self.device, non_blocking=True)
                outs.append(self.projector(chunk).float())
        return torch.cat(outs) if outs else torch.empty(0, self.num_classes, device=self.device)

    def soft_labels(self, images: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """Soft labels ``softmax(logits(images) / T)``: the targets a student trains on.

        Args:
            images: float ``[B, 3, h, w]`` in [0, 1], on any device.
            temperature: ``T`` (a number > 0); default: the bundle's recipe (:attr:`temperature`).

        Returns:
            float32 probabilities ``[B, C]`` on ``ds.device``; each row sums to 1.

        Raises:
            InputError: bad ``images``, or ``temperature`` not a number > 0.
        """
        t = self._check_temperature(self.temperature if temperature is None else temperature)
        return torch.softmax(self.logits(images) / t, dim=1)

    def label(self, images: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """Deprecated alias of :meth:`logits` (removed in 0.3.0): it returns logits, not labels.

        With ``temperature`` the logits are divided by it, as before the rename.
        """
        _deprecated("label", "logits(images)")
        t = self._check_temperature(temperature) if temperature is not None else None
        logits = self.logits(images)
        return logits / t if t is not None else logits

    def soft_label(self, images: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """Deprecated alias of :meth:`soft_labels` (removed in 0.3.0)."""
        _deprecated("soft_label", "soft_labels(images, temperature)")
        return self.soft_labels(images, temperature=temperature)

    @staticmethod
    def _check_temperature(t) -> float:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise InputError(f"temperature must be a number > 0, got {t!r}", field="temperature")
        return float(t)

    # ---- other images, same projector ------------------------------------------------------------
    def with_images(self, images: torch.Tensor, labels: torch.Tensor) -> DistilledDataset:
        """A dataset of other images labelled by this one's projector: the same manifest, projector
        and device, shared (nothing is copied or reloaded), with ``images`` in place of the bundle's.

        What ``hellofmt eval`` trains its ``random`` arm on: real images labelled by the same
        projector, through the same loader. The bundle on disk is not touched.

        Args:
            images: uint8 ``[N, 3, H, W]`` (any ``H, W``; the loader crops and resizes them).
            labels: int64 class indices ``[N]``, each in ``[0, num_classes)``.

        Returns:
            a new :class:`DistilledDataset` whose ``images``/``targets`` are the given ones (on
            this dataset's image storage device); ``bundle``, ``manifest`` and ``projector`` are
            this dataset's.

        Raises:
            InputError: ``images`` is not a non-empty uint8 ``[N, 3, H, W]`` tensor, or ``labels``
                does not hold ``N`` integers in ``[0, num_classes)``.
        """
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
                or images.shape[1] != 3 or images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
            desc = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"images must be a non-empty uint8 [N, 3, H, W] tensor, got {desc}", field="images")
        n = images.shape[0]
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.shape != (n,):
            desc = f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise InputError(f"labels must be {n} integer class indices, got {desc}", field="labels")
        labels = labels.to(torch.int64).cpu()
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise InputError(f"labels must be in [0, {self.num_classes}), got {int(labels.min())}..{int(labels.max())}",
                             field="labels")
        other = copy.copy(self)  # shares bundle, manifest, projector; the fields below are replaced
        other.images = images.to(self.images.device)
        other.targets = labels.to(self.images.device)
        other._targets_cpu = labels
        other.memory_bytes = int(images.numel() + labels.numel() * 8)
        return other

    # ---- the training loader ---------------------------------------------------------------------
    def loader(
        self,
        batch_size: int = 256,
        image_size: int | Sequence[int] | None = None,
        *,
        scale: Sequence[float] | None = None,
        ratio: Sequence[float] | None = None,
        mix: str | None = None,
        temperature: float | None = None,
        flip: bool | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        epochs: int = 1,
    ) -> DistilledLoader:
        """A loader of on-device training batches: augmented views, their soft labels, hard labels.

        Each batch: the shard's next indices, one batched random-resized-crop + flip to
        ``image_size``, the optional mix, then ``soft = softmax(projector(view) / T)`` for that exact
        view. Iterating the loader runs ``epochs`` epochs from its current epoch and then advances
        it; :meth:`DistilledLoader.set_epoch` sets it, as with ``DistributedSampler``. Batches are a
        pure function of ``(seed, epoch, rank, world_size)``. Arguments left at ``None`` take the
        bundle's label recipe (``manifest.labels``).

        Args:
            batch_size: images per batch (per rank).
            image_size: side ``S`` of the square views the student sees (default: the bundle's own
                image side, the larger one if the stored images are not square). A square ``(S, S)``
                pair is accepted too, so ``image_size=ds.image_size`` works.
            scale: ``(min, max)`` area fraction of the random resized crop, as in torchvision.
            ratio: ``(min, max)`` aspect ratio of the random resized crop, as in torchvision.
            mix: ``"none"``, ``"cutmix"``, ``"mixup"`` or ``"cutmix-mixup"``.
            temperature: ``T`` of the soft labels (a number > 0).
            flip: random horizontal flips (default: on when the recipe's ``augmentation`` names ``flip``).
            shuffle: a new random order each epoch (from ``seed + epoch``); ``False`` keeps index order.
            seed: integer in [0, 2**63): the order and augmentation stream.
            drop_last: drop each rank's last incomplete batch (every batch then has ``batch_size``
                images) and cut the shard tail instead of padding it; see :func:`shard_indices`.
            rank: this process's rank (default: ``torch.distributed``'s, else 0).
            world_size: the number of processes (default: ``torch.distributed``'s, else 1).
            epochs: epochs one iteration of the loader runs (>= 1).

        Returns:
            A :class:`DistilledLoader`. Each batch is ``(images, soft, hard)``: float
            ``[B, 3, S, S]`` in [0, 1], float32 ``[B, C]`` probabilities, and int64 ``[B]`` classes
            (the class of the image that dominates the view), all on ``ds.device``.

        Raises:
            InputError: an argument out of range or of the wrong type.
        """
        return DistilledLoader(
            self,
            batch_size=batch_size,
            image_size=self._view_side(image_size),
            scale=scale,
            ratio=ratio,
            mix=mix,
            temperature=temperature,
            flip=flip,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            epochs=epochs,
        )

    def _view_side(self, image_size: int | Sequence[int] | None) -> object:
        """``loader``'s ``image_size`` as one side: None -> the stored images' (larger) side; a square
        ``(S, S)`` pair -> ``S``. Anything else is passed on for :class:`DistilledLoader` to check."""
        if image_size is None:
            return max(self.image_size)
        if isinstance(image_size, (tuple, list)):
            if len(image_size) == 2 and _is_int(image_size[0]) and image_size[0] == image_size[1]:
                return int(image_size[0])
            raise InputError(
                f"image_size must be one side S or a square (S, S) pair, got {tuple(image_size)!r}",
                field="image_size", fix="the loader's views are square: give one side, e.g. image_size=32",
            )
        return image_size

    # ---- the projector as a teacher model --------------------------------------------------------
    def as_teacher(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        temperature: float | None = None,
    ) -> ProjectorTeacher:
        """The projector as a drop-in teacher ``nn.Module``: a tool's normalised images in, logits out.

        For tools built around a live teacher model. The module un-normalises its input with
        ``mean``/``std`` (what the tool's ``transforms.Normalize`` used), clamps to [0, 1] and returns
        the projector's logits; it owns no parameters (an empty ``state_dict``), stays in eval mode
        whatever ``.train()`` says, accepts any input size and device, and returns logits on the
        input's device in its dtype. The logits' class order is the bundle's (``ds.classes``): the
        tool's labels must use the same order (``ImageFolder`` sorts its class folders by name).

        - SRe2L ``validate/train_KD.py`` and RDED ``validation/main.py`` (both normalise with
          ImageNet's mean and std, the default here): replace the teacher they load with
          ``teacher_model = DistilledDataset(BUNDLE, device="cuda").as_teacher()``; their
          ``nn.DataParallel(teacher_model).cuda()``, ``.eval()``, ``requires_grad = False`` loop and
          ``softmax(teacher_model(images) / T)`` then work unchanged.
        - DD-Ranking: see ``examples/ddranking_eval.py``; for its CIFAR-10/100 datasets pass
          ``mean=hellofmt.teacher.CIFAR_MEAN, std=hellofmt.teacher.CIFAR_STD``.

        Args:
            mean: per-channel mean of the tool's normalisation (default: ImageNet's, as torchvision,
                timm, SRe2L and RDED use); ``(0, 0, 0)`` with ``std=(1, 1, 1)`` for images in [0, 1].
            std: per-channel standard deviation of the tool's normalisation (3 numbers > 0).
            temperature: divide the logits by it (a number > 0); ``None`` (default) returns raw
                logits, for tools that apply their own temperature.

        Returns:
            A :class:`~hellofmt.teacher.ProjectorTeacher` sharing this dataset's projector.

        Raises:
            InputError: ``mean``, ``std`` or ``temperature`` malformed (the error names the field).
        """
        return ProjectorTeacher(self.projector, mean=mean, std=std, temperature=temperature)


class DistilledLoader:
    """Iterable of on-device ``(images, soft, hard)`` batches; made by :meth:`DistilledDataset.loader`."""

    def __init__(
        self,
        dataset: DistilledDataset,
        *,
        batch_size: int,
        image_size: int,
        scale,
        ratio,
        mix,
        temperature,
        flip: bool | None,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int | None,
        world_size: int | None,
        epochs: int,
    ) -> None:
        recipe = dataset.manifest.labels
        if not _is_int(batch_size) or batch_size <= 0:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}", field="batch_size")
        if not _is_int(image_size) or not 1 <= image_size <= MAX_IMAGE_SIDE:
            raise InputError(
                f"image_size must be an integer in [1, {MAX_IMAGE_SIDE}], got {image_size!r}", field="image_size"
            )
        if not _is_int(seed) or not 0 <= seed < _SEED_LIMIT:
            raise InputError(f"seed must be an integer in [0, 2**63), got {seed!r}", field="seed")
        if not _is_int(epochs) or epochs < 1:
            raise InputError(f"epochs must be an integer >= 1, got {epochs!r}", field="epochs")
        from .augment import check_range

        self.scale = check_range("scale", recipe.scale if scale is None else scale, 0.0, 1.0)
        self.ratio = check_range("ratio", recipe.ratio if ratio is None else ratio, 0.0, None)
        self.mix = recipe.mix if mix is None else mix
        if self.mix is False:
            self.mix = "none"
        if self.mix not in MIX_MODES:
            raise InputError(f"mix must be one of {', '.join(MIX_MODES)}, got {mix!r}", field="mix")
        self.temperature = DistilledDataset._check_temperature(
            recipe.temperature if temperature is None else temperature
        )
        self.rank, self.world_size = resolve_distributed(rank, world_size)
        self.dataset = dataset
        self.batch_size = batch_size
        self.image_size = image_size
        self.flip = ("flip" in recipe.augmentation) if flip is None else bool(flip)
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.epochs = epochs
        self.epoch = 0
        self.device = dataset.device
        foundation = getattr(dataset.projector, "foundation", None)
        self.foundation_size = int(getattr(foundation, "image_size", 0) or 0)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run epoch ``epoch`` (order and augmentation from ``seed + epoch``)."""
        if not _is_int(epoch) or not 0 <= epoch < _EPOCH_LIMIT:
            raise InputError(f"epoch must be an integer in [0, 2**62), got {epoch!r}", field="epoch")
        self.epoch = epoch

    @property
    def samples_per_epoch(self) -> int:
        """Images this rank sees per epoch (padding included, tail dropped if ``drop_last``)."""
        n, w = len(self.dataset), self.world_size
        if w == 1:
            per = n
        elif self.drop_last:
            per = n // w
        else:
            per = math.ceil(n / w)
        return (per // self.batch_size) * self.batch_size if self.drop_last else per

    def __len__(self) -> int:
        """Batches per iteration (all ``epochs`` of it)."""
        per = self.samples_per_epoch
        batches = per // self.batch_size if self.drop_last else math.ceil(per / self.batch_size)
        return batches * self.epochs

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        start = self.epoch
        self.epoch = start + self.epochs
        return self._run(start)

    def _run(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for epoch in range(start, start + self.epochs):
            yield from self.epoch_batches(epoch)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """The image indices (CPU) this rank visits in ``epoch``, in order."""
        idx = shard_indices(
            len(self.dataset),
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=epoch,
            drop_last=self.drop_last,
        )
        if self.drop_last:
            idx = idx[: (idx.numel() // self.batch_size) * self.batch_size]
        return idx

    def _generator(self, epoch: int) -> torch.Generator:
        # A CPU generator: hellofmt.augment.sample_epoch draws the epoch's random numbers on it and
        # sends them to the device in one non-blocking copy, so the same seed gives the same views
        # on the CPU and on CUDA, and batch-level choices need no device->host sync. Augmentation
        # differs per rank but is a pure function of (seed, epoch, rank).
        key = (int(self.seed) * 1_000_003 + int(epoch)) * 10_007 + self.rank
        g = torch.Generator()
        g.manual_seed(key & ((1 << 62) - 1))
        return g

    def epoch_draws(self, epoch: int):
        """The random choices of every batch of ``epoch`` (:func:`hellofmt.augment.sample_epoch`),
        on the device: a pure function of ``(seed, epoch, rank, world_size)``."""
        from . import augment

        n = self.epoch_indices(epoch).numel()
        sizes = [min(self.batch_size, n - s) for s in range(0, n, self.batch_size)]
        h, w = self.dataset.image_size
        return augment.sample_epoch(
            sizes, scale=self.scale, ratio=self.ratio, aspect=w / h, flip=self.flip, mix=self.mix,
            generator=self._generator(epoch), device=self.device,
        )

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of one epoch (does not touch the loader's own epoch counter)."""
        ds = self.dataset
        idx_all = self.epoch_indices(epoch)
        on_device = ds.images.device == self.device
        draws = self.epoch_draws(epoch)
        if on_device:
            idx_all = _to_device(idx_all, self.device)
        for k, start in enumerate(range(0, idx_all.numel(), self.batch_size)):
            idx = idx_all[start : start + self.batch_size]
            if on_device:
                src = ds.images.index_select(0, idx)
                hard = ds.targets.index_select(0, idx)
            else:
                # Gathered straight into pinned memory, so the copy really is asynchronous.
                src = _to_device(_pinned_index_select(ds.images, idx), self.device)
                hard = _to_device(ds._targets_cpu.index_select(0, idx), self.device)
            yield self._make_batch(src, hard, draws[k])

    def _make_batch(self, src, hard, draws):
        from . import augment

        boxes, flips, mode = draws.boxes, draws.flips, draws.mode
        with torch.no_grad():
            # One uint8 -> float conversion serves both the student's and the projector's views.
            x = augment.to_float(src)
            view = augment.crop_resize(x, boxes, flips, self.image_size, exact=_EXACT)
            label_view = view
            resample = self.foundation_size and self.foundation_size != self.image_size
            if mode != "none":
                perm = draws.perm
                if mode == "cutmix":
                    view, lam = augment.paste(view, perm, draws.cut)
                else:
                    lam = draws.lam
                    view = augment.blend(view, perm, lam)
                # The hard label follows whichever image covers most of the view.
                hard = torch.where(lam >= 0.5, hard, hard.index_select(0, perm))
                label_view = view
                if resample:
                    # Both mixes are redone on a view resampled from the source at the
                    # foundation's size (the same crop, flip, partner and cut), rather than
                    # resizing the student's view: a small student view would lose detail.
                    f = augment.crop_resize(x, boxes, flips, self.foundation_size, exact=_EXACT)
                    if mode == "cutmix":
                        label_view, _ = augment.paste(f, perm, draws.cut)
                    else:
                        label_view = augment.blend(f, perm, lam)
            elif resample:
                # Resample the projector's view from the same source boxes rather than resizing
                # the student's view a second time.
                label_view = augment.crop_resize(x, boxes, flips, self.foundation_size, exact=_EXACT)
            logits = ds_forward(self.dataset.projector, label_view)
            soft = torch.softmax(logits.float() / self.temperature, dim=1)
        return view, soft, hard


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from the CPU to CUDA through pinned memory, without blocking the host."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        try:
            t = t.pin_memory()
        except RuntimeError:  # pinning can fail under tight locked-memory limits
            pass
    return t.to(device, non_blocking=True)


def _pinned_index_select(images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``images[idx]`` (CPU) written into pinned memory when the images are pinned (host storage)."""
    if not images.is_pinned():
        return images.index_select(0, idx)
    try:
        out = torch.empty((idx.numel(), *images.shape[1:]), dtype=images.dtype, pin_memory=True)
    except RuntimeError:
        return images.index_select(0, idx)
    return torch.index_select(images, 0, idx, out=out)


def ds_forward(projector, images: torch.Tensor) -> torch.Tensor:
    """The projector's logits for a batch built by the loader (already checked, already on device)."""
    return projector(images)
