"""DistilledDataset and its loader: sharding, determinism, labels, bad input, DataLoader use."""

from __future__ import annotations

import math

import pytest
import torch

from hellofmt.dataset import DistilledDataset, resolve_distributed, shard_indices
from hellofmt.errors import BundleNotFoundError, HellofmtError, InputError


# --------------------------------------------------------------------------------------------------
# Shards: pure index logic, no model.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 10, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_disjoint_and_covering(n, world, shuffle):
    shards = [shard_indices(n, rank=r, world_size=world, shuffle=shuffle, seed=3, epoch=1) for r in range(world)]
    lengths = {s.numel() for s in shards}
    assert lengths == {math.ceil(n / world)}, "every rank gets the same count"
    cat = torch.cat(shards)
    assert set(cat.tolist()) == set(range(n)), "shards cover the set"
    pad = world * math.ceil(n / world) - n
    # Only padding repeats an index, and only as many as needed.
    assert cat.numel() - len(set(cat.tolist())) == pad
    if n % world == 0:
        assert len(set(cat.tolist())) == cat.numel(), "no repeats when the set divides evenly"


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (12, 5), (2, 5)])
def test_shards_drop_last_disjoint(n, world):
    shards = [shard_indices(n, rank=r, world_size=world, seed=0, drop_last=True) for r in range(world)]
    cat = torch.cat(shards).tolist()
    assert len(cat) == len(set(cat)) == (n // world) * world
    assert all(s.numel() == n // world for s in shards)


def test_shard_single_process_is_a_permutation():
    idx = shard_indices(13, seed=5, epoch=0)
    assert sorted(idx.tolist()) == list(range(13))
    assert idx.tolist() != list(range(13)), "shuffled"
    assert shard_indices(13, shuffle=False).tolist() == list(range(13))


def test_shard_order_depends_on_seed_and_epoch_only():
    a = shard_indices(50, seed=1, epoch=2, rank=1, world_size=3)
    assert torch.equal(a, shard_indices(50, seed=1, epoch=2, rank=1, world_size=3))
    assert not torch.equal(a, shard_indices(50, seed=1, epoch=3, rank=1, world_size=3))
    assert not torch.equal(a, shard_indices(50, seed=2, epoch=2, rank=1, world_size=3))


def test_resolve_distributed_defaults_and_errors():
    assert resolve_distributed(None, None) == (0, 1)
    assert resolve_distributed(2, 4) == (2, 4)
    with pytest.raises(InputError, match="rank"):
        resolve_distributed(4, 4)
    with pytest.raises(InputError, match="rank"):
        resolve_distributed(-1, 4)
    with pytest.raises(InputError, match="world_size"):
        resolve_distributed(0, 0)


# --------------------------------------------------------------------------------------------------
# With a real bundle.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ds(tiny_bundle):
    return DistilledDataset(tiny_bundle, device="cpu")


def test_basic_properties(ds, tiny_bundle):
    assert len(ds) == 6 and ds.num_classes == 3 and len(ds.classes) == 3
    img, y = ds[0]
    assert img.dtype == torch.uint8 and img.device.type == "cpu" and img.shape == (3, 32, 32)
    assert isinstance(y, int) and 0 <= y < 3
    last, _ = ds[-1]
    assert torch.equal(last, ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds.memory_bytes == 6 * 3 * 32 * 32 + 6 * 8
    assert ds.verified_probe
    assert sorted(ds.targets.tolist()) == [0, 0, 1, 1, 2, 2]


def test_epoch_yields_every_image_once(ds):
    # shuffle + no mix: recover the image of each batch row through its label and the index order.
    loader = ds.loader(batch_size=4, image_size=16, mix="none", seed=7)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 2]
    idx = loader.epoch_indices(0)
    assert sorted(idx.tolist()) == list(range(len(ds)))
    hard = torch.cat([b[2] for b in batches])
    assert torch.equal(hard, ds.targets[idx])
    assert len(loader) == 2


def test_epoch_covers_with_identity_crops(ds):
    # scale=(1,1), ratio=(1,1), no flip: the view is the image itself; each appears exactly once.
    loader = ds.loader(batch_size=4, image_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, mix="none", seed=1)
    views = torch.cat([b[0] for b in loader])
    ref = ds.images.float() / 255
    matches = [(torch.cdist(v.flatten()[None], ref.flatten(1)).argmin().item()) for v in views]
    assert sorted(matches) == list(range(len(ds)))
    for v, m in zip(views, matches):
        assert torch.allclose(v, ref[m], atol=2e-2)


def test_batches_shapes_and_soft_labels(ds):
    images, soft, hard = next(iter(ds.loader(batch_size=5, image_size=24, mix="cutmix", seed=0)))
    assert images.shape == (5, 3, 24, 24) and images.dtype == torch.float32
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert soft.shape == (5, 3) and hard.shape == (5,) and hard.dtype == torch.int64
    assert torch.allclose(soft.sum(1), torch.ones(5), atol=1e-5)
    assert bool((soft >= 0).all())


def test_soft_labels_equal_independent_recomputation(ds):
    # No mix, student size == foundation size: soft must be softmax(projector(view) / T).
    size = ds.projector.foundation.image_size
    images, soft, _ = next(iter(ds.loader(batch_size=6, image_size=size, mix="none", temperature=2.5, seed=4)))
    with torch.no_grad():
        expected = torch.softmax(ds.projector(images).float() / 2.5, dim=1)
    assert torch.allclose(soft, expected, atol=1e-5)
    assert not torch.allclose(soft, torch.full_like(soft, 1 / 3), atol=1e-3), "labels are not uniform"


def test_same_seed_same_batches_and_labels(ds):
    def run(seed, epoch=0):
        loader = ds.loader(batch_size=4, image_size=16, mix="cutmix-mixup", seed=seed)
        loader.set_epoch(epoch)
        return list(loader)

    a, b = run(3), run(3)
    for (xa, sa, ha), (xb, sb, hb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(sa, sb) and torch.equal(ha, hb)
    c = run(4)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_set_epoch_changes_order_and_auto_advances(ds):
    loader = ds.loader(batch_size=6, image_size=16, mix="none", seed=0)
    assert not torch.equal(loader.epoch_indices(0), loader.epoch_indices(1))
    first = next(iter(loader))[0]  # runs epoch 0, advances to 1
    assert loader.epoch == 1
    second = next(iter(loader))[0]
    assert not torch.equal(first, second)
    loader.set_epoch(0)
    again = next(iter(loader))[0]
    assert torch.equal(first, again)


def test_rank_shards_in_loader(ds):
    seen = []
    for r in range(4):
        loader = ds.loader(batch_size=2, image_size=16, mix="none", rank=r, world_size=4, seed=9)
        idx = loader.epoch_indices(0)
        assert idx.numel() == 2  # ceil(6 / 4)
        hard = torch.cat([b[2] for b in loader])
        assert torch.equal(hard, ds.targets[idx])
        seen += idx.tolist()
    assert set(seen) == set(range(len(ds))) and len(seen) == 8  # two padded repeats


def test_drop_last_and_epochs(ds):
    loader = ds.loader(batch_size=4, image_size=16, mix="none", drop_last=True, epochs=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 3 and all(b[0].shape[0] == 4 for b in batches)
    assert loader.epoch == 3


def test_mixed_hard_label_is_dominant_image(ds, monkeypatch):
    from hellofmt import augment

    # The loader draws each batch's partners and weights with sample_mixup (once per epoch).
    def fake_sample_mixup(n, *, alpha=0.8, generator=None, device=None):
        perm = torch.arange(n - 1, -1, -1)
        lam = torch.tensor([0.9, 0.1, 0.6, 0.4, 0.5, 0.2], dtype=torch.float64)[:n]
        return perm, lam

    monkeypatch.setattr(augment, "sample_mixup", fake_sample_mixup)
    loader = ds.loader(batch_size=6, image_size=16, mix="mixup", shuffle=False)
    _, soft, hard = next(iter(loader))
    y = ds.targets
    assert hard.tolist() == [y[0], y[4], y[2], y[2], y[4], y[0]]


def test_logits_split_invariant(ds):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 3, 20, 28, generator=g)
    whole = ds.logits(x)
    assert whole.shape == (7, 3) and whole.dtype == torch.float32
    ds.label_batch_size = 3
    try:
        split = ds.logits(x)
    finally:
        ds.label_batch_size = 256
    assert torch.allclose(whole, split, atol=1e-4)
    assert torch.allclose(ds.soft_labels(x, temperature=2.0), torch.softmax(whole / 2, 1), atol=1e-5)
    assert torch.allclose(ds.soft_labels(x, temperature=1.0), torch.softmax(whole, 1), atol=1e-5)


def test_soft_labels_default_to_the_recipe_temperature(ds, monkeypatch):
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(ds.manifest.labels, "temperature", 3.0)
    soft = ds.soft_labels(x)
    assert torch.allclose(soft, torch.softmax(ds.logits(x) / 3.0, 1), atol=1e-5)
    assert torch.allclose(soft.sum(1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(soft, ds.soft_labels(x, temperature=1.0), atol=1e-4)


def test_deprecated_label_aliases_warn_and_match(ds):
    """``label``/``soft_label`` stay until 0.3.0: same values as before, and a FutureWarning that users see."""
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    removal = r"label\(\) is deprecated and will be removed in hellofmt 0\.3\.0; use DistilledDataset\.logits"
    with pytest.warns(FutureWarning, match=removal) as rec:
        old = ds.label(x)
    assert rec[0].filename == __file__, "the warning points at the caller's line"
    assert torch.equal(old, ds.logits(x))
    with pytest.warns(FutureWarning, match="use DistilledDataset.logits"):
        assert torch.allclose(ds.label(x, temperature=2.0), ds.logits(x) / 2, atol=1e-6)
    with pytest.warns(FutureWarning, match=r"soft_label\(\) is deprecated .* use DistilledDataset\.soft_labels"):
        old_soft = ds.soft_label(x, temperature=2.0)
    assert torch.equal(old_soft, ds.soft_labels(x, temperature=2.0))
    with pytest.warns(FutureWarning), pytest.raises(InputError):
        ds.label(x, temperature=-1)


def test_outputs_train_a_student(ds):
    # The batch must be usable for backprop: no inference tensors saved for backward.
    student = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    )
    images, soft, hard = next(iter(ds.loader(batch_size=4, image_size=16)))
    out = student(images)
    loss = torch.nn.functional.kl_div(out.log_softmax(1), soft, reduction="batchmean")
    loss = loss + torch.nn.functional.cross_entropy(out, hard)
    loss.backward()
    assert student[0].weight.grad is not None and torch.isfinite(student[0].weight.grad).all()


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -3}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"image_size": 0}, "image_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"rank": 0, "world_size": 0}, "world_size"),
        ({"mix": "cutout"}, "mix"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"scale": (0.5, 0.2)}, "scale"),
        ({"scale": (0.5, 1.5)}, "scale"),
        ({"ratio": (0, 1)}, "ratio"),
        ({"epochs": 0}, "epochs"),
        ({"scale": "x"}, "scale"),
        ({"scale": (0.0, 1.0)}, "scale"),
        ({"scale": (0.5, float("nan"))}, "scale"),
        ({"scale": (0.5, 10**400)}, "scale"),
        ({"ratio": (2.0, 1.0)}, "ratio"),
        ({"ratio": (1.0, float("inf"))}, "ratio"),
        ({"ratio": (1.0,)}, "ratio"),
        ({"seed": 2**70}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_loader_bad_input(ds, kwargs, field):
    with pytest.raises(InputError) as e:
        ds.loader(**kwargs)
    assert e.value.field == field


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 3, 8, 8, dtype=torch.uint8),  # dtype
        torch.zeros(3, 8, 8),  # rank
        torch.zeros(2, 1, 8, 8),  # channels
        torch.full((2, 3, 8, 8), 2.0),  # range
    ],
)
def test_label_bad_input(ds, bad):
    with pytest.raises(InputError):
        ds.logits(bad)
    with pytest.raises(InputError):
        ds.soft_labels(bad)
    with pytest.raises(InputError):
        ds.soft_labels(torch.rand(1, 3, 8, 8), temperature=-1)


