"""Hostile safetensors files other than image shards: the projector, embedded and local foundation
weights, build checkpoints and teacher weights all go through the one checked reader
(``hellofmt.tensorfile``), so a truncated header, tensor bytes past the end of the file or a dtype
the reader does not allow is a HellofmtError naming the file, before safetensors or torch read it."""

from __future__ import annotations

import shutil
import struct

import pytest
import torch
from safetensors.torch import save, save_file

from hellofmt.bundle import Bundle
from hellofmt.errors import BuildError, FoundationError, TeacherError, TensorFileError
from hellofmt.manifest import FOUNDATION_FILE, PROJECTOR_FILE
from hellofmt.tensorfile import DEFAULT_DTYPES, load_safetensors, read_safetensors_header

from _hostile import replace_file, snapshot
from bundles import make_format_bundle


def _past_the_end(good: bytes) -> bytes:
    header = b'{"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}'
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


def _as_float64(good: bytes) -> bytes:
    from safetensors.torch import load

    return save({k: v.double() for k, v in load(good).items()}, metadata={"format": "hellofmt-foundation"})


# name -> (rewrite the good file's bytes into a hostile one, what the error says)
HOSTILE = {
    "truncated header": (lambda good: good[:20], "header claims"),
    "bytes past the end": (_past_the_end, "do not fit"),
    "disallowed dtype": (_as_float64, "dtype F64 is not allowed"),
}


# ---- the reader itself ---------------------------------------------------------------------------
def test_dtype_allow_list_default_and_narrowed(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(2, dtype=torch.int64), "b": torch.ones(3)}, str(path))
    assert set(read_safetensors_header(path)) == {"a", "b"}  # both in the default list
    with pytest.raises(TensorFileError, match="dtype I64 is not allowed") as e:
        load_safetensors(path, dtypes={"F32"})
    assert e.value.field == "a" and e.value.file == str(path)
    save_file({"c": torch.zeros(2, dtype=torch.float64)}, str(path))
    assert "F64" not in DEFAULT_DTYPES
    with pytest.raises(TensorFileError, match="F64"):
        load_safetensors(path)
    tensors, _ = load_safetensors(path, dtypes={"F64"})  # a caller may widen it
    assert tensors["c"].dtype == torch.float64


def test_byte_cap_refuses_a_larger_file_before_reading_it(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(100)}, str(path))
    size = path.stat().st_size
    with pytest.raises(TensorFileError, match=f"file is {size} bytes, over the {size - 1}-byte limit"):
        load_safetensors(path, max_bytes=size - 1)
    assert load_safetensors(path, max_bytes=size)[0]["a"].shape == (100,)


# ---- the projector file --------------------------------------------------------------------------
@pytest.mark.parametrize("attack", HOSTILE)
def test_hostile_projector_file(tmp_path, attack):
    rewrite, match = HOSTILE[attack]
    bundle = make_format_bundle(tmp_path / "b")
    replace_file(bundle, PROJECTOR_FILE, rewrite((bundle / PROJECTOR_FILE).read_bytes()))
    b = Bundle.open(bundle, verify=True)  # sizes and hashes agree: the attacker controls the manifest too
    before = snapshot(bundle)
    with pytest.raises(TensorFileError, match=match) as e:
        b.projector_tensors()
    assert PROJECTOR_FILE in e.value.file
    problems = b.verify()
    assert len(problems) == 1 and PROJECTOR_FILE in problems[0]
    assert snapshot(bundle) == before


def test_projector_file_allows_floats_only(tmp_path):
    bundle = make_format_bundle(tmp_path / "b")
    good = (bundle / PROJECTOR_FILE).read_bytes()
    from safetensors.torch import load

    tensors = load(good)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.int64)  # fine for the reader in general, not for deltas
    replace_file(bundle, PROJECTOR_FILE, save(tensors))
    with pytest.raises(TensorFileError, match="dtype I64 is not allowed") as e:
        Bundle.open(bundle).projector_tensors()
    assert e.value.field == name


# ---- embedded foundation weights -----------------------------------------------------------------
@pytest.mark.parametrize("attack", HOSTILE)
def test_hostile_embedded_foundation_weights(tiny_bundle, tmp_path, attack):
    from hellofmt.projector import Projector
    from hellofmt.verify import verify_bundle

    rewrite, match = HOSTILE[attack]
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    replace_file(bundle, FOUNDATION_FILE, rewrite((bundle / FOUNDATION_FILE).read_bytes()))
    b = Bundle.open(bundle, verify=True)
    before = snapshot(bundle)
    with pytest.raises(TensorFileError, match=match) as e:
        Projector.from_bundle(b)
    assert FOUNDATION_FILE in e.value.file
    problems = verify_bundle(bundle)
    assert len(problems) == 1 and FOUNDATION_FILE in problems[0]
    assert snapshot(bundle) == before


# ---- local foundation weights (CONFIG.json:WEIGHTS.safetensors) ----------------------------------
@pytest.mark.parametrize("attack", HOSTILE)
def test_hostile_local_foundation_weights_raise_foundation_error(tmp_path, data_dir, attack):
    from hellofmt.foundation import foundation_tensors, load_foundation

    rewrite, match = HOSTILE[attack]
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(rewrite(save(foundation_tensors(load_foundation("hf-test-tiny-vit").model))))
    cfg = tmp_path / "my-clip.json"
    cfg.write_bytes((data_dir / "hf-test-tiny-vit.json").read_bytes())
    with pytest.raises(FoundationError, match=match) as e:
        load_foundation(f"{cfg}:{weights}")
    assert e.value.file == str(weights)


# ---- builder inputs: checkpoints and teacher weights ---------------------------------------------
@pytest.mark.parametrize("attack", HOSTILE)
def test_hostile_checkpoint_tensors_are_a_build_error(tmp_path, attack):
    from hellofmt.builder.checkpoint import CheckpointStore

    rewrite, match = HOSTILE[attack]
    store = CheckpointStore(tmp_path / "ck")
    store.save("s", 2, params={"p": torch.ones(300)})
    t = tmp_path / "ck" / "s-00000002.safetensors"
    t.write_bytes(rewrite(t.read_bytes()))
    with pytest.raises(BuildError, match=f"unreadable checkpoint tensors: .*{match}"):
        store.load("s")


@pytest.mark.parametrize("attack", HOSTILE)
def test_hostile_teacher_weights_are_a_teacher_error(tmp_path, attack):
    timm = pytest.importorskip("timm")
    from hellofmt.builder.teachers import load_teachers

    rewrite, match = HOSTILE[attack]
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=3)
    w = tmp_path / "t.safetensors"
    w.write_bytes(rewrite(save({k: v.contiguous() for k, v in model.state_dict().items()})))
    with pytest.raises(TeacherError, match=match) as e:
        load_teachers("timm:test_resnet.r160_in1k", num_classes=3, weights=str(w))
    assert e.value.field == "--teacher-weights"
