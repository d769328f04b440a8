"""Bundle: atomic writing, opening, checking, reading."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hellofmt.bundle import Bundle, BundleWriter, UnlistedFileWarning, sha256_file
from hellofmt.errors import (
    BundleExistsError,
    BundleNotFoundError,
    ImageStoreError,
    InputError,
    IntegrityError,
    ManifestError,
)
from hellofmt.manifest import MANIFEST_NAME
from hellofmt.verify import verify_bundle

from bundles import DEFAULT_TARGETS, make_format_bundle, make_manifest, projector_tensors, smooth_images, write_manifest


def snapshot(root):
    return {p.name: sha256_file(p) for p in sorted(root.iterdir())} if root.exists() else None


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_written_bundle_opens_verifies_and_reads_back(tmp_path):
    images = smooth_images(6, 16, 12, seed=3)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    path = make_format_bundle(tmp_path / "b", images=images, labels=labels, height=16, width=12, max_shard_bytes=1500)
    b = Bundle.open(path, verify=True)
    assert b.verify() == []
    assert len(b.manifest.images.shards) > 1
    x, y = b.read_images()
    assert torch.equal(x, images) and torch.equal(y, labels)
    assert b.manifest.images.per_class == [2, 2, 2]
    assert sorted(b.manifest.files) == sorted(p.name for p in path.iterdir() if p.name != MANIFEST_NAME)
    for name, entry in b.manifest.files.items():
        assert entry.sha256 == sha256_file(path / name) and entry.size == (path / name).stat().st_size
    assert leftovers(tmp_path, "b") == []


def test_projector_tensors_and_foundation_path(tmp_path):
    path = make_format_bundle(tmp_path / "b", rank=3, head_rank=2, embed_dim=5)
    b = Bundle.open(path)
    t = b.projector_tensors()
    assert t["visual.conv1.weight.lora_A"].shape == (3, 48)
    assert t["visual.proj.lora_B"].shape == (8, 3)
    assert t["head.lora_A"].shape == (2, 5) and t["head.lora_B"].shape == (3, 2)
    assert b.foundation_path() is None


def test_embedded_foundation_is_listed_and_found(tmp_path):
    from safetensors.torch import save

    from hellofmt.foundation import fingerprint

    weights = {"w": torch.ones(2), "b.c": torch.arange(3)}
    man = make_manifest(["a", "b"])
    man.foundation.source, man.foundation.weights_file = "embedded", "foundation.safetensors"
    man.foundation.weights_sha256 = fingerprint(weights)
    with BundleWriter(tmp_path / "b") as w:
        man.images = w.write_images(smooth_images(2, 8, 8), torch.tensor([0, 1]), num_classes=2)
        w.write_tensors("projector.safetensors", projector_tensors(DEFAULT_TARGETS, rank=2, head_rank=2,
                                                                    num_classes=2, embed_dim=6))
        w.write_bytes("foundation.safetensors", save(weights, metadata={"format": "hellofmt-foundation"}))
        w.commit(man)
    b = Bundle.open(tmp_path / "b", verify=True)
    assert b.foundation_path().name == "foundation.safetensors"
    assert b.verify() == []
    b.manifest.foundation.weights_sha256 = "cd" * 32
    (problem,) = b.verify()
    assert "foundation.weights_sha256: embedded weights have fingerprint" in problem


def test_existing_target_is_kept_without_overwrite(tmp_path):
    path = make_format_bundle(tmp_path / "b")
    before = snapshot(path)
    with pytest.raises(BundleExistsError):
        make_format_bundle(tmp_path / "b", seed=5)
    assert snapshot(path) == before
    assert leftovers(tmp_path, "b") == []


def test_overwrite_replaces_the_bundle_whole(tmp_path):
    path = make_format_bundle(tmp_path / "b", per_class=1)
    (path / "stale.bin").write_bytes(b"old")
    make_format_bundle(tmp_path / "b", per_class=3, overwrite=True)
    b = Bundle.open(path, verify=True)
    assert b.manifest.images.count == 9
    assert not (path / "stale.bin").exists()
    assert leftovers(tmp_path, "b") == []


@pytest.mark.parametrize("existing", [False, True])
def test_an_exception_removes_the_temp_dir_and_leaves_the_target(tmp_path, existing):
    if existing:
        make_format_bundle(tmp_path / "b")
    before = snapshot(tmp_path / "b")
    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path / "b", overwrite=True) as w:
            w.write_images(smooth_images(2, 8, 8), torch.tensor([0, 1]), num_classes=2)
            assert w.tmpdir.is_dir()
            raise RuntimeError("boom")
    assert not w.tmpdir.exists()
    assert snapshot(tmp_path / "b") == before
    assert leftovers(tmp_path, "b") == []


def test_invalid_manifest_is_refused_at_commit_and_nothing_is_written(tmp_path):
    man = make_manifest(["a", "b"])
    with pytest.raises(ManifestError, match="projector.safetensors"):
        with BundleWriter(tmp_path / "b") as w:
            man.images = w.write_images(smooth_images(2, 8, 8), torch.tensor([0, 1]), num_classes=2)
            w.commit(man)  # projector file never written
    assert not (tmp_path / "b").exists() and leftovers(tmp_path, "b") == []


def test_commit_fills_files_and_writes_a_valid_manifest(tmp_path):
    path = make_format_bundle(tmp_path / "b")
    text = (path / MANIFEST_NAME).read_text()
    obj = json.loads(text)
    assert set(obj["files"]) == {"images-00000-of-00001.safetensors", "projector.safetensors"}


def test_writer_refuses_bad_labels(tmp_path):
    with BundleWriter(tmp_path / "b") as w:
        with pytest.raises(InputError, match="labels"):
            w.write_images(smooth_images(2, 8, 8), torch.tensor([0, 5]), num_classes=2)
    assert not (tmp_path / "b").exists()


def test_unlisted_file_warns_but_readme_does_not(tmp_path):
    path = make_format_bundle(tmp_path / "b")
    (path / "README.md").write_text("# card")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Bundle.open(path)
    (path / "notes.txt").write_text("hi")
    with pytest.warns(UnlistedFileWarning, match="notes.txt"):
        Bundle.open(path)
    assert any("notes.txt" in p for p in verify_bundle(path))


def test_verify_reports_every_problem(tmp_path):
    path = make_format_bundle(tmp_path / "b", max_shard_bytes=1000)
    shards = sorted(path.glob("images-*"))
    for p in shards[:2]:
        data = bytearray(p.read_bytes())
        data[-1] ^= 0xFF
        p.write_bytes(bytes(data))
    problems = Bundle.open_unchecked(path).verify()
    assert len(problems) == 2 and all("sha256" in line for line in problems)
    with pytest.raises(IntegrityError, match="sha256"):
        Bundle.open(path, verify=True)


def test_verify_checks_projector_tensors_against_the_manifest(tmp_path):
    man = make_manifest(["a", "b"], rank=2)
    bad = projector_tensors(DEFAULT_TARGETS, rank=3, head_rank=2, num_classes=2, embed_dim=6)
    bad["extra.lora_A"] = torch.zeros(1)
    with BundleWriter(tmp_path / "b") as w:
        man.images = w.write_images(smooth_images(2, 8, 8), torch.tensor([0, 1]), num_classes=2)
        w.write_tensors("projector.safetensors", bad)
        w.commit(man)
    problems = Bundle.open(tmp_path / "b").verify()
    assert any("visual.proj.lora_A: shape [3, 6], expected [2, 6]" in p for p in problems)
    assert any("extra.lora_A" in p for p in problems)


def test_per_class_counts_are_checked_against_labels(tmp_path):
    path = make_format_bundle(tmp_path / "b")
    obj = json.loads((path / MANIFEST_NAME).read_text())
    obj["images"]["per_class"] = [3, 1, 2]
    write_manifest(path, obj)
    with pytest.raises(ImageStoreError, match="per-class"):
        Bundle.open(path).read_images()


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleNotFoundError):
        Bundle.open(tmp_path / "nope")
    with pytest.raises(BundleNotFoundError):
        Bundle.open(tmp_path)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    classes=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=5, unique=True),
    n=st.integers(0, 6),
    h=st.integers(1, 8),
    w=st.integers(1, 8),
    codec=st.sampled_from(["png", "raw"]),
    seed=st.integers(0, 2**31),
)
def test_property_bundles_round_trip(tmp_path_factory, classes, n, h, w, codec, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, len(classes), (n,), generator=g)
    path = make_format_bundle(tmp_path_factory.mktemp("p") / "b", classes=classes, images=images, labels=labels,
                              codec=codec, max_shard_bytes=300)
    b = Bundle.open(path, verify=True)
    assert b.manifest.classes == classes
    x, y = b.read_images()
    assert torch.equal(x, images) and torch.equal(y, labels)
    assert b.verify() == []


def test_update_manifest_rewrites_in_place_under_the_lock(tmp_path):
    import pytest

    from hellofmt.bundle import Bundle, _Lock, update_manifest
    from hellofmt.errors import BundleLockedError

    path = make_format_bundle(tmp_path / "b")
    update_manifest(path, lambda m: m.metrics.update({"note.x": 1.5}))
    b = Bundle.open(path, verify=True)  # every file hash still holds
    assert b.manifest.metrics["note.x"] == 1.5
    lock = _Lock(path)
    assert lock.acquire(0)
    try:
        with pytest.raises(BundleLockedError):
            update_manifest(path, lambda m: m.metrics.update({"note.x": 2.0}), lock_timeout=0)
    finally:
        lock.release()
    assert Bundle.open(path).manifest.metrics["note.x"] == 1.5
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]