def test_open_errors(tmp_path, tiny_bundle):
    with pytest.raises(BundleNotFoundError):
        DistilledDataset(tmp_path / "nope", device="cpu")
    with pytest.raises(InputError, match="revision"):
        DistilledDataset(tiny_bundle, device="cpu", revision="main")
    with pytest.raises(InputError, match="expected a bundle path or a Hub id, got int"):
        DistilledDataset(123, device="cpu")
    with pytest.raises(InputError):
        DistilledDataset(tiny_bundle, device="cpu", label_batch_size=0)
    with pytest.raises(InputError, match="device"):
        DistilledDataset(tiny_bundle, device="toaster")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            DistilledDataset(tiny_bundle, device="cuda")


def test_plain_dataloader(ds):
    dl = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    batches = list(dl)
    x, y = batches[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(torch.cat([b[1] for b in batches]), ds.targets.cpu())
    logits = ds.logits(x.float() / 255)
    assert logits.shape == (4, 3)


def test_errors_are_hellofmt_errors():
    assert issubclass(InputError, HellofmtError)


def test_hub_id_goes_through_pull(tiny_bundle, monkeypatch, tmp_path):
    from hellofmt import hub

    calls = []

    def fake_pull(repo_id, local_dir=None, *, revision=None, token=None, **kw):
        calls.append((repo_id, revision, token))
        return tiny_bundle

    monkeypatch.setattr(hub, "pull", fake_pull)
    monkeypatch.chdir(tmp_path)  # so "user/name" is not a local directory
    ds = DistilledDataset("user/name", device="cpu", revision="v1")
    assert calls == [("user/name", "v1", None)] and len(ds) == 6


def test_hub_pull_honours_verify(tiny_bundle, monkeypatch, tmp_path):
    from hellofmt import hub

    seen = []

    def fake_pull(repo_id, local_dir=None, *, revision=None, token=None, verify=True, **kw):
        seen.append(verify)
        return tiny_bundle

    monkeypatch.setattr(hub, "pull", fake_pull)
    monkeypatch.chdir(tmp_path)
    DistilledDataset("user/name", device="cpu", verify=False)
    DistilledDataset("user/name", device="cpu")
    assert seen == [False, True]


@pytest.mark.parametrize("bad", ["x", 0, -2, 1.5, True])
def test_num_threads_is_checked_up_front(tiny_bundle, monkeypatch, bad):
    from hellofmt import bundle

    def no_open(*a, **k):  # the check must come before any file is opened or hashed
        raise AssertionError("Bundle.open reached")

    monkeypatch.setattr(bundle.Bundle, "open", staticmethod(no_open))
    with pytest.raises(InputError) as e:
        DistilledDataset(tiny_bundle, device="cpu", num_threads=bad)
    assert e.value.field == "num_threads"


def test_num_threads_accepts_a_count(tiny_bundle):
    assert len(DistilledDataset(tiny_bundle, device="cpu", num_threads=1, verify=False)) == 6


@pytest.mark.parametrize("epoch", [2**62, 2**64, -1, 1.0])
def test_set_epoch_rejects_out_of_range(ds, epoch):
    loader = ds.loader(batch_size=4, image_size=16, mix="none")
    with pytest.raises(InputError) as e:
        loader.set_epoch(epoch)
    assert e.value.field == "epoch"


def test_largest_seed_and_epoch_run(ds):
    loader = ds.loader(batch_size=6, image_size=16, mix="none", seed=2**63 - 1)
    loader.set_epoch(2**62 - 1)
    images, _, _ = next(iter(loader))
    assert images.shape == (6, 3, 16, 16)


def test_lazy_export():
    import hellofmt

    assert hellofmt.DistilledDataset is DistilledDataset
    assert "DistilledDataset" in hellofmt.__all__


def test_rank_defaults_from_torch_distributed(ds, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 3)
    loader = ds.loader(batch_size=2, image_size=16, mix="none", seed=2)
    assert (loader.rank, loader.world_size) == (1, 3)
    assert torch.equal(loader.epoch_indices(0), shard_indices(6, rank=1, world_size=3, seed=2))
    assert ds.loader(batch_size=2, rank=0, world_size=2).world_size == 2  # explicit wins


def _spy_crops_and_labels(monkeypatch):
    from hellofmt import augment, dataset

    crops, seen = [], []
    real_crop, real_forward = augment.crop_resize, dataset.ds_forward

    def crop(images, boxes, flips, size, **kw):
        out = real_crop(images, boxes, flips, size, **kw)
        crops.append((boxes, flips, size, out))
        return out

    def forward(projector, x):
        seen.append(x)
        return real_forward(projector, x)

    monkeypatch.setattr(augment, "crop_resize", crop)
    monkeypatch.setattr(dataset, "ds_forward", forward)
    return crops, seen


def test_label_view_resampled_from_source_at_foundation_size(ds, monkeypatch):
    crops, seen = _spy_crops_and_labels(monkeypatch)
    fsize = ds.projector.foundation.image_size
    images, soft, _ = next(iter(ds.loader(batch_size=4, image_size=fsize // 2, mix="none", temperature=1.0)))
    assert [c[2] for c in crops] == [fsize // 2, fsize]
    assert crops[0][0] is crops[1][0] and crops[0][1] is crops[1][1], "same boxes and flips"
    assert torch.equal(images, crops[0][3]) and images.shape[-1] == fsize // 2
    assert seen[0].shape[-1] == fsize and torch.equal(seen[0], crops[1][3])
    with torch.no_grad():
        assert torch.allclose(soft, torch.softmax(ds.projector(crops[1][3]), 1), atol=1e-5)


def test_mixup_label_view_redone_at_foundation_size(ds, monkeypatch):
    from hellofmt import augment

    crops, seen = _spy_crops_and_labels(monkeypatch)
    mixes = []
    real_sample_mixup = augment.sample_mixup

    def sample_mixup(n, **kw):  # the loader draws partners and weights per epoch, then blends
        out = real_sample_mixup(n, **kw)
        mixes.append(out)
        return out

    monkeypatch.setattr(augment, "sample_mixup", sample_mixup)
    fsize = ds.projector.foundation.image_size
    next(iter(ds.loader(batch_size=4, image_size=fsize // 2, mix="mixup")))
    (perm, lam), f = mixes[0], crops[1][3]
    lam4 = lam.float().view(-1, 1, 1, 1)
    assert torch.allclose(seen[0], (lam4 * f + (1 - lam4) * f[perm]).clamp(0, 1), atol=1e-6)


def test_cutmix_label_view_redone_at_foundation_size(ds, monkeypatch):
    # The same partner and the same fractional cut are pasted into a view resampled from the source
    # at the foundation's size, so the projector sees the student's view at full detail.
    from hellofmt import augment

    crops, seen = _spy_crops_and_labels(monkeypatch)
    pastes = []
    real_paste = augment.paste

    def paste(images, perm, boxes):
        out = real_paste(images, perm, boxes)
        pastes.append((images, perm, boxes, out))
        return out

    monkeypatch.setattr(augment, "paste", paste)
    fsize = ds.projector.foundation.image_size
    images, soft, hard = next(iter(ds.loader(batch_size=4, image_size=fsize // 2, mix="cutmix", temperature=1.0)))
    student, label = pastes
    assert student[0].shape[-1] == fsize // 2 and label[0].shape[-1] == fsize
    assert student[1] is label[1] and student[2] is label[2], "same partners and cut boxes"
    assert torch.equal(images, student[3][0]) and torch.equal(seen[0], label[3][0])
    assert torch.equal(label[0], crops[1][3]), "the foundation view is resampled from the source"
    # the cut covers the same fraction of the image at both sizes (up to pixel snapping)
    assert torch.allclose(student[3][1], label[3][1], atol=4.0 / (fsize // 2))
    with torch.no_grad():
        assert torch.allclose(soft, torch.softmax(ds.projector(label[3][0]), 1), atol=1e-5)

