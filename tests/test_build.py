"""hellofmt build: a tiny end-to-end build, resume after an interruption, torchrun on the CPU, and
every bad input the issue lists (each must fail up front with a HellofmtError naming the problem).

All builds use the tiny ViT config (random weights, embedded in the bundle), a teacher defined in a
``FILE.py:FACTORY`` written to the test's tmp folder, and 3 classes x 5 procedural 32 px images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hellofmt.errors import BuildError, BuildInputError, TeacherError

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "tests" / "data" / "hf-test-tiny-vit.json")

# A deterministic teacher: logits from the mean colour (classes are red, green, blue images).
# ``FAIL_AFTER`` (an environment variable) makes forward raise after that many calls, to
# interrupt a build at a known point.
TEACHER_PY = textwrap.dedent(
    '''
    import os
    import torch
    from torch import nn

    class ColourTeacher(nn.Module):
        def __init__(self, classes=3, nan=False):
            super().__init__()
            self.lin = nn.Linear(3, classes)
            with torch.no_grad():
                # folders sort as blue, green, red: class 0 is channel 2 and so on
                self.lin.weight.copy_(torch.eye(3, classes).flip(0).t() * 12 - 4)
                self.lin.bias.zero_()
            self.nan = nan
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            limit = int(os.environ.get("HELLOFMT_TEST_FAIL_AFTER", "0"))
            if limit and self.calls > limit:
                raise KeyboardInterrupt("simulated interruption")
            out = self.lin(x.mean((2, 3)))
            return out * float("nan") if self.nan else out

    def make():
        return ColourTeacher().eval()

    def five_classes():
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5)).eval()

    def nan_teacher():
        return ColourTeacher(nan=True).eval()

    def not_a_module():
        return 42
    '''
)


def _write_data(root: Path, classes=("red", "green", "blue"), per_class=5, size=32, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (size, size, 3))
            img[..., c % 3] += 120 + rng.integers(0, 40)
            # a bright square somewhere so that crops differ
            x, y = rng.integers(0, size - 8, 2)
            img[y:y + 8, x:x + 8] = 255
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture
def env(tmp_path):
    data = _write_data(tmp_path / "train")
    teacher = tmp_path / "teacher.py"
    teacher.write_text(TEACHER_PY)
    return {"data": data, "teacher": f"{teacher}:make", "tfile": teacher, "tmp": tmp_path}


def _small(**kw):
    opts = dict(ipc=1, factor=2, steps=4, batch_size=8, rank=2, head_rank=2, holdout=0.2, fidelity_views=1,
                checkpoint_every=2, progress=False, device="cpu", seed=0)
    opts.update(kw)
    return opts


def _build(env, out_name="bundle", **kw):
    import hellofmt

    teacher = kw.pop("teacher_override", env["teacher"])
    # hellofmt.build_bundle(...) mirrors `hellofmt build`
    return hellofmt.build_bundle(str(env["data"]), teacher, TINY_CONFIG, env["tmp"] / out_name, **_small(**kw))


# --------------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------------
def test_tiny_build_end_to_end(env):
    from hellofmt.bundle import Bundle

    res = _build(env, refine_steps=2, keep_checkpoints=False)
    b = Bundle.open(res.path, verify=True)
    assert b.verify() == []
    m = b.manifest
    assert m.classes == ["blue", "green", "red"]
    assert m.images.count == 3 and m.images.per_class == [1, 1, 1]
    assert (m.images.height, m.images.width) == (32, 32)
    assert m.foundation.source == "embedded"
    assert m.probe is not None and m.probe.views
    assert m.projector.head is not None and m.projector.head.rank == 2
    assert m.metrics["distill.steps"] == 4 and m.metrics["distill.resumed_from"] == 0
    assert "adapt.steps" not in m.metrics and m.provenance.build_args["adapt_steps"] == 0  # off by default
    for key in ("fidelity.synthetic.top1_agreement", "fidelity.heldout.kl", "refine.kl_before", "refine.kl_after"):
        assert key in m.metrics
    assert set(m.provenance.extra["timings_s"]) >= {"inputs", "distill", "images", "refine", "fidelity"}
    assert m.provenance.teachers == ["teacher.py:make"]
    assert "label payload" in res["summary"]
    # the checkpoint folder is removed after a successful build unless asked to keep it
    assert not (env["tmp"] / "bundle.ckpt").exists()
    images, labels = b.read_images()
    assert labels.tolist() == [0, 1, 2]
    dominant = images.float().mean((2, 3)).argmax(1).tolist()
    assert dominant == [2, 1, 0]  # class 0 "blue" -> channel 2, ...
    # RDED keeps the patches the teacher is surest of
    assert m.metrics["images.init_teacher_confidence"] > 0.9


def test_build_bundle_loads_in_dataset(env):
    from hellofmt.dataset import DistilledDataset

    res = _build(env)
    ds = DistilledDataset(str(res.path), device="cpu")
    assert len(ds) == 3 and ds.num_classes == 3
    logits = ds.logits(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_distillation_learns_the_teacher(env):
    """The projector starts from random CLIP weights, so agreement comes from the deltas alone."""
    res = _build(env, steps=40, rank=4, head_rank=4, lr=1e-2, ipc=2)
    assert res["metrics"]["fidelity.synthetic.top1_agreement"] >= 0.8


def test_adaptation_fits_the_projector_to_the_bundle_images(env):
    """--adapt-steps fine-tunes the deltas on views of the kept images: a barely distilled projector
    then labels those views like the teacher, recorded in the metrics and the timings."""
    from hellofmt.builder.checkpoint import CheckpointStore

    kw = dict(steps=2, ipc=2, rank=4, head_rank=4, lr=1e-2, keep_checkpoints=True)
    before = _build(env, out_name="plain", **kw)["metrics"]
    res = _build(env, out_name="adapted", adapt_steps=40, **kw)
    after = res["metrics"]
    assert "adapt.steps" not in before
    assert after["adapt.steps"] == 40 and after["distill.steps"] == 2
    assert after["fidelity.synthetic.top1_agreement"] >= before["fidelity.synthetic.top1_agreement"] + 0.3
    assert after["fidelity.synthetic.kl"] < before["fidelity.synthetic.kl"]
    assert "adapt" in res["timings"]
    assert res.path is not None
    ck = CheckpointStore(env["tmp"] / "adapted.ckpt").load("adapt")
    assert ck is not None and ck.done and ck.step == 40
    # resuming a finished adaptation reloads it rather than training again
    again = _build(env, out_name="adapted", adapt_steps=40, resume=True, overwrite=True, **kw)["metrics"]
    assert again["fidelity.synthetic.top1_agreement"] == after["fidelity.synthetic.top1_agreement"]


def test_images_from_folder(env):
    from hellofmt.bundle import Bundle

    pre = _write_data(env["tmp"] / "distilled", per_class=2, size=24, seed=3)
    res = _build(env, ipc=None, images=str(pre), head_rank=0)
    m = Bundle.open(res.path).manifest
    assert m.images.per_class == [2, 2, 2] and m.images.height == 32
    assert m.projector.head is None  # --head-rank 0: no head delta


def test_default_image_size_follows_small_source_images(tmp_path):
    """Images smaller than the foundation's input are kept at their own side (not upsampled), and
    the size-dependent defaults follow that side; --image-size still wins."""
    from hellofmt.bundle import Bundle

    env = {"data": _write_data(tmp_path / "train", size=20), "teacher": None, "tmp": tmp_path}
    (tmp_path / "teacher.py").write_text(TEACHER_PY)
    env["teacher"] = f"{tmp_path / 'teacher.py'}:make"
    m = Bundle.open(_build(env, factor=None).path).manifest
    assert (m.images.height, m.images.width) == (20, 20)
    args = m.provenance.build_args
    assert args["image_size"] is None and args["factor"] == 1  # as given, and as resolved for 20 px
    m = Bundle.open(_build(env, out_name="b2", image_size=32).path).manifest
    assert (m.images.height, m.images.width) == (32, 32)


def test_whole_image_selection_keeps_the_originals_pixels(env):
    """Below 128 px the defaults keep whole images (factor 1, --select-scale 1 1): a kept image is the
    original itself when it is already at the image size (read at that size, not enlarged by 8/7 and
    shrunk back, which blurred edges and textures), as the eval's random arm reads real images."""
    from hellofmt.bundle import Bundle

    res = _build(env, factor=None, ipc=2)
    b = Bundle.open(res.path)
    assert b.manifest.provenance.build_args["select_scale"] == [1.0, 1.0]
    originals = {np.asarray(Image.open(f).convert("RGB")).tobytes() for f in env["data"].rglob("*.png")}
    images, _ = b.read_images()
    assert images.shape[0] == 6
    for img in images:
        assert img.permute(1, 2, 0).numpy().tobytes() in originals
    # --load-size still wins: read at 36 px and resampled to 32, no kept image is an original any more
    images, _ = Bundle.open(_build(env, out_name="b2", factor=None, ipc=2, load_size=36).path).read_images()
    assert not any(img.permute(1, 2, 0).numpy().tobytes() in originals for img in images)


