"""A first hour that goes well (issue 12): builds that warn when they should, class folders kept in the
manifest, a loader that fits the bundle, and a foundation download that fails fast and in the user's words.
"""

from __future__ import annotations

import json
import logging
import socket

import pytest
from click.testing import CliRunner
from test_build import TEACHER_PY, TINY_CONFIG, _write_data

from hellofmt.builder.config import BuildConfig
from hellofmt.builder.pipeline import agreement_floor, build_warnings
from hellofmt.errors import FoundationError, InputError, ManifestError
from hellofmt.manifest import Manifest

from bundles import make_format_bundle
from fakehub import point_client_at


# --------------------------------------------------------------------------------------------------
# build warnings
# --------------------------------------------------------------------------------------------------
def test_agreement_floor_is_twice_chance_capped_for_few_classes():
    assert agreement_floor(8) == pytest.approx(0.25)
    assert agreement_floor(1000) == pytest.approx(0.002)
    assert agreement_floor(2) == pytest.approx(0.75)  # twice chance would be 100%: halfway instead
    assert agreement_floor(3) == pytest.approx(2 / 3)


def test_low_heldout_agreement_warns_with_the_fix():
    c = BuildConfig(ipc=1, steps=3).resolved(32)
    w = build_warnings({"distill.steps": 3.0, "fidelity.heldout.top1_agreement": 0.07}, num_classes=8, config=c)
    assert len(w) == 1
    assert "only 7.0% of held-out original images" in w[0] and "chance is 12.5% for 8 classes" in w[0]
    assert "flagged below 25.0%, twice chance" in w[0]
    assert "--min-steps" in w[0] and "--lr" in w[0] and "drop --steps" in w[0]
    # above the floor: no warning; without held-out images the bundle's own views are judged
    assert build_warnings({"fidelity.heldout.top1_agreement": 0.3}, num_classes=8, config=c) == []
    w = build_warnings({"fidelity.synthetic.top1_agreement": 0.1}, num_classes=8, config=c)
    assert len(w) == 1 and "the bundle's own views" in w[0]


def test_ipc_at_or_above_the_originals_warns_naming_the_class():
    c = BuildConfig(ipc=1000).resolved(32)  # factor 1 below 128 px
    w = build_warnings({}, num_classes=3, config=c, originals_per_class=[150, 2000, 1000],
                       classes=["checker bar", "b", "c"])
    assert len(w) == 1
    assert "--ipc 1000" in w[0] and "in 2 of 3 classes (fewest: 150 ('checker bar'))" in w[0]
    assert "at most 150 distinct originals" in w[0] and "--ipc below 150" in w[0]
    assert build_warnings({}, num_classes=3, config=BuildConfig(ipc=10).resolved(32),
                          originals_per_class=[150, 2000, 1000]) == []


def test_a_short_distillation_warns():
    c = BuildConfig(ipc=1, batch_size=8, steps=1).resolved(32)
    w = build_warnings({"distill.steps": 1.0}, num_classes=3, config=c, train_count=100)
    assert len(w) == 1 and "less than one pass over the 100 training originals" in w[0]


def test_the_one_pass_check_counts_every_process():
    c = BuildConfig(ipc=1, batch_size=8, steps=10).resolved(32)
    # 10 steps of 8 views: 80 views on one process, under one pass over 100 originals; 160 on two
    w = build_warnings({"distill.steps": 10.0}, num_classes=3, config=c, train_count=100)
    assert len(w) == 1 and "80 views in all" in w[0]
    assert build_warnings({"distill.steps": 10.0}, num_classes=3, config=c, train_count=100, world_size=2) == []
    w = build_warnings({"distill.steps": 5.0}, num_classes=3, config=c, train_count=100, world_size=2)
    assert len(w) == 1 and "on each of 2 processes, 80 views in all" in w[0]


