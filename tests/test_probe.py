"""The probe: fixed views, recorded top-k logits, and the checks that refuse a changed projector."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hellofmt.bundle import Bundle
from hellofmt.dataset import DistilledDataset
from hellofmt.errors import FingerprintMismatchError, HellofmtError, ProbeMismatchError
from hellofmt.manifest import MANIFEST_NAME, Manifest
from hellofmt.probe import (
    check_bundle_probe,
    check_probe,
    compute_probe,
    probe_inputs,
    probe_logits,
    probe_views,
)
from hellofmt.verify import verify_bundle

from bundles import write_manifest


# --------------------------------------------------------------------------------------------------
# Views: pure.
# --------------------------------------------------------------------------------------------------
def test_probe_views_deterministic_and_distinct():
    for n_images in (1, 2, 3, 8, 20):
        views = probe_views(n_images, 8)
        assert views == probe_views(n_images, 8)
        assert len(views) == min(8, 4 * n_images)
        keys = [(i, tuple(b), f) for i, b, f in views]
        assert len(set(keys)) == len(keys), "no view twice"
        assert all(0 <= i < n_images for i, _, _ in views)
    big = probe_views(20, 8)
    assert [v[0] for v in big] == list(range(8)), "a large set spreads the views over 8 images"
    assert {(tuple(b), f) for _, b, f in big} == {((0, 0, 1, 1), False), ((0.2, 0.2, 0.8, 0.8), False),
                                                   ((0, 0, 1, 1), True), ((0.2, 0.2, 0.8, 0.8), True)}
    assert probe_views(0) == [] and probe_views(5, 0) == []


def test_probe_inputs_flip_and_full_box():
    img = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    img[..., :4] = 255  # left half white
    x = probe_inputs(img, [(0, [0, 0, 1, 1], False), (0, [0, 0, 1, 1], True)], 8)
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(x[0], img[0].float() / 255, atol=1e-3)
    assert torch.allclose(x[1], img[0].flip(-1).float() / 255, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# With a real bundle.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(tiny_bundle):
    from hellofmt.projector import Projector

    bundle = Bundle.open(tiny_bundle)
    images, _ = bundle.read_images()
    return bundle, Projector.from_bundle(bundle), images


def test_recorded_probe_shape(loaded):
    bundle, _, _ = loaded
    probe = bundle.manifest.probe
    assert probe is not None and len(probe.views) == 8
    assert probe.size == bundle.manifest.foundation.image_size
    for v in probe.views:
        assert len(v.topk_indices) == 3  # k is capped at the number of classes
        assert v.topk_logits == sorted(v.topk_logits, reverse=True)
    assert probe.atol > 0


def test_probe_passes_on_good_bundle(loaded):
    bundle, projector, images = loaded
    check_probe(projector, images, bundle.manifest.probe)
    assert check_bundle_probe(bundle) == []
    assert verify_bundle(bundle.path) == []


def test_compute_probe_is_reproducible(loaded):
    bundle, projector, images = loaded
    again = compute_probe(projector, images)
    rec = bundle.manifest.probe
    for a, b in zip(again.views, rec.views):
        assert a.topk_indices == b.topk_indices
        assert a.topk_logits == pytest.approx(b.topk_logits, abs=rec.atol / 10)


def test_probe_logits_are_float32_and_match_forward(loaded):
    _, projector, images = loaded
    views = probe_views(images.shape[0])
    logits = probe_logits(projector, images, views, projector.foundation.image_size)
    assert logits.dtype == torch.float32 and logits.shape == (len(views), 3)
    with torch.no_grad():
        direct = projector(probe_inputs(images, views, projector.foundation.image_size))
    assert torch.allclose(logits, direct.float(), atol=1e-5)


def test_probe_logits_moves_only_the_probed_images(loaded, monkeypatch):
    # A set kept in host memory because it does not fit on the device must not be copied there
    # whole to read a few views: only the probed rows reach probe_inputs (and the device).
    from hellofmt import probe as probe_mod

    _, projector, images = loaded
    many = torch.cat([images] * 4)  # more images than views
    views = [(len(many) - 1, [0, 0, 1, 1], True), (2, [0.2, 0.2, 0.8, 0.8], False), (2, [0, 0, 1, 1], False)]
    size = projector.foundation.image_size
    want = probe_logits(projector, many, views, size)
    seen = []
    real = probe_mod.probe_inputs

    def spy(imgs, vs, sz):
        seen.append(imgs.shape[0])
        return real(imgs, vs, sz)

    monkeypatch.setattr(probe_mod, "probe_inputs", spy)
    got = probe_logits(projector, many, views, size)
    assert seen == [len(views)]
    assert torch.equal(got, want)
    with torch.no_grad():
        direct = projector(real(many, views, size))
    assert torch.allclose(got, direct.float(), atol=1e-5)


def _shifted(probe, view: int, rank: int, delta: float):
    p = copy.deepcopy(probe)
    p.views[view].topk_logits[rank] += delta
    return p


def test_mismatch_names_view_class_and_values(loaded):
    bundle, projector, images = loaded
    probe = bundle.manifest.probe
    bad = _shifted(probe, 3, 0, 1.0)
    with pytest.raises(ProbeMismatchError) as e:
        check_probe(projector, images, bad, file="b/hellofmt.json", classes=bundle.manifest.classes)
    msg = str(e.value)
    c = bad.views[3].topk_indices[0]
    assert "view 3" in msg and f"class {c}" in msg and bundle.manifest.classes[c] in msg
    assert f"{bad.views[3].topk_logits[0]:.4f}" in msg
    assert "foundation" in msg and e.value.field == "probe.views[3].topk_logits[0]"
    # Within tolerance passes.
    check_probe(projector, images, _shifted(probe, 3, 0, probe.atol / 2))


def test_mismatch_when_another_class_climbs(loaded):
    bundle, projector, images = loaded
    probe = copy.deepcopy(bundle.manifest.probe)
    # Record only the top-1 and pretend it was far above everything: now the runner-up "climbs".
    v = probe.views[0]
    v.topk_indices, v.topk_logits = v.topk_indices[:1], v.topk_logits[:1]
    check_probe(projector, images, probe)  # a consistent top-1 record passes
    runner_up = bundle.manifest.probe.views[0].topk_indices[1]
    v.topk_indices = [runner_up]
    v.topk_logits = [bundle.manifest.probe.views[0].topk_logits[1]]
    with pytest.raises(ProbeMismatchError, match="above the recorded"):
        check_probe(projector, images, probe)


def _copy(tiny_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    return out


def _rehash(path, name):
    """Re-record a file's hash so that only the probe can notice the change."""
    from hellofmt.bundle import sha256_file

    man_path = path / MANIFEST_NAME
    man = Manifest.from_json(man_path.read_text())
    man.files[name].sha256 = sha256_file(path / name)
    man.files[name].size = (path / name).stat().st_size
    man_path.write_text(man.to_json())