def test_default_image_size_rule():
    from hellofmt.builder.config import default_image_size

    assert default_image_size(224, 32) == 32  # a CIFAR-sized set under a 224-px foundation: 32 px
    assert default_image_size(224, 375) == 224  # ImageNet-sized: the foundation's side
    assert default_image_size(224, None) == 224  # nothing read: the foundation's side
    assert default_image_size(32, 4) == 8  # never below --image-size's floor


def test_source_side_reads_headers_and_takes_the_median(tmp_path):
    from hellofmt.builder.inputs import TensorData, scan_image_folder, source_side

    root = tmp_path / "src"
    for i, (w, h) in enumerate([(40, 30), (64, 64), (100, 50), (20, 90)]):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h)).save(root / f"c{i % 2}" / f"{i}.png")
    folder = scan_image_folder(str(root))
    (root / "broken.png").write_bytes(b"not an image")
    folder.samples.append((str(root / "broken.png"), 0))  # left out, not raised: the decode reports it
    assert source_side(folder, list(range(len(folder.samples)))) == 30  # short sides 20, 30, 50, 64
    assert source_side(folder, [len(folder.samples) - 1]) is None
    assert source_side(TensorData(torch.zeros(2, 3, 24, 28, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"]),
                       [0]) == 24


# --------------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------------
def test_interrupted_build_resumes_from_checkpoint(env, monkeypatch):
    from hellofmt.builder.checkpoint import CheckpointStore
    from hellofmt.bundle import Bundle

    # probe check: 1 call; then one teacher call per distillation step; fail during step 6
    monkeypatch.setenv("HELLOFMT_TEST_FAIL_AFTER", "6")
    with pytest.raises(KeyboardInterrupt):
        _build(env, steps=8, checkpoint_every=2)
    assert not (env["tmp"] / "bundle").exists()
    ck = CheckpointStore(env["tmp"] / "bundle.ckpt").load("distill")
    assert ck is not None and ck.step == 4 and not ck.done
    assert any(k.startswith("optim.state.") and k.endswith("exp_avg") for k in ck.tensors)
    monkeypatch.delenv("HELLOFMT_TEST_FAIL_AFTER")
    res = _build(env, steps=8, checkpoint_every=2, resume=True)
    m = Bundle.open(res.path, verify=True).manifest
    assert m.metrics["distill.resumed_from"] == 4
    assert m.metrics["distill.steps"] == 8


def test_resume_with_other_options_refused(env, monkeypatch):
    monkeypatch.setenv("HELLOFMT_TEST_FAIL_AFTER", "4")
    with pytest.raises(KeyboardInterrupt):
        _build(env, steps=8, checkpoint_every=2)
    monkeypatch.delenv("HELLOFMT_TEST_FAIL_AFTER")
    with pytest.raises(BuildError, match="rank"):
        _build(env, steps=8, checkpoint_every=2, resume=True, rank=3)


def test_checkpoint_optimizer_round_trip(tmp_path):
    from hellofmt.builder.checkpoint import CheckpointStore

    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([p], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        p.pow(2).sum().backward()
        opt.step()
    store = CheckpointStore(tmp_path / "ck")
    store.save("s", 3, params={"p": p.detach()}, optimizer=opt, scalars={"x": 1.5})
    ck = store.load("s")
    p2 = torch.nn.Parameter(ck.params()["p"].clone())
    opt2 = torch.optim.AdamW([p2], lr=0.1)
    opt2.load_state_dict(ck.optimizer_state())
    for o, q in ((opt, p), (opt2, p2)):
        o.zero_grad()
        q.pow(2).sum().backward()
        o.step()
    assert torch.equal(p, p2) and ck.step == 3 and ck.scalars["x"] == 1.5
    # nothing pickled: the tensor file is plain safetensors, the rest JSON
    assert json.loads((tmp_path / "ck" / "s.json").read_text())["tensors"].endswith(".safetensors")


# --------------------------------------------------------------------------------------------------
# torchrun on the CPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_cpu(env):
    from hellofmt.bundle import Bundle

    out = env["tmp"] / "ddp-bundle"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hellofmt.cli", "build", "--train-data", str(env["data"]), "--teacher", env["teacher"],
           "--foundation", TINY_CONFIG, "--out", str(out), "--ipc", "1", "--epochs", "0.01", "--min-steps", "7",
           "--batch-size", "4",
           "--rank", "2", "--head-rank", "2", "--holdout", "0.2", "--fidelity-views", "1", "--device", "cpu",
           "--quiet"]
    envv = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=envv, cwd=env["tmp"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"wrote {out}" in r.stdout
    b = Bundle.open(out, verify=True)
    assert b.verify() == []
    assert b.manifest.provenance.extra["world_size"] == 2
    # the --min-steps floor is shared: 7 steps of one process's batch are ceil(7 / 2) = 4 on each of two
    assert b.manifest.metrics["distill.steps"] == 4


def test_planned_steps_share_the_floor_not_the_epochs():
    from hellofmt.builder.distill import planned_steps

    assert planned_steps(100, steps=None, epochs=1.0, min_steps=6000) == 6000
    assert planned_steps(100, steps=None, epochs=1.0, min_steps=6000, world_size=8) == 750
    assert planned_steps(100, steps=None, epochs=1.0, min_steps=6001, world_size=8) == 751  # rounded up
    # epochs count each process's own share already (the sampler's per_epoch), so they are not divided
    assert planned_steps(1000, steps=None, epochs=2.0, min_steps=6000, world_size=8) == 2000
    assert planned_steps(100, steps=None, epochs=1.0, min_steps=0, world_size=8) == 100
    assert planned_steps(100, steps=37, epochs=1.0, min_steps=6000, world_size=8) == 37  # --steps: as given
    assert planned_steps(0, steps=None, epochs=0.0, min_steps=0) == 1


# --------------------------------------------------------------------------------------------------
# bad inputs: each fails before any training, naming what is wrong
# --------------------------------------------------------------------------------------------------
def test_missing_train_folder(env):
    with pytest.raises(BuildInputError, match="folder not found") as e:
        from hellofmt import build_bundle as build

        build(str(env["tmp"] / "nope"), env["teacher"], TINY_CONFIG, env["tmp"] / "b", **_small())
    assert e.value.field == "--train-data" and "nope" in str(e.value)


def test_class_without_images(env):
    (env["data"] / "purple").mkdir()
    with pytest.raises(BuildInputError, match="no images: purple"):
        _build(env)
    assert not (env["tmp"] / "bundle.ckpt").exists()  # nothing left behind by a failed input check


def test_unreadable_images_listed_with_paths(env):
    (env["data"] / "red" / "broken.png").write_bytes(b"not a png at all")
    (env["data"] / "blue" / "empty.jpg").write_bytes(b"")
    with pytest.raises(BuildInputError, match="2 unreadable image") as e:
        _build(env)
    assert str(env["data"] / "red" / "broken.png") in str(e.value)
    assert str(env["data"] / "blue" / "empty.jpg") in str(e.value)


def test_class_map_tsv_and_json(env):
    from hellofmt.builder.inputs import load_class_map, scan_image_folder

    tsv = env["tmp"] / "classes.tsv"
    tsv.write_text("red\tred square\ngreen\tgreen square\nblue\tblue square\n")
    folder = scan_image_folder(env["data"], class_map=load_class_map(tsv))
    assert folder.names == ["blue square", "green square", "red square"]
    js = env["tmp"] / "classes.json"
    js.write_text(json.dumps({"red": "r", "green": "g"}))
    with pytest.raises(BuildInputError, match="no readable name in the class map: blue"):
        scan_image_folder(env["data"], class_map=load_class_map(js))
    bad = env["tmp"] / "bad.tsv"
    bad.write_text("red\tx\ngreen\n")
    with pytest.raises(BuildInputError) as e:
        load_class_map(bad)
    assert e.value.field == "line 2"


def test_teacher_with_wrong_class_count(env):
    with pytest.raises(TeacherError, match="outputs 5 classes but the training data has 3"):
        _build(env, teacher_override=f"{env['tfile']}:five_classes")


def test_teacher_returning_nan(env):
    with pytest.raises(TeacherError, match="NaN"):
        _build(env, teacher_override=f"{env['tfile']}:nan_teacher")


def test_bad_teacher_specs(env):
    from hellofmt.builder.teachers import load_teachers

    with pytest.raises(TeacherError, match="not a torch.nn.Module"):
        load_teachers(f"{env['tfile']}:not_a_module", num_classes=3)
    with pytest.raises(TeacherError, match="no function 'missing'"):
        load_teachers(f"{env['tfile']}:missing", num_classes=3)
    with pytest.raises(TeacherError, match="cannot parse teacher spec"):
        load_teachers("resnet18", num_classes=3)
    with pytest.raises(TeacherError, match="needs --teacher-weights"):
        load_teachers("timm:resnet18", num_classes=3)
    pt = env["tmp"] / "w.pt"
    pt.write_bytes(b"\x80\x02pickle")
    with pytest.raises(TeacherError, match="must be a .safetensors file"):
        load_teachers("timm:resnet18", num_classes=3, weights=str(pt))


def test_teacher_specs_are_checked_before_the_foundation_loads(env, monkeypatch):
    # A real foundation can be a large download: a typo in --teacher must fail before it starts.
    import hellofmt.foundation

    def no_load(*a, **k):
        raise AssertionError("the foundation was loaded before the teacher spec was checked")

    monkeypatch.setattr(hellofmt.foundation, "load_foundation", no_load)
    with pytest.raises(TeacherError, match="teacher file not found"):
        _build(env, teacher_override=str(env["tmp"] / "nosuch.py") + ":make")
    with pytest.raises(TeacherError, match="timm has no architecture 'resnet1800'"):
        _build(env, teacher_override="timm:resnet1800")
    with pytest.raises(TeacherError, match="teacher weights not found"):
        _build(env, teacher_override="timm:resnet18", teacher_weights=str(env["tmp"] / "none.safetensors"))
    assert not (env["tmp"] / "bundle").exists()


def test_timm_teacher_from_safetensors(env):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from hellofmt.builder.teachers import load_teachers

    m = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=3)
    w = env["tmp"] / "t.safetensors"
    save_file(m.state_dict(), str(w))
    ens, descs = load_teachers("timm:test_resnet.r160_in1k", num_classes=3, weights=str(w),
                               probe=torch.rand(2, 3, 32, 32))
    assert descs == ["timm:test_resnet.r160_in1k (t.safetensors)"]
    with pytest.raises(TeacherError, match="do not fit"):
        load_teachers("timm:test_resnet.r160_in1k", num_classes=4, weights=str(w))


def test_images_and_ipc_are_exclusive(env):
    with pytest.raises(BuildInputError, match="exactly one of --images"):
        _build(env, images=str(env["data"]))


def test_images_folder_missing_a_class(env):
    pre = _write_data(env["tmp"] / "distilled", classes=("red", "green"), per_class=1)
    with pytest.raises(BuildInputError, match="no images for class folder"):
        _build(env, ipc=None, images=str(pre))


def test_existing_out_refused(env):
    (env["tmp"] / "bundle").mkdir()
    with pytest.raises(BuildInputError, match="already exists"):
        _build(env)


def test_cli_reports_bad_input_in_one_line(env):
    from click.testing import CliRunner

    from hellofmt.cli import main

    r = CliRunner().invoke(main, ["build", "--train-data", str(env["tmp"] / "missing"), "--teacher", env["teacher"],
                                  "--foundation", TINY_CONFIG, "--out", str(env["tmp"] / "b"), "--ipc", "1"])
    assert r.exit_code == 2
    assert "folder not found" in r.output and "Traceback" not in r.output


# --------------------------------------------------------------------------------------------------
# Python API: modules and in-memory data directly; several teachers averaged
# --------------------------------------------------------------------------------------------------
def test_build_from_tensors_and_module(env):
    from hellofmt import build_bundle as build
    from hellofmt.builder.teachers import load_teacher
    from hellofmt.bundle import Bundle

    teacher, _ = load_teacher(env["teacher"], num_classes=3)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(12, 3, 32, 32, generator=g) * 80).to(torch.uint8)
    labels = torch.arange(12) % 3
    for i in range(12):
        images[i, 2 - int(labels[i])] += 150  # class 0 is blue (channel 2), as for the colour teacher
    res = build((images, labels), teacher, TINY_CONFIG, env["tmp"] / "mem", classes=["blue", "green", "red"],
                **_small())
    m = Bundle.open(res.path, verify=True).manifest
    assert m.classes == ["blue", "green", "red"] and m.images.count == 3
    assert m.provenance.teachers == ["module:ColourTeacher"]
    with pytest.raises(BuildInputError, match="needs classes"):
        build((images, labels), teacher, TINY_CONFIG, env["tmp"] / "mem2", **_small())


def test_several_teachers_are_averaged(env):
    from hellofmt.builder.teachers import load_teachers

    a = torch.nn.Linear(3, 3)
    b = torch.nn.Linear(3, 3)
    wrap = lambda lin: torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), lin)  # noqa: E731
    ens, descs = load_teachers([wrap(a), wrap(b)], num_classes=3, probe=torch.rand(2, 3, 8, 8))
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        want = (a(x.mean((2, 3))) + b(x.mean((2, 3)))) / 2
        assert torch.allclose(ens(x), want, atol=1e-6)
    assert len(descs) == 2


