"""Manifest: JSON round trip, validation errors naming the field, agreement with the JSON Schema."""

from __future__ import annotations

import copy
import importlib.resources
import json
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hellofmt.errors import FormatVersionError, ManifestError
from hellofmt.manifest import (
    MANIFEST_NAME,
    FileEntry,
    ImagesInfo,
    Manifest,
    Probe,
    ProbeView,
    Shard,
)

from bundles import make_format_bundle, make_manifest

# The copy shipped in the wheel (hellofmt/schema/), read the way an installed package reads it.
PACKAGED_SCHEMA = importlib.resources.files("hellofmt") / "schema" / "manifest.schema.json"
SPEC_SCHEMA = Path(__file__).parents[1] / "spec" / "manifest.schema.json"
SCHEMA = json.loads(PACKAGED_SCHEMA.read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def test_spec_schema_is_the_packaged_schema():
    """spec/ keeps a copy for readers of the spec; it must not drift from the one the wheel ships."""
    assert SPEC_SCHEMA.read_bytes() == PACKAGED_SCHEMA.read_bytes(), (
        "spec/manifest.schema.json differs from hellofmt/schema/manifest.schema.json (the canonical copy): "
        "edit the packaged one and copy it to spec/"
    )
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def full_manifest(num_classes: int = 3, per_class: int = 2, probe: bool = True) -> Manifest:
    m = make_manifest([f"c{i}" for i in range(num_classes)])
    n = num_classes * per_class
    m.images = ImagesInfo(count=n, codec="jpeg", quality=80, height=16, width=16,
                          shards=[Shard(file="images-00000-of-00001.safetensors", count=n)],
                          per_class=[per_class] * num_classes)
    m.files = {"images-00000-of-00001.safetensors": FileEntry("0" * 64, 10),
               "projector.safetensors": FileEntry("1" * 64, 20)}
    if probe and n:
        m.probe = Probe(size=32, atol=1e-3, views=[
            ProbeView(image=0, box=[0.0, 0.0, 1.0, 1.0], flip=False, topk_indices=[1, 0], topk_logits=[3.5, 1.25]),
            ProbeView(image=n - 1, box=[0.2, 0.2, 0.8, 0.8], flip=True, topk_indices=[2], topk_logits=[0.5]),
        ])
    m.metrics = {"top1_agreement": 0.9}
    return m


def test_round_trip_is_exact():
    m = full_manifest()
    back = Manifest.from_json(m.to_json())
    assert back == m
    assert back.to_json() == m.to_json()


def test_manifest_written_by_the_writer_matches_the_schema(tmp_path):
    path = make_format_bundle(tmp_path / "b", codec="webp", quality=75)
    obj = json.loads((path / MANIFEST_NAME).read_text())
    VALIDATOR.validate(obj)
    assert Manifest.from_dict(obj).images.quality == 75


def test_full_manifest_matches_the_schema():
    VALIDATOR.validate(json.loads(full_manifest().to_json()))


def test_unknown_fields_are_kept_and_written_back():
    obj = json.loads(full_manifest().to_json())
    obj["future_thing"] = {"a": 1}
    obj["images"]["dither"] = "none"
    obj["projector"]["targets"][0]["note"] = "x"
    m = Manifest.from_dict(obj)
    again = json.loads(m.to_json())
    assert again["future_thing"] == {"a": 1}
    assert again["images"]["dither"] == "none"
    assert again["projector"]["targets"][0]["note"] == "x"
    VALIDATOR.validate(again)


def test_newer_minor_is_read_newer_major_is_refused():
    obj = json.loads(full_manifest().to_json())
    obj["format_version"] = "1.7"
    assert Manifest.from_dict(obj).format_version == "1.7"
    obj["format_version"] = "2.3"  # format 2 (int8 deltas) is read too
    assert Manifest.from_dict(obj).format_version == "2.3"
    obj["format_version"] = "3.0"
    with pytest.raises(FormatVersionError, match="format_version: format version 3.0 is newer"):
        Manifest.from_dict(obj, file="b/hellofmt.json")


def _del(path):
    def f(o):
        *head, last = path
        for k in head:
            o = o[k]
        del o[last]
    return f


def _set(path, value):
    def f(o):
        *head, last = path
        for k in head:
            o = o[k]
        o[last] = value
    return f


BAD = [
    (_del(["foundation", "weights_sha256"]), "foundation.weights_sha256: missing required field"),
    (_set(["foundation", "weights_sha256"], "abc"), "foundation.weights_sha256: expected 64 hex"),
    (_set(["images", "count"], "6"), "images.count: expected an integer"),
    (_set(["images", "codec"], "gif"), "images.codec: expected one of"),
    (_set(["images", "height"], 5000), "images.height: expected an integer <= 4096"),
    (_set(["classes"], []), "classes: expected a non-empty list"),
    (_set(["classes"], ["a", "a", "b"]), "classes: class names must be unique"),
    (_set(["classes"], ["a", "", "b"]), "classes: class 1 has an empty name"),
    (_set(["format"], "other"), "format: expected 'hellofmt'"),
    (_set(["projector", "targets", 0, "rank"], 0), "projector.targets[0].rank"),
    (_set(["projector", "targets", 0, "shape"], []), "projector.targets[0].shape"),
    (_set(["projector", "file"], "../x.safetensors"), "projector.file: unsafe file name"),
    (_set(["head", "templates"], ["no placeholder"]), "head.templates[0]"),
    (_set(["labels", "mix"], "blend"), "labels.mix"),
    (_set(["probe", "views", 0, "box"], [0, 0, 1]), "probe.views[0].box"),
    (_set(["files", "a/b"], {"sha256": "0" * 64, "size": 1}), "unsafe file name"),
    (_set(["files", "projector.safetensors", "size"], -1), "files.projector.safetensors.size"),
]


@pytest.mark.parametrize("mutate, message", BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_fields_are_named_and_the_schema_agrees(mutate, message):
    obj = json.loads(full_manifest().to_json())
    mutate(obj)
    with pytest.raises(ManifestError) as err:
        Manifest.from_dict(obj, file="b/hellofmt.json")
    assert message in str(err.value)
    assert str(err.value).startswith("b/hellofmt.json: ")
    assert not VALIDATOR.is_valid(obj)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (_set(["images", "per_class"], [2, 2, 1]), "images.per_class"),
        (_set(["images", "per_class"], [2, 2]), "images.per_class"),
        (_set(["images", "shards", 0, "count"], 5), "images.shards"),
        (_del(["files", "projector.safetensors"]), "files"),
        (_set(["probe", "views", 1, "image"], 99), "probe.views[1].image"),
        (_set(["probe", "views", 0, "topk_indices"], [7, 0]), "probe.views[0].topk_indices"),
    ],
)
def test_cross_field_rules(mutate, field):
    obj = json.loads(full_manifest().to_json())
    mutate(obj)
    with pytest.raises(ManifestError) as err:
        Manifest.from_dict(obj)
    assert err.value.field == field