def test_altered_deltas_fail_the_probe(tiny_bundle, tmp_path):
    path = _copy(tiny_bundle, tmp_path)
    name = Manifest.from_json((path / MANIFEST_NAME).read_text()).projector.file
    tensors = load_file(path / name)
    key = next(k for k in sorted(tensors) if k.endswith("lora_B") and not k.startswith("head"))
    tensors[key] = tensors[key] * 3 + 0.05
    save_file(tensors, path / name, metadata={"format": "hellofmt-projector"})
    _rehash(path, name)
    with pytest.raises(ProbeMismatchError, match="view"):
        DistilledDataset(path, device="cpu")
    problems = verify_bundle(path)
    assert len(problems) == 1 and "view" in problems[0]
    # verify=False trusts the bundle: it opens.
    assert len(DistilledDataset(path, device="cpu", verify=False)) == 6


def test_altered_foundation_fails(tiny_bundle, tmp_path):
    path = _copy(tiny_bundle, tmp_path)
    man = Manifest.from_json((path / MANIFEST_NAME).read_text())
    name = man.foundation.weights_file
    tensors = load_file(path / name)
    key = next(k for k in sorted(tensors) if k.startswith("visual.") and tensors[k].ndim == 2)
    tensors[key] = tensors[key] + 0.1 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(
        tensors, path / name, metadata={"format": "hellofmt-foundation", "architecture": man.foundation.architecture}
    )
    _rehash(path, name)
    # The fingerprint catches it first; with that check off, the probe still does.
    with pytest.raises(FingerprintMismatchError):
        DistilledDataset(path, device="cpu")
    with pytest.warns(UserWarning, match="fingerprint"), pytest.raises(ProbeMismatchError, match="foundation"):
        DistilledDataset(path, device="cpu", check_fingerprint=False)


def test_tampered_probe_in_manifest_fails(tiny_bundle, tmp_path):
    path = _copy(tiny_bundle, tmp_path)
    man_path = path / MANIFEST_NAME
    obj = json.loads(man_path.read_text())
    obj["probe"]["views"][5]["topk_logits"][1] -= 0.5
    write_manifest(path, obj)  # resealed: the probe check, not the digest, must catch it
    with pytest.raises(ProbeMismatchError, match="view 5") as e:
        DistilledDataset(path, device="cpu")
    assert isinstance(e.value, HellofmtError)