# --------------------------------------------------------------------------------------------------
# review fixes
# --------------------------------------------------------------------------------------------------
def test_refine_resume_after_completion_returns_stored_images(tmp_path):
    from hellofmt.builder.checkpoint import CheckpointStore
    from hellofmt.builder.refine import refine_images

    torch.manual_seed(0)
    wrap = lambda: torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),  # noqa: E731
                                       torch.nn.Linear(3, 3))
    projector, teacher = wrap().eval(), wrap().eval()
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(6, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(6) % 3
    store = CheckpointStore(tmp_path / "ck")
    kw = dict(steps=3, view_size=16, batch_size=4, lr=0.05, store=store, checkpoint_every=1, progress=False)
    out, st = refine_images(projector, teacher, images, labels, **kw)
    again, st2 = refine_images(projector, teacher, images, labels, resume=True, **kw)
    assert again.dtype == torch.uint8 and torch.equal(again, out)
    assert st2["refine_kl_before"] == st["refine_kl_before"] and st2["refine_kl_after"] == st["refine_kl_after"]
    assert st2["refine_resumed_from"] == 3


@pytest.mark.parametrize("kw, field", [
    (dict(lr=0.0), "--lr"),
    (dict(lr=-1e-3), "--lr"),
    (dict(weight_decay=-0.1), "--weight-decay"),
    (dict(refine_steps=2, refine_lr=0.0), "--refine-lr"),
    (dict(adapt_steps=-1), "--adapt-steps"),
    (dict(num_workers=-1), "--num-workers"),
    (dict(fidelity_views=0), "--fidelity-views"),
    (dict(candidates=0), "--candidates"),
    (dict(load_size=0), "--load-size"),
    (dict(codec="png", quality=90), "--quality"),
    (dict(codec="jpeg", quality=0), "--quality"),
    (dict(codec="gif"), "--codec"),
    (dict(device="foo"), "--device"),
    pytest.param(dict(device="cuda"), "--device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (dict(device="cuda:99"), "--device"),
])
def test_bad_options_refused_up_front(env, monkeypatch, kw, field):
    import hellofmt.foundation

    def no_load(*a, **k):
        raise AssertionError("the foundation was loaded before the options were checked")

    monkeypatch.setattr(hellofmt.foundation, "load_foundation", no_load)
    with pytest.raises(BuildInputError) as e:
        _build(env, **kw)
    assert e.value.field == field
    assert not (env["tmp"] / "bundle").exists() and not (env["tmp"] / "bundle.ckpt").exists()


def test_init_world_bad_device_is_an_input_error():
    from hellofmt.builder.dist import init_world

    with pytest.raises(BuildInputError) as e:
        init_world("foo")
    assert e.value.field == "--device"


def test_corrupt_build_json_on_resume_is_a_build_error(env, monkeypatch):
    monkeypatch.setenv("HELLOFMT_TEST_FAIL_AFTER", "4")
    with pytest.raises(KeyboardInterrupt):
        _build(env, steps=8, checkpoint_every=2)
    monkeypatch.delenv("HELLOFMT_TEST_FAIL_AFTER")
    bj = env["tmp"] / "bundle.ckpt" / "build.json"
    bj.write_text("{not json")
    with pytest.raises(BuildError, match="unreadable checkpoint") as e:
        _build(env, steps=8, checkpoint_every=2, resume=True)
    assert e.value.file == str(bj) and "delete the checkpoint folder" in str(e.value)
    bj.write_text("[1, 2]")
    with pytest.raises(BuildError, match="JSON object"):
        _build(env, steps=8, checkpoint_every=2, resume=True)
    assert not (env["tmp"] / "bundle").exists()


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("step"), "step"),
    (lambda m: m.update(step="4"), "step"),
    (lambda m: m.update(done=1), "done"),
    (lambda m: m.pop("tensors"), "tensors"),
    (lambda m: m.update(tensors="../../etc/passwd"), "tensors"),
])
def test_malformed_stage_json_is_a_build_error(tmp_path, edit, field):
    from hellofmt.builder.checkpoint import CheckpointStore

    store = CheckpointStore(tmp_path / "ck")
    store.save("s", 2, params={"p": torch.ones(3)})
    p = tmp_path / "ck" / "s.json"
    meta = json.loads(p.read_text())
    edit(meta)
    p.write_text(json.dumps(meta))
    with pytest.raises(BuildError) as e:
        store.load("s")
    assert e.value.field == field and e.value.file == str(p)
    p.write_text("[]")
    with pytest.raises(BuildError, match="JSON object"):
        store.load("s")


def test_truncated_checkpoint_tensors_are_a_build_error(tmp_path):
    from hellofmt.builder.checkpoint import CheckpointStore

    store = CheckpointStore(tmp_path / "ck")
    store.save("s", 2, params={"p": torch.ones(300)})
    t = tmp_path / "ck" / "s-00000002.safetensors"
    t.write_bytes(t.read_bytes()[:40])
    with pytest.raises(BuildError, match="unreadable checkpoint tensors"):
        store.load("s")


def test_step_generator_is_on_the_cpu():
    from hellofmt.builder.distill import step_generator

    g = step_generator(3, 1, 7, torch.device("cpu"))
    assert g.device.type == "cpu"
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=step_generator(3, 1, 7, "cpu")))
