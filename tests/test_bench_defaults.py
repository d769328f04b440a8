"""benchmarks/defaults: weak teachers are checkpoints of the teacher's own training run (data.py, on the
quickstart's recipe with its ``on_epoch`` hook), saved once beside the teacher and loaded back; compare.py
pairs a lever's bundle and random arms with the hard and teacher arms of the row that has the same images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ROOT / "benchmarks" / "defaults"


def _load_data(name: str = "data"):
    return load_script(DEFAULTS / f"{name}.py", f"hellofmt_bench_defaults_{name}")


def _folder(root: Path, classes: int = 2, per_class: int = 6, size: int = 16) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")


def test_on_epoch_sees_every_epoch_and_the_last_is_the_returned_model():
    data = _load_data()
    x = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1] * 6)
    seen: dict[int, dict] = {}

    def keep(epoch, model):
        seen[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    model = data.train_teacher(x, y, 3, seed=0, on_epoch=keep)
    assert sorted(seen) == [1, 2, 3]
    final = model.state_dict()
    assert all(torch.equal(seen[3][k].cpu(), final[k]) for k in final)
    assert any(not torch.equal(seen[1][k], seen[3][k]) for k in final if final[k].is_floating_point())


def test_weak_teachers_are_saved_once_and_differ(tmp_path):
    data = _load_data()
    _folder(tmp_path / "train")
    info = {"root": tmp_path, "names": ["c0", "c1"], "size": 16}
    first = data.weak_teachers(info, (1, 3), teacher_epochs=3)
    files = sorted(p.name for p in tmp_path.glob("teacher-e*.safetensors"))
    assert files == ["teacher-e1.safetensors", "teacher-e3.safetensors"]
    stamp = [p.stat().st_mtime_ns for p in sorted(tmp_path.glob("teacher-e*.safetensors"))]
    again = data.weak_teachers(info, (1, 3), teacher_epochs=3)  # read back, not retrained
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.glob("teacher-e*.safetensors"))] == stamp
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(first[0](x), again[0](x))
        assert not torch.equal(first[0](x), first[1](x))
    assert not first[0].training


def test_compare_fills_the_image_arms_from_the_row_with_the_same_images(tmp_path, capsys):
    compare = _load_data("compare")
    base = {"dataset": "s", "foundation": "f", "eval_s": 1.0, "agreement_heldout": 0.9}
    rows = [
        {**base, "config": "ref", "overrides": {}, "images_sha256": "aa",
         "arms": {"bundle": [0.60, 0.62, 0.64], "hard": [0.30, 0.31, 0.32], "teacher": [0.60, 0.60, 0.60],
                  "random": [0.55, 0.56, 0.60]}},
        {**base, "config": "lever", "overrides": {"rank": 8}, "images_sha256": "aa",
         "arms": {"bundle": [0.59, 0.62, 0.62], "random": [0.55, 0.55, 0.59]}},
        {**base, "config": "other", "overrides": {"x": 1}, "images_sha256": "bb",
         "arms": {"bundle": [0.5, 0.5, 0.5], "random": [0.5, 0.5, 0.5]}},
    ]
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    compare.main([str(f), "--dataset", "s", "--reference", "ref", "--cache", str(tmp_path)])
    lines = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()}
    lever, other = lines["lever"], lines["other"]
    assert lever[4] == "31.0 ± 0.8" and lever[5] == "60.0 ± 0.0"  # the reference's hard and teacher arms
    assert lever[7] == "+30.0 (0.6)"  # bundle - hard per seed: 29, 31, 30 (s.d. 1, s.e. 1/sqrt 3)
    assert lever[9] == "1.02"  # 61.0 / 60.0
    assert lever[10] == "-1.0 (0.6)"  # bundle vs ref per seed: -1, 0, -2
    assert other[4] == "-" and other[5] == "-" and other[7] == "-"  # other images: no partner


def test_compare_takes_the_random_arm_from_the_row_with_the_same_projector(tmp_path, capsys):
    """A selection redone on a kept projector (adapt.py --reselect --arms bundle) has no random arm of its
    own: it is the one of the row whose projector deltas are the same, hashed from the bundles' tensors."""
    from safetensors.torch import save_file

    compare = _load_data("compare")
    bundles = tmp_path / "bundles"
    for name, value in (("s-ref-k1", 1.0), ("s-resel", 1.0), ("s-other-k2", 2.0)):
        (bundles / name).mkdir(parents=True)
        (bundles / name / "hellofmt.json").write_text('{"foundation": "f"}')
        save_file({"a": torch.full((2, 2), value), "b": torch.zeros(3)}, str(bundles / name / "projector.safetensors"))
    assert compare.projector_sha256(bundles / "s-ref-k1") == compare.projector_sha256(bundles / "s-resel")
    assert compare.projector_sha256(bundles / "s-ref-k1") != compare.projector_sha256(bundles / "s-other-k2")
    base = {"dataset": "s", "foundation": "f", "eval_s": 1.0, "agreement_heldout": 0.9, "overrides": {}}
    rows = [
        {**base, "config": "ref", "images_sha256": "aa",
         "arms": {"bundle": [0.60, 0.62], "hard": [0.3, 0.3], "teacher": [0.6, 0.6], "random": [0.61, 0.64]}},
        {**base, "config": "other", "images_sha256": "cc", "arms": {"bundle": [0.5, 0.5], "random": [0.1, 0.1]}},
        {**base, "config": "resel", "images_sha256": "bb", "arms": {"bundle": [0.63, 0.66]}},
    ]
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    compare.main([str(f), "--dataset", "s", "--reference", "ref", "--cache", str(tmp_path)])
    lines = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()}
    resel = lines["resel"]
    assert resel[6] == "62.5 ± 1.5"  # ref's random arm, not other's
    assert resel[8] == "+2.0 (0.0)"  # IOR per seed: 63 - 61, 66 - 64
    assert resel[4] == "-"  # other images: no hard arm to borrow
    # the borrowed arm also serves as the reference's: rows compare against it
    compare.main([str(f), "--dataset", "s", "--reference", "resel", "--cache", str(tmp_path)])
    lines = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()}
    assert lines["ref"][10] == "-3.5 (0.5)" and lines["ref"][11].startswith("+0.0 (0.0)")


