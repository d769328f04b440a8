"""The student loader under torch.distributed: shard-decoded opening and per-epoch random numbers.

Two gloo processes (``torch.distributed.run``, as tests/test_eval.py runs its two-process test) open
the same multi-shard bundle: each must decode only its share and end with exactly the images and
labels one process gets; a corrupted image shard that only rank 1 reads must be reported on both
ranks (the subprocess timeout turns a hang into a failure); their loaders must give the batches a
single process gives for the same (seed, epoch, rank, world_size). One torchrun launch serves all
the scenarios (module fixture). The in-process tests cover ``augment.sample_epoch`` and the loader's
use of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hellofmt import augment
from hellofmt.bundle import Bundle
from hellofmt.errors import InputError

from bundles import make_tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
WORLD = 2
NUM_IMAGES = 15  # 3 classes x 5: not a multiple of WORLD, so rank 1's share is one image short
PER = -(-NUM_IMAGES // WORLD)

WORKER = textwrap.dedent(
    """
    import json
    import sys

    import torch.distributed as dist
    from safetensors.torch import save_file

    import hellofmt.imagestore as imagestore
    from hellofmt import DistilledDataset
    from hellofmt.errors import HellofmtError

    decoded = [0]
    real_decode = imagestore._decode_to

    def counting_decode(*args, **kwargs):  # every image decode of this process goes through here
        decoded[0] += 1
        return real_decode(*args, **kwargs)

    imagestore._decode_to = counting_decode
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = sys.argv[1]
    report = {}
    for name, path, kwargs in json.loads(sys.argv[2]):
        decoded[0] = 0
        try:
            ds = DistilledDataset(path, device="cpu", num_threads=1, **kwargs)
        except HellofmtError as e:
            report[name] = {"error": type(e).__name__, "message": str(e)}
            continue
        loader = ds.loader(batch_size=4, image_size=16, mix="cutmix-mixup", seed=5)
        report[name] = {"decoded": decoded[0], "range": list(ds.decoded_range),
                        "loader": [loader.rank, loader.world_size]}
        tensors = {"images": ds.images.contiguous(), "targets": ds.targets}
        for epoch in (0, 1):
            for i, (x, soft, hard) in enumerate(loader.epoch_batches(epoch)):
                tensors.update({f"x{epoch}.{i}": x, f"soft{epoch}.{i}": soft, f"hard{epoch}.{i}": hard})
        save_file(tensors, f"{out}/{name}-rank{rank}.safetensors")
    with open(f"{out}/report-rank{rank}.json", "w") as f:
        json.dump(report, f)
    dist.barrier()  # no rank tears down gloo while a peer's last transfer is in flight
    dist.destroy_process_group()
    """
)


def _corrupt_last_image(shard: Path) -> None:
    """Invert 16 bytes in the middle of the shard's last encoded image (its sha256 and its PNG break)."""
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    offsets = load_file(shard)["offsets"].tolist()
    mid = 8 + n + header["data"]["data_offsets"][0] + (offsets[-2] + offsets[-1]) // 2
    raw[mid : mid + 16] = bytes(255 - b for b in raw[mid : mid + 16])
    shard.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def multi_shard(tmp_path_factory) -> Path:
    """A real bundle of 15 images cut into several shards (a few images each)."""
    path = make_tiny_bundle(tmp_path_factory.mktemp("dist") / "bundle", ipc=5, max_shard_bytes=8000)
    shards = Bundle.open(path).manifest.images.shards
    assert len(shards) >= 3 and sum(s.count for s in shards) == NUM_IMAGES
    return path


@pytest.fixture(scope="module")
def torchrun(multi_shard, tmp_path_factory):
    """One two-process gloo run over every scenario; returns ``(out dir, [report of rank 0, of rank 1])``."""
    tmp = tmp_path_factory.mktemp("dist-run")
    bad = tmp / "bad"
    shutil.copytree(multi_shard, bad)
    shards = Bundle.open(bad).manifest.images.shards
    # The last shard lies wholly in rank 1's share: rank 0 neither decodes nor hashes it.
    assert NUM_IMAGES - shards[-1].count >= PER
    _corrupt_last_image(bad / shards[-1].file)
    scenarios = [
        ("sharded", str(multi_shard), {}),
        ("full", str(multi_shard), {"shard_decode": False}),
        ("bad_hash", str(bad), {}),
        ("bad_image", str(bad), {"verify": False}),
    ]
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    out = tmp / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(worker), str(out), json.dumps(scenarios)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    # A rank left waiting in a collective would hang: the timeout makes that a failure.
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    reports = [json.loads((out / f"report-rank{rank}.json").read_text()) for rank in range(WORLD)]
    return out, reports


@pytest.fixture(scope="module")
def single(multi_shard):
    from hellofmt import DistilledDataset

    return DistilledDataset(multi_shard, device="cpu")


