"""benchmarks/student_epoch.py: one student, three label sources (stored labels, the projector through
``DistilledDataset.loader``, the teacher online). The GPU run takes minutes; CI runs the ``--tiny`` preset on
the CPU in seconds, and checks the refusals: a CUDA device this machine lacks, and running out of memory at
the batch asked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "student_epoch.py"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


@pytest.mark.slow
def test_tiny_run_prints_each_arm_and_the_result(tmp_path):
    out = tmp_path / "figures.json"
    r = _run("--tiny", "--device", "cpu", "--threads", "1", "--label-amp", "bf16", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    for arm in ("(a) stored soft labels", "(b) projector, DistilledDataset.loader", "(c) teacher online"):
        line = next((x for x in r.stdout.splitlines() if x.startswith(arm)), None)
        assert line is not None, r.stdout
        rate = float(re.search(r"([0-9.]+) img/s", line).group(1))
        assert rate > 0
    m = re.search(r"^RESULT projector_vs_stored=([0-9.]+) projector_vs_teacher=([0-9.]+)$", r.stdout, re.M)
    assert m, r.stdout
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0
    assert "same views in (a), (b) and (c): yes" in r.stdout
    assert re.search(r"KL\(float32 \|\| bf16\) on one batch of 16 views: mean [0-9.e+-]+", r.stdout)
    assert "compute-bound ceiling" in r.stdout
    figures = json.loads(out.read_text())
    assert figures["projector_vs_stored"] == pytest.approx(float(m.group(1)), abs=1e-3)
    assert figures["flops_per_image"]["student_fwd_bwd"] > figures["flops_per_image"]["teacher_fwd"] > 0
    assert 0 < figures["ceiling"]["b_over_a"] < 1 and figures["same_views"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_one_line_error(device):
    r = _run("--tiny", "--device", device, timeout=60)
    assert r.returncode == 2
    assert f"--device {device}" in r.stderr and "no CUDA device is visible" in r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("script", ["label_throughput.py", "build_throughput.py"])
def test_the_throughput_benchmarks_refuse_a_missing_gpu_the_same_way(script):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--device", "cuda:0"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"{script}: error: --device cuda:0: no CUDA device is visible "
                                "(torch.cuda.is_available() is False); use --device cpu")


def test_out_of_memory_names_the_batch(monkeypatch, capsys):
    mod = load_script(SCRIPT, "hellofmt_bench_student_epoch")

    def oom(args, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(mod, "run", oom)
    with pytest.raises(SystemExit) as e:
        mod.main(["--tiny", "--device", "cpu", "--batch", "64"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "--batch 64" in err and "--batch 32" in err and len(err.strip().splitlines()) == 1
