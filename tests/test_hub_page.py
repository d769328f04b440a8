"""The Hub page of a pushed bundle: the preview image, the viewer table, the card's label line and
evaluations, and the unlisted extras readers ignore (spec section 1).

Pushes go through the real huggingface_hub client to the fake Hub of tests/fakehub.py; the viewer
table is read back with ``datasets.load_dataset("parquet", ...)`` offline.
"""

from __future__ import annotations

import io
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from hellofmt import hub
from hellofmt.bundle import Bundle, update_manifest
from hellofmt.cli import main
from hellofmt.errors import InputError
from hellofmt.manifest import EXTRA_NAMES, MANIFEST_NAME, PREVIEW_NAME, VIEWER_TABLE_NAME, Evaluation
from hellofmt.show import preview_png
from hellofmt.verify import verify_bundle

from bundles import make_format_bundle
from fakehub import WRITE_TOKEN, running_fake_hub

REPO = "user/tiny"
EVALUATION = {"protocol": "quick", "student": "convnet", "seeds": [0, 1, 2], "hellofmt_version": "0.1.0",
              "date": "2026-01-02T00:00:00Z", "val_count": 800,
              "arms": {"bundle": [0.60, 0.62, 0.61], "hard": [0.50, 0.50, 0.52], "teacher": [0.70, 0.70, 0.71],
                       "random": [0.58, 0.57, 0.59]}}


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    yield from running_fake_hub(monkeypatch, tmp_path)


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_format_bundle(tmp_path / "bundle", num_classes=3, per_class=2, seed=0)


def _head(fake_hub) -> dict[str, bytes]:
    return fake_hub.repo(REPO).resolve("main").files


def _front(card: str) -> dict:
    return yaml.safe_load(card.split("---", 2)[1])


def _with_evaluations(path: Path, evaluations: list[dict]) -> Path:
    # The way `hellofmt eval --record` writes them: only the manifest changes.
    update_manifest(path, lambda m: m.evaluations.extend(Evaluation(**e) for e in evaluations))
    return path


def _bundle_bytes(path: Path) -> int:
    return sum(e.size for e in Bundle.open(path).manifest.files.values())


# --------------------------------------------------------------------------------------------------
# The preview
# --------------------------------------------------------------------------------------------------
def test_push_uploads_the_preview_in_the_same_commit_and_the_card_shows_it_first(fake_hub, bundle):
    url = hub.push(bundle, REPO, token=WRITE_TOKEN)
    assert fake_hub.commit_requests() == 1
    files = _head(fake_hub)
    assert url.endswith(fake_hub.repo(REPO).resolve("main").oid)
    assert PREVIEW_NAME in files and VIEWER_TABLE_NAME not in files  # the viewer table is opt-in
    png = Image.open(io.BytesIO(files[PREVIEW_NAME]))
    expected = preview_png(Bundle.open(bundle))
    assert png.format == "PNG" and png.size == (expected.width, expected.height)
    assert files[PREVIEW_NAME] == expected.data

    card = files["README.md"].decode()
    body = card.split("---", 2)[2]
    first = next(line for line in body.splitlines() if line.strip() and not line.startswith("# "))
    assert first == f"![Images of user/tiny: all 3 classes]({PREVIEW_NAME})"  # by its uploaded name, on top
    assert _front(card)["viewer"] is False  # no table: the viewer would show the manifest or the PNG as data


def test_no_preview_uploads_the_card_alone_and_removes_an_earlier_preview(fake_hub, bundle):
    hub.push(bundle, REPO, token=WRITE_TOKEN, viewer_table=True)
    assert {PREVIEW_NAME, VIEWER_TABLE_NAME} <= set(_head(fake_hub))
    res = CliRunner().invoke(main, ["push", str(bundle), REPO, "--token", WRITE_TOKEN, "--no-preview"])
    assert res.exit_code == 0, res.output
    files = _head(fake_hub)
    assert not {PREVIEW_NAME, VIEWER_TABLE_NAME} & set(files)  # a stale page would show another bundle
    card = files["README.md"].decode()
    assert PREVIEW_NAME not in card.split("## Files")[0] and "configs" not in _front(card)
    assert "README.md" in files and MANIFEST_NAME in files