# --------------------------------------------------------------------------------------------------
# two processes
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_each_rank_decodes_only_its_share(torchrun):
    _, reports = torchrun
    shares = [r["sharded"] for r in reports]
    assert [s["range"] for s in shares] == [[0, PER], [PER, NUM_IMAGES]]
    assert [s["decoded"] for s in shares] == [PER, NUM_IMAGES - PER]
    assert [s["loader"] for s in shares] == [[0, WORLD], [1, WORLD]]
    # shard_decode=False: every rank decodes everything, as before
    assert [r["full"]["decoded"] for r in reports] == [NUM_IMAGES, NUM_IMAGES]
    assert [r["full"]["range"] for r in reports] == [[0, NUM_IMAGES]] * WORLD


@pytest.mark.slow
def test_ranks_get_the_images_and_labels_of_one_process(torchrun, single):
    out, _ = torchrun
    for rank in range(WORLD):
        for name in ("sharded", "full"):
            got = load_file(out / f"{name}-rank{rank}.safetensors")
            assert torch.equal(got["images"], single.images), (name, rank)
            assert torch.equal(got["targets"], single.targets), (name, rank)


@pytest.mark.slow
def test_rank_batches_are_those_of_one_process_with_that_rank(torchrun, single):
    out, _ = torchrun
    for rank in range(WORLD):
        got = load_file(out / f"sharded-rank{rank}.safetensors")
        loader = single.loader(batch_size=4, image_size=16, mix="cutmix-mixup", seed=5, rank=rank, world_size=WORLD)
        for epoch in (0, 1):
            batches = list(loader.epoch_batches(epoch))
            assert len(batches) == 2
            for i, (x, soft, hard) in enumerate(batches):
                assert torch.equal(got[f"x{epoch}.{i}"], x) and torch.equal(got[f"hard{epoch}.{i}"], hard)
                # the same views; the projector may run with other thread counts, so labels to rounding
                torch.testing.assert_close(got[f"soft{epoch}.{i}"], soft, atol=1e-5, rtol=1e-5)
    r0, r1 = (load_file(out / f"sharded-rank{r}.safetensors") for r in range(WORLD))
    assert not torch.equal(r0["x0.0"], r1["x0.0"]), "ranks see different images and views"
    assert not torch.equal(r0["x0.0"], r0["x1.0"]), "epochs differ"


@pytest.mark.slow
def test_corrupted_shard_is_reported_on_every_rank(torchrun):
    _, reports = torchrun
    bad_hash = [r["bad_hash"] for r in reports]
    assert [b["error"] for b in bad_hash] == ["IntegrityError"] * WORLD
    assert all("images-00005" in b["message"] and "sha256" in b["message"] for b in bad_hash)
    # rank 0 does not read that shard: it learns of it from rank 1
    assert bad_hash[0]["message"].count("[rank 1]") == 1 and "[rank" not in bad_hash[1]["message"]
    bad_image = [r["bad_image"] for r in reports]  # no hashes: the decoder finds it, on rank 1 only
    assert [b["error"] for b in bad_image] == ["ImageDecodeError"] * WORLD
    assert all("does not decode" in b["message"] for b in bad_image)
    assert "[rank 1]" in bad_image[0]["message"]


# --------------------------------------------------------------------------------------------------
# one process
# --------------------------------------------------------------------------------------------------
def test_one_process_decodes_everything(single):
    assert single.decoded_range == (0, NUM_IMAGES) and len(single) == NUM_IMAGES


def test_read_images_range_equals_the_slice_of_the_whole(multi_shard):
    b = Bundle.open(multi_shard)
    images, labels = b.read_images()
    for start, stop in [(0, 8), (8, 15), (2, 3), (4, 4), (0, 15)]:
        x, y = b.read_images(start=start, stop=stop, verify=True)
        assert torch.equal(x, images[start:stop]) and torch.equal(y, labels[start:stop]), (start, stop)
    with pytest.raises(InputError):
        b.read_images(start=3, stop=16)


def test_read_shard_select_is_checked(multi_shard):
    from hellofmt.imagestore import read_shard

    b = Bundle.open(multi_shard)
    im = b.manifest.images
    shard = im.shards[0]
    kw = dict(codec=im.codec, height=im.height, width=im.width, num_classes=b.manifest.num_classes)
    whole, labels = read_shard(multi_shard / shard.file, **kw)
    part, part_labels = read_shard(multi_shard / shard.file, select=(1, shard.count), **kw)
    assert torch.equal(part, whole[1:]) and torch.equal(part_labels, labels[1:])
    for bad in [(2, 1), (0, shard.count + 1), (-1, 1)]:
        with pytest.raises(InputError):
            read_shard(multi_shard / shard.file, select=bad, **kw)


def _per_batch_draws(sizes, mix, seed, flip=True):
    """What sample_epoch must equal: the same calls, batch after batch, on one generator."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        boxes = augment.sample_boxes(n, generator=g)
        flips = augment.sample_flips(n, generator=g) if flip else None
        mode = mix
        if mode == "cutmix-mixup":
            mode = "cutmix" if bool(torch.rand((), generator=g) < 0.5) else "mixup"
        perm = cut = lam = None
        if mode == "cutmix":
            perm, cut = augment.cutmix_boxes(n, generator=g)
        elif mode == "mixup":
            perm, lam = augment.sample_mixup(n, generator=g)
            lam = lam.float()
        out.append((boxes, flips, mode, perm, cut, lam))
    return out


@pytest.mark.parametrize("mix", ["none", "cutmix", "mixup", "cutmix-mixup"])
@pytest.mark.parametrize("flip", [True, False])
def test_sample_epoch_equals_per_batch_draws(mix, flip):
    sizes = [4, 4, 3]
    want = _per_batch_draws(sizes, mix, seed=9, flip=flip)
    got = augment.sample_epoch(sizes, mix=mix, flip=flip, generator=torch.Generator().manual_seed(9))
    assert len(got) == len(want)
    for d, w in zip(got, want):
        assert torch.equal(d.boxes, w[0]) and d.mode == w[2]
        assert (d.flips is None) if not flip else torch.equal(d.flips, w[1])
        for a, b in zip((d.perm, d.cut, d.lam), w[3:]):
            assert (a is None and b is None) or torch.equal(a, b)
    if mix == "cutmix-mixup":  # both kinds occur over a few batches
        modes = {d.mode for d in augment.sample_epoch([2] * 12, mix=mix, generator=torch.Generator().manual_seed(0))}
        assert modes == {"cutmix", "mixup"}


def test_sample_epoch_checks_its_arguments():
    with pytest.raises(InputError):
        augment.sample_epoch([4], mix="cutmax")
    with pytest.raises(InputError):
        augment.sample_epoch([4, -1])
    with pytest.raises(InputError):
        augment.sample_epoch([4], scale=(0.5, 0.1))


def test_mixup_is_sample_mixup_then_blend():
    x = torch.rand(6, 3, 8, 8)
    mixed, perm, lam = augment.mixup(x, generator=torch.Generator().manual_seed(4))
    perm2, lam2 = augment.sample_mixup(6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(perm, perm2) and torch.equal(lam, lam2.float())
    assert torch.equal(mixed, augment.blend(x, perm2, lam2.float()))


def test_loader_draws_the_epoch_up_front(single, monkeypatch):
    calls = []
    real = augment.sample_boxes

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(augment, "sample_boxes", spy)
    loader = single.loader(batch_size=4, image_size=16, mix="cutmix", seed=1)
    it = iter(loader)
    next(it)
    assert len(calls) == len(loader) == 4, "every batch's boxes are drawn before the first batch"
    assert len(list(it)) == 3 and len(calls) == 4


def test_batches_are_a_pure_function_of_seed_epoch_rank_world(single):
    def run(seed, epoch, rank, world):
        loader = single.loader(batch_size=4, image_size=16, mix="cutmix-mixup", seed=seed, rank=rank,
                               world_size=world)
        return [t for batch in loader.epoch_batches(epoch) for t in batch]

    a = run(3, 1, 1, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, run(3, 1, 1, 2)))
    for other in (run(3, 2, 1, 2), run(4, 1, 1, 2), run(3, 1, 0, 2)):
        assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, other))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_sample_epoch_cpu_and_cuda_agree():
    sizes = [8, 8, 5]
    cpu = augment.sample_epoch(sizes, mix="cutmix-mixup", generator=torch.Generator().manual_seed(2))
    gpu = augment.sample_epoch(sizes, mix="cutmix-mixup", generator=torch.Generator().manual_seed(2), device="cuda")
    for c, g in zip(cpu, gpu):
        assert g.boxes.device.type == "cuda" and c.mode == g.mode
        for a, b in zip(c, g):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b.cpu())


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_loader_batches_cpu_and_cuda_agree(multi_shard):
    from hellofmt import DistilledDataset

    out = {}
    for dev in ("cpu", "cuda"):
        ds = DistilledDataset(multi_shard, device=dev)
        loader = ds.loader(batch_size=4, image_size=16, mix="cutmix-mixup", seed=7)
        out[dev] = [[t.cpu() for t in batch] for batch in loader.epoch_batches(0)]
    for (x, soft, hard), (xg, softg, hardg) in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(x, xg, atol=1e-4, rtol=1e-4)
        assert torch.equal(hard, hardg)
        torch.testing.assert_close(soft, softg, atol=5e-2, rtol=0)  # the projector runs bf16 autocast on CUDA
