"""hellofmt.compress: re-encoding a bundle's deltas (``hellofmt compress``), with the label change measured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hellofmt import build_bundle
from hellofmt.bundle import Bundle
from hellofmt.cli import main
from hellofmt.compress import compress_bundle
from hellofmt.dataset import DistilledDataset
from hellofmt.errors import BundleExistsError, InputError
from hellofmt.manifest import MANIFEST_NAME, PROJECTOR_FILE
from hellofmt.summary import format_summary, summarize
from hellofmt.verify import verify_bundle


@pytest.fixture(scope="module")
def int8_copy(tiny_bundle, tmp_path_factory):
    return compress_bundle(tiny_bundle, "int8", tmp_path_factory.mktemp("c") / "int8", device="cpu")


def test_int8_copy_is_smaller_verified_and_records_the_label_change(tiny_bundle, int8_copy):
    src, dst = Bundle.open(tiny_bundle), Bundle.open(int8_copy.path, verify=True)
    m = dst.manifest
    assert m.projector.dtype == "int8" and m.format_version == "2.1"  # 2.0 (int8) + the digest (2.1)
    assert int8_copy["encoding"] == {"from": "float32", "to": "int8"}
    before, after = int8_copy["projector_bytes"]["before"], int8_copy["projector_bytes"]["after"]
    assert before == src.manifest.files[PROJECTOR_FILE].size and after == m.files[PROJECTOR_FILE].size
    assert after < before
    for k in ("kl", "top1_agreement", "max_logit_diff", "views"):
        assert m.metrics[f"delta_encoding.{k}"] == pytest.approx(int8_copy["label_change"][k])
    assert m.metrics["delta_encoding.views"] == 4 * src.manifest.images.count  # 4 views per image
    assert 0 <= m.metrics["delta_encoding.kl"] < 1e-3 and m.metrics["delta_encoding.top1_agreement"] == 1.0
    assert 0 < m.metrics["delta_encoding.max_logit_diff"] < 0.05
    assert m.provenance.extra["delta_encoding_from"] == "float32"
    # Every other file is copied byte for byte, and everything else in the manifest is kept.
    for name, entry in src.manifest.files.items():
        if name != PROJECTOR_FILE:
            assert m.files[name].sha256 == entry.sha256
    assert m.classes == src.manifest.classes and m.images == src.manifest.images
    # The recomputed probe passes (verify rebuilds the projector from the int8 file) and differs
    # from the float32 bundle's, since the labels moved a little.
    assert verify_bundle(int8_copy.path) == []
    assert len(m.probe.views) == len(src.manifest.probe.views)
    assert m.probe.views[0].topk_logits != src.manifest.probe.views[0].topk_logits


def test_int8_copy_labels_match_the_float32_bundle(tiny_bundle, int8_copy):
    a, b = DistilledDataset(tiny_bundle, device="cpu"), DistilledDataset(int8_copy.path, device="cpu")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    la, lb = a.logits(x), b.logits(x)
    assert torch.equal(la.argmax(1), lb.argmax(1))
    assert 0 < float((la - lb).abs().max()) < 0.05


def test_info_shows_encoding_bytes_and_ratio(int8_copy):
    s = summarize(Bundle.open(int8_copy.path))
    assert s["label_payload"]["encoding"] == "int8"
    text = format_summary(s)
    size = s["label_payload"]["projector_bytes"]
    assert f"({size:,} B, int8 deltas)" in text and "stored labels" in text and "ratio" in text
    # the delta_encoding.* metrics, grouped by stage; the label is wider than its column: a line of its own
    assert "\ndelta encoding\n" + " " * 12 + "kl " in text


def test_output_exists_and_in_place_need_overwrite(tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    before = (bundle / MANIFEST_NAME).read_bytes()
    with pytest.raises(BundleExistsError, match="--overwrite"):
        compress_bundle(bundle, "int8", device="cpu")  # in place
    (tmp_path / "taken").mkdir()
    with pytest.raises(BundleExistsError):
        compress_bundle(bundle, "int8", tmp_path / "taken", device="cpu")
    assert (bundle / MANIFEST_NAME).read_bytes() == before
    res = compress_bundle(bundle, "float16", overwrite=True, device="cpu")
    assert res.path == bundle.absolute() and Bundle.open(bundle, verify=True).manifest.projector.dtype == "float16"
    assert json.loads((bundle / MANIFEST_NAME).read_text())["format_version"] == "2.1"  # never lowered
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    with pytest.raises(InputError, match="already float16"):
        compress_bundle(bundle, "float16", overwrite=True, device="cpu")


def test_int8_back_to_float32_records_the_change_against_int8(int8_copy, tmp_path):
    res = compress_bundle(int8_copy.path, "float32", tmp_path / "f32", device="cpu", views_per_image=1)
    m = Bundle.open(res.path).manifest
    assert m.projector.dtype == "float32" and m.provenance.extra["delta_encoding_from"] == "int8"
    # int8 values are exact in float32: decoding them again changes no label.
    assert m.metrics["delta_encoding.max_logit_diff"] == 0.0 and m.metrics["delta_encoding.views"] == 6
    assert verify_bundle(res.path) == []


def test_bad_view_counts_and_device(tiny_bundle, tmp_path):
    for kw in ({"views_per_image": 0}, {"max_views": -1}, {"views_per_image": 1.5}, {"device": "gpu7"}):
        with pytest.raises(InputError):
            compress_bundle(tiny_bundle, "int8", tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()


def test_cli_compress(tiny_bundle, tmp_path):
    res = CliRunner().invoke(main, ["compress", str(tiny_bundle), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "float32 -> int8" in res.output and "top-1 agreement" in res.output and "wrote" in res.output
    assert Bundle.open(tmp_path / "o").manifest.projector.dtype == "int8"
    again = CliRunner().invoke(main, ["compress", str(tiny_bundle), "--out", str(tmp_path / "o")])
    assert again.exit_code == 2 and "already exists" in again.output


# ---- hellofmt build --delta-dtype ------------------------------------------------------------------
class _ColourTeacher(torch.nn.Module):
    """Logits from the mean colour: class 0 is blue (channel 2), 1 green, 2 red."""

    def forward(self, x):
        return (x.mean((2, 3)).flip(1) * 12 - 4).float()


@pytest.mark.parametrize("delta_dtype", ["int8", "float32"])
def test_build_writes_the_encoding_and_measures_it(tmp_path, delta_dtype):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(12, 3, 32, 32, generator=g) * 80).to(torch.uint8)
    labels = torch.arange(12) % 3
    for i in range(12):
        images[i, 2 - int(labels[i])] += 150
    config = str(Path(__file__).parent / "data" / "hf-test-tiny-vit.json")
    res = build_bundle((images, labels), _ColourTeacher().eval(), config, tmp_path / "b",
                       classes=["blue", "green", "red"], ipc=1, steps=3, batch_size=8, rank=2, head_rank=2,
                       holdout=0.2, fidelity_views=2, progress=False, device="cpu", delta_dtype=delta_dtype)
    b = Bundle.open(res.path, verify=True)
    m = b.manifest
    assert m.projector.dtype == delta_dtype
    assert m.format_version == ("2.1" if delta_dtype == "int8" else "1.1")  # the lowest that can read it, + digest
    assert m.provenance.build_args["delta_dtype"] == delta_dtype
    assert verify_bundle(res.path) == []  # the probe was recorded on the stored deltas
    keys = {k for k in m.metrics if k.startswith("delta_encoding.")}
    if delta_dtype == "int8":
        assert keys == {f"delta_encoding.{k}" for k in ("kl", "top1_agreement", "max_logit_diff", "views")}
        assert m.metrics["delta_encoding.views"] == 2 * m.images.count
        assert 0 <= m.metrics["delta_encoding.kl"] < 1e-3
        tensors = b.projector_tensors()
        assert tensors["head.lora_B"].dtype == torch.int8 and "head.lora_B.scale" in tensors
    else:
        assert keys == set()
    assert f"{delta_dtype} deltas" in res["summary"]
