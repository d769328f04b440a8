"""Image initialisation: distilled images made elsewhere (``--images DIR``) or selection from the originals.

RDED (Sun et al., CVPR 2024) samples many random crops of each class's real images, scores each with
the teacher, keeps the best ``ipc x factor^2`` and stitches ``factor x factor`` of them into each
synthetic image. :func:`rded_images` does that with three rules for what to keep (``--selection``):
``kmeans`` (the default: candidates the teacher classifies correctly, clustered in the distilled
projector's embedding space, one per cluster, the one nearest its centre: coverage of the class
rather than its easiest examples), ``confidence`` (RDED's: the teacher's surest) and ``random``. At
most one candidate per source image is kept while there are enough sources. Below 128 px the
defaults keep whole images (``factor`` 1, ``select_scale`` (1, 1)); the student measurements behind
that are in benchmarks/README.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import augment
from ..errors import BuildInputError
from .config import SELECTIONS
from .inputs import ImageFolder, TensorData, data_labels, load_all, scan_image_folder

__all__ = ["SELECTIONS", "distinct_first", "images_from_folder", "kmeans", "rded_images", "stitch"]


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
        extra = torch.where(rest, scores, torch.full_like(scores, -float("inf"))).topk(need - picked.numel()).indices
        picked = torch.cat([picked, extra])
    return picked[:need]


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
    scale: tuple[float, float] = (0.25, 1.0),
    selection: str = "confidence",
    embed=None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Select and stitch patches: ``ipc`` uint8 images per class at ``image_size``. Each class draws
    ``ipc x factor^2 x candidates`` random crops (area fraction in ``scale``) from its own training
    images (cycling over them when there are few) and keeps ``ipc x factor^2`` of them:

    - ``"confidence"`` (RDED): the crops with the highest teacher log-probability of the class;
    - ``"kmeans"``: crops the teacher puts in the class, clustered in the embedding space of ``embed``
      (a callable: float views -> features, e.g. the distilled projector's image encoder), one crop
      nearest each cluster centre: coverage of the class rather than its easiest examples;
    - ``"random"``: crops drawn at random (the control; no teacher involved in the choice).

    Returns (images, labels, stats: mean teacher confidence of the kept patches, fraction of them the
    teacher classifies correctly)."""
    from tqdm.auto import tqdm

    if ipc < 1 or factor < 1:
        raise BuildInputError("--ipc and --factor must be >= 1", field="--ipc")
    if selection not in SELECTIONS:
        raise BuildInputError(f"unknown selection {selection!r}", field="--selection",
                              fix=f"use one of {', '.join(SELECTIONS)}")
    load_size = load_size or image_size
    dev = torch.device(device)
    labels_all = data_labels(data)
    train = torch.tensor(train_indices, dtype=torch.int64)
    k = factor * factor
    need = ipc * k
    n_cand = need * max(1, candidates)
    patch = max(1, image_size // factor)
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=dev).manual_seed(seed + 1)
    out, out_labels, conf, correct = [], [], [], []
    num_classes = data.num_classes
    teacher.eval()
    for c in tqdm(range(num_classes), desc=f"select patches ({selection})", disable=not progress, dynamic_ncols=True):
        pool = train[labels_all[train] == c]
        if pool.numel() == 0:
            raise BuildInputError(f"class {c} has no training images left after the held-out split",
                                  field="--holdout", fix="lower --holdout or add images")
        # Each source image gives several crops when the class has fewer images than candidates.
        src = pool[torch.randperm(pool.numel(), generator=g)[: min(pool.numel(), n_cand)]]
        per_img = -(-n_cand // src.numel())
        imgs, _ = load_all(data, src.tolist(), load_size, num_workers=num_workers)
        imgs = imgs.to(dev)
        scores, preds, crops, feats = [], [], [], []
        order = torch.arange(src.numel()).repeat(per_img)[:n_cand]
        for s in range(0, n_cand, batch_size):
            idx = order[s:s + batch_size].to(dev)
            boxes = augment.sample_boxes(idx.numel(), scale=tuple(scale), generator=gd, device=dev)
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
        conf.append(scores[best].exp().mean().item())
        correct.append((preds[best] == c).float().mean().item())
        out.append(stitch(crops[best], factor, image_size).clamp(0, 1).mul(255).round().to(torch.uint8).cpu())
        out_labels.append(torch.full((ipc,), c, dtype=torch.int64))
    return torch.cat(out), torch.cat(out_labels), {"init_teacher_confidence": sum(conf) / len(conf),
                                                  "init_teacher_top1": sum(correct) / len(correct)}
