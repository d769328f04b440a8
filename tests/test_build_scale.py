"""The build at scale: selection split across ranks by class, refinement in chunks split across ranks,
refinement resumed inside a chunk, memory bounded by the chunk, and a two-process torchrun build against
a one-process build.

World-size tests run the code under ``torchrun`` on the CPU (gloo) with 1 and 2 processes and the same
thread count, and compare the results bit for bit. Data and teachers are tiny and generated here; the
full builds use the tiny foundation and the colour teacher of ``tests/test_build.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_build import TEACHER_PY, TINY_CONFIG, _write_data

from hellofmt.builder.checkpoint import CheckpointStore
from hellofmt.builder.images import candidate_pool, rded_images
from hellofmt.builder.refine import refine_images

ROOT = Path(__file__).resolve().parents[1]


def _net(seed: int, classes: int = 3) -> torch.nn.Module:
    """A small conv net (teacher or stand-in projector) with weights from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, classes))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.eval()


def _images(n: int = 10, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = (torch.rand(n, 3, size, size, generator=g) * 120).to(torch.uint8)
    images[torch.arange(n), labels] += 120
    return images, labels


def _torchrun(script: Path, nproc: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=script.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


# --------------------------------------------------------------------------------------------------
# the candidate pool
# --------------------------------------------------------------------------------------------------
def test_candidate_pool_maps_candidates_to_images_times_crops():
    # default: ipc x factor^2 x candidates candidates, from as many images as the class has
    assert candidate_pool(1300, need=40, candidates=4) == (160, 1, 160)
    assert candidate_pool(50, need=40, candidates=4) == (50, 4, 160)  # crops cycle over a small class
    assert candidate_pool(50, need=40, candidates=4, whole=True) == (50, 1, 50)  # a whole image once
    # RDED's own pool on ImageNet: 300 images x 5 crops
    assert candidate_pool(1300, need=40, candidates=4, pool_images=300, pool_crops=5) == (300, 5, 1500)
    assert candidate_pool(100, need=40, candidates=4, pool_images=300, pool_crops=5) == (100, 5, 500)
    assert candidate_pool(1300, need=40, candidates=4, pool_images=300) == (300, 1, 300)


def test_pool_options_are_build_options():
    from hellofmt.builder.config import BuildConfig
    from hellofmt.errors import BuildInputError

    c = BuildConfig(ipc=1, pool_images=300, pool_crops=5, refine_chunk=64, candidates=2)
    c.validate()
    for bad, field in ((dict(pool_images=0), "--pool-images"), (dict(pool_crops=0), "--pool-crops"),
                       (dict(refine_chunk=0), "--refine-chunk")):
        with pytest.raises(BuildInputError) as e:
            BuildConfig(ipc=1, **bad).validate()
        assert e.value.field == field


def test_selection_from_a_folder_with_loader_workers(tmp_path):
    """Class sources are decoded by DataLoader workers; the images do not depend on how many."""
    from hellofmt.builder.inputs import scan_image_folder

    folder = scan_image_folder(_write_data(tmp_path / "train", per_class=6))
    kw = dict(train_indices=list(range(18)), ipc=2, factor=2, image_size=16, load_size=20, candidates=3,
              scale=(0.3, 1.0), selection="confidence", seed=3, progress=False)
    a, la, sa = rded_images(folder, _net(1), num_workers=0, **kw)
    b, lb, sb = rded_images(folder, _net(1), num_workers=2, **kw)
    assert a.shape == (6, 3, 16, 16) and la.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(a, b) and torch.equal(la, lb) and sa == sb


def test_selection_counts_images_skipped_in_loader_workers(tmp_path):
    """An image that fails to decode in a DataLoader worker is counted in the build's record, not lost
    with the worker's copy of it."""
    from hellofmt.builder.inputs import SkippedImages, scan_image_folder

    folder = scan_image_folder(_write_data(tmp_path / "train", per_class=6))
    bad = folder.samples[0][0]
    Path(bad).write_bytes(b"broken after the scan")
    folder.skipped = SkippedImages(limit=3, total=len(folder.samples))
    imgs, _, _ = rded_images(folder, _net(1), train_indices=list(range(18)), ipc=2, factor=1, image_size=16,
                             load_size=20, scale=(1.0, 1.0), selection="confidence", num_workers=2, progress=False)
    assert imgs.shape == (6, 3, 16, 16)
    assert list(folder.skipped.files) == [bad]


# --------------------------------------------------------------------------------------------------
# selection and refinement do not depend on the world size
# --------------------------------------------------------------------------------------------------
WORKER_PY = textwrap.dedent(
    '''
    import json
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, sys.argv[2])  # the tests folder: this file's helpers
    from test_build_scale import _images, _net

    from hellofmt.builder.checkpoint import CheckpointStore
    from hellofmt.builder.dist import init_world
    from hellofmt.builder.images import rded_images
    from hellofmt.builder.inputs import TensorData
    from hellofmt.builder.refine import refine_images

    out = Path(sys.argv[1])
    world = init_world("cpu")
    torch.set_num_threads(1)
    images, labels = _images(n=30, size=20)
    data = TensorData(images, labels, ["a", "b", "c"])
    teacher, projector = _net(1), _net(2)
    embed = lambda v: projector[:4](v)  # the stand-in projector's features
    tensors, stats = {}, {}
    for sel, scale, factor in (("kmeans", (0.3, 1.0), 2), ("confidence", (1.0, 1.0), 1), ("random", (0.3, 1.0), 1)):
        imgs, labs, st = rded_images(data, teacher, train_indices=list(range(30)), ipc=3, factor=factor,
                                     image_size=16, load_size=20, candidates=3, scale=scale, selection=sel,
                                     embed=embed, batch_size=8, seed=5, world=world, progress=False)
        tensors[f"{sel}.images"], tensors[f"{sel}.labels"], stats[sel] = imgs, labs, st
    imgs, labs = tensors["kmeans.images"], tensors["kmeans.labels"]  # 9 images: chunks of 4, 4 and 1
    ref, st = refine_images(projector, teacher, imgs, labs, steps=3, view_size=16, batch_size=3, chunk=4, seed=5,
                            store=CheckpointStore(out / f"ck{world.size}"), checkpoint_every=1, world=world,
                            progress=False)
    tensors["refined"], stats["refine"] = ref, st
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"w{world.size}-r{world.rank}.safetensors"),
              metadata={"stats": json.dumps(stats)})
    world.close(sync=True)
    '''
)


@pytest.mark.slow
def test_selection_and_refinement_do_not_depend_on_world_size(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER_PY)
    tests = str(Path(__file__).parent)
    _torchrun(script, 1, str(tmp_path), tests)
    _torchrun(script, 2, str(tmp_path), tests)
    runs = {name: load_file(str(tmp_path / f"{name}.safetensors")) for name in ("w1-r0", "w2-r0", "w2-r1")}

    def stats(name):
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            return json.loads(f.metadata()["stats"])

    one, one_stats = runs["w1-r0"], stats("w1-r0")
    assert one["kmeans.images"].shape == (9, 3, 16, 16) and one["refined"].shape == (9, 3, 16, 16)
    assert not torch.equal(one["refined"], one["kmeans.images"])  # refinement did something
    for name in ("w2-r0", "w2-r1"):  # both ranks of the two-process run hold every result
        two = runs[name]
        assert two.keys() == one.keys()
        for key in one:
            assert torch.equal(two[key], one[key]), f"{key} differs between 1 and 2 processes ({name})"
        assert stats(name) == one_stats
    assert one_stats["refine"]["refine_chunks"] == 3
    # chunk 1 was refined, and checkpointed, by rank 1; chunks 0 and 2 by rank 0
    for i in range(3):
        ck = CheckpointStore(tmp_path / "ck2").load(f"refine.chunk{i}")
        assert ck is not None and ck.done and ck.step == 3
        assert torch.equal(ck.params()["images"], one["refined"][4 * i:4 * i + 4])


# --------------------------------------------------------------------------------------------------
# refinement: resume inside a chunk, memory bounded by the chunk, checkpoint_every=0
# --------------------------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


class CountingTeacher(torch.nn.Module):
    """Wraps a teacher; raises :class:`Interrupted` on call number ``limit + 1`` (a kill at a known point)."""

    def __init__(self, net: torch.nn.Module, limit: int = 0):
        super().__init__()
        self.net, self.limit, self.calls = net, limit, 0

    def forward(self, x):
        self.calls += 1
        if self.limit and self.calls > self.limit:
            raise Interrupted
        return self.net(x)


_REFINE = dict(steps=6, view_size=16, batch_size=3, chunk=4, seed=2, lr=0.05, checkpoint_every=2, progress=False)


def test_refine_resumed_mid_chunk_equals_uninterrupted_run(tmp_path):
    images, labels = _images(n=10)  # chunks of 4, 4 and 2 images
    projector = _net(2)
    whole, whole_st = refine_images(projector, CountingTeacher(_net(1)), images, labels,
                                    store=CheckpointStore(tmp_path / "a"), **_REFINE)
    # Teacher calls per chunk: 4 (views measured before) + 1 per step + 4 (after). Chunk 0 takes 14,
    # chunk 1's measurement 4 more; the 23rd call is chunk 1's 5th step, after its checkpoint at step 4.
    store = CheckpointStore(tmp_path / "b")
    with pytest.raises(Interrupted):
        refine_images(projector, CountingTeacher(_net(1), limit=22), images, labels, store=store, **_REFINE)
    first = store.load("refine.chunk0")
    assert first.done and first.step == 6 and first.params()["images"].dtype == torch.uint8
    mid = store.load("refine.chunk1")
    assert mid is not None and not mid.done and mid.step == 4
    assert mid.params()["images"].dtype == torch.float32 and mid.params()["images"].shape == (4, 3, 16, 16)
    assert {v.shape[0] for k, v in mid.tensors.items() if k.startswith("optim.state.") and v.dim() > 0} == {4}
    assert store.load("refine.chunk2") is None
    resumed, st = refine_images(projector, CountingTeacher(_net(1)), images, labels, store=store, resume=True,
                                **_REFINE)
    assert torch.equal(resumed, whole), "a resumed refinement must equal an uninterrupted one bit for bit"
    assert st["refine_kl_before"] == whole_st["refine_kl_before"]
    assert st["refine_kl_after"] == whole_st["refine_kl_after"]
    assert st["refine_resumed_from"] == 6 + 4 and whole_st["refine_resumed_from"] == 0
    assert st["refine_chunks"] == 3


def test_refine_resumed_with_another_chunk_size_starts_over(tmp_path):
    images, labels = _images(n=10)
    store = CheckpointStore(tmp_path / "ck")
    refine_images(_net(2), _net(1), images, labels, store=store, **{**_REFINE, "steps": 2})
    other = {**_REFINE, "steps": 2, "chunk": 5}
    resumed, st = refine_images(_net(2), _net(1), images, labels, store=store, resume=True, **other)
    fresh, _ = refine_images(_net(2), _net(1), images, labels, **other)
    assert st["refine_resumed_from"] == 0 and st["refine_chunks"] == 2
    assert torch.equal(resumed, fresh)


def test_refine_holds_one_chunk_of_float_state(monkeypatch):
    shapes = []

    class Recording(torch.optim.Adam):
        def step(self, closure=None):
            out = super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    shapes.append(tuple(p.shape))
                    shapes.extend(tuple(v.shape) for v in self.state[p].values() if v.dim() > 0)
            return out

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    images, labels = _images(n=10)
    out, st = refine_images(_net(2), _net(1), images, labels, **{**_REFINE, "steps": 2})
    assert out.shape == images.shape and st["refine_chunks"] == 3
    # the parameter, its gradient-sized moments: never more images than a chunk (4), never the set (10)
    assert shapes and {s[0] for s in shapes} == {4, 2}
    assert all(s[1:] == (3, 16, 16) for s in shapes)


def test_checkpoint_every_zero_saves_finished_chunks_only(tmp_path, monkeypatch):
    saved = []
    real = CheckpointStore.save

    def spy(self, stage, step, **kw):
        saved.append((stage, step, kw.get("done", False)))
        return real(self, stage, step, **kw)

    monkeypatch.setattr(CheckpointStore, "save", spy)
    images, labels = _images(n=10)
    refine_images(_net(2), _net(1), images, labels, store=CheckpointStore(tmp_path / "ck"),
                  **{**_REFINE, "checkpoint_every": 0})
    assert saved == [(f"refine.chunk{i}", 6, True) for i in range(3)]


def test_build_passes_checkpoint_every_zero_to_refinement(tmp_path, monkeypatch):
    """``--checkpoint-every 0`` means no intermediate checkpoints (it used to mean every step)."""
    import hellofmt
    import hellofmt.builder.refine as refine

    seen = []
    real = refine.refine_images

    def spy(*a, **kw):
        seen.append(kw["checkpoint_every"])
        return real(*a, **kw)

    monkeypatch.setattr(refine, "refine_images", spy)
    data = _write_data(tmp_path / "train")
    (tmp_path / "teacher.py").write_text(TEACHER_PY)
    hellofmt.build_bundle(str(data), f"{tmp_path / 'teacher.py'}:make", TINY_CONFIG, tmp_path / "b", ipc=1, steps=2,
                          batch_size=4, rank=2, head_rank=2, holdout=0.2, fidelity_views=1, refine_steps=2,
                          checkpoint_every=0, progress=False, device="cpu")
    assert seen == [0]


# --------------------------------------------------------------------------------------------------
# a whole build: torchrun with 2 processes against 1
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_process_build_against_one_process(tmp_path):
    """The same build (same seed) under torchrun with 1 and with 2 CPU processes.

    What differs, and why: distillation is DDP, so with 2 processes each step averages the gradients of
    a global batch of 2 x --batch-size views (each rank's own samples from the DistributedSampler and its
    own view randomness, seeded from (seed, rank, step)), against --batch-size views with 1 process. The
    projectors therefore differ in general, and so does everything computed from them: k-means selection
    (it clusters in the projector's embedding space), refinement, fidelity, the probe, the deltas. To
    compare the stages after distillation, this build makes distillation a no-op in float32 (--lr 1e-30:
    the low-rank B starts at zero and moves by about 1e-30, far below one ulp of any weight or logit), so
    the two projectors give the same logits; the distillation's own loss and agreement figures (measured
    on different batches) and the deltas' stored bytes still differ, as do timings and world_size.
    Selection (classes split across ranks) and refinement (chunks split across ranks) must then give
    identical images.
    """
    from hellofmt.bundle import Bundle

    data = _write_data(tmp_path / "train", per_class=5)
    (tmp_path / "teacher.py").write_text(TEACHER_PY)
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"bundle{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "hellofmt.cli", "build", "--train-data", str(data), "--teacher", f"{tmp_path / 'teacher.py'}:make",
               "--foundation", TINY_CONFIG, "--out", str(out), "--ipc", "2", "--steps", "2", "--batch-size", "4",
               "--lr", "1e-30", "--rank", "2", "--head-rank", "2", "--holdout", "0.2", "--fidelity-views", "1",
               "--refine-steps", "2", "--refine-chunk", "4", "--keep-checkpoints", "--device", "cpu", "--seed", "3",
               "--quiet"]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        outs[nproc] = Bundle.open(out, verify=True)
    one, two = outs[1], outs[2]
    assert two.manifest.provenance.extra["world_size"] == 2 and one.manifest.provenance.extra["world_size"] == 1
    # selected images (before refinement), from the checkpoint each build kept
    sel = [CheckpointStore(tmp_path / f"bundle{n}.ckpt").load("images").params() for n in (1, 2)]
    assert torch.equal(sel[0]["images"], sel[1]["images"]) and torch.equal(sel[0]["labels"], sel[1]["labels"])
    # refined images, as stored in the bundles: 6 images in chunks of 4 and 2, chunk 1 refined on rank 1
    (i1, l1), (i2, l2) = one.read_images(), two.read_images()
    assert torch.equal(i1, i2) and torch.equal(l1, l2)
    assert (tmp_path / "bundle2.ckpt" / "refine.chunk1.json").is_file()
    m1, m2 = one.manifest.metrics, two.manifest.metrics
    for key in ("images.init_teacher_confidence", "images.init_teacher_top1", "refine.kl_before", "refine.kl_after",
                "refine.chunks", "fidelity.synthetic.kl", "fidelity.heldout.kl"):
        assert m1[key] == m2[key], key