def test_a_preview_over_the_cap_is_downscaled_not_uploaded_as_is(fake_hub, tmp_path):
    path = make_format_bundle(tmp_path / "big", num_classes=4, per_class=4, height=64, seed=2)
    full = preview_png(Bundle.open(path))
    cap = len(full.data) // 4
    small = preview_png(Bundle.open(path), max_bytes=cap)
    assert len(small.data) <= cap < len(full.data)
    assert small.scale < 1 and small.width < full.width and small.height < full.height
    assert Image.open(io.BytesIO(small.data)).size == (small.width, small.height)

    hub.push(path, REPO, token=WRITE_TOKEN, preview_max_bytes=cap)
    files = _head(fake_hub)
    assert files[PREVIEW_NAME] == small.data
    assert f"shrunk to {small.width}x{small.height} px" in files["README.md"].decode()
    with pytest.raises(InputError, match="cannot hold a legible PNG") as err:
        preview_png(Bundle.open(path), max_bytes=10)
    assert err.value.field == "preview_max_bytes"


def test_the_preview_of_many_classes_shows_a_spread_of_them(tmp_path):
    path = make_format_bundle(tmp_path / "many", num_classes=40, per_class=1, seed=3)
    p = preview_png(Bundle.open(path), max_classes=8)
    assert (p.classes_shown, p.num_classes) == (8, 40)
    card = hub.dataset_card(path, REPO, preview=p)
    assert "8 of the 40 classes, evenly spaced" in card


# --------------------------------------------------------------------------------------------------
# The viewer table
# --------------------------------------------------------------------------------------------------
def test_viewer_table_holds_every_image_with_its_class_name(fake_hub, bundle, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    hub.push(bundle, REPO, token=WRITE_TOKEN, viewer_table=True)
    files = _head(fake_hub)
    card = files["README.md"].decode()
    meta = _front(card)
    assert meta["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": VIEWER_TABLE_NAME}]}]
    assert "viewer" not in meta

    table = tmp_path / "from-hub.parquet"
    table.write_bytes(files[VIEWER_TABLE_NAME])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = datasets.load_dataset("parquet", data_files={"train": str(table)}, split="train",
                               cache_dir=str(tmp_path / "ds-cache"))
    b = Bundle.open(bundle)
    images, labels = b.read_images()
    assert len(ds) == b.manifest.images.count
    assert ds.features["label"].names == b.manifest.classes
    for row, img, label in zip(ds, images, labels.tolist()):
        assert ds.features["label"].int2str(row["label"]) == b.manifest.classes[label]
        assert (np.asarray(row["image"].convert("RGB")) == img.permute(1, 2, 0).numpy()).all()  # stored pixels


def test_viewer_table_bytes_against_the_bundle(tmp_path, bundle):
    # The measure behind making the table opt-in: it is a second copy of the images.
    size = hub.write_viewer_table(bundle, tmp_path / "v.parquet")
    images = sum(e.size for n, e in Bundle.open(bundle).manifest.files.items() if n.startswith("images-"))
    assert size == (tmp_path / "v.parquet").stat().st_size
    assert size > 0.1 * _bundle_bytes(bundle)
    assert size > 0.5 * images


