"""Image selection (``--selection``): k-means, one candidate per source image, and each rule's choice."""

from __future__ import annotations

import pytest
import torch

from hellofmt.builder.config import BuildConfig, load_side
from hellofmt.builder.images import distinct_first, kmeans, rded_images
from hellofmt.builder.inputs import TensorData
from hellofmt.errors import BuildInputError


def test_kmeans_finds_separated_clusters_deterministically():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 3, generator=g) + 10, torch.randn(40, 3, generator=g) - 10,
                   torch.randn(40, 3, generator=g)])
    a1, c1 = kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    a2, c2 = kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    # each true group lands in one cluster, and the three groups in three different clusters
    groups = [set(a1[i * 40:(i + 1) * 40].tolist()) for i in range(3)]
    assert all(len(gr) == 1 for gr in groups) and len(set().union(*groups)) == 3


def test_distinct_first_takes_one_per_source_while_it_can():
    order = torch.tensor([0, 1, 2, 3, 4, 5])
    source = torch.tensor([7, 7, 8, 8, 9, 9])
    assert distinct_first(order, source, 3).tolist() == [0, 2, 4]
    assert distinct_first(order, source, 5).tolist() == [0, 2, 4, 1, 3]


def _data(per_class: int = 12):
    """Two classes told apart by the red channel's mean; brightness varies within a class."""
    g = torch.Generator().manual_seed(0)
    n = 2 * per_class
    labels = torch.arange(n) % 2
    images = (torch.rand(n, 3, 16, 16, generator=g) * 60).to(torch.uint8)
    images[:, 0] += (labels * 150).to(torch.uint8).view(-1, 1, 1)
    images[:, 1] += (torch.arange(n) * 4).to(torch.uint8).view(-1, 1, 1)
    return TensorData(images, labels, ["a", "b"])


class RedTeacher(torch.nn.Module):
    def forward(self, x):
        r = x[:, 0].mean((1, 2))
        return torch.stack([(0.4 - r) * 20, (r - 0.4) * 20], 1)


@pytest.mark.parametrize("selection", ["confidence", "kmeans", "random"])
def test_whole_image_selection_keeps_distinct_sources(selection):
    data = _data(per_class=12)
    train = list(range(24))
    imgs, labels, stats = rded_images(data, RedTeacher(), train_indices=train, ipc=5, factor=1, image_size=16,
                                      candidates=4, scale=(1.0, 1.0), selection=selection,
                                      embed=lambda v: v.flatten(1), progress=False)
    assert imgs.shape == (10, 3, 16, 16) and labels.tolist() == [0] * 5 + [1] * 5
    for c in (0, 1):
        kept = imgs[labels == c]
        assert len({bytes(k.numpy().tobytes()) for k in kept}) == 5, "a source image was kept twice"
    if selection != "random":
        assert stats["init_teacher_top1"] == 1.0


def test_confidence_keeps_the_teachers_surest_images():
    data = _data(per_class=12)
    imgs, labels, stats = rded_images(data, RedTeacher(), train_indices=list(range(24)), ipc=3, factor=1,
                                      image_size=16, candidates=4, scale=(1.0, 1.0), selection="confidence",
                                      progress=False)
    red = imgs[:, 0].float().mean((1, 2)) / 255
    assert (red[labels == 1] > 0.6).all() and (red[labels == 0] < 0.3).all()
    assert stats["init_teacher_confidence"] > 0.9


def test_load_side():
    assert load_side(None, 64, (1.0, 1.0)) == 64  # whole images: read once, at the image size
    assert load_side(None, 64, (0.25, 1.0)) == 73  # crops: RDED's 8/7 margin
    assert load_side(None, 224, (0.08, 1.0)) == 256
    assert load_side(80, 64, (1.0, 1.0)) == 80  # --load-size wins


def test_unknown_selection_is_refused_naming_the_option():
    with pytest.raises(BuildInputError) as e:
        rded_images(_data(), RedTeacher(), train_indices=list(range(24)), ipc=2, factor=1, image_size=16,
                    selection="best", progress=False)
    assert e.value.field == "--selection"


def test_size_dependent_defaults():
    small = BuildConfig(ipc=1).resolved(32)
    large = BuildConfig(ipc=1).resolved(224)
    assert (small.factor, small.select_scale, small.scale) == (1, (1.0, 1.0), (0.25, 1.0))
    assert (large.factor, large.select_scale, large.scale) == (2, (0.25, 1.0), (0.08, 1.0))
    assert (small.load_size, large.load_size) == (32, 256)  # whole images read at the side; crops at 8/7
    mine = BuildConfig(ipc=1, factor=3, scale=(0.5, 1.0), select_scale=(0.3, 0.9)).resolved(32)
    assert (mine.factor, mine.scale, mine.select_scale) == (3, (0.5, 1.0), (0.3, 0.9))
    with pytest.raises(BuildInputError) as e:
        BuildConfig(ipc=1, scale=(0.9, 0.2)).validate()
    assert e.value.field == "--scale"


def test_a_class_is_selected_the_same_on_any_rank(monkeypatch):
    """Rank 1 of 2 selects class 1 exactly as one process does (the per-class randomness comes from
    (seed, class), not from the rank or the classes before it); the gather itself is faked here and
    tested under torchrun in tests/test_build_scale.py."""
    import hellofmt.builder.images as images_mod
    from hellofmt.builder.dist import World

    kw = dict(train_indices=list(range(24)), ipc=2, factor=2, image_size=16, candidates=3, scale=(0.3, 1.0),
              selection="kmeans", embed=lambda v: v.mean((2, 3)), seed=4, progress=False)
    whole, _, _ = rded_images(_data(), RedTeacher(), **kw)
    seen = {}

    def fake_gather(world, blocks, shapes, dtype):
        seen.setdefault("classes", sorted(blocks))
        return [blocks[i] if i in blocks else torch.zeros(shapes[i], dtype=dtype) for i in range(len(shapes))]

    monkeypatch.setattr(images_mod, "all_gather_blocks", fake_gather)
    part, _, _ = rded_images(_data(), RedTeacher(), world=World(rank=1, size=2), **kw)
    assert seen["classes"] == [1]
    assert torch.equal(part[2:], whole[2:])


def test_pool_images_limits_the_sources_of_a_class():
    data = _data(per_class=12)
    imgs, labels, _ = rded_images(data, RedTeacher(), train_indices=list(range(24)), ipc=4, factor=1, image_size=16,
                                  pool_images=2, scale=(1.0, 1.0), selection="confidence", progress=False)
    for c in (0, 1):
        assert len({bytes(k.numpy().tobytes()) for k in imgs[labels == c]}) == 2  # 4 images from 2 sources
