"""The build's training-data path: the header-only scan, the index in the checkpoint folder (reused on
resume), images that fail to decode (skipped and counted, up to --max-bad-images), the --num-workers
default, JPEG decoding at reduced size, and the one persistent DataLoader's resumable batches.

Builds use the tiny ViT config and the colour teacher of ``test_build`` (3 classes x 5 images).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_build import TEACHER_PY, TINY_CONFIG, _small, _write_data

from hellofmt.builder.checkpoint import CheckpointStore
from hellofmt.builder.config import (
    AUTO_WORKERS_MAX,
    AUTO_WORKERS_MIN_IMAGES,
    BuildConfig,
    auto_num_workers,
    bad_image_limit,
)
from hellofmt.builder.dist import World
from hellofmt.builder.distill import StepBatchSampler
from hellofmt.builder.inputs import (
    INDEX_FILE,
    FolderDataset,
    SkippedImages,
    load_all,
    load_image,
    scan_image_folder,
    scan_once,
)
from hellofmt.errors import BuildInputError


@pytest.fixture
def env(tmp_path):
    data = _write_data(tmp_path / "train")
    teacher = tmp_path / "teacher.py"
    teacher.write_text(TEACHER_PY)
    return {"data": data, "teacher": f"{teacher}:make", "tmp": tmp_path}


def _build(env, out_name="bundle", **kw):
    import hellofmt

    return hellofmt.build_bundle(str(env["data"]), env["teacher"], TINY_CONFIG, env["tmp"] / out_name, **_small(**kw))


def _truncated_jpeg(path, size=(96, 80)):
    """A JPEG whose header (format, size) reads but whose pixel data stops half-way."""
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


# --------------------------------------------------------------------------------------------------
# the scan reads headers only; a file that fails later is skipped and counted
# --------------------------------------------------------------------------------------------------
def test_header_only_scan_passes_a_truncated_jpeg_which_then_is_skipped(env):
    bad = _truncated_jpeg(env["data"] / "red" / "zz-truncated.jpg")
    (env["data"] / "red" / "not-an-image.png").write_bytes(b"not a png at all")
    with pytest.raises(BuildInputError, match="1 unreadable image") as e:  # a bad header is still caught up front
        scan_image_folder(env["data"])
    assert "not-an-image.png" in str(e.value) and "zz-truncated" not in str(e.value)
    (env["data"] / "red" / "not-an-image.png").unlink()
    folder = scan_image_folder(env["data"])  # the truncated one passes: its pixels are not decoded here
    i = [p for p, _ in folder.samples].index(str(bad))
    with pytest.raises(BuildInputError, match="cannot decode image"):  # no SkippedImages: stop at once
        FolderDataset(folder, 16)[i]
    folder.skipped = SkippedImages(limit=5, total=len(folder.samples))
    ds = FolderDataset(folder, 16)
    image, label, skipped = ds[i]
    assert [p for p, _ in skipped] == [str(bad)]
    assert torch.equal(image, ds[(i + 1) % len(ds)][0]) and label == ds[(i + 1) % len(ds)][1]  # the next stands in
    images, labels = load_all(folder, [i, 0], 16)
    assert images.shape == (2, 3, 16, 16) and list(folder.skipped.files) == [str(bad)]


def test_truncated_image_is_skipped_and_counted_in_the_build(env):
    from hellofmt.bundle import Bundle

    bad = _truncated_jpeg(env["data"] / "red" / "0-truncated.jpg")
    res = _build(env, steps=6)
    m = Bundle.open(res.path, verify=True).manifest
    assert m.metrics["inputs.skipped_images"] == 1
    assert m.provenance.extra["skipped_images"] == [str(bad)]
    assert any("1 training image(s) failed to decode" in w and str(bad) in w for w in res["warnings"])
    assert m.provenance.build_args["num_workers"] == 0  # auto: a tiny set loads in the main process


def test_too_many_bad_images_stop_the_build_naming_them(env):
    bad = _truncated_jpeg(env["data"] / "red" / "0-truncated.jpg")
    with pytest.raises(BuildInputError, match="more than the 0 --max-bad-images allows") as e:
        _build(env, max_bad_images=0)
    assert str(bad) in str(e.value) and e.value.field == "--max-bad-images"


def test_bad_image_limit_and_its_validation():
    assert bad_image_limit(None, 100) == 10 and bad_image_limit(None, 1_281_167) == 1281  # 0.1%, at least 10
    assert bad_image_limit(0, 100) == 0 and bad_image_limit(3, 100) == 3 and bad_image_limit(0.05, 1000) == 50
    for v in (-1, 2.5):
        with pytest.raises(BuildInputError, match="--max-bad-images"):
            BuildConfig(ipc=1, max_bad_images=v).validate()
    skipped = SkippedImages(limit=1, total=9)
    skipped.add([("a.jpg", "OSError"), ("a.jpg", "OSError")])  # the same file twice counts once
    with pytest.raises(BuildInputError, match="2 of 9 image"):
        skipped.add([("b.jpg", "OSError")])


# --------------------------------------------------------------------------------------------------
# scan once: the index in the checkpoint folder
# --------------------------------------------------------------------------------------------------
def test_index_is_written_and_reused_on_resume(env, monkeypatch):
    import hellofmt.builder.inputs as inputs

    store = CheckpointStore(env["tmp"] / "ck")
    world = World()
    first = scan_once(env["data"], class_map=None, world=world, store=store)
    index = store.read_json(INDEX_FILE)
    assert index["folders"] == ["blue", "green", "red"] and len(index["samples"]) == 15
    assert index["samples"][0] == ["blue/0.png", 0]  # relative to the root

    (env["data"] / "red" / "new.png").write_bytes((env["data"] / "red" / "0.png").read_bytes())

    def no_scan(*a, **k):
        raise AssertionError("scanned again")

    monkeypatch.setattr(inputs, "scan_image_folder", no_scan)
    again = scan_once(env["data"], class_map={"blue": "b", "green": "g", "red": "r"}, world=world, store=store,
                      resume=True)
    assert again.samples == first.samples and again.names == ["b", "g", "r"]  # the listing of the first run
    monkeypatch.undo()
    fresh = scan_once(env["data"], class_map=None, world=world, store=store)  # not resuming: a new scan
    assert len(fresh.samples) == 16 and len(store.read_json(INDEX_FILE)["samples"]) == 16


def test_index_of_another_root_is_not_reused(env):
    store = CheckpointStore(env["tmp"] / "ck")
    other = _write_data(env["tmp"] / "other", per_class=2)
    scan_once(other, class_map=None, world=World(), store=store)
    folder = scan_once(env["data"], class_map=None, world=World(), store=store, resume=True)
    assert len(folder.samples) == 15 and str(folder.root) == str(env["data"])


def test_build_writes_the_index_and_resume_reads_it(env, monkeypatch):
    import hellofmt.builder.inputs as inputs

    monkeypatch.setenv("HELLOFMT_TEST_FAIL_AFTER", "4")
    with pytest.raises(KeyboardInterrupt):
        _build(env, steps=6, checkpoint_every=2)
    assert (env["tmp"] / "bundle.ckpt" / INDEX_FILE).is_file()
    monkeypatch.delenv("HELLOFMT_TEST_FAIL_AFTER")
    calls = []
    real = inputs.scan_image_folder
    monkeypatch.setattr(inputs, "scan_image_folder", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = _build(env, steps=6, checkpoint_every=2, resume=True)
    assert calls == [] and res["metrics"]["distill.resumed_from"] == 2


# --------------------------------------------------------------------------------------------------
# --num-workers default
# --------------------------------------------------------------------------------------------------
def test_num_workers_auto_rule(monkeypatch):
    big = AUTO_WORKERS_MIN_IMAGES
    assert auto_num_workers(big - 1, cpus=32) == 0  # a small set: no worker processes
    assert auto_num_workers(big, cpus=1) == 0  # one CPU: the main process decodes
    assert auto_num_workers(big, cpus=8, local_world_size=1) == 7  # one CPU left for the main process
    assert auto_num_workers(big, cpus=64, local_world_size=1) == AUTO_WORKERS_MAX
    assert auto_num_workers(big, cpus=32, local_world_size=4) == 7  # torchrun: the CPUs shared per process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert auto_num_workers(big, cpus=16) == 1
    assert BuildConfig().num_workers is None  # auto unless given
    with pytest.raises(BuildInputError, match="--num-workers"):
        BuildConfig(ipc=1, num_workers=-1).validate()


# --------------------------------------------------------------------------------------------------
# the persistent loader resumes to the same batches
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,batch,world", [(12, 8, 1), (37, 4, 3), (5, 8, 2)])
def test_step_batches_resume_where_they_stopped(n, batch, world):
    from torch.utils.data import DistributedSampler

    for rank in range(world):
        whole = list(StepBatchSampler(n, batch, rank=rank, world_size=world, seed=3, stop=20))
        for start in (0, 1, 7, 13):
            resumed = list(StepBatchSampler(n, batch, rank=rank, world_size=world, seed=3, start=start, stop=20))
            assert resumed == whole[start:]
        # the same batches as one DistributedSampler per epoch, skipping the steps already run
        ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3,
                                 drop_last=n >= world * batch)
        per_epoch = max(1, len(ref) // batch)
        ref.set_epoch(2)
        order = list(ref)
        assert whole[2 * per_epoch] == order[:batch]


def test_persistent_loader_with_a_worker_resumes_to_the_same_projector(env, monkeypatch):
    from hellofmt.bundle import Bundle

    kw = dict(steps=6, checkpoint_every=2, num_workers=1, delta_dtype="float32", holdout=0.0)
    whole = Bundle.open(_build(env, "whole", **kw).path).projector_tensors()
    monkeypatch.setenv("HELLOFMT_TEST_FAIL_AFTER", "4")  # the probe check, then steps 1-3: interrupted in step 3
    with pytest.raises(KeyboardInterrupt):
        _build(env, "resumed", **kw)
    monkeypatch.delenv("HELLOFMT_TEST_FAIL_AFTER")
    res = _build(env, "resumed", resume=True, **kw)
    assert res["metrics"]["distill.resumed_from"] == 2
    resumed = Bundle.open(res.path).projector_tensors()
    assert whole.keys() == resumed.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# JPEG decoding at reduced size
# --------------------------------------------------------------------------------------------------
def _reference_square(path, size):
    """The full decode and bicubic resize of the whole image, then the centre crop (the former load_image)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def test_large_jpeg_decodes_at_reduced_size_close_to_the_full_decode(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    # a smooth picture with some detail, as photographs are (noise would make any two resamplings differ)
    yy, xx = np.mgrid[0:1200, 0:1600].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(xx / 90), 128 + 100 * np.cos(yy / 70), 128 + 60 * np.sin((xx + yy) / 40)], -1)
    path = tmp_path / "big.jpg"
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=92)
    drafts = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafts.append(size) or real(self, mode, size))
    out = load_image(str(path), 146)
    assert out.shape == (3, 146, 146) and out.dtype == torch.uint8
    assert drafts and min(drafts[0]) >= 146  # decoded at reduced scale, short side still >= the target
    ref = _reference_square(path, 146)
    assert (out.float() - ref.float()).abs().mean() < 2.0
    png = tmp_path / "big.png"  # not a JPEG: no draft, integer reduction then bicubic
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(png)
    assert (load_image(str(png), 146).float() - _reference_square(png, 146).float()).abs().mean() < 2.0
    small = tmp_path / "small.jpg"  # no larger than twice the target: decoded in full, as before
    Image.fromarray(img[:200, :300].clip(0, 255).astype(np.uint8)).save(small, "JPEG", quality=92)
    assert (load_image(str(small), 146).float() - _reference_square(small, 146).float()).abs().mean() < 1.0


