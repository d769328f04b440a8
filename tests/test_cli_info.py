"""`hellofmt info` and `hellofmt verify`: thin shells over summarize() and verify_bundle()."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bundles import make_format_bundle
from hellofmt import __version__
from hellofmt.bundle import Bundle
from hellofmt.cli import main
from hellofmt.summary import summarize


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def bundle(tmp_path):
    return make_format_bundle(tmp_path / "b", num_classes=4, per_class=3, codec="jpeg", quality=85)


def test_version(runner):
    r = runner.invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_info_text(runner, bundle):
    r = runner.invoke(main, ["info", str(bundle)])
    assert r.exit_code == 0, r.output
    out = r.output
    assert "4: class 0, class 1, class 2, class 3" in out
    assert "12 (3-3 per class), 16x16, jpeg (quality 85)" in out
    assert "hf-test-tiny-vit:fake" in out
    assert "projector.safetensors" in out and "images-00000-of-00001.safetensors" in out
    assert "stored labels" in out and "ratio" in out


def test_info_json_label_payload(runner, bundle):
    r = runner.invoke(main, ["info", str(bundle), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s == summarize(Bundle.open(bundle))
    proj = (bundle / "projector.safetensors").stat().st_size
    lp = s["label_payload"]
    assert lp["projector_bytes"] == proj
    assert lp["stored_label_bytes"] == 12 * 300 * 4 * 2
    assert lp["ratio"] == pytest.approx(12 * 300 * 4 * 2 / proj)
    assert s["images"]["per_class"] == [3, 3, 3, 3]
    assert s["projector"]["ranks"] == [2] and s["projector"]["head_rank"] == 2
    assert s["files"]["projector.safetensors"] == proj


def test_verify_ok(runner, bundle):
    r = runner.invoke(main, ["verify", str(bundle)])
    assert r.exit_code == 0, r.output
    assert "ok" in r.output


def test_verify_lists_each_problem_and_exits_1(runner, bundle):
    p = bundle / "projector.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    (bundle / "images-00000-of-00001.safetensors").unlink()
    r = runner.invoke(main, ["verify", str(bundle)])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 2
    assert any("projector.safetensors" in line and "sha256" in line for line in lines)
    assert any("images-00000-of-00001.safetensors" in line and "absent" in line for line in lines)


@pytest.mark.parametrize("command", ["info", "verify"])
def test_errors_are_one_line_exit_2(runner, tmp_path, command):
    (tmp_path / "hellofmt.json").write_text("{not json")
    r = runner.invoke(main, [command, str(tmp_path)])
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    assert r.output.strip().count("\n") == 0 and "not valid JSON" in r.output


def test_info_missing_bundle_exit_2(runner, tmp_path):
    r = runner.invoke(main, ["info", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no such bundle directory" in r.output


def test_verify_runs_the_probe_on_a_real_bundle(runner, tiny_bundle, tmp_path):
    import shutil

    r = runner.invoke(main, ["verify", str(tiny_bundle)])
    assert r.exit_code == 0, r.output
    # A probe whose logits no longer match the projector is one problem line, exit 1.
    b = shutil.copytree(tiny_bundle, tmp_path / "b")
    obj = json.loads((b / "hellofmt.json").read_text())
    obj["probe"]["views"][0]["topk_logits"][0] += 1.0
    (b / "hellofmt.json").write_text(json.dumps(obj))
    r = runner.invoke(main, ["verify", str(b)])
    assert r.exit_code == 1, r.output
    assert len(r.output.strip().splitlines()) == 1 and "probe" in r.output


def test_ratio_wording_says_larger_when_the_projector_outweighs_the_labels():
    from hellofmt.summary import ratio_text

    assert ratio_text(40.0) == "40x smaller than stored labels"
    assert ratio_text(2.5) == "2.5x smaller than stored labels"
    assert ratio_text(0.5).startswith("2.0x larger than stored labels")
    assert ratio_text(None) == "n/a"
