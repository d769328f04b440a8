"""`hellofmt info` and `hellofmt verify`: thin shells over summarize() and verify_bundle()."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hellofmt import __version__
from hellofmt.bundle import Bundle
from hellofmt.cli import main
from hellofmt.summary import format_bytes, summarize

from bundles import make_format_bundle, write_manifest


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
    assert "12 images (3 per class), 16x16, jpeg (quality 85)" in out
    assert "hf-test-tiny-vit:fake" in out
    assert "projector.safetensors" in out and "images-00000-of-00001.safetensors" in out
    assert "stored labels" in out and "ratio" in out


def test_info_json_label_payload(runner, bundle):
    r = runner.invoke(main, ["info", str(bundle), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s == {**summarize(Bundle.open(bundle)), "problems": []}  # a sound bundle: no problems
    proj = (bundle / "projector.safetensors").stat().st_size
    lp = s["label_payload"]
    assert lp["projector_bytes"] == proj
    assert lp["stored_label_bytes"] == 12 * 300 * 4 * 2
    assert lp["ratio"] == pytest.approx(12 * 300 * 4 * 2 / proj)
    assert s["images"]["per_class"] == [3, 3, 3, 3]
    assert s["projector"]["ranks"] == [2] and s["projector"]["head_rank"] == 2
    assert s["files"]["projector.safetensors"] == proj


def test_verify_ok_says_what_it_checked(runner, bundle):
    r = runner.invoke(main, ["verify", str(bundle)])
    assert r.exit_code == 0, r.output
    total = sum(e.size for e in Bundle.open(bundle).manifest.files.values())
    assert r.output.splitlines()[0] == f"{bundle}: ok"
    assert f"2 files, {total:,} bytes" in r.output and "sha256" in r.output
    assert "12 images decoded (16x16 jpeg" in r.output
    assert "probe       none recorded" in r.output  # the format bundle has no probe: said, not hidden


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


@pytest.mark.parametrize("command", ["info", "verify", "show"])
def test_a_manifest_file_points_to_its_folder(runner, bundle, command):
    r = runner.invoke(main, [command, str(bundle / "hellofmt.json")])
    assert r.exit_code == 2
    assert "is a file" in r.output and f"pass the folder: {bundle}" in r.output


def _decorate(bundle, **fields):
    """Add manifest fields a builder or `hellofmt eval --record` writes (resealed: see bundles.reseal)."""
    p = bundle / "hellofmt.json"
    obj = json.loads(p.read_text())
    for k, v in fields.items():
        if k in ("teachers", "extra"):
            obj["provenance"].update(v if k == "extra" else {"teachers": v})
        else:
            obj[k] = v
    write_manifest(bundle, obj)
    return bundle


METRICS = {
    "distill.steps": 680.0, "distill.resumed_from": 0.0, "distill.final_loss": 0.0123, "distill.train_agreement": 0.91,
    "fidelity.heldout.top1_agreement": 0.89, "fidelity.heldout.kl": 0.12, "fidelity.heldout.teacher_top1": 0.66,
    "fidelity.heldout.projector_top1": 0.6, "fidelity.synthetic.top1_agreement": 0.95,
    "fidelity.synthetic.teacher_top1": 0.9, "time.inputs_s": 1.3, "time.distill_s": 30.4,
}
EVALUATION = {"protocol": "quick", "student": "convnet", "seeds": [0, 1, 2], "hellofmt_version": "0.1.0",
              "date": "2026-01-02T00:00:00Z", "val_count": 800,
              "arms": {"bundle": [0.60, 0.62, 0.61], "hard": [0.50, 0.50, 0.52], "teacher": [0.70, 0.70, 0.71],
                       "random": [0.58, 0.57, 0.59]}}


def test_info_groups_metrics_by_stage_with_units(runner, bundle):
    _decorate(bundle, metrics=METRICS)
    out = runner.invoke(main, ["info", str(bundle)]).output
    lines = out.splitlines()
    distill = next(line for line in lines if line.startswith("distill "))
    assert "steps 680," in distill + "," and "final loss 0.0123" in distill
    time = next(line for line in lines if line.startswith("time "))
    assert "inputs 1.3 s" in time and "distill 30.4 s" in time and "total 31.7 s" in time
    # fractions in percent, each view set on its own line, the teacher's own top-1 named as such
    held = next(line for line in lines if line.strip().startswith("held-out "))
    assert "agreement 89.0%" in held and "teacher top-1 66.0%" in held and "projector top-1 60.0%" in held
    assert "chance 25.0% for 4 classes" in out
    assert "usually lower than its accuracy on whole, clean images" in " ".join(out.split())
    assert not any(len(line) > 120 for line in lines)
    assert "fidelity.heldout" not in out  # no dotted keys in the text


def test_info_json_gives_counts_as_integers(runner, bundle):
    _decorate(bundle, metrics=METRICS)
    s = json.loads(runner.invoke(main, ["info", str(bundle), "--json"]).output)
    assert s["metrics"]["distill.steps"] == 680 and isinstance(s["metrics"]["distill.steps"], int)
    assert isinstance(s["metrics"]["distill.resumed_from"], int)
    assert isinstance(s["metrics"]["fidelity.heldout.kl"], float)
    assert all(isinstance(n, int) for n in s["images"]["per_class"]) and isinstance(s["images"]["count"], int)


def test_info_lists_every_class_with_folders_and_caps_on_request(runner, tmp_path):
    b = make_format_bundle(tmp_path / "b", num_classes=12, per_class=1)
    _decorate(b, class_folders=[f"n{i:08d}" for i in range(12)])
    out = " ".join(runner.invoke(main, ["info", str(b)]).output.split())
    assert all(f"class {i} (n{i:08d})" in out for i in range(12))  # every class, with its folder
    assert "more" not in out
    out = " ".join(runner.invoke(main, ["info", str(b), "--max-classes", "3"]).output.split())
    assert "class 2 (n00000002)" in out and "class 3 (" not in out
    assert "and 9 more (--max-classes 0 lists all)" in out


def test_info_shows_recipe_teachers_and_warnings(runner, bundle):
    _decorate(bundle, teachers=["timm:resnet18", "timm:resnet34"],
              extra={"warnings": ["the projector agrees with the teacher on only 7.0% of held-out images"]})
    out = runner.invoke(main, ["info", str(bundle)]).output
    assert "labels      T 1, random-resized-crop+flip (scale 0.08-1, ratio 0.75-1.33), mix cutmix" in out
    assert "teacher(s)  timm:resnet18, timm:resnet34 (2 averaged)" in out
    assert "warnings" in out and "only 7.0% of held-out images" in out


def test_info_and_card_show_evaluations(runner, bundle):
    from hellofmt.hub import dataset_card

    _decorate(bundle, evaluations=[EVALUATION])
    out = runner.invoke(main, ["info", str(bundle)]).output
    line = ("  quick, student convnet, 3 seed(s), 800 val images, 2026-01-02T00:00:00Z: bundle 61.0% ± 1.0, "
            "hard 50.7% ± 1.2, teacher 70.3% ± 0.6, random 58.0% ± 1.0; bundle/teacher 0.867; bundle - hard +10.3 "
            "points; IOR (bundle - random) +3.0 points")
    assert line in out.splitlines()  # one line per evaluation
    _decorate(bundle, evaluations=[EVALUATION, {**EVALUATION, "protocol": "rded", "arms": {"hard": [0.5]},
                                                "seeds": [0]}])
    lines = runner.invoke(main, ["info", str(bundle)]).output.splitlines()
    assert line in lines and "  rded, student convnet, 1 seed(s), 800 val images, 2026-01-02T00:00:00Z: hard " \
        "50.0% ± 0.0" in lines
    _decorate(bundle, evaluations=[])
    assert "evaluations none recorded (hellofmt eval BUNDLE --val DIR --record)" in \
        runner.invoke(main, ["info", str(bundle)]).output
    _decorate(bundle, evaluations=[EVALUATION])
    s = json.loads(runner.invoke(main, ["info", str(bundle), "--json"]).output)
    assert s["evaluations"][0]["arms"]["bundle"]["mean"] == pytest.approx(0.61)
    assert s["evaluations"][0]["comparisons"]["ior"] == pytest.approx(0.03)
    card = dataset_card(bundle, "user/b")
    assert "## Student evaluations" in card
    assert "| bundle/teacher | bundle − hard | IOR (bundle − random) |" in card
    assert ("| quick | convnet | 3 | 800 | 61.0 ± 1.0 | 50.7 ± 1.2 | 70.3 ± 0.6 | 58.0 ± 1.0 | 0.867 | +10.3 | +3.0 |"
            in card)
    assert "not evaluated yet" not in card.lower()
    assert "image_size=" not in card  # the loader's default fits the bundle


def test_info_explains_an_embedded_foundation(runner, tmp_path):
    b = make_format_bundle(tmp_path / "b", extra_files={"foundation.safetensors": b"x" * 5000})
    obj = json.loads((b / "hellofmt.json").read_text())
    obj["foundation"].update(source="embedded", weights_file="foundation.safetensors")
    obj["foundation"].pop("pretrained")
    write_manifest(b, obj)
    out = " ".join(runner.invoke(main, ["info", str(b)]).output.split())
    proj = (b / "projector.safetensors").stat().st_size
    assert f"label payload (projector, {format_bytes(proj)})" in out
    assert "embeds its foundation (foundation.safetensors, 4.9 KiB) because it has no public name" in out
    from hellofmt.hub import dataset_card

    assert "| Embedded foundation | 5,000 bytes (4.9 KiB) (`foundation.safetensors`)" in dataset_card(b)


def test_info_and_verify_pull_a_hub_id_through_the_cache(runner, monkeypatch, bundle):
    from hellofmt import hub

    calls = []

    def fake_pull(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return bundle

    monkeypatch.setattr(hub, "pull", fake_pull)
    r = runner.invoke(main, ["info", "someone/tiny-set"])
    assert r.exit_code == 0, r.output
    assert f"bundle      {bundle}" in r.output
    r = runner.invoke(main, ["verify", "someone/tiny-set"])
    assert r.exit_code == 0, r.output
    assert [c[0] for c in calls] == ["someone/tiny-set", "someone/tiny-set"]
    assert calls[1][1] == {"verify": False}  # verify hashes every file itself, listing each problem


def test_an_unreachable_hub_id_says_it_is_not_a_local_folder_either(runner, monkeypatch):
    from hellofmt import hub
    from hellofmt.errors import OfflineError

    def offline(repo_id, **kwargs):
        raise OfflineError("the Hub cannot be reached", file="hf://datasets/someone/x", fix="connect")

    monkeypatch.setattr(hub, "pull", offline)
    r = runner.invoke(main, ["info", "someone/x"])
    assert r.exit_code == 2
    assert "no local directory 'someone/x'; as a Hub dataset: the Hub cannot be reached" in r.output


def test_verify_runs_the_probe_on_a_real_bundle(runner, tiny_bundle, tmp_path):
    import shutil

    r = runner.invoke(main, ["verify", str(tiny_bundle)])
    assert r.exit_code == 0, r.output
    # A probe whose logits no longer match the projector is one problem line, exit 1.
    b = shutil.copytree(tiny_bundle, tmp_path / "b")
    obj = json.loads((b / "hellofmt.json").read_text())
    obj["probe"]["views"][0]["topk_logits"][0] += 1.0
    write_manifest(b, obj)
    r = runner.invoke(main, ["verify", str(b)])
    assert r.exit_code == 1, r.output
    assert len(r.output.strip().splitlines()) == 1 and "probe" in r.output


def test_ratio_wording_says_larger_when_the_projector_outweighs_the_labels():
    from hellofmt.summary import ratio_text

    assert ratio_text(40.0) == "40x smaller than stored labels"
    assert ratio_text(2.5) == "2.5x smaller than stored labels"
    assert ratio_text(0.5).startswith("2.0x larger than stored labels")
    assert ratio_text(None) == "n/a"


def test_help_lists_each_command_uncut_and_build_states_the_teacher_contract(runner):
    r = runner.invoke(main, ["--help"])
    assert r.exit_code == 0, r.output
    assert "..." not in r.output.split("Commands:")[1]  # click cuts a long first line with "..."
    for name, cmd in main.commands.items():
        assert cmd.short_help and f"{name}  " in r.output and cmd.short_help in r.output, name
    r = runner.invoke(main, ["build", "--help"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # help is wrapped to the terminal's width
    assert "FILE.py:FACTORY" in text and "[0, 1]" in text and "eval mode" in text
    assert ("--rank INTEGER Rank of the encoder deltas (16: chosen by students, benchmarks/README.md; rank 8 "
            "with head rank 8 halves the payload for 0.3 to 0.6 points of student accuracy). [default: 16]") in text
