"""Missing, extra, altered, truncated, hostile and escaping files."""

from __future__ import annotations

import os
import struct

import pytest

from hellofmt.bundle import Bundle, UnlistedFileWarning
from hellofmt.errors import IntegrityError, MissingFileError, TensorFileError, UnsafePathError

from _hostile import edit_manifest, replace_file, snapshot
from bundles import make_format_bundle


@pytest.fixture
def bundle(tmp_path):
    return make_format_bundle(tmp_path / "b", max_shard_bytes=1200)


def files_of(bundle):
    return sorted(Bundle.open(bundle).manifest.files)


def unchanged(bundle, fn, error, match=None):
    before = snapshot(bundle.parent)
    with pytest.raises(error, match=match) as e:
        fn()
    assert snapshot(bundle.parent) == before
    return e.value


def test_listed_file_absent(bundle):
    (bundle / "projector.safetensors").unlink()
    err = unchanged(bundle, lambda: Bundle.open(bundle), MissingFileError, "absent")
    assert err.field == "files.projector.safetensors"


def test_unlisted_extra_file_warns_only(bundle):
    (bundle / "payload.exe").write_bytes(b"MZ")
    before = snapshot(bundle.parent)
    with pytest.warns(UnlistedFileWarning, match="payload.exe"):
        b = Bundle.open(bundle, verify=True)
    assert b.read_images()[0].shape[0] == 6
    assert snapshot(bundle.parent) == before


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_flipped_byte_in_any_file(bundle, where):
    names = files_of(bundle)
    assert len(names) >= 3
    for name in names:
        p = bundle / name
        original = p.read_bytes()
        data = bytearray(original)
        i = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
        data[i] ^= 0x01
        p.write_bytes(bytes(data))
        err = unchanged(bundle, lambda: Bundle.open(bundle, verify=True), IntegrityError, "sha256")
        assert err.field == f"files.{name}.sha256"
        assert any(name in line and "sha256" in line for line in Bundle.open(bundle).verify())
        p.write_bytes(original)


def test_truncated_file_fails_the_size_check(bundle):
    p = bundle / "projector.safetensors"
    p.write_bytes(p.read_bytes()[:-10])
    unchanged(bundle, lambda: Bundle.open(bundle), IntegrityError, "bytes, the manifest says")


@pytest.mark.parametrize("keep", [4, 100, -1])
def test_truncated_safetensors_with_a_consistent_manifest(bundle, keep):
    data = (bundle / "projector.safetensors").read_bytes()
    replace_file(bundle, "projector.safetensors", data[:keep])
    b = Bundle.open(bundle, verify=True)
    unchanged(bundle, b.projector_tensors, TensorFileError)
    assert any("projector.safetensors" in line for line in b.verify())


def test_truncated_shard_with_a_consistent_manifest(bundle):
    name = Bundle.open(bundle).manifest.images.shards[0].file
    replace_file(bundle, name, (bundle / name).read_bytes()[:-3])
    b = Bundle.open(bundle, verify=True)
    err = unchanged(bundle, b.read_images, TensorFileError)
    assert name in err.file


def test_header_claiming_a_huge_length(bundle):
    # 2**60 bytes: reading it would exhaust memory; the length is checked against the file size first.
    hostile = struct.pack("<Q", 2**60) + b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}' + b"\0" * 4
    replace_file(bundle, "projector.safetensors", hostile)
    b = Bundle.open(bundle, verify=True)
    unchanged(bundle, b.projector_tensors, TensorFileError, "claims 1152921504606846976 bytes")


def test_header_with_tensor_bytes_past_the_end(bundle):
    header = b'{"a": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}'
    replace_file(bundle, "projector.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 16)
    b = Bundle.open(bundle, verify=True)
    unchanged(bundle, b.projector_tensors, TensorFileError, "do not fit")


@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "C:evil"])
def test_file_name_escaping_the_bundle(bundle, name):
    def attack(o):
        o["files"][name] = dict(o["files"]["projector.safetensors"])
        o["projector"]["file"] = name

    edit_manifest(bundle, attack)
    err = unchanged(bundle, lambda: Bundle.open(bundle), UnsafePathError, "unsafe file name")
    assert err.field and name in str(err)


def test_symlink_leading_out_of_the_bundle(bundle, tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes((bundle / "projector.safetensors").read_bytes())
    (bundle / "projector.safetensors").unlink()
    os.symlink(outside, bundle / "projector.safetensors")
    err = unchanged(bundle, lambda: Bundle.open(bundle), UnsafePathError, "leads out of the bundle")
    assert err.field == "files.projector.safetensors"
    assert any("leads out" in line for line in Bundle.open_unchecked(bundle).verify())


def test_manifest_symlink_leading_out(bundle, tmp_path):
    outside = tmp_path / "m.json"
    outside.write_bytes((bundle / "hellofmt.json").read_bytes())
    (bundle / "hellofmt.json").unlink()
    os.symlink(outside, bundle / "hellofmt.json")
    unchanged(bundle, lambda: Bundle.open(bundle), UnsafePathError, "leads out")


def test_listed_name_is_a_directory(bundle):
    (bundle / "projector.safetensors").unlink()
    (bundle / "projector.safetensors").mkdir()
    unchanged(bundle, lambda: Bundle.open(bundle), UnsafePathError, "not a regular file")


def test_safetensors_header_with_hostile_nesting(tmp_path):
    # A header of 200,000 '[' makes json.loads raise RecursionError, not a ValueError.
    import struct

    from hellofmt.errors import TensorFileError
    from hellofmt.tensorfile import read_safetensors_header

    header = b"[" * 200_000
    path = tmp_path / "nested.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(TensorFileError, match="not JSON: RecursionError") as e:
        read_safetensors_header(path)
    assert e.value.file == str(path)