def test_viewer_table_without_pyarrow_fails_before_any_request(fake_hub, bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(InputError, match="needs pyarrow") as err:
        hub.push(bundle, REPO, token=WRITE_TOKEN, viewer_table=True)
    assert err.value.field == "--viewer-table" and "hellofmt[hf-datasets]" in err.value.fix
    assert fake_hub.requests == []


# --------------------------------------------------------------------------------------------------
# Unlisted extras: readers ignore them
# --------------------------------------------------------------------------------------------------
def test_a_bundle_carrying_the_extras_opens_and_verifies(tiny_bundle, tmp_path):
    path = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    (path / "README.md").write_text(hub.dataset_card(path))
    (path / PREVIEW_NAME).write_bytes(preview_png(Bundle.open(path)).data)
    hub.write_viewer_table(path, path / VIEWER_TABLE_NAME)
    assert set(EXTRA_NAMES) <= {p.name for p in path.iterdir()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UnlistedFileWarning
        Bundle.open(path, verify=True).close()
    assert verify_bundle(path) == []
    res = CliRunner().invoke(main, ["verify", str(path)])
    assert res.exit_code == 0 and res.output.startswith(f"{path}: ok"), res.output

    (path / "notes.txt").write_text("not an extra")  # any other unlisted file is still reported
    assert any("notes.txt" in p for p in verify_bundle(path))


def test_pull_skips_the_page_files(fake_hub, bundle, tmp_path):
    hub.push(bundle, REPO, token=WRITE_TOKEN, viewer_table=True)
    out = hub.pull(REPO, tmp_path / "pulled")
    names = {p.name for p in Path(out).iterdir()}
    assert MANIFEST_NAME in names and not {PREVIEW_NAME, VIEWER_TABLE_NAME} & names


# --------------------------------------------------------------------------------------------------
# The card: the label line and the evaluations
# --------------------------------------------------------------------------------------------------
def test_card_names_the_label_payload_in_one_line(bundle):
    from hellofmt.summary import format_bytes, summarize

    lp = summarize(Bundle.open(bundle))["label_payload"]
    card = hub.dataset_card(bundle, REPO)
    line = next(x for x in card.splitlines() if x.startswith("**Labels:"))
    assert line.startswith(f"**Labels: {format_bytes(lp['projector_bytes'])} instead of "
                           f"{format_bytes(lp['stored_label_bytes'])}.**")
    assert "smaller than stored labels" in line


def test_card_without_evaluations_says_not_evaluated_yet_and_how(bundle):
    card = hub.dataset_card(bundle, REPO)
    section = card.split("## Student evaluations", 1)[1].split("\n## ", 1)[0]
    assert "Not evaluated yet" in section
    assert "hellofmt eval BUNDLE --val VAL_DIR --teacher TEACHER --train-data TRAIN_DIR --record" in section
    assert f"hellofmt pull {REPO} BUNDLE" in section and f"hellofmt push BUNDLE {REPO}" in section


def test_card_lists_every_evaluation_with_the_comparisons(bundle):
    second = {**EVALUATION, "protocol": "rded", "student": "timm:resnet18", "seeds": [0],
              "arms": {"bundle": [0.4], "hard": [0.3]}}
    _with_evaluations(bundle, [EVALUATION, second])
    card = hub.dataset_card(bundle, REPO)
    assert "Not evaluated yet" not in card
    assert ("| protocol | student | seeds | val images | bundle | hard | teacher | random | bundle/teacher "
            "| bundle − hard | IOR (bundle − random) |") in card
    assert ("| quick | convnet | 3 | 800 | 61.0 ± 1.0 | 50.7 ± 1.2 | 70.3 ± 0.6 | 58.0 ± 1.0 | 0.867 | +10.3 "
            "| +3.0 |") in card
    assert "| rded | timm:resnet18 | 1 | 800 | 40.0 ± 0.0 | 30.0 ± 0.0 | - | - | - | +10.0 | - |" in card


def test_the_spec_names_every_extra_in_section_1():
    spec = (Path(__file__).resolve().parents[1] / "spec" / "hellofmt-v1.md").read_text(encoding="utf-8")
    section = spec.split("## 1. Files", 1)[1].split("\n## 2.", 1)[0]
    assert "*unlisted extras* are exactly" in section and "MUST NOT warn about them" in section
    for name in EXTRA_NAMES:
        assert f"`{name}`" in section
