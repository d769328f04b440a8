"""Hostile or broken manifests: each raises its HellofmtError and nothing on disk changes."""

from __future__ import annotations

import pytest

from hellofmt.bundle import Bundle
from hellofmt.errors import BundleNotFoundError, FormatVersionError, ManifestError
from hellofmt.manifest import MANIFEST_NAME

from _hostile import edit_manifest, snapshot
from bundles import make_format_bundle, reseal


@pytest.fixture
def bundle(tmp_path):
    return make_format_bundle(tmp_path / "b")


def refused(bundle, error, match=None):
    before = snapshot(bundle.parent)
    with pytest.raises(error, match=match) as e:
        Bundle.open(bundle)
    assert snapshot(bundle.parent) == before
    return e.value


def test_missing_manifest(bundle):
    (bundle / MANIFEST_NAME).unlink()
    refused(bundle, BundleNotFoundError, "no hellofmt.json")


def test_manifest_not_json(bundle):
    (bundle / MANIFEST_NAME).write_bytes(b"\x00\x01 this is not json")
    err = refused(bundle, ManifestError, "not UTF-8|not valid JSON")
    assert err.file.endswith(MANIFEST_NAME)


def test_manifest_is_a_json_list(bundle):
    (bundle / MANIFEST_NAME).write_text("[]")
    refused(bundle, ManifestError, "expected an object")


def test_wrong_format_name(bundle):
    edit_manifest(bundle, lambda o: o.update(format="safetensors-index"))
    refused(bundle, ManifestError, "format: expected 'hellofmt'")


def test_newer_major_version(bundle):
    edit_manifest(bundle, lambda o: o.update(format_version="3.0"))
    err = refused(bundle, FormatVersionError, "newer")
    assert err.field == "format_version" and "upgrade" in err.fix


def test_missing_field(bundle):
    edit_manifest(bundle, lambda o: o["images"].pop("codec"))
    err = refused(bundle, ManifestError, "images.codec: missing required field")
    assert err.field == "images.codec"


def test_mistyped_field(bundle):
    edit_manifest(bundle, lambda o: o["images"].update(height="16"))
    refused(bundle, ManifestError, "images.height: expected an integer, got the string '16'")


def test_huge_manifest_is_refused_before_parsing(bundle):
    with open(bundle / MANIFEST_NAME, "ab") as f:
        f.truncate(17 * 1024 * 1024)
    refused(bundle, ManifestError, "over the")


def test_deeply_nested_manifest(bundle):
    # json.loads raises RecursionError (not a ValueError) on hostile nesting
    (bundle / MANIFEST_NAME).write_text("[" * 200_000 + "]" * 200_000)
    refused(bundle, ManifestError, "not valid JSON: RecursionError")


def test_number_too_large_for_a_float(bundle):
    # JSON integers are unbounded; float() of a 400-digit one overflows
    text = (bundle / MANIFEST_NAME).read_text().replace('"temperature": 1.0', '"temperature": ' + "9" * 400)
    assert "9" * 400 in text
    (bundle / MANIFEST_NAME).write_text(reseal(text))
    refused(bundle, ManifestError, "labels.temperature: expected a finite number")


@pytest.mark.parametrize("value", ["1e400", "9" * 400, '"high"'])
def test_metric_that_is_not_a_finite_number(bundle, value):
    # written as text: json.dumps cannot produce these values
    text = (bundle / MANIFEST_NAME).read_text()
    assert '"metrics": {}' in text
    (bundle / MANIFEST_NAME).write_text(reseal(text.replace('"metrics": {}', f'"metrics": {{"agreement": {value}}}')))
    refused(bundle, ManifestError, "metrics.agreement: expected a finite number")