# ------------------------------------------------------------------------------------------------
# distillation views: one copy per step, the same draws as the per-call functions
# ------------------------------------------------------------------------------------------------
def _views_per_call(images, labels, *, size, generator, scale, mix):
    """make_views as 0.2.0 wrote it: each random draw made and moved to the device by its own call."""
    from hellofmt import augment

    n = images.shape[0]
    boxes = augment.sample_boxes(n, scale=scale, generator=generator)
    flips = augment.sample_flips(n, generator=generator)
    views = augment.crop_resize(images, boxes, flips, size)
    if mix == "none" or n < 2:
        return views, labels, labels, torch.ones(n)
    if mix == "cutmix-mixup":
        mix = "cutmix" if torch.rand((), generator=generator).item() < 0.5 else "mixup"
    views, perm, lam = (augment.cutmix if mix == "cutmix" else augment.mixup)(views, generator=generator)
    return views, labels, labels[perm], lam.float()


@pytest.mark.parametrize("mix", ["none", "cutmix", "mixup", "cutmix-mixup"])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_make_views_draws_what_the_per_call_functions_draw(mix, n):
    from hellofmt.builder.distill import make_views, step_generator

    x = torch.randint(0, 256, (n, 3, 37, 37), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    y = torch.arange(n)
    for step in range(3):
        want = _views_per_call(x, y, size=32, generator=step_generator(0, 0, step), scale=(0.25, 1.0), mix=mix)
        got = make_views(x, y, size=32, generator=step_generator(0, 0, step), scale=(0.25, 1.0), mix=mix)
        for w, g in zip(want, got):
            assert torch.equal(w, g)
