"""Nothing is written before every input is checked (issue 22): a build whose teacher, foundation or
class map is missing fails before the data scan and leaves the filesystem exactly as it found it; a
failure after the scan removes only what the run created (its checkpoint folder), never what was there.
The same for `eval --record` / `--json` (checked before any student trains) and `export` (a failure
part-way removes what it wrote).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_build import TEACHER_PY, TINY_CONFIG, _write_data

from hellofmt.cli import main


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its bytes' sha256 and mtime (directories by name)."""
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(Path(root).rglob("*"))}


@pytest.fixture
def env(tmp_path):
    data = _write_data(tmp_path / "train", per_class=3)
    teacher = tmp_path / "teacher.py"
    teacher.write_text(TEACHER_PY)
    return {"data": data, "teacher": f"{teacher}:make", "tmp": tmp_path, "out": tmp_path / "out"}


def _build(env, **changes) -> tuple:
    args = {"--train-data": str(env["data"]), "--teacher": env["teacher"], "--foundation": TINY_CONFIG,
            "--out": str(env["out"]), "--ipc": "1", "--steps": "1", "--batch-size": "4", "--holdout": "0.2",
            "--fidelity-views": "1", "--rank": "2", "--head-rank": "2", "--device": "cpu"}
    args.update(changes)
    argv = ["build", "--quiet"] + [x for k, v in args.items() if v is not None for x in (k, v)]
    before = snapshot(env["tmp"])
    r = CliRunner().invoke(main, argv)
    return r, before, snapshot(env["tmp"])


def test_a_missing_teacher_file_writes_nothing(env):
    r, before, after = _build(env, **{"--teacher": str(env["tmp"] / "nosuchfile.py") + ":make"})
    assert r.exit_code == 2 and "nosuchfile.py" in r.output, r.output
    assert after == before  # no OUT.ckpt/index.json, nothing else


def test_a_missing_foundation_file_writes_nothing(env):
    r, before, after = _build(env, **{"--foundation": str(env["tmp"] / "nosuch-config.json")})
    assert r.exit_code == 2 and "nosuch-config.json" in r.output and "--foundation" in r.output, r.output
    assert after == before


def test_an_unknown_foundation_architecture_writes_nothing(env):
    r, before, after = _build(env, **{"--foundation": "NoSuchArch-B-32:openai"})
    assert r.exit_code == 2 and "NoSuchArch" in r.output, r.output
    assert after == before


def test_a_missing_classes_file_writes_nothing(env):
    r, before, after = _build(env, **{"--classes": str(env["tmp"] / "nosuch-classes.json")})
    assert r.exit_code == 2 and "nosuch-classes.json" in r.output and "--classes" in r.output, r.output
    assert after == before


def test_a_missing_images_folder_writes_nothing(env):
    r, before, after = _build(env, **{"--images": str(env["tmp"] / "nosuch-images"), "--ipc": None})
    assert r.exit_code == 2 and "nosuch-images" in r.output, r.output
    assert after == before


def test_an_existing_output_writes_nothing(env):
    env["out"].mkdir()
    (env["out"] / "mine.txt").write_text("the user's")
    r, before, after = _build(env)
    assert r.exit_code == 2 and "already exists" in r.output, r.output
    assert after == before


def test_a_failure_after_the_scan_removes_only_what_the_run_created(env):
    # A teacher whose class count is wrong is found only when it runs on the data: after the scan.
    bad = env["tmp"] / "two.py"
    bad.write_text(TEACHER_PY + "\n\ndef make_two():\n    return ColourTeacher(classes=2).eval()\n")
    r, before, after = _build(env, **{"--teacher": f"{bad}:make_two"})
    assert r.exit_code == 2, r.output
    assert after == before  # OUT.ckpt (holding the scan's index.json) is gone again

    # a checkpoint folder the user had before the run is kept, with what it held
    ckpt = env["tmp"] / "out.ckpt"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("mine")
    r, before, after = _build(env, **{"--teacher": f"{bad}:make_two"})
    assert r.exit_code == 2, r.output
    assert (ckpt / "notes.txt").read_text() == "mine"
    assert not (env["tmp"] / "out").exists()


# ---- eval --record / --json, export ---------------------------------------------------------------
def test_eval_checks_where_it_writes_before_training(tiny_bundle, tmp_path):
    import shutil

    from hellofmt import evaluate
    from hellofmt.errors import EvalInputError

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    val = _write_data(tmp_path / "val", classes=("cat", "dog", "car"), per_class=1)
    before = snapshot(tmp_path)
    with pytest.raises(EvalInputError, match="--json") as e:
        evaluate(b, val, json_path=tmp_path / "no-such-folder" / "eval.json", seeds=1, epochs=1, device="cpu")
    assert e.value.field == "--json"
    b.chmod(0o555)
    try:
        if not os.access(b, os.W_OK):  # root can write anywhere: nothing to check then
            with pytest.raises(EvalInputError, match="not writable"):
                evaluate(b, val, record=True, seeds=1, epochs=1, device="cpu")
    finally:
        b.chmod(0o755)
    assert snapshot(tmp_path) == before


def test_export_that_fails_part_way_removes_what_it_wrote(tiny_bundle, tmp_path, monkeypatch):
    from PIL import Image

    from hellofmt.show import export_images

    calls = []
    real_save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError):
        export_images(tiny_bundle, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # the folder it created is gone
    (tmp_path / "mine").mkdir()  # an empty folder of the user's is kept, empty again
    calls.clear()
    with pytest.raises(OSError):
        export_images(tiny_bundle, tmp_path / "mine")
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []
