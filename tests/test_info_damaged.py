"""``hellofmt info`` on a damaged bundle, and its wording (issue 22): everything the manifest says, then
the problems, exit status 1; a missing file's hint depends on where the bundle came from (the Hub
cache or a pulled folder: pull again; a local folder: the folder is incomplete). Counts in
``info --json`` are integers; a fresh build does not say "resumed from 0"; long labels stay aligned.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from hellofmt.bundle import Bundle, missing_file_hint
from hellofmt.cli import main
from hellofmt.compress import format_compress_result
from hellofmt.errors import MissingFileError
from hellofmt.manifest import MANIFEST_NAME
from hellofmt.summary import format_summary, summarize

from bundles import make_format_bundle, write_manifest

LOCAL_HINT = "the folder is incomplete"
HUB_HINT = "pull the bundle again"


@pytest.fixture
def bundle(tmp_path):
    return make_format_bundle(tmp_path / "b", num_classes=3, per_class=4, max_shard_bytes=600)


def _shard(bundle) -> str:
    return Bundle.open(bundle).manifest.images.shards[-1].file


def test_info_on_a_bundle_missing_a_shard_says_everything_then_the_problem(bundle):
    shard = _shard(bundle)
    os.remove(bundle / shard)
    r = CliRunner().invoke(main, ["info", str(bundle)])
    assert r.exit_code == 1, r.output
    out = r.stdout
    whole = format_summary(summarize(Bundle.open_unchecked(bundle)))
    assert out.startswith(whole)  # the whole summary first, as for a sound bundle
    tail = out[len(whole):]
    assert tail.lstrip().startswith("problems    1")
    assert shard in tail and "listed in the manifest but absent" in tail and LOCAL_HINT in tail
    assert HUB_HINT not in out


def test_info_json_on_a_damaged_bundle_lists_the_problems(bundle):
    shard = _shard(bundle)
    os.remove(bundle / shard)
    (bundle / "projector.safetensors").write_bytes(b"short")
    r = CliRunner().invoke(main, ["info", "--json", str(bundle)])
    assert r.exit_code == 1
    s = json.loads(r.stdout)
    assert s["images"]["count"] == 12 and len(s["problems"]) == 2
    assert any(shard in p and LOCAL_HINT in p for p in s["problems"])
    assert any("projector.safetensors" in p and "bytes, the manifest says" in p for p in s["problems"])
    ok = CliRunner().invoke(main, ["info", "--json", str(make_format_bundle(bundle.parent / "ok"))])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["problems"] == []


def test_info_on_an_edited_manifest_shows_it_and_the_digest_problem(bundle):
    text = (bundle / MANIFEST_NAME).read_text()
    (bundle / MANIFEST_NAME).write_text(text.replace('"temperature": 1.0', '"temperature": 3.0'))
    r = CliRunner().invoke(main, ["info", str(bundle)])
    assert r.exit_code == 1
    assert "labels      T 3," in r.stdout  # the manifest as it is now, then the problem
    assert "the manifest changed after it was written" in r.stdout and "--fix-digest" in r.stdout


def _as_hub_snapshot(bundle, root):
    """Lay ``bundle`` out as huggingface_hub's cache does: snapshots/<commit>/NAME -> ../../blobs/<hash>."""
    repo = root / "datasets--you--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in sorted(bundle.iterdir()):
        blob = repo / "blobs" / f"blob-{p.name}"
        shutil.copy(p, blob)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_a_missing_file_in_the_hub_cache_says_pull_again(bundle, tmp_path):
    shard = _shard(bundle)
    snap = _as_hub_snapshot(bundle, tmp_path / "hub")
    Bundle.open(snap, verify=True).close()  # sound as laid out
    os.remove(snap / shard)  # the snapshot lacks the file: an incomplete download
    with pytest.raises(MissingFileError) as e:
        Bundle.open(snap)
    assert HUB_HINT in e.value.fix
    r = CliRunner().invoke(main, ["info", str(snap)])
    assert r.exit_code == 1 and HUB_HINT in r.stdout and LOCAL_HINT not in r.stdout
    # a folder `hellofmt pull USER/NAME DIR` wrote (huggingface_hub's .cache inside) is from the Hub too
    (bundle / ".cache" / "huggingface").mkdir(parents=True)
    assert HUB_HINT in missing_file_hint(bundle)
    shutil.rmtree(bundle / ".cache")
    assert missing_file_hint(bundle).startswith(LOCAL_HINT)


# ---- wording -------------------------------------------------------------------------------------
def test_info_json_counts_are_integers_and_a_fresh_build_is_not_resumed(bundle):
    obj = json.loads((bundle / MANIFEST_NAME).read_text())
    obj["metrics"] = {"inputs.skipped_images": 0.0, "distill.steps": 40.0, "distill.resumed_from": 0.0,
                      "delta_encoding.kl": 1.5e-05, "delta_encoding.top1_agreement": 1.0,
                      "delta_encoding.max_logit_diff": 0.01, "delta_encoding.views": 48.0}
    write_manifest(bundle, obj)
    r = CliRunner().invoke(main, ["info", "--json", str(bundle)])
    m = json.loads(r.stdout)["metrics"]
    assert r.stdout.count('"inputs.skipped_images": 0,') == 1 and isinstance(m["inputs.skipped_images"], int)
    for k in ("distill.steps", "distill.resumed_from", "delta_encoding.views"):
        assert type(m[k]) is int, k
    text = CliRunner().invoke(main, ["info", str(bundle)]).stdout
    assert "resumed from" not in text
    lines = text.splitlines()
    i = lines.index("delta encoding")  # a label wider than the column gets its own line ...
    assert lines[i + 1].startswith(" " * 12 + "kl ")  # ... and its values start in the value column
    steps = next(line for line in lines if line.startswith("distill"))
    assert steps.index("steps") == 12
    obj["metrics"]["distill.resumed_from"] = 20.0
    write_manifest(bundle, obj)
    assert "resumed from 20" in CliRunner().invoke(main, ["info", str(bundle)]).stdout


def test_compress_says_larger_when_the_projector_grew():
    def text(before, after):
        return format_compress_result({"encoding": {"from": "int8", "to": "float32"}, "label_change": {},
                                       "projector_bytes": {"before": before, "after": after}, "path": "b"})

    assert "(4.00x smaller)" in text(4096, 1024)
    grew = text(1024, 4096)
    assert "(4.00x larger)" in grew and "smaller" not in grew
    assert "(the same size)" in text(100, 100)