@pytest.mark.parametrize("text", [b"", b"{", b"[1, 2]", b"\xff\xfe", b'{"format": NaN}'])
def test_not_json_or_not_an_object(text):
    with pytest.raises(ManifestError):
        Manifest.from_json(text, file="x.json")


def test_null_optional_fields_mean_absent():
    obj = json.loads(full_manifest(probe=False).to_json())
    obj["probe"] = None
    obj["images"]["quality"] = None
    obj["provenance"]["seed"] = None
    VALIDATOR.validate(obj)
    m = Manifest.from_dict(obj)
    assert m.probe is None and m.images.quality is None


names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10)


@settings(max_examples=60, deadline=None)
@given(
    classes=st.lists(names, min_size=1, max_size=6, unique=True),
    per_class=st.lists(st.integers(0, 5), min_size=6, max_size=6),
    codec=st.sampled_from(["png", "jpeg", "webp", "raw"]),
    side=st.tuples(st.integers(1, 4096), st.integers(1, 4096)),
    ranks=st.lists(st.integers(1, 64), min_size=0, max_size=4),
    temperature=st.floats(0.01, 100, allow_nan=False),
    extra=st.dictionaries(st.text(min_size=1, max_size=5).filter(lambda k: k not in Manifest.__dataclass_fields__),
                          st.integers() | st.text(max_size=5), max_size=2),
)
def test_property_manifest_round_trips(classes, per_class, codec, side, ranks, temperature, extra):
    from hellofmt.manifest import LowRankTarget

    m = make_manifest(classes)
    pc = per_class[: len(classes)]
    m.images = ImagesInfo(count=sum(pc), codec=codec, quality=50 if codec in ("jpeg", "webp") else None,
                          height=side[0], width=side[1],
                          shards=[Shard(file="images-00000-of-00001.safetensors", count=sum(pc))], per_class=pc)
    m.projector.targets = [
        LowRankTarget(name=f"p{i}", rank=r, alpha=1.5 * r, shape=[r + 1, 3]) for i, r in enumerate(ranks)
    ]
    m.labels.temperature = temperature
    m.extra = dict(extra)
    m.files = {
        "images-00000-of-00001.safetensors": FileEntry("a" * 64, 1),
        "projector.safetensors": FileEntry("b" * 64, 2),
    }
    text = m.to_json()
    back = Manifest.from_json(text.encode("utf-8"))
    assert back == m
    VALIDATOR.validate(json.loads(text))
    assert copy.deepcopy(back).validate() == m


def test_real_tiny_bundle_manifest_matches_the_schema(tiny_bundle):
    # Built like the builder does (embedded foundation, probe): every field the code writes is covered.
    obj = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    VALIDATOR.validate(obj)
    assert obj["foundation"]["source"] == "embedded" and obj["probe"]["views"]
