"""Inputs that used to escape as raw exceptions (OSError, ValueError) now raise a HellofmtError
naming the file and field: over-long names, non-finite numbers in unknown manifest fields, and a
Hub repository holding a file name that would escape the download folder."""

from __future__ import annotations

import json

import pytest

from hellofmt.bundle import Bundle, BundleWriter
from hellofmt.errors import (
    BundleNotFoundError,
    HellofmtError,
    HubError,
    InputError,
    ManifestError,
    UnsafeFileNameError,
)
from hellofmt.manifest import MANIFEST_NAME, Manifest

from _hostile import edit_manifest, snapshot
from bundles import make_format_bundle, reseal


@pytest.fixture
def bundle(tmp_path):
    return make_format_bundle(tmp_path / "b")


# ---- names too long for the filesystem (ENAMETOOLONG) ----------------------------------------------
def test_a_manifest_listing_a_300_character_file_name(bundle):
    long = "x" * 296 + ".bin"

    def edit(obj):
        obj["files"][long] = {"sha256": "0" * 64, "size": 1}

    edit_manifest(bundle, edit)
    before = snapshot(bundle)
    with pytest.raises(UnsafeFileNameError, match="at most 255 bytes") as e:
        Bundle.open(bundle)
    assert e.value.field == f"files.{long}"
    assert snapshot(bundle) == before


def test_a_shard_named_with_300_characters(bundle):
    long = "images-" + "0" * 293

    def edit(obj):
        old = obj["images"]["shards"][0]["file"]
        obj["images"]["shards"][0]["file"] = long
        obj["files"][long] = obj["files"].pop(old)

    edit_manifest(bundle, edit)
    with pytest.raises(UnsafeFileNameError) as e:
        Bundle.open(bundle)
    assert e.value.field in (f"files.{long}", "images.shards[0].file")


def test_opening_or_writing_a_path_with_a_300_character_name(tmp_path):
    with pytest.raises(BundleNotFoundError):
        Bundle.open(tmp_path / ("x" * 300))
    for name in ("x" * 300, "y" * 240):  # 240: fits, but not with the writer's temporary suffix
        with pytest.raises(InputError, match="name is") as e:
            BundleWriter(tmp_path / name)
        assert e.value.field == "out"
    with BundleWriter(tmp_path / "b") as w, pytest.raises(UnsafeFileNameError):
        w.write_bytes("z" * 300, b"data")
    assert list(tmp_path.iterdir()) == []


# ---- numbers out of the float range, known field or not ------------------------------------------
@pytest.mark.parametrize("where, field", [
    ('"my_extension": 1e999', "my_extension"),
    ('"my_extension": {"deep": [1, -1e999]}', "my_extension.deep[1]"),
])
def test_an_infinite_number_in_an_unknown_field_is_refused_at_parse(bundle, where, field):
    text = (bundle / MANIFEST_NAME).read_text()
    (bundle / MANIFEST_NAME).write_text(reseal(text.replace('"metrics": {}', f'"metrics": {{}}, {where}')))
    with pytest.raises(ManifestError, match="expected a finite number") as e:
        Bundle.open(bundle)
    assert e.value.field == field
    # a manifest that parses can always be written back
    obj = json.loads(text)
    obj["my_extension"] = {"deep": [1, 2.5e300]}
    m = Manifest.from_dict(obj)
    assert json.loads(m.to_json())["my_extension"] == {"deep": [1, 2.5e300]}


# ---- pull: a repository file name that would escape the folder ---------------------------------
@pytest.fixture
def evil_repo(monkeypatch, tmp_path, bundle):
    """A Hub dataset repository holding a valid bundle plus a file named '../evil.txt'."""
    from huggingface_hub import constants

    from fakehub import FakeHub, point_client_at

    with FakeHub() as server:
        point_client_at(server.url, monkeypatch)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        server.create_repo("user/evil")
        files = {p.name: p.read_bytes() for p in bundle.iterdir()}
        files["../evil.txt"] = b"outside"
        server.commit_files("user/evil", files)
        yield "user/evil"


@pytest.mark.parametrize("existing", [False, True])
def test_pull_of_a_repository_with_an_escaping_file_name(evil_repo, tmp_path, existing):
    from hellofmt import hub

    target = tmp_path / "download"
    if existing:
        target.mkdir()
        (target / "mine.txt").write_text("the user's own file")
    with pytest.raises(HubError, match="cannot download the repository") as e:
        hub.pull(evil_repo, local_dir=target)
    assert e.value.file == "hf://datasets/user/evil"
    assert not (tmp_path / "evil.txt").exists()
    if existing:  # a folder the user had keeps the user's files
        assert (target / "mine.txt").read_text() == "the user's own file"
    else:  # a folder pull created is removed with what it downloaded
        assert not target.exists()


def test_pull_of_an_escaping_file_name_into_the_cache(evil_repo, tmp_path):
    from hellofmt import hub

    with pytest.raises(HellofmtError):
        hub.pull(evil_repo)
    assert not (tmp_path / "evil.txt").exists()
    assert not any(p.name == "evil.txt" for p in (tmp_path / "hf-cache").rglob("*"))