def test_a_teacher_that_fails_on_the_kept_images_warns_with_the_size():
    c = BuildConfig(ipc=10).resolved(64)
    metrics = {"images.init_teacher_top1": 0.53, "fidelity.heldout.teacher_top1": 0.263}
    w = build_warnings(metrics, num_classes=10, config=c, image_size=64)
    assert len(w) == 1
    assert "only 53.0% of the bundle's own images right (and 26.3% of held-out views)" in w[0]
    assert "64-px views" in w[0] and "--image-size, now 64" in w[0] and "--classes" in w[0]
    # a healthy teacher (the kept images right), or random selection (which does not prefer them): no warning
    assert build_warnings({"images.init_teacher_top1": 1.0}, num_classes=10, config=c) == []
    assert build_warnings({"images.init_teacher_top1": 0.53}, num_classes=10,
                          config=BuildConfig(ipc=10, selection="random").resolved(64)) == []


@pytest.fixture
def env(tmp_path):
    data = _write_data(tmp_path / "train")  # 3 classes (blue, green, red) x 5 images
    teacher = tmp_path / "teacher.py"
    teacher.write_text(TEACHER_PY)
    return {"data": data, "teacher": f"{teacher}:make", "tmp": tmp_path}


def test_build_cli_warns_records_warnings_and_class_folders(env):
    from hellofmt.bundle import Bundle
    from hellofmt.cli import main

    out = env["tmp"] / "b"
    r = CliRunner().invoke(main, [
        "build", "--train-data", str(env["data"]), "--teacher", env["teacher"], "--foundation", TINY_CONFIG,
        "--out", str(out), "--ipc", "6", "--steps", "1", "--batch-size", "8", "--holdout", "0.2",
        "--fidelity-views", "1", "--rank", "2", "--head-rank", "2", "--device", "cpu", "--quiet",
    ])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert any("--ipc 6" in w and "in 3 of 3 classes (fewest: 4" in w for w in warnings)  # 4 after hold-out
    assert any("less than one pass" in w for w in warnings)  # --steps 1
    assert r.stdout.rstrip().endswith(f"wrote {out}")
    m = Bundle.open(out).manifest
    assert m.class_folders == ["blue", "green", "red"]
    assert m.provenance.extra["warnings"] == [w.removeprefix("warning: ") for w in warnings]
    info = CliRunner().invoke(main, ["info", str(out)]).output
    assert "warnings    (recorded by the build)" in info and "--ipc 6" in info


# --------------------------------------------------------------------------------------------------
# class_folders in the manifest, and hellofmt eval matching --val folders through it
# --------------------------------------------------------------------------------------------------
def _manifest_dict(tmp_path) -> dict:
    b = make_format_bundle(tmp_path / "b", classes=["tench", "goldfish"], per_class=1)
    return json.loads((b / "hellofmt.json").read_text())


def test_class_folders_round_trip_and_schema(tmp_path):
    from importlib.resources import files

    import jsonschema

    obj = _manifest_dict(tmp_path)
    obj["class_folders"] = ["n01440764", "n01443537"]
    m = Manifest.from_dict(obj)
    assert m.class_folders == ["n01440764", "n01443537"]
    assert m.to_dict()["class_folders"] == ["n01440764", "n01443537"]
    schema = json.loads((files("hellofmt") / "schema" / "manifest.schema.json").read_text())
    jsonschema.validate(json.loads(m.to_json()), schema)  # as written: with its digest
    del obj["class_folders"]
    assert "class_folders" not in Manifest.from_dict(obj).to_dict()  # optional: absent stays absent


@pytest.mark.parametrize("value, field", [(["only-one"], "class_folders"), ([1, 2], "class_folders[0]"),
                                          ("n01440764", "class_folders")])
def test_bad_class_folders_are_refused(tmp_path, value, field):
    obj = _manifest_dict(tmp_path)
    obj["class_folders"] = value
    with pytest.raises(ManifestError) as e:
        Manifest.from_dict(obj)
    assert e.value.field == field


def test_eval_matches_val_folders_through_class_folders(tmp_path):
    from hellofmt.evaluation import _recorded_folders, match_classes

    obj = _manifest_dict(tmp_path)
    obj["class_folders"] = ["n01440764", "n01443537"]
    m = Manifest.from_dict(obj)
    assert _recorded_folders(m) == ["n01440764", "n01443537"]
    idx = match_classes(["n01443537", "n01440764"], m.classes, recorded_folders=_recorded_folders(m))
    assert idx == [1, 0]