def test_compare_joins_a_run_trained_in_parts_seed_after_seed(tmp_path, capsys):
    compare = _load_data("compare")
    base = {"dataset": "s", "foundation": "f", "eval_s": 1.0, "agreement_heldout": 0.9, "config": "default",
            "overrides": {}, "images_sha256": "aa"}
    rows = [
        {**base, "arms": {"bundle": [0.60, 0.62, 0.64], "hard": [0.30, 0.31, 0.32], "teacher": [0.6] * 3,
                          "random": [0.61, 0.62, 0.63]}},
        # seeds 3-5 of the same run (--first-seed 3), bundle and random only
        {**base, "first_seed": 3, "arms": {"bundle": [0.50, 0.52, 0.54], "random": [0.52, 0.54, 0.56]}},
        # a repeat of seeds 0-2 and a part that leaves a gap add nothing
        {**base, "arms": {"bundle": [0.9, 0.9, 0.9], "random": [0.1, 0.1, 0.1]}},
        {**base, "first_seed": 9, "arms": {"bundle": [0.9], "random": [0.1]}},
    ]
    merged = compare.merge_seeds([dict(r) for r in rows])
    assert len(merged) == 1
    arms = merged[0]["arms"]
    assert arms["bundle"] == [0.60, 0.62, 0.64, 0.50, 0.52, 0.54]
    assert arms["random"] == [0.61, 0.62, 0.63, 0.52, 0.54, 0.56]
    assert arms["hard"] == [0.30, 0.31, 0.32]  # not extended: the parts had no hard arm
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    compare.main([str(f), "--dataset", "s", "--cache", str(tmp_path)])
    line = [row for row in capsys.readouterr().out.splitlines() if row.startswith("| default")][0].split(" | ")
    assert line[3] == "57.0 ± 5.3"  # the bundle arm over six seeds (population s.d.)
    assert line[7] == "+31.0 (0.6)"  # bundle - hard on the seeds both have (0-2): 30, 31, 32
    assert line[8] == "-1.0 (0.5)"  # IOR over six seeds: -1, 0, 1, -2, -2, -2 (s.d. 1.26)
    assert line[9] == "1.03"  # bundle/teacher on seeds 0-2: 62.0 / 60.0 (over six seeds it would be 0.95)


def test_aligned_pairs_rows_by_seed_not_by_position():
    compare = _load_data("compare")
    assert compare.aligned([1, 2, 3, 4], 0, [30, 40], 2) == ([3, 4], [30, 40])
    assert compare.aligned([30, 40], 2, [1, 2, 3, 4], 0) == ([30, 40], [3, 4])


def test_sweep_refuses_an_unknown_config_before_any_work(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(DEFAULTS / "sweep.py"), "--dataset", "shapes32", "--config", "nope",
                        "--cache", str(tmp_path), "--prepare-only"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown --config 'nope'" in r.stderr and "NAME=JSON" in r.stderr
    assert list(tmp_path.iterdir()) == []  # no data made, no teacher trained
    r = subprocess.run([sys.executable, str(DEFAULTS / "sweep.py"), "--dataset", "shapes32", "--config", "x={bad",
                        "--cache", str(tmp_path), "--prepare-only"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--config x=...: the overrides are not JSON" in r.stderr
    assert list(tmp_path.iterdir()) == []
