"""Hostile delta encodings (spec 5.1): an unknown encoding name, int8 tensors without their scales or
with scales of the wrong shape or dtype or with zero, negative, NaN or infinite values, an int8 value
outside the symmetric range, and a manifest that disagrees with its projector file on the encoding.
Each is a HellofmtError naming the file and the field (the tensor), from every way in: the manifest
reader, the projector loader, ``hellofmt verify`` and ``DistilledDataset``. The attacker controls the
manifest too, so every rewritten file has a matching size and sha256 (``_hostile.replace_file``)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load, save

from hellofmt import lowrank
from hellofmt.bundle import Bundle
from hellofmt.compress import compress_bundle
from hellofmt.dataset import DistilledDataset
from hellofmt.errors import HellofmtError, InputError, ManifestError, ProjectorError
from hellofmt.manifest import PROJECTOR_FILE
from hellofmt.projector import Projector
from hellofmt.verify import verify_bundle

from _hostile import edit_manifest, replace_file

A = "visual.transformer.resblocks.0.attn.in_proj_weight.lora_A"


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, tmp_path_factory):
    """The session's tiny bundle, re-encoded to int8 once for this module (read-only: copy it)."""
    return compress_bundle(tiny_bundle, "int8", tmp_path_factory.mktemp("int8") / "b", device="cpu").path


