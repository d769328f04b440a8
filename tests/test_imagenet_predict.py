"""benchmarks/imagenet_predict.py: the ImageNet-1K build-time prediction (issue #24, item 4). The GPU run takes
minutes; here the ``--tiny`` preset runs the real build on the CPU in seconds, the options it predicts for are
checked against examples/imagenet.md, the step and held-out formulas against the builder's own, and a CUDA
device this machine lacks is a one-line error."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "imagenet_predict.py"
STAGES = ("inputs", "distill", "images", "refine", "fidelity", "write")


def _module():
    return load_script(SCRIPT, "imagenet_predict")


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def _seconds(cell: str) -> float:
    """A table cell such as ``**12.3 s**``, ``4.5 min`` or ``1.20 h`` in seconds."""
    m = re.fullmatch(r"\**([0-9.,]+) (s|min|h)\**", cell.strip())
    assert m, cell
    return float(m.group(1).replace(",", "")) * {"s": 1, "min": 60, "h": 3600}[m.group(2)]


def test_tiny_run_measures_every_stage_and_scales_it(tmp_path):
    js, md = tmp_path / "predict.json", tmp_path / "predict.md"
    r = _run("--tiny", "--device", "cpu", "--threads", "1", "--no-progress", "--data", str(tmp_path / "jpegs"),
             "--json", str(js), "--markdown", str(md))
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(rf"^device cpu: .*torch {re.escape(torch.__version__)}", r.stdout, re.M), r.stdout[:500]
    assert "NOT a prediction" in r.stdout
    table = md.read_text()
    assert table in r.stdout  # the file holds what was printed
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    header = rows[0]
    assert header[:3] == ["stage", "part", "measured on this run"] and header[-2:] == [
        "ImageNet-1K, 1 GPU", "ImageNet-1K, 8 GPUs"]
    stage_rows = {row[0]: row for row in rows[1:] if row[1].startswith("**stage**")}
    assert tuple(stage_rows) == STAGES
    for name, row in stage_rows.items():
        assert _seconds(row[2]) > 0, (name, row)
    one, eight = _seconds(stage_rows["distill"][-2]), _seconds(stage_rows["distill"][-1])
    assert one > eight > 0

    figures = json.loads(js.read_text())
    assert figures["run"]["tiny"] is True and figures["run"]["device"] == "cpu"
    assert figures["run"]["torch"] == torch.__version__
    assert set(figures["run"]["timings"]) == set(STAGES)
    assert all(figures["stages"][st]["measured_s"] > 0 for st in STAGES)
    distill = figures["stages"]["distill"]
    assert distill["predicted_1gpu_s"] > distill["predicted_gpus_s"] > 0
    # every part says what it was scaled by, with the factors for one GPU and per GPU of eight
    sf = figures["scale_factors"]
    assert len(sf) == len(figures["parts"]) and {p.split("/")[0] for p in sf} == set(STAGES)
    for key, f in sf.items():
        assert f["one_gpu"] > 0 and f["per_gpu"] > 0 and f["scaled_by"], key
    assert sf["inputs/folder scan (headers)"]["one_gpu"] == pytest.approx(1_281_167 / 80)
    assert sf["images/RDED selection"]["per_gpu"] == pytest.approx(sf["images/RDED selection"]["one_gpu"] / 8)
    steps = sf["distill/optimiser steps"]
    # one GPU: the 6,000-step floor at batch 256; eight: the floor shared (750 each), so one epoch of
    # 1,249 steps of 128 per GPU decides
    assert steps["one_gpu"] == pytest.approx(6000 * 256 / (6 * 8)) and steps["per_gpu"] == pytest.approx(
        steps["one_gpu"] * (1249 * 128) / (6000 * 256))
    target = figures["target"]
    assert target["distill_steps_1gpu"] == 6000 and target["distill_steps_per_gpu"] == 1249
    assert target["held_out"] == 2000 and target["refine_blocks"] == 40
    assert any("not measured" in a for a in figures["assumptions"])
    # the folder is reused
    r2 = _run("--tiny", "--device", "cpu", "--threads", "1", "--no-progress", "--data", str(tmp_path / "jpegs"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "(reused)" in r2.stdout


def _flags(command: str) -> dict[str, str]:
    """The options after ``build`` of a ``hellofmt build`` command (each takes a value)."""
    words = shlex.split(command.replace("\\\n", " "))
    words = words[words.index("build") + 1:]
    out, i = {}, 0
    while i < len(words):
        if words[i].startswith("--"):
            out[words[i][2:].replace("-", "_")] = words[i + 1]
            i += 2
        else:
            i += 1
    return out


def test_the_options_are_those_of_examples_imagenet_md():
    mod = _module()
    text = (ROOT / "examples" / "imagenet.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    one = next(b for b in blocks if b.startswith("hellofmt build"))
    eight = next(b for b in blocks if b.startswith("torchrun") and "hellofmt.cli build" in b)
    inputs = {"train_data", "classes", "teacher", "teacher_weights", "foundation", "out"}
    for block, want in ((one, mod.IMAGENET_MD), (eight, {**mod.IMAGENET_MD, **mod.IMAGENET_MD_TORCHRUN})):
        got = {k: v for k, v in _flags(block).items() if k not in inputs}
        assert set(got) <= set(want), set(got) - set(want)
        for k, v in got.items():
            assert type(want[k])(v) == want[k], (k, v, want[k])
        # options the example leaves out are the build's defaults
        from hellofmt.builder.config import BuildConfig

        for k in set(want) - set(got):
            assert getattr(BuildConfig(), k) == want[k], k


def test_step_and_held_out_formulas_follow_the_builder():
    mod = _module()
    from hellofmt.builder.inputs import split_holdout

    # ImageNet-1K: --epochs 1 gives fewer steps than --min-steps 6000 on one GPU; on eight the floor is
    # shared (750 steps each) and one epoch (1,249 steps of 128 per GPU) is above it
    assert mod.build_steps(1_279_167, 256, 1, epochs=1.0, min_steps=6000) == 6000
    assert mod.build_steps(1_279_167, 128, 8, epochs=1.0, min_steps=6000) == 1_279_167 // 8 // 128
    assert mod.build_steps(1_279_167, 128, 8, epochs=0.1, min_steps=6000) == 750
    assert mod.build_steps(1_279_167, 256, 1, epochs=1.0, min_steps=0) == 1_279_167 // 256
    assert mod.build_steps(1_279_167, 128, 8, epochs=1.0, min_steps=0) == 1_279_167 // 8 // 128
    for n, classes in ((80, 4), (1300, 10), (50_000, 100)):
        labels = torch.arange(n) % classes
        _, held = split_holdout(labels, 0.05, seed=0)
        assert mod.held_out(n, classes, 0.05) == len(held), (n, classes)
    assert mod.held_out(1_281_167, 1000, 0.05) == 2000
    # refinement: blocks of 256 (the last one short), rank 0's blocks on 8 processes
    assert mod.refine_views(10_000, 256, 200, 256) == 39 * 200 * 256 + 200 * 16
    assert mod.refine_views(10_000, 256, 200, 128, world=8) == 5 * 200 * 128


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path):
    r = _run("--tiny", "--device", "cuda", "--data", str(tmp_path / "never"), timeout=60)
    assert r.returncode == 2
    assert "--device cuda" in r.stderr and "no CUDA device is visible" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stdout
    assert not (tmp_path / "never").exists()  # refused before anything is generated


def test_a_folder_it_did_not_make_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = _run("--tiny", "--device", "cpu", "--no-progress", "--data", str(tmp_path / "mine"), timeout=60)
    assert r.returncode != 0 and "not empty and was not made by this script" in r.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
