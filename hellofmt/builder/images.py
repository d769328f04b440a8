"""Image initialisation: distilled images made elsewhere (``--images DIR``) or selection from the originals.

RDED (Sun et al., CVPR 2024) samples many random crops of each class's real images, scores each with
the teacher, keeps the best ``ipc x factor^2`` and stitches ``factor x factor`` of them into each
synthetic image. :func:`rded_images` does that with three rules for what to keep (``--selection``):
``confidence`` (the default, RDED's: the teacher's surest), ``kmeans`` (candidates the teacher
classifies correctly, clustered in the distilled projector's embedding space, one per cluster, the one
nearest its centre: coverage of the class rather than its easiest examples) and ``random``. At
most one candidate per source image is kept while there are enough sources. Below 128 px the
defaults keep whole images (``factor`` 1, ``select_scale`` (1, 1)), read once at the image size
(:func:`.config.load_side`); the student measurements behind that are in benchmarks/README.md.

The candidate pool is RDED's images per class x crops per image (:func:`candidate_pool`; by default
``--candidates`` candidates per kept patch). Under torchrun the classes are split across ranks and the
results gathered; a class's randomness comes from ``(seed, class)``, so the images do not depend on the
number of processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import augment
from ..errors import BuildInputError
from .config import SELECTIONS
from .dist import World, all_gather_blocks, all_gather_json
from .inputs import ImageFolder, TensorData, data_labels, load_all, scan_image_folder

__all__ = ["SELECTIONS", "candidate_pool", "class_generator", "distinct_first", "images_from_folder", "kmeans",
           "rded_images", "stitch"]


def images_from_folder(
    directory, classes: list[str], folders: list[str], image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read pre-made distilled images (an image folder with the same class folders as the training
    data) as uint8 [N,3,S,S] + labels; every class must have at least one image."""
    folder = scan_image_folder(directory, what="--images")
    extra = sorted(set(folder.folders) - set(folders))
    if extra:
        raise BuildInputError(f"class folder(s) not in the training data: {', '.join(extra[:10])}", file=directory,
                              field="--images", fix="use the same class folder names as --train-data")
    missing = sorted(set(folders) - set(folder.folders))
    if missing:
        raise BuildInputError(f"no images for class folder(s): {', '.join(missing[:10])}", file=directory,
                              field="--images", fix="give at least one distilled image per class")
    remap = {i: folders.index(f) for i, f in enumerate(folder.folders)}
    imgs, labels = load_all(folder, list(range(len(folder.samples))), image_size)
    labels = torch.tensor([remap[int(c)] for c in labels], dtype=torch.int64)
    order = torch.argsort(labels, stable=True)
    return imgs[order], labels[order]


def stitch(patches: torch.Tensor, factor: int, image_size: int) -> torch.Tensor:
    """Tile ``[n * factor^2, 3, p, p]`` float patches into ``n`` images of ``image_size``."""
    k = factor * factor
    n, _, p, _ = patches.shape
    grid = patches.view(n // k, factor, factor, 3, p, p).permute(0, 3, 1, 4, 2, 5)
    grid = grid.reshape(n // k, 3, factor * p, factor * p)
    if grid.shape[-1] != image_size:
        grid = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return grid




def kmeans(
    x: torch.Tensor, k: int, *, generator: torch.Generator, iters: int = 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain k-means (k-means++ seeding, Lloyd iterations) on the rows of ``x`` [n, d].
    Returns (assignment [n], centroids [k, d]); deterministic for a given generator."""
    n = x.shape[0]
    k = min(k, n)
    first = int(torch.randint(n, (1,), generator=generator))
    cent = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        w = d2.clamp_min(0).cpu().double()
        i = int(torch.multinomial(w / w.sum(), 1, generator=generator)) if w.sum() > 0 else \
            int(torch.randint(n, (1,), generator=generator))
        cent.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = torch.stack(cent)
    assign = torch.zeros(n, dtype=torch.int64, device=x.device)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=c.shape[0]).unsqueeze(1)
        keep = counts.squeeze(1) > 0
        new[keep] = new[keep] / counts[keep]
        new[~keep] = c[~keep]  # an emptied cluster keeps its centre
        if torch.allclose(new, c):
            break
        c = new
    return assign, c


def distinct_first(order: torch.Tensor, source: torch.Tensor, need: int) -> torch.Tensor:
    """The first ``need`` of the candidate indices ``order``, taking at most one per source image while
    there are enough distinct sources (a small class cycles over its images, and whole-image
    candidates of one source are the same image)."""
    seen: set[int] = set()
    first, rest = [], []
    for i in order.tolist():
        (rest if int(source[i]) in seen else first).append(i)
        seen.add(int(source[i]))
    return torch.tensor((first + rest)[:need], dtype=torch.int64, device=order.device)


def _pick(scores: torch.Tensor, feats: torch.Tensor | None, need: int, selection: str, c_correct: torch.Tensor,
          generator: torch.Generator, source: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``need`` candidates kept for one class (``source``: each candidate's source image)."""
    n = scores.numel()
    if source is None:
        source = torch.arange(n)
    if selection == "random":
        return distinct_first(torch.randperm(n, generator=generator).to(scores.device), source, need)
    if selection == "confidence" or feats is None:
        return distinct_first(scores.argsort(descending=True), source, need)
    # kmeans: cover the class. Candidates the teacher does not put in the class are dropped while
    # enough remain; the rest are clustered into `need` groups in the projector's embedding space and
    # each group is represented by its candidate nearest to the centre (a medoid, not the easiest).
    ok = c_correct.nonzero().flatten()
    if ok.numel() < need:
        ok = scores.topk(min(n, max(need, 2 * need))).indices
    # one candidate per source image (its best-scored), while enough sources remain
    best_per_source = distinct_first(ok[scores[ok].argsort(descending=True)], source, ok.numel())
    n_src = len({int(source[i]) for i in ok.tolist()})
    if n_src >= need:
        ok = best_per_source[:n_src]
    f = feats[ok]
    assign, cent = kmeans(f, need, generator=generator)
    out = []
    for j in range(cent.shape[0]):
        members = (assign == j).nonzero().flatten()
        if members.numel() == 0:
            continue
        d = ((f[members] - cent[j]) ** 2).sum(1)
        out.append(ok[members[d.argmin()]])
    picked = torch.stack(out) if out else ok[:0]
    if picked.numel() < need:  # empty clusters: fill with the most confident of the rest
        rest = torch.ones(n, dtype=torch.bool, device=scores.device)
        rest[picked] = False
        extra = torch.where(rest, scores, torch.full_like(scores, -float("inf")))
        extra = extra.topk(min(n, need) - picked.numel()).indices  # fewer candidates than need: rded_images repeats
        picked = torch.cat([picked, extra])
    return picked[:need]


def class_generator(seed: int, c: int) -> torch.Generator:
    """The CPU generator of class ``c``'s selection (its sources, crops and k-means), seeded from
    ``(seed, c)`` alone: a class gets the same candidates on whichever rank selects it, so the result
    does not depend on the world size."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + (c + 1) * 15_485_863 + 7) % (2**63 - 1))
    return g


def candidate_pool(class_size: int, need: int, candidates: int, *, pool_images: int | None = None,
                   pool_crops: int | None = None, whole: bool = False) -> tuple[int, int, int]:
    """The candidate pool of one class, RDED-style: images drawn x crops per image.

    By default (``pool_images`` and ``pool_crops`` None) the pool is ``need x candidates`` candidates
    (``need`` = ipc x factor^2 kept patches): that many images when the class has them, several crops of
    each otherwise; whole images (``whole``: ``--select-scale 1 1``) give one crop each, since every crop
    of an image is the same image. Given, ``pool_images`` (capped by the class size) and ``pool_crops``
    set the pool as RDED does (its defaults on ImageNet: 300 images x 5 crops).

    Args:
        class_size: the class's training images.
        need: patches kept for the class (ipc x factor^2).
        candidates: ``--candidates``, candidates per kept patch.
        pool_images: ``--pool-images``, images drawn per class.
        pool_crops: ``--pool-crops``, crops per drawn image.
        whole: candidates are whole images.

    Returns:
        (images drawn, crops per image, candidates scored); candidate ``j`` is crop ``j // images`` of
        image ``j % images``.
    """
    target = need * max(1, candidates)
    n_img = max(1, min(class_size, pool_images or target))
    if pool_crops is not None:
        crops = pool_crops
    elif whole:
        crops = 1
    else:
        crops = -(-target // n_img)
    total = n_img * crops
    if pool_images is None and pool_crops is None:
        total = min(total, target)
    return n_img, crops, total


class _ClassSources(torch.utils.data.Dataset):
    """Item ``i``: the uint8 source images of the ``i``-th class a rank selects for, so that a DataLoader's
    workers decode the next classes while the current one is scored."""

    def __init__(self, data: ImageFolder | TensorData, sources: list[list[int]], size: int):
        self.data, self.sources, self.size = data, sources, size

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        # Images that fail to decode are skipped and recorded in data.skipped (inputs.SkippedImages); in a
        # worker process that is the worker's copy, so the new ones travel back with the images.
        skipped = getattr(self.data, "skipped", None)
        known = set(skipped.files) if skipped is not None else set()
        images = load_all(self.data, self.sources[i], self.size)[0]
        failed = [(p, r) for p, r in skipped.files.items() if p not in known] if skipped is not None else []
        return images, failed


@torch.no_grad()
def rded_images(
    data: ImageFolder | TensorData,
    teacher: nn.Module,
    *,
    train_indices: list[int],
    ipc: int,
    factor: int = 2,
    image_size: int = 32,
    load_size: int | None = None,
    candidates: int = 4,
    pool_images: int | None = None,
    pool_crops: int | None = None,
    scale: tuple[float, float] = (0.25, 1.0),
    selection: str = "confidence",
    embed=None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_workers: int | None = 0,
    world: World | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Select and stitch patches: ``ipc`` uint8 images per class at ``image_size``. Each class scores a
    pool of random crops (area fraction in ``scale``) of its own training images (see
    :func:`candidate_pool`: by default ``ipc x factor^2 x candidates`` of them) and keeps
    ``ipc x factor^2``:

    - ``"confidence"`` (RDED): the crops with the highest teacher log-probability of the class;
    - ``"kmeans"``: crops the teacher puts in the class, clustered in the embedding space of ``embed``
      (a callable: float views -> features, e.g. the distilled projector's image encoder), one crop
      nearest each cluster centre: coverage of the class rather than its easiest examples;
    - ``"random"``: crops drawn at random (the control; no teacher involved in the choice).

    Under torchrun (``world`` with several processes) rank ``r`` selects the classes ``c % size == r``
    and every rank gets all the results. A class's randomness is seeded from ``(seed, c)``
    (:func:`class_generator`), so the images do not depend on the world size. Each class's sources are
    decoded by a DataLoader with ``num_workers`` workers (not for in-memory data), overlapping scoring.

    Returns (images, labels, stats: mean teacher confidence of the kept patches, fraction of them the
    teacher classifies correctly), the same on every rank."""
    from tqdm.auto import tqdm

    if ipc < 1 or factor < 1:
        raise BuildInputError("--ipc and --factor must be >= 1", field="--ipc")
    if selection not in SELECTIONS:
        raise BuildInputError(f"unknown selection {selection!r}", field="--selection",
                              fix=f"use one of {', '.join(SELECTIONS)}")
    world = world or World()
    load_size = load_size or image_size
    dev = torch.device(device)
    labels_all = data_labels(data)
    train = torch.tensor(train_indices, dtype=torch.int64)
    num_classes = data.num_classes
    # Checked for every class on every rank, so that all ranks fail together rather than some waiting.
    counts = torch.bincount(labels_all[train], minlength=num_classes) if train.numel() else \
        torch.zeros(num_classes, dtype=torch.int64)
    if (counts == 0).any():
        c = int((counts == 0).nonzero()[0])
        raise BuildInputError(f"class {c} has no training images left after the held-out split",
                              field="--holdout", fix="lower --holdout or add images")
    k = factor * factor
    need = ipc * k
    patch = max(1, image_size // factor)
    whole = float(scale[0]) >= 1.0
    mine = list(range(world.rank, num_classes, world.size))
    by_class = torch.split(train[torch.argsort(labels_all[train], stable=True)], counts.tolist())  # in train order
    gens, plans, sources = {}, {}, []
    for c in mine:
        g = gens[c] = class_generator(seed, c)
        pool = by_class[c]
        n_img, crops, total = candidate_pool(pool.numel(), need, candidates, pool_images=pool_images,
                                             pool_crops=pool_crops, whole=whole)
        sources.append(pool[torch.randperm(pool.numel(), generator=g)[:n_img]].tolist())
        plans[c] = total
    workers = 0 if isinstance(data, TensorData) else (num_workers or 0)  # in-memory data needs no workers
    loader = torch.utils.data.DataLoader(_ClassSources(data, sources, load_size), batch_size=None, shuffle=False,
                                         num_workers=workers, pin_memory=dev.type == "cuda")
    teacher.eval()
    out: dict[int, torch.Tensor] = {}
    stats: dict[int, torch.Tensor] = {}
    bar = tqdm(zip(mine, loader), total=len(mine), desc=f"select patches ({selection})",
               disable=not (progress and world.is_main), dynamic_ncols=True)
    skipped = getattr(data, "skipped", None)
    for c, (imgs, failed) in bar:
        if failed:
            skipped.add(failed)  # raises past --max-bad-images
        g = gens.pop(c)
        if imgs.shape[0] == 0:  # every drawn source failed to decode
            raise BuildInputError(f"no readable candidate images in class {c}", field="--train-data",
                                  fix="delete or re-encode the class's unreadable images")
        imgs = imgs.to(dev, non_blocking=True)
        n_cand = plans[c]
        # candidate j is a crop of source j % n: every source gives one crop before any gives two
        order = torch.arange(imgs.shape[0]).repeat(-(-n_cand // imgs.shape[0]))[:n_cand]
        scores, preds, crops, feats = [], [], [], []
        for s in range(0, n_cand, batch_size):
            idx = order[s:s + batch_size].to(dev)
            boxes = augment.sample_boxes(idx.numel(), scale=tuple(scale), generator=g, device=dev)
            flips = torch.zeros(idx.numel(), dtype=torch.bool, device=dev)
            views = augment.crop_resize(imgs[idx], boxes, flips, image_size)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits = teacher(views).float()
            scores.append(logits.log_softmax(1)[:, c])
            preds.append(logits.argmax(1))
            if selection == "kmeans" and embed is not None:
                feats.append(F.normalize(embed(views).float(), dim=-1))
            crops.append(F.interpolate(views, size=(patch, patch), mode="bilinear", antialias=True,
                                       align_corners=False) if patch != image_size else views)
        scores = torch.cat(scores)
        preds = torch.cat(preds)
        crops = torch.cat(crops)
        best = _pick(scores, torch.cat(feats) if feats else None, need, selection, preds == c, g, source=order)
        if best.numel() < need:  # fewer candidates than patches: reuse the ones kept
            best = best.repeat(-(-need // best.numel()))[:need]
        # Deal patches round-robin so every image mixes strong and weaker patches.
        best = best.view(k, ipc).t().reshape(-1)
        stats[c] = torch.tensor([scores[best].exp().mean().item(), (preds[best] == c).float().mean().item()],
                                dtype=torch.float64)
        out[c] = stitch(crops[best], factor, image_size).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    if skipped is not None and world.size > 1:  # every rank (rank 0 writes the manifest) counts every rank's
        for part in all_gather_json(world, list(skipped.files.items())):
            skipped.add(part)
    images = all_gather_blocks(world, out, [(ipc, 3, image_size, image_size)] * num_classes, torch.uint8)
    st = all_gather_blocks(world, stats, [(2,)] * num_classes, torch.float64)
    labels = torch.arange(num_classes, dtype=torch.int64).repeat_interleave(ipc)
    return torch.cat(images), labels, {"init_teacher_confidence": sum(float(t[0]) for t in st) / num_classes,
                                       "init_teacher_top1": sum(float(t[1]) for t in st) / num_classes}