def _copy(src, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def _rewrite(bundle, fn) -> None:
    """Apply ``fn`` to the projector file's tensors (a dict, edited in place) and write it back."""
    tensors = load((bundle / PROJECTOR_FILE).read_bytes())
    fn(tensors)
    replace_file(bundle, PROJECTOR_FILE, save(tensors, metadata={"format": "hellofmt-projector"}))


def _refused_everywhere(bundle, error, field, match):
    """Loading the projector, DistilledDataset and verify each refuse the bundle, naming ``field``."""
    b = Bundle.open(bundle, verify=True)  # sizes and hashes agree with the manifest
    with pytest.raises(error, match=match) as e:
        Projector.from_bundle(b)
    assert e.value.field == field and PROJECTOR_FILE in str(e.value.file)
    with pytest.raises(HellofmtError, match=match):
        DistilledDataset(bundle, device="cpu")
    problems = verify_bundle(bundle)
    assert problems and any(field in p for p in problems), problems
    return e.value


# ---- unknown encoding names ----------------------------------------------------------------------
def test_unknown_encoding_in_the_manifest_is_refused_with_upgrade(int8_bundle, tmp_path):
    bundle = _copy(int8_bundle, tmp_path)
    edit_manifest(bundle, lambda o: o["projector"].update(dtype="int4"))
    with pytest.raises(ManifestError, match="unknown delta encoding 'int4'") as e:
        Bundle.open(bundle)
    assert e.value.field == "projector.dtype" and "upgrade" in e.value.fix
    with pytest.raises(ManifestError, match="projector.dtype"):
        verify_bundle(bundle)
    with pytest.raises(ManifestError, match="int4"):
        DistilledDataset(bundle, device="cpu")


def test_unknown_encoding_name_in_the_api_and_cli(tiny_bundle, tmp_path):
    with pytest.raises(ProjectorError, match="unknown delta encoding 'int4'") as e:
        lowrank.check_delta_tensors({}, [], dtype="int4", file=PROJECTOR_FILE)
    assert e.value.field == "projector.dtype"
    with pytest.raises(ProjectorError, match="unknown delta encoding"):
        lowrank.encode_delta_tensors({"x.lora_A": torch.zeros(2, 3)}, "fp8")
    with pytest.raises(InputError, match="unknown delta encoding 'q4'") as e:
        compress_bundle(tiny_bundle, "q4", tmp_path / "out")
    assert e.value.field == "--delta-dtype"
    assert not (tmp_path / "out").exists()
    from click.testing import CliRunner

    from hellofmt.cli import main

    res = CliRunner().invoke(
        main, ["compress", str(tiny_bundle), "--delta-dtype", "int4", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "int4" in res.output and not (tmp_path / "o").exists()


def test_int8_under_a_version_1_manifest_is_refused(int8_bundle, tmp_path):
    bundle = _copy(int8_bundle, tmp_path)
    edit_manifest(bundle, lambda o: o.update(format_version="1.0"))
    with pytest.raises(ManifestError, match="int8 deltas need format_version 2.0") as e:
        Bundle.open(bundle)
    assert e.value.field == "projector.dtype"


# ---- int8 tensors and their scales -----------------------------------------------------------------
def _drop(key):
    return lambda t: t.pop(key)


def _set(key, value):
    def fn(t):
        t[key] = value(t[key])

    return fn


def _zero_first(s):
    s = s.clone()
    s[0] = 0.0
    return s


def _value(v):
    def fn(s):
        s = s.clone()
        s[-1] = v
        return s

    return fn


def _min_int8(q):
    q = q.clone()
    q[0, 0] = -128
    return q


# name -> (edit of the projector tensors, the field the error names, what it says)
SCALE_ATTACKS = {
    "scale missing": (_drop(A + ".scale"), A + ".scale", "missing tensor"),
    "head scale missing": (_drop("head.lora_B.scale"), "head.lora_B.scale", "missing tensor"),
    "scale too long": (_set(A + ".scale", lambda s: torch.cat([s, s[:1]])), A + ".scale", "shape"),
    "scale 2-D": (_set(A + ".scale", lambda s: s[:, None]), A + ".scale", "shape"),
    "scale float16": (_set(A + ".scale", lambda s: s.half()), A + ".scale", "float16"),
    "scale int8": (_set(A + ".scale", lambda s: torch.ones_like(s, dtype=torch.int8)), A + ".scale", "int8"),
    "scale zero": (_set(A + ".scale", _zero_first), A + ".scale", "not > 0"),
    "scale negative": (_set(A + ".scale", lambda s: -s), A + ".scale", "not > 0"),
    "scale NaN": (_set(A + ".scale", _value(float("nan"))), A + ".scale", "NaN"),
    "scale inf": (_set(A + ".scale", _value(float("inf"))), A + ".scale", "infinite"),
    "int8 value -128": (_set(A, _min_int8), A, "symmetric int8 range"),
    "lora tensor float32 under int8": (_set(A, lambda q: q.float()), A, "needs int8"),
}


@pytest.mark.parametrize("attack", SCALE_ATTACKS)
def test_bad_int8_tensors_and_scales(int8_bundle, tmp_path, attack):
    edit, field, match = SCALE_ATTACKS[attack]
    bundle = _copy(int8_bundle, tmp_path)
    _rewrite(bundle, edit)
    err = _refused_everywhere(bundle, ProjectorError, field, match)
    assert err.fix  # says what to do


# ---- manifest and file disagree on the encoding ----------------------------------------------------
def test_float_manifest_over_an_int8_file(int8_bundle, tmp_path):
    bundle = _copy(int8_bundle, tmp_path)
    edit_manifest(bundle, lambda o: o["projector"].update(dtype="float32"))
    b = Bundle.open(bundle, verify=True)
    with pytest.raises(ProjectorError, match="int8 scale, but the manifest's projector.dtype is float32") as e:
        Projector.from_bundle(b)
    assert e.value.field.endswith(".scale") and "disagree" in e.value.fix
    problems = verify_bundle(bundle)
    assert any("dtype torch.int8" in p for p in problems) and any("not described" in p for p in problems)


def test_int8_manifest_over_a_float_file(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    edit_manifest(bundle, lambda o: o.update(format_version="2.0") or o["projector"].update(dtype="int8"))
    b = Bundle.open(bundle, verify=True)
    with pytest.raises(ProjectorError, match="needs int8 tensors") as e:
        Projector.from_bundle(b)
    assert "disagree" in e.value.fix and PROJECTOR_FILE in str(e.value.file)
    problems = verify_bundle(bundle)
    assert any("missing" in p and ".scale" in p for p in problems)
    assert any("dtype torch.float32" in p and "needs int8" in p for p in problems)


def test_float16_manifest_over_a_float32_file(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    edit_manifest(bundle, lambda o: o["projector"].update(dtype="float16"))
    with pytest.raises(ProjectorError, match="differs from the manifest's projector.dtype float16"):
        Projector.from_bundle(Bundle.open(bundle))
