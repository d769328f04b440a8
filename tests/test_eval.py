"""hellofmt eval: arms on the same views, the table and JSON, --record, protocols, students, and every
bad input the issue lists (each a clear EvalInputError before any training).

Everything runs on the session's tiny bundle (3 classes x 2 images, 32 px) with a tiny ConvNet and
one or two epochs, so the file takes seconds; accuracies are only checked for being real top-1 values
on the val set (multiples of 1/N), never for being high.
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
from click.testing import CliRunner
from PIL import Image

from hellofmt.errors import EvalInputError, ManifestError

from bundles import class_names, make_images

ROOT = Path(__file__).resolve().parents[1]
CLASSES = class_names(3)  # the tiny bundle's classes: cat, dog, car
FAST = {"student": "convnet:width=8", "epochs": 1, "progress": False}

STUDENTS_PY = textwrap.dedent(
    """
    from torch import nn

    def five_outputs(num_classes):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))

    def good(num_classes):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, num_classes))

    def colour_teacher():
        lin = nn.Linear(3, 3)
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin).eval()
    """
)


def _write_folder(root: Path, per_class: int, seed: int, folders=None, size: int = 40) -> Path:
    images, labels = make_images(3, per_class, size, seed=seed)
    names = folders or CLASSES
    for i, (x, y) in enumerate(zip(images, labels)):
        d = root / names[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    (tmp / "models.py").write_text(STUDENTS_PY)
    return {
        "tmp": tmp,
        "val": _write_folder(tmp / "val", 4, seed=7),  # 12 images
        "train": _write_folder(tmp / "train", 5, seed=8),
        "models": tmp / "models.py",
    }


def _evaluate(bundle, val, **kw):
    from hellofmt import evaluate

    return evaluate(bundle, val, **{**FAST, **kw})


# --------------------------------------------------------------------------------------------------
# the whole run: four arms, table, JSON
# --------------------------------------------------------------------------------------------------
def test_all_four_arms_table_and_json(tiny_bundle, dirs):
    out = dirs["tmp"] / "result.json"
    r = _evaluate(tiny_bundle, dirs["val"], teacher=f"{dirs['models']}:colour_teacher", train_data=dirs["train"],
                  seeds=2, epochs=2, json_path=out)
    assert list(r.arms) == ["bundle", "hard", "teacher", "random"]
    for arm in r.arms.values():
        assert len(arm.accuracies) == 2 and len(arm.seconds) == 2
        # real top-1 on the 12 val images: multiples of 1/12
        assert all(abs(a * 12 - round(a * 12)) < 1e-9 and 0 <= a <= 1 for a in arm.accuracies)
    d = json.loads(out.read_text())
    assert d["protocol"] == "quick" and d["seeds"] == [0, 1] and d["val_count"] == 12 and d["val_skipped"] == 0
    assert d["hyperparameters"]["epochs"] == 2 and d["hyperparameters"]["batch_size"] == 6  # capped at 6 images
    assert d["hyperparameters"]["image_size"] == 32 and d["student"] == "convnet:depth=3,width=8,norm=instance"
    assert d["arms"]["random"]["accuracies"] == r.arms["random"].accuracies
    assert d["random_adapted"] is None  # a bundle built without --adapt-steps: the same projector labels both
    assert d["comparisons"]["ior"] == pytest.approx(r.arms["bundle"].mean - r.arms["random"].mean)
    assert d["comparisons"]["bundle-hard"] == pytest.approx(r.arms["bundle"].mean - r.arms["hard"].mean)
    assert d["teacher"] == ["models.py:colour_teacher"] and d["world_size"] == 1
    assert d["hellofmt_version"] and d["date"].endswith("Z")
    table = r.format_table()
    for word in ("bundle", "hard", "teacher", "random", "bundle/teacher", "bundle - hard", "IOR = bundle - random"):
        assert word in table
    assert f"{100 * r.arms['hard'].accuracies[1]:6.1f}" in table


def test_default_arms_are_those_the_inputs_allow(tiny_bundle, dirs):
    r = _evaluate(tiny_bundle, dirs["val"], seeds=1)
    assert list(r.arms) == ["bundle", "hard"]
    assert r.comparisons()["ior"] is None and "IOR" not in r.format_table()


def test_same_seed_same_student(tiny_bundle, dirs):
    a = _evaluate(tiny_bundle, dirs["val"], arms="bundle", seeds=1, epochs=2)
    b = _evaluate(tiny_bundle, dirs["val"], arms="bundle", seeds=1, epochs=2)
    assert a.arms["bundle"].accuracies == b.arms["bundle"].accuracies


def test_first_seed_adds_the_students_a_longer_run_would_have_trained(tiny_bundle, dirs):
    whole = _evaluate(tiny_bundle, dirs["val"], arms="bundle,random", train_data=dirs["train"], seeds=2, epochs=2)
    later = _evaluate(tiny_bundle, dirs["val"], arms="bundle,random", train_data=dirs["train"], seeds=1,
                      first_seed=1, epochs=2)
    assert later.seeds == [1] and later.to_dict()["seeds"] == [1]
    # the two seeds' random subsets differ, so a first_seed that were ignored (seed 0) would be seen
    assert whole.arms["random"].accuracies[0] != whole.arms["random"].accuracies[1]
    for arm in ("bundle", "random"):  # seed 1 trains the same student on the same random subset
        assert later.arms[arm].accuracies == whole.arms[arm].accuracies[1:]


@pytest.mark.parametrize("first", [-1, 1.5, True])
def test_first_seed_must_be_a_natural_number(tiny_bundle, dirs, first):
    with pytest.raises(EvalInputError, match="integer >= 0") as e:
        _evaluate(tiny_bundle, dirs["val"], first_seed=first)
    assert e.value.field == "--first-seed"


# --------------------------------------------------------------------------------------------------
# the arms see the same views
# --------------------------------------------------------------------------------------------------
def test_arms_share_views(tiny_bundle):
    from hellofmt.dataset import DistilledDataset
    from hellofmt.evaluation import _NoLabels, _Online, _with_labeller, arm_loader
    from hellofmt.students import get_protocol

    ds = DistilledDataset(tiny_bundle, device="cpu")
    proto = get_protocol("quick").resolved(num_images=len(ds), num_classes=3, image_size=32,
                                           recipe_scale=(0.5, 1.0), build_args={})
    teacher = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 3))
    arms = {
        "bundle": ds,
        "hard": _with_labeller(ds, _NoLabels(3)),
        "teacher": _with_labeller(ds, _Online(teacher)),
        "random": ds.with_images(ds.images.clone(), ds.targets.clone()),  # same pixels: same views
    }
    first = {k: next(iter(arm_loader(v, proto, seed=3))) for k, v in arms.items()}
    for k in ("hard", "teacher", "random"):
        assert torch.equal(first[k][0], first["bundle"][0]), k  # the same crops, flips, CutMix
        assert torch.equal(first[k][2], first["bundle"][2]), k  # the same hard labels
    assert torch.equal(first["random"][1], first["bundle"][1])  # same images, same projector: same labels
    assert not torch.allclose(first["teacher"][1], first["bundle"][1])  # only the labeller differs
    assert torch.equal(first["hard"][1], torch.full_like(first["hard"][1], 1 / 3))
    other_seed = next(iter(arm_loader(ds, proto, seed=4)))
    assert not torch.equal(other_seed[0], first["bundle"][0])


def test_with_images_shares_the_projector(tiny_bundle):
    from hellofmt.dataset import DistilledDataset
    from hellofmt.errors import InputError

    ds = DistilledDataset(tiny_bundle, device="cpu")
    imgs, labels = make_images(3, 3, 48, seed=11)
    other = ds.with_images(imgs, labels)
    assert len(other) == 9 and len(ds) == 6 and other.image_size == (48, 48)
    assert other.projector is ds.projector and other.manifest is ds.manifest
    assert other[4][1] == int(labels[4]) and torch.equal(other[4][0], imgs[4])
    soft = next(iter(other.loader(batch_size=9, image_size=32, seed=0)))[1]
    assert soft.shape == (9, 3) and torch.allclose(soft.sum(1), torch.ones(9))
    with pytest.raises(InputError, match="uint8"):
        ds.with_images(imgs.float(), labels)
    with pytest.raises(InputError, match=r"in \[0, 3\)"):
        ds.with_images(imgs, labels + 1)
    with pytest.raises(InputError, match="9 integer"):
        ds.with_images(imgs, labels[:4])


def test_random_arm_of_an_adapted_bundle_gets_an_adapted_projector(dirs, monkeypatch):
    """A bundle built with --adapt-steps has a projector fitted to its own images; the random control
    gets a copy fitted to each random subset the same way (with --teacher), or says it is biased."""
    import hellofmt
    import hellofmt.evaluation as ev
    from hellofmt.dataset import DistilledDataset
    from hellofmt.projector import Projector

    config = str(ROOT / "tests" / "data" / "hf-test-tiny-vit.json")
    teacher = f"{dirs['models']}:colour_teacher"
    out = dirs["tmp"] / "adapted-bundle"
    hellofmt.build_bundle(str(dirs["train"]), teacher, config, out, ipc=2, steps=2, adapt_steps=3, batch_size=4,
                          rank=2, head_rank=2, holdout=0.2, fidelity_views=1, progress=False, device="cpu")
    ds = DistilledDataset(out, device="cpu")
    assert ds.manifest.provenance.build_args["adapt_steps"] == 3

    # the training form of the bundle's projector labels as its merged form, and only the deltas train
    train_form = Projector.from_bundle(ds.bundle, trainable=True)
    x = ds.images[:4].float() / 255
    assert torch.allclose(train_form(x), ds.projector(x), atol=1e-4)
    trainable = {n for n, p in train_form.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)

    made = []
    real = ev._adapted_copy

    def spy(ds_, teacher_, xs, ys, cfg, **kw):
        proj = real(ds_, teacher_, xs, ys, cfg, **kw)
        made.append((cfg.steps, xs, proj))
        return proj

    monkeypatch.setattr(ev, "_adapted_copy", spy)
    r = _evaluate(out, dirs["val"], arms="random", teacher=teacher, train_data=dirs["train"], seeds=2)
    assert r.random_adapted is True and "adapted to it the same way" not in r.format_table()  # no IOR without bundle
    assert [m[0] for m in made] == [3, 3]  # one copy per seed, adapted for the bundle's own steps
    steps, xs, proj = made[0]
    views = xs.float() / 255
    assert not torch.allclose(proj(views), ds.projector(views), atol=1e-4)  # the copy's deltas moved

    made.clear()
    r = _evaluate(out, dirs["val"], arms="bundle,random", train_data=dirs["train"], seeds=1)
    assert r.random_adapted is False and not made
    assert "biased towards the bundle" in r.format_table() and r.to_dict()["random_adapted"] is False


def test_adaptation_read_from_an_untrusted_manifest_is_bounded():
    from types import SimpleNamespace

    from hellofmt.evaluation import MAX_ADAPT_STEPS, _adaptation

    def man(**args):
        return SimpleNamespace(provenance=SimpleNamespace(build_args=args),
                               labels=SimpleNamespace(temperature=1.0, mix="cutmix", scale=[0.25, 1.0]))

    assert _adaptation(man(), 32) is None and _adaptation(man(adapt_steps=0), 32) is None
    assert _adaptation(man(adapt_steps="9"), 32) is None
    cfg = _adaptation(man(adapt_steps=7, loss="evil", batch_size=-3, lr=0.02), 32)
    assert (cfg.steps, cfg.loss, cfg.batch_size, cfg.lr, cfg.mix, cfg.view_size) == (7, "kl", 1, 0.02, "cutmix", 32)
    with pytest.raises(EvalInputError, match="adapt_steps") as e:
        _adaptation(man(adapt_steps=MAX_ADAPT_STEPS + 1), 32)
    assert e.value.field == "--arms"


# --------------------------------------------------------------------------------------------------
# --record
# --------------------------------------------------------------------------------------------------
def test_record_round_trips_and_hashes_still_verify(tiny_bundle, dirs):
    from hellofmt.bundle import Bundle

    try:
        from hellofmt.verify import verify_bundle
    except ImportError:  # before the verify module was split out of bundle
        from hellofmt.bundle import verify_bundle

    copy = dirs["tmp"] / "recorded"
    shutil.copytree(tiny_bundle, copy)
    r = _evaluate(copy, dirs["val"], arms="bundle,hard", seeds=2, record=True)
    _evaluate(copy, dirs["val"], arms="hard", seeds=1, record=True)
    b = Bundle.open(copy, verify=True)
    evs = b.manifest.evaluations
    assert len(evs) == 2
    assert evs[0].protocol == "quick" and evs[0].seeds == [0, 1] and evs[0].val_count == 12
    assert evs[0].arms == {"bundle": r.arms["bundle"].accuracies, "hard": r.arms["hard"].accuracies}
    assert evs[0].student == "convnet:depth=3,width=8,norm=instance" and evs[0].hyperparameters["epochs"] == 1
    assert list(evs[1].arms) == ["hard"]
    assert verify_bundle(copy) == []
    assert sorted(os.listdir(copy)) == sorted(os.listdir(tiny_bundle))  # no temporary file left behind
    on_disk = json.loads((copy / "hellofmt.json").read_text())
    assert on_disk["evaluations"][0]["arms"]["hard"] == r.arms["hard"].accuracies


def test_evaluations_in_the_manifest_round_trip_and_are_checked(tiny_bundle):
    from hellofmt.bundle import Bundle
    from hellofmt.manifest import Manifest

    d = Bundle.open(tiny_bundle).manifest.to_dict()
    assert "evaluations" not in d  # absent when nobody evaluated the bundle
    d["evaluations"] = [{"protocol": "rded", "student": "timm:resnet18", "arms": {"bundle": [0.5, 0.25]},
                         "seeds": [0, 1], "hellofmt_version": "0.1.0", "date": "2026-01-01T00:00:00Z",
                         "hyperparameters": {"epochs": 300}, "future_field": {"kept": True}}]
    m = Manifest.from_dict(json.loads(json.dumps(d)))
    assert m.evaluations[0].arms["bundle"] == [0.5, 0.25] and m.evaluations[0].hyperparameters == {"epochs": 300}
    assert m.to_dict()["evaluations"] == d["evaluations"]  # unknown fields kept
    jsonschema = pytest.importorskip("jsonschema")
    for schema_file in (ROOT / "spec" / "manifest.schema.json", ROOT / "hellofmt" / "schema" / "manifest.schema.json"):
        if schema_file.is_file():  # the evaluations part (other helpers' fields may be mid-change)
            schema = json.loads(schema_file.read_text())
            sub = {"$defs": schema["$defs"], **schema["properties"]["evaluations"]}
            jsonschema.validate(d["evaluations"], sub)
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate([{**d["evaluations"][0], "arms": {"bundle": [2.0]}}], sub)
    bad = json.loads(json.dumps(d))
    bad["evaluations"][0]["arms"]["bundle"] = [1.5, 0.2]
    with pytest.raises(ManifestError, match=r"evaluations\[0\]\.arms\.bundle"):
        Manifest.from_dict(bad)
    bad["evaluations"][0]["arms"]["bundle"] = [0.5]
    with pytest.raises(ManifestError, match="1 accuracies for 2 seeds"):
        Manifest.from_dict(bad)


# --------------------------------------------------------------------------------------------------
# protocols and students
# --------------------------------------------------------------------------------------------------
def test_protocol_presets_and_overrides():
    from hellofmt.students import PROTOCOLS, get_protocol, lr_factor

    assert set(PROTOCOLS) == {"quick", "rded", "sre2l"}
    rded = get_protocol("rded")
    assert (rded.lr, rded.weight_decay, rded.temperature, rded.epochs, rded.t2) == (1e-3, 0.01, 20.0, 300, False)
    kw = {"image_size": 224, "recipe_scale": (0.08, 1.0)}
    assert rded.resolved(num_images=100, num_classes=10, build_args={"factor": 2}, **kw).batch_size == 50
    assert rded.resolved(num_images=1000, num_classes=100, build_args={}, **kw).batch_size == 100
    assert rded.resolved(num_images=10, num_classes=10, build_args={}, **kw).batch_size == 10
    assert rded.resolved(num_images=100, num_classes=10, build_args={"factor": 1}, **kw).scale == (1.0, 1.0)
    assert rded.resolved(num_images=100, num_classes=10, build_args={}, **kw).scale == (0.5, 1.0)
    sre2l = get_protocol("sre2l").resolved(num_images=300, num_classes=3, build_args={}, **kw)
    assert sre2l.batch_size == 300 and sre2l.scale == (0.08, 1.0) and sre2l.schedule == "cosine"
    quick = get_protocol("quick", epochs=7, lr=0.5, mix="none").resolved(
        num_images=80, num_classes=8, image_size=32, recipe_scale=[0.25, 1.0], build_args={})
    assert (quick.epochs, quick.lr, quick.mix, quick.scale, quick.image_size) == (7, 0.5, "none", (0.25, 1.0), 32)
    assert lr_factor("half-cosine", 1.0) == pytest.approx(0.5) and lr_factor("cosine", 1.0) == pytest.approx(0.0)
    assert lr_factor("onecycle", 0.0) == pytest.approx(0.04) and lr_factor("onecycle", 0.3) == pytest.approx(1.0)
    with pytest.raises(EvalInputError, match="expected a number > 0") as e:
        get_protocol("quick", lr=-1)
    assert e.value.field == "--lr"


def test_students(dirs):
    from hellofmt.builder.teachers import Normalize
    from hellofmt.students import ConvNet, build_student, check_student
    from hellofmt.students import parse_student_spec as parse

    m, desc = build_student("convnet:depth=2,width=4,norm=batch", 5, 16)
    assert isinstance(m, ConvNet) and desc == "convnet:depth=2,width=4,norm=batch"
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 5)
    assert parse("convnet").width == 128 and parse("convnet").depth == 3
    t, desc = build_student("timm:test_resnet", 3, 32)
    assert isinstance(t, Normalize) and desc == "timm:test_resnet"
    assert torch.allclose(t.mean.flatten(), torch.tensor(t.model.pretrained_cfg["mean"], dtype=torch.float32))
    check_student(t, 3, 32, torch.device("cpu"), name=desc)
    f, desc = build_student(f"{dirs['models']}:good", 3, 32)
    assert f(torch.rand(1, 3, 8, 8)).shape == (1, 3) and desc == "models.py:good"


# --------------------------------------------------------------------------------------------------
# bad input: each a clear EvalInputError naming the option, before any training
# --------------------------------------------------------------------------------------------------
def test_val_classes_not_matching(tiny_bundle, dirs):
    val = _write_folder(dirs["tmp"] / "val-mismatch", 1, seed=1, folders=["cat", "dog", "zebra"])
    with pytest.raises(EvalInputError) as e:
        _evaluate(tiny_bundle, val)
    assert e.value.field == "--val" and "not bundle classes: zebra" in str(e.value)
    assert "bundle classes with no folder: car" in str(e.value) and "--val-classes" in e.value.fix


def test_val_classes_map(tiny_bundle, dirs):
    from hellofmt.evaluation import match_classes

    assert match_classes(["c0", "c1", "c2"], CLASSES, class_map={"c0": "car", "c1": "cat", "c2": "dog"}) == [2, 0, 1]
    assert match_classes(["car", "cat", "dog"], CLASSES, recorded_folders=["x", "y", "z"]) == [2, 0, 1]
    assert match_classes(["a_b", "c"], ["a b", "c"]) == [0, 1]  # '_' read as a space, as the builder does
    val = _write_folder(dirs["tmp"] / "val-ids", 1, seed=2, folders=["n0", "n1", "n2"])
    tsv = dirs["tmp"] / "classes.tsv"
    tsv.write_text("n0\tcat\nn1\tdog\nn2\tcar\n")
    r = _evaluate(tiny_bundle, val, val_classes=tsv, arms="hard", seeds=1)
    assert r.val_count == 3
    tsv.write_text("n0\tcat\nn1\tdog\n")
    with pytest.raises(EvalInputError, match="no name in the class map: n2") as e:
        _evaluate(tiny_bundle, val, val_classes=tsv)
    assert e.value.field == "--val-classes"


def test_teacher_arm_without_teacher(tiny_bundle, dirs):
    with pytest.raises(EvalInputError, match="teacher arm needs a teacher") as e:
        _evaluate(tiny_bundle, dirs["val"], arms="bundle,teacher")
    assert e.value.field == "--teacher"


def test_random_arm_without_train_data(tiny_bundle, dirs):
    with pytest.raises(EvalInputError, match="random arm needs") as e:
        _evaluate(tiny_bundle, dirs["val"], arms=["random"])
    assert e.value.field == "--train-data"


def test_unknown_arm(tiny_bundle, dirs):
    with pytest.raises(EvalInputError, match="unknown arm") as e:
        _evaluate(tiny_bundle, dirs["val"], arms="bundle,soft")
    assert e.value.field == "--arms"


def test_unknown_protocol(tiny_bundle, dirs):
    with pytest.raises(EvalInputError, match="unknown protocol 'cifar'") as e:
        _evaluate(tiny_bundle, dirs["val"], protocol="cifar")
    assert e.value.field == "--protocol" and "quick, rded, sre2l" in e.value.fix


@pytest.mark.parametrize("spec, match", [
    ("resnet18", "cannot parse student spec"),
    ("convnet:depth=x", "depth must be a positive integer"),
    ("convnet:colour=1", "unknown convnet option"),
    ("timm:no_such_net_xyz", "timm has no architecture"),
    ("missing.py:make", "student file not found"),
])
def test_bad_student_spec(tiny_bundle, dirs, spec, match):
    with pytest.raises(EvalInputError, match=match) as e:
        _evaluate(tiny_bundle, dirs["val"], student=spec)
    assert e.value.field == "--student"


def test_student_output_width_wrong(tiny_bundle, dirs):
    with pytest.raises(EvalInputError, match="student outputs 5 classes but the bundle has 3") as e:
        _evaluate(tiny_bundle, dirs["val"], student=f"{dirs['models']}:five_outputs")
    assert e.value.field == "--student"


@pytest.mark.parametrize("seeds", [0, -1, 1.5])
def test_seeds_below_one(tiny_bundle, dirs, seeds):
    with pytest.raises(EvalInputError, match="integer >= 1") as e:
        _evaluate(tiny_bundle, dirs["val"], seeds=seeds)
    assert e.value.field == "--seeds"


def test_undecodable_val_image_is_skipped_and_counted(tiny_bundle, dirs):
    val = dirs["tmp"] / "val-broken"
    shutil.copytree(dirs["val"], val)
    (val / "dog" / "broken.png").write_bytes(b"not a png at all")
    (val / "cat" / "empty.jpg").write_bytes(b"")
    r = _evaluate(tiny_bundle, val, arms="hard", seeds=1)
    assert r.val_count == 12
    assert sorted(r.val_skipped) == sorted([str(val / "cat" / "empty.jpg"), str(val / "dog" / "broken.png")])
    assert "2 undecodable, skipped" in r.format_table()
    assert r.to_dict()["val_skipped"] == 2


def test_record_refuses_a_hub_id(dirs):
    with pytest.raises(EvalInputError, match="local bundle folder") as e:
        _evaluate("someone/some-bundle", dirs["val"], record=True)
    assert e.value.field == "--record"


# --------------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------------
def test_cli_eval(tiny_bundle, dirs):
    from hellofmt.cli import main
    from hellofmt.plots import PLOT_DPI, PLOT_SIZE

    out, png = dirs["tmp"] / "cli.json", dirs["tmp"] / "cli.png"
    r = CliRunner().invoke(main, ["eval", str(tiny_bundle), "--val", str(dirs["val"]), "--arms", "bundle,hard",
                                  "--seeds", "1", "--epochs", "1", "--student", "convnet:width=8", "--quiet",
                                  "--json", str(out), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "bundle - hard" in r.output and f"wrote {out}" in r.output
    assert json.loads(out.read_text())["arms"].keys() == {"bundle", "hard"}
    # the same run drew the chart (tests/test_eval_plot.py checks its contents)
    assert f"wrote {png}" in r.output
    assert Image.open(png).size == (round(PLOT_SIZE[0] * PLOT_DPI), round(PLOT_SIZE[1] * PLOT_DPI))
    r = CliRunner().invoke(main, ["eval", str(tiny_bundle), "--val", str(dirs["val"]), "--seeds", "0"])
    assert r.exit_code == 2 and "error: --seeds: expected an integer >= 1" in r.output


@pytest.mark.slow
def test_torchrun_two_processes_cpu(tiny_bundle, dirs):
    out = dirs["tmp"] / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hellofmt.cli", "eval", str(tiny_bundle), "--val", str(dirs["val"]), "--arms", "bundle,hard",
           "--seeds", "1", "--epochs", "2", "--student", "convnet:width=8", "--device", "cpu", "--quiet",
           "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, env=env, cwd=dirs["tmp"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("hellofmt eval") == 1  # rank 0 reports, once
    d = json.loads(out.read_text())
    assert d["world_size"] == 2 and d["val_count"] == 12
    assert all(abs(a * 12 - round(a * 12)) < 1e-9 for a in d["arms"]["bundle"]["accuracies"])  # all-reduced
