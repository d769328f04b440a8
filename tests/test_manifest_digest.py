"""The manifest digest (spec 2.1, issue 22): ``manifest_sha256`` over the manifest's canonical form.

A single-bit flip anywhere in ``hellofmt.json`` is refused, at parse (every bit of a manifest's first
4 KiB and a seeded sample beyond), at open (Bundle, DistilledDataset) and by ``hellofmt verify``;
in-place updates (``eval --record``) recompute it; an older manifest without one opens with a warning
and ``hellofmt verify`` reports it with the command that adds one.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings

import pytest
from click.testing import CliRunner

from hellofmt.bundle import Bundle, reseal_manifest, update_manifest
from hellofmt.cli import main
from hellofmt.errors import HellofmtError, ManifestDigestError, ManifestError
from hellofmt.manifest import (
    DIGEST_FIELD,
    MANIFEST_NAME,
    Evaluation,
    Manifest,
    MissingDigestWarning,
    canonical_manifest,
    manifest_digest,
)
from hellofmt.verify import verify_bundle

from bundles import make_format_bundle, reseal


@pytest.fixture
def bundle(tmp_path):
    return make_format_bundle(tmp_path / "b", num_classes=3, per_class=2)


def _evaluation() -> Evaluation:
    return Evaluation(protocol="quick", student="convnet", arms={"bundle": [0.5, 0.25], "hard": [0.4, 0.5]},
                      seeds=[0, 1], hellofmt_version="0.3.0", date="2026-01-01T00:00:00Z",
                      hyperparameters={"epochs": 2, "lr": 0.01}, val_count=12)


# ---- the canonical form: what another implementation must reproduce ---------------------------------
def test_canonical_form_sorts_keys_drops_whitespace_and_keeps_numbers_as_written():
    text = ('{ "b": 1.50, "a": [1E5, -0, "x\\u001B\\n\\u00e9\\/"], "é": {"z": true, "y": null},\n'
            ' "manifest_sha256": "00"}')
    assert canonical_manifest(text) == '{"a":[1E5,-0,"x\\u001b\\né/"],"b":1.50,"é":{"y":null,"z":true}}'.encode()
    # the digest is the plain sha256 of those bytes, hex
    assert manifest_digest(text) == hashlib.sha256(canonical_manifest(text)).hexdigest()
    # key order and whitespace do not matter; a nested field named like the digest is content
    same = '{"manifest_sha256":"11","é":{"y":null,"z":true},"a":[1E5,-0,"x\\u001b\\n\\u00E9/"],"b":1.50}'
    assert manifest_digest(same) == manifest_digest(text)
    assert manifest_digest('{"a": {"manifest_sha256": "1"}}') != manifest_digest('{"a": {}}')
    # a number's text is part of the content: 1.50 is not 1.5
    assert manifest_digest(text.replace("1.50", "1.5")) != manifest_digest(text)


def test_golden_digest_of_a_tiny_manifest():
    # a fixed vector for other implementations (spec 2.1 quotes it)
    text = '{"format": "hellofmt", "format_version": "1.1", "classes": ["cat", "dog"], "metrics": {"kl": 0.5}}'
    assert canonical_manifest(text) == (b'{"classes":["cat","dog"],"format":"hellofmt","format_version":"1.1",'
                                        b'"metrics":{"kl":0.5}}')
    assert manifest_digest(text) == "f27743f8b421c2d80991c778d753883b762b8c2f7d5e358f6a57c94fada33ab8"


def test_written_manifests_carry_a_digest_that_verifies_and_survives_reformatting(bundle):
    text = (bundle / MANIFEST_NAME).read_text()
    obj = json.loads(text)
    assert obj[DIGEST_FIELD] == manifest_digest(text) and obj["format_version"].endswith(".1")
    m = Bundle.open(bundle).manifest
    assert m.manifest_sha256 == obj[DIGEST_FIELD]
    # another writer's layout (compact, keys sorted the other way) keeps the same digest
    (bundle / MANIFEST_NAME).write_text(json.dumps(dict(reversed(list(obj.items()))), separators=(",", ":")))
    assert Bundle.open(bundle).manifest.manifest_sha256 == obj[DIGEST_FIELD]


def test_unknown_fields_are_covered_and_kept(bundle):
    obj = json.loads((bundle / MANIFEST_NAME).read_text())
    obj["x_extension"] = {"note": "kept"}
    (bundle / MANIFEST_NAME).write_text(reseal(json.dumps(obj)))
    assert Bundle.open(bundle).manifest.extra["x_extension"] == {"note": "kept"}
    obj2 = json.loads((bundle / MANIFEST_NAME).read_text())
    obj2["x_extension"]["note"] = "changed"
    (bundle / MANIFEST_NAME).write_text(json.dumps(obj2))
    with pytest.raises(ManifestDigestError):
        Bundle.open(bundle)


# ---- single-bit flips ------------------------------------------------------------------------------
def _flips(data: bytes, *, first: int = 4096):
    """Every bit of the first ``first`` bytes."""
    for pos in range(min(first, len(data))):
        for bit in range(8):
            yield pos, bit


def _flipped(data: bytes, pos: int, bit: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


@pytest.fixture(scope="module")
def evaluated_bundle(tiny_bundle, tmp_path_factory):
    """A real bundle (probe, metrics) with an evaluation recorded in place, as `eval --record` does."""
    b = tmp_path_factory.mktemp("evaluated") / "b"
    shutil.copytree(tiny_bundle, b)
    update_manifest(b, lambda m: m.evaluations.append(_evaluation()))
    return b


def _refused_flips(data: bytes, flips) -> tuple[int, int, list]:
    """Parse every flipped manifest: (refused, refused by the digest itself, flips that passed)."""
    refused = by_digest = 0
    passed = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a flip read as "an older manifest without a digest" fails too
        for pos, bit in flips:
            try:
                Manifest.from_json(_flipped(data, pos, bit), file="hellofmt.json")
            except ManifestDigestError:
                by_digest += 1
            except HellofmtError:
                pass
            else:
                passed.append((pos, bit))
                continue
            refused += 1
    return refused, by_digest, passed


def test_every_bit_flip_of_a_small_manifest_is_refused_at_parse(bundle):
    data = (bundle / MANIFEST_NAME).read_bytes()
    assert len(data) <= 4096  # every bit of it (the whole manifest, about 2.4 KiB)
    Manifest.from_json(data)  # the original parses
    refused, by_digest, passed = _refused_flips(data, _flips(data))
    assert passed == [] and refused == 8 * len(data)
    assert by_digest > len(data)  # many flips leave valid JSON and a valid manifest: only the digest sees them


def test_a_seeded_sample_of_flips_of_a_real_evaluated_manifest_is_refused_at_parse(evaluated_bundle):
    # the tiny real bundle: probe, metrics, build arguments, and an evaluation recorded in place
    data = (evaluated_bundle / MANIFEST_NAME).read_bytes()
    Manifest.from_json(data)
    rng = random.Random(0)
    flips = [(rng.randrange(len(data)), rng.randrange(8)) for _ in range(2500)]
    refused, by_digest, passed = _refused_flips(data, flips)
    assert passed == [] and refused == 2500 and by_digest > 500


def test_bit_flips_are_refused_at_open_by_the_dataset_and_by_verify(evaluated_bundle, tmp_path):
    from hellofmt import DistilledDataset

    b = tmp_path / "b"
    shutil.copytree(evaluated_bundle, b)
    data = (b / MANIFEST_NAME).read_bytes()
    rng = random.Random(1)
    flips = [(rng.randrange(len(data)), rng.randrange(8)) for _ in range(30)]
    # the flips the issue found passing before: provenance.build_args and metrics
    for key in ('"min_steps"', '"steps"', '"kl"'):
        pos = data.find(key.encode())
        if pos >= 0:
            flips.append((pos + 2, 0))
    for pos, bit in flips:
        (b / MANIFEST_NAME).write_bytes(_flipped(data, pos, bit))
        with pytest.raises(HellofmtError):
            Bundle.open(b).close()
    for pos, bit in flips[:3]:
        (b / MANIFEST_NAME).write_bytes(_flipped(data, pos, bit))
        with pytest.raises(HellofmtError):
            DistilledDataset(b, device="cpu")
        try:
            problems = verify_bundle(b)
        except ManifestError:
            problems = ["refused"]
        assert problems
        r = CliRunner().invoke(main, ["verify", str(b)])
        assert r.exit_code != 0, r.output
    (b / MANIFEST_NAME).write_bytes(data)
    assert verify_bundle(b) == []


# ---- bad input: the messages --------------------------------------------------------------------
def test_a_mismatch_names_the_file_the_field_and_both_fixes(bundle):
    text = (bundle / MANIFEST_NAME).read_text()
    (bundle / MANIFEST_NAME).write_text(text.replace('"temperature": 1.0', '"temperature": 2.0'))
    with pytest.raises(ManifestDigestError) as e:
        Bundle.open(bundle)
    err = e.value
    assert err.file == str(bundle / MANIFEST_NAME) and err.field == DIGEST_FIELD
    assert "the manifest changed after it was written" in str(err)
    assert f"if you edited it on purpose, run `hellofmt verify --fix-digest {bundle}`" in err.fix
    assert "otherwise get the bundle again" in err.fix


@pytest.mark.parametrize("value, words", [
    ("ab" * 31, "expected 64 lowercase hex characters, got 62 characters"),
    ("AB" * 32, "expected 64 lowercase hex characters"),
    (12, "expected 64 lowercase hex characters, got the number 12"),
])
def test_a_digest_of_the_wrong_form_is_refused(bundle, value, words):
    obj = json.loads((bundle / MANIFEST_NAME).read_text())
    obj[DIGEST_FIELD] = value
    (bundle / MANIFEST_NAME).write_text(json.dumps(obj))
    with pytest.raises(ManifestDigestError, match=words) as e:
        Bundle.open(bundle)
    assert e.value.field == DIGEST_FIELD and "--fix-digest" in e.value.fix


def test_two_digests_are_refused(bundle):
    text = (bundle / MANIFEST_NAME).read_text()
    digest = json.loads(text)[DIGEST_FIELD]
    # the same digest twice, and two different ones: both refused, naming the field
    for second in (digest, "0" * 64):
        (bundle / MANIFEST_NAME).write_text(text.replace(f'"{DIGEST_FIELD}"', f'"{DIGEST_FIELD}": "{second}", '
                                                                               f'"{DIGEST_FIELD}"'))
        with pytest.raises(ManifestDigestError, match="two digests") as e:
            Bundle.open(bundle)
        assert e.value.field == DIGEST_FIELD and "--fix-digest" in e.value.fix


def test_any_repeated_key_is_refused(bundle):
    text = (bundle / MANIFEST_NAME).read_text()
    (bundle / MANIFEST_NAME).write_text(text.replace('"temperature": 1.0', '"temperature": 1.0, "temperature": 9.0'))
    with pytest.raises(ManifestError, match="'temperature' appears twice"):
        Bundle.open(bundle)


def test_a_renamed_digest_is_refused_where_the_version_requires_one(bundle):
    text = (bundle / MANIFEST_NAME).read_text()
    (bundle / MANIFEST_NAME).write_text(text.replace(f'"{DIGEST_FIELD}"', '"manifest_sha257"'))
    with pytest.raises(ManifestDigestError, match="missing, but format_version 2.1 requires it"):
        Bundle.open(bundle)


# ---- older manifests, and the fix ---------------------------------------------------------------
def _undigested(bundle, version="2.0"):
    obj = json.loads((bundle / MANIFEST_NAME).read_text())
    del obj[DIGEST_FIELD]
    obj["format_version"] = version
    obj["x_unknown"] = [1.50, "kept"]
    (bundle / MANIFEST_NAME).write_text(json.dumps(obj))


def test_an_older_manifest_without_a_digest_opens_with_a_warning_and_verify_reports_it(bundle):
    _undigested(bundle)
    with pytest.warns(MissingDigestWarning, match="--fix-digest"):
        m = Bundle.open(bundle).manifest
    assert m.manifest_sha256 is None and m.format_version == "2.0"
    problems = verify_bundle(bundle, probe=False)
    assert len(problems) == 1 and DIGEST_FIELD in problems[0]
    assert f"hellofmt verify --fix-digest {bundle}" in problems[0]
    r = CliRunner().invoke(main, ["verify", str(bundle)])
    assert r.exit_code == 1 and "--fix-digest" in r.output


def test_fix_digest_seals_an_older_or_edited_manifest_keeping_every_field(bundle):
    _undigested(bundle)
    r = CliRunner().invoke(main, ["verify", "--fix-digest", str(bundle)])
    assert "wrote a new manifest_sha256" in r.output
    obj = json.loads((bundle / MANIFEST_NAME).read_text())
    assert obj["format_version"] == "2.1" and obj["x_unknown"] == [1.5, "kept"]
    assert obj[DIGEST_FIELD] == manifest_digest((bundle / MANIFEST_NAME).read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Bundle.open(bundle, verify=True).close()
    # an edit on purpose, then the fix: the edit is kept and the bundle opens
    text = (bundle / MANIFEST_NAME).read_text()
    (bundle / MANIFEST_NAME).write_text(text.replace('"temperature": 1.0', '"temperature": 2.0'))
    with pytest.raises(ManifestDigestError):
        Bundle.open(bundle)
    reseal_manifest(bundle)
    assert Bundle.open(bundle).manifest.labels.temperature == 2.0
    # an invalid manifest is not sealed
    (bundle / MANIFEST_NAME).write_text(text.replace('"temperature": 1.0', '"temperature": -1'))
    with pytest.raises(ManifestError, match="labels.temperature"):
        reseal_manifest(bundle)


def test_record_recomputes_the_digest_under_the_lock(bundle):
    before = json.loads((bundle / MANIFEST_NAME).read_text())[DIGEST_FIELD]
    update_manifest(bundle, lambda m: m.evaluations.append(_evaluation()))
    text = (bundle / MANIFEST_NAME).read_text()
    obj = json.loads(text)
    assert obj[DIGEST_FIELD] != before and obj[DIGEST_FIELD] == manifest_digest(text)
    m = Bundle.open(bundle, verify=True).manifest
    assert m.evaluations == [_evaluation()]
    assert verify_bundle(bundle, probe=False) == []
    # an in-place update refuses a manifest that changed behind its back (it would seal the change)
    (bundle / MANIFEST_NAME).write_text(text.replace('"temperature": 1.0', '"temperature": 2.0'))
    with pytest.raises(ManifestDigestError):
        update_manifest(bundle, lambda m: None)


def test_the_schema_knows_the_digest(bundle):
    from importlib.resources import files

    import jsonschema

    schema = json.loads(files("hellofmt").joinpath("schema/manifest.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    obj = json.loads((bundle / MANIFEST_NAME).read_text())
    validator.validate(obj)
    for bad in ("ab" * 31, "AB" * 32):
        assert not validator.is_valid({**obj, DIGEST_FIELD: bad})
    without = {k: v for k, v in obj.items() if k != DIGEST_FIELD}
    assert not validator.is_valid(without)  # 2.1 requires it
    assert validator.is_valid({**without, "format_version": "2.0"})  # an older bundle
    assert not validator.is_valid({**without, "format_version": "1.12"})