# --------------------------------------------------------------------------------------------------
# the loader fits the bundle
# --------------------------------------------------------------------------------------------------
def test_loader_defaults_to_the_bundle_image_side_and_takes_a_square_pair(tiny_bundle):
    from hellofmt import DistilledDataset

    ds = DistilledDataset(str(tiny_bundle), device="cpu")
    side = ds.image_size[0]
    assert ds.loader(batch_size=2, mix="none").image_size == side
    images, soft, _ = next(iter(ds.loader(batch_size=2, mix="none")))
    assert images.shape[-2:] == (side, side) and soft.shape == (2, ds.num_classes)
    assert ds.loader(batch_size=2, image_size=ds.image_size).image_size == side
    assert ds.loader(batch_size=2, image_size=[16, 16]).image_size == 16
    with pytest.raises(InputError) as e:
        ds.loader(image_size=(16, 24))
    assert e.value.field == "image_size" and "square" in str(e.value)


# --------------------------------------------------------------------------------------------------
# offline: fast, one attempt, in the user's words
# --------------------------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_backoff(monkeypatch):
    """Fail the test if huggingface_hub sleeps to retry (its back-off is what made offline runs slow)."""
    import huggingface_hub.utils._http as hf_http

    class NoSleep:
        @staticmethod
        def sleep(seconds):
            raise AssertionError(f"huggingface_hub retried (sleep {seconds}s)")

        def __getattr__(self, name):
            import time

            return getattr(time, name)

    monkeypatch.setattr(hf_http, "time", NoSleep())


def test_unreachable_hub_fails_at_once_naming_the_spec(monkeypatch, tmp_path, caplog, no_backoff):
    from huggingface_hub import constants

    from hellofmt.foundation import load_foundation

    point_client_at(f"http://127.0.0.1:{_closed_port()}", monkeypatch)  # nothing listens: connection refused
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with caplog.at_level(logging.WARNING), pytest.raises(FoundationError) as e:
        load_foundation("ViT-B-32:openai")
    msg = str(e.value)
    assert msg.startswith("foundation: cannot get ViT-B-32:openai:")
    assert "cannot be reached" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "CONFIG.json:WEIGHTS.safetensors" in msg
    assert "Retrying" not in caplog.text


def _fake_hub(monkeypatch, tmp_path, *, metadata, download):
    """An online Hub (HF_HUB_OFFLINE off, an empty cache) whose metadata request and download are
    ``metadata`` and ``download``."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


def test_a_transport_error_from_the_metadata_request_is_offline(monkeypatch, tmp_path, no_backoff):
    import httpx2

    from hellofmt import foundation

    def refuse(*args, **kwargs):
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    def never(*args, **kwargs):
        raise AssertionError("hf_hub_download must not run once the Hub is known to be unreachable")

    _fake_hub(monkeypatch, tmp_path, metadata=refuse, download=never)
    with pytest.raises(FoundationError) as e:
        foundation.load_foundation("hf-hub:someone/clip")
    assert "cannot get hf-hub:someone/clip" in str(e.value) and "ConnectError" in str(e.value)


def test_an_http_answer_is_left_to_the_download(monkeypatch, tmp_path):
    """A Hub that answers (here: 404) is reachable: the download's own error says what is wrong."""
    import httpx2
    from huggingface_hub import errors as hf_errors

    from hellofmt import foundation

    response = httpx2.Response(404, request=httpx2.Request("HEAD", "http://127.0.0.1/someone/clip"))

    def not_found(*args, **kwargs):
        raise hf_errors.RepositoryNotFoundError("404 Repository Not Found", response=response)

    def download(*args, **kwargs):
        raise hf_errors.RepositoryNotFoundError("404 Repository Not Found", response=response)

    _fake_hub(monkeypatch, tmp_path, metadata=not_found, download=download)
    with pytest.raises(FoundationError) as e:
        foundation.load_foundation("hf-hub:someone/clip")
    assert "no such model repository" in str(e.value)


def test_offline_mode_names_the_spec(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from hellofmt.foundation import load_foundation

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FoundationError) as e:
        load_foundation("ViT-B-32:openai")
    assert str(e.value).startswith("foundation: cannot get ViT-B-32:openai:")

