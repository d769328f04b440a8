"""hellofmt.foundation: spec parsing, loading from every source, the weights fingerprint."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import DATA, TINY_RN, TINY_VIT
from safetensors.torch import save_file

import hellofmt.manifest as mf
from hellofmt.errors import FingerprintMismatchError, FoundationError, HellofmtError, TensorFileError
from hellofmt.foundation import (
    EMBEDDED_WEIGHTS_FILE,
    FoundationSpec,
    fingerprint,
    foundation_metadata,
    foundation_tensors,
    load_foundation,
    parse_foundation_spec,
)


@pytest.fixture(autouse=True)
def _never_unpickle(monkeypatch):
    """Any torch.load / pickle.load during these tests is a bug: weights are safetensors only."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An offline Hugging Face cache in tmp_path; returns a function adding a file to a repo in it.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so the constant is patched directly.
    """
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"

    def put(repo: str, filename: str, data: bytes) -> Path:
        root = cache / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(commit)
        path = root / "snapshots" / commit / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    return put


def tiny_config(name: str = TINY_VIT) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def random_model_file(tmp_path: Path, arch: str = TINY_VIT, seed: int = 0) -> tuple[Path, str]:
    torch.manual_seed(seed)
    f = load_foundation(arch)
    path = tmp_path / f"weights-{seed}.safetensors"
    save_file(foundation_tensors(f.model), str(path))
    return path, f.fingerprint


def encode(f, size=None):
    size = size or f.image_size
    x = torch.linspace(0, 1, 2 * 3 * size * size).reshape(2, 3, size, size)
    with torch.no_grad():
        return f.model.encode_image(x)


# --------------------------------------------------------------------------------------------------
# Spec strings
# --------------------------------------------------------------------------------------------------
def test_parse_pretrained_spec_normalises_tag():
    s = parse_foundation_spec("ViT-B-32:openai")
    assert (s.kind, s.architecture, s.pretrained) == ("pretrained", "ViT-B-32", "openai")
    s = parse_foundation_spec("ViT-B-32:laion2b-s34b-b79k")  # open_clip accepts '-' for '_'
    assert s.pretrained == "laion2b_s34b_b79k"
    assert parse_foundation_spec("RN50:openai").architecture == "RN50"


def test_parse_other_kinds():
    assert parse_foundation_spec(TINY_VIT) == FoundationSpec(kind="random", architecture=TINY_VIT, spec=TINY_VIT)
    hub = parse_foundation_spec("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert (hub.kind, hub.hf_hub_id) == ("hf-hub", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    f = parse_foundation_spec("dir/my-clip.json:dir/w.safetensors")
    assert (f.kind, f.config_path, f.weights_path, f.architecture) == (
        "file",
        "dir/my-clip.json",
        "dir/w.safetensors",
        "my-clip",
    )
    c = parse_foundation_spec("my-clip.json")
    assert (c.kind, c.weights_path) == ("file", None)


@pytest.mark.parametrize(
    "spec, expect",
    [
        ("ViT-B-33:openai", "ViT-B-32"),  # unknown architecture: suggests the close one
        ("VIT-B-32", "ViT-B-32"),
        ("ViT-B-32:opnai", "openai"),  # unknown tag
        ("hf-test-tiny-vt", TINY_VIT),
    ],
)
def test_unknown_architecture_or_tag_names_close_matches(spec, expect):
    with pytest.raises(FoundationError) as e:
        parse_foundation_spec(spec)
    assert expect in str(e.value)
    assert e.value.fix


@pytest.mark.parametrize(
    "spec", ["cfg.json:weights.bin", "cfg.json:weights.pt", "cfg.json:w.pth", "model.pt", "open_clip_pytorch_model.bin"]
)
def test_pickled_weights_are_refused_at_parse(spec):
    with pytest.raises(FoundationError) as e:
        parse_foundation_spec(spec)
    assert "safetensors" in str(e.value)


@pytest.mark.parametrize("spec", ["", "   ", "hf-hub:", "hf-hub:noslash", "hf-hub:a/b/c", "w.safetensors"])
def test_malformed_specs(spec):
    with pytest.raises(FoundationError):
        parse_foundation_spec(spec)


def test_errors_are_hellofmt_errors():
    with pytest.raises(HellofmtError):
        load_foundation("nonexistent-arch")


# --------------------------------------------------------------------------------------------------
# Random init (bare ARCH) and the reference it records
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, size", [(TINY_VIT, 32), (TINY_RN, 64)])
def test_random_init_is_pinned_as_embedded(arch, size):
    f = load_foundation(arch)
    assert f.image_size == size
    assert f.embedded
    ref = f.reference
    assert (ref.source, ref.weights_file, ref.architecture) == ("embedded", EMBEDDED_WEIGHTS_FILE, arch)
    assert ref.model_config == tiny_config(arch)
    assert ref.weights_sha256 == f.fingerprint == fingerprint(f.model)
    # preprocess numbers come from the model's own preprocess config
    pp = f.model.visual.preprocess_cfg
    assert f.mean == pytest.approx(list(pp["mean"])) and f.std == pytest.approx(list(pp["std"]))
    assert f.interpolation == pp["interpolation"] == "bicubic"
    assert not f.model.training
    assert not any(p.requires_grad for p in f.model.parameters())
    # the reference is a valid manifest section
    again = mf.Foundation.parse(mf._Reader(json.loads(json.dumps(mf._to_dict(ref))), "foundation", None))
    assert again.weights_sha256 == ref.weights_sha256
    tokens = f.tokenizer(["a photo of a cat."])
    assert tokens.shape == (1, 16)


def test_two_random_inits_differ_and_seed_reproduces():
    torch.manual_seed(1)
    a = load_foundation(TINY_VIT)
    b = load_foundation(TINY_VIT)
    torch.manual_seed(1)
    c = load_foundation(TINY_VIT)
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == c.fingerprint


# --------------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------------
def _spec_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """The definition in foundation.fingerprint's docstring, written out independently."""
    import numpy as np

    h = hashlib.sha256(b"hellofmt-fingerprint-v1\n")
    for name in sorted(state):
        t = state[name]
        arr = t.numpy() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy()
        raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        dtype = {
            torch.float32: "float32", torch.bfloat16: "bfloat16", torch.int64: "int64", torch.float16: "float16"
        }[t.dtype]
        h.update(f"{name}\n{dtype}\n{','.join(map(str, t.shape))}\n{len(raw)}\n".encode())
        h.update(raw)
    return h.hexdigest()


def test_fingerprint_matches_its_written_definition():
    g = torch.Generator().manual_seed(0)
    state = {
        "b.weight": torch.randn(3, 4, generator=g),
        "a.scale": torch.tensor(2.5),  # 0-d
        "c.half": torch.randn(5, generator=g).to(torch.bfloat16),
        "d.count": torch.arange(4),
        "e.fp16": torch.randn(2, 2, generator=g).half().t(),  # non-contiguous
    }
    assert fingerprint(state) == _spec_fingerprint({k: v.contiguous() for k, v in state.items()})


def test_fingerprint_stable_across_forms_and_order():
    f = load_foundation(TINY_VIT)
    sd = f.model.state_dict()
    reordered = dict(reversed(list(sd.items())))
    assert fingerprint(f.model) == fingerprint(sd) == fingerprint(reordered) == fingerprint(foundation_tensors(f.model))
    assert fingerprint(f.model) == fingerprint(f.model)  # deterministic
    # attn_mask is a derived, non-persistent buffer: never part of the fingerprint
    assert "attn_mask" not in sd
    assert fingerprint({**sd, "attn_mask": torch.ones(3, 3)}) == fingerprint(sd)


def test_fingerprint_sensitive_to_one_element_dtype_shape_and_name():
    f = load_foundation(TINY_VIT)
    sd = {k: v.clone() for k, v in f.model.state_dict().items()}
    base = fingerprint(sd)
    name = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    one = {**sd, name: sd[name].clone()}
    one[name][7, 3] = torch.nextafter(one[name][7, 3], torch.tensor(1e9))  # one ulp
    assert fingerprint(one) != base
    assert fingerprint({**sd, name: sd[name].reshape(-1)}) != base  # same bytes, other shape
    assert fingerprint({**sd, "logit_scale": sd["logit_scale"].double()}) != base
    renamed = dict(sd)
    renamed["visual.extra"] = renamed.pop(name)
    assert fingerprint(renamed) != base
    assert fingerprint({k: v for k, v in sd.items() if k != name}) != base


# --------------------------------------------------------------------------------------------------
# CONFIG.json[:WEIGHTS.safetensors]
# --------------------------------------------------------------------------------------------------
def test_custom_config_and_safetensors_weights(tmp_path):
    weights, fp = random_model_file(tmp_path)
    cfg = tmp_path / "my-clip.json"
    cfg.write_text(json.dumps(tiny_config()))
    f = load_foundation(f"{cfg}:{weights}")
    assert f.fingerprint == fp
    ref = f.reference
    # the manifest records the file's name only (a hint), never a local path (spec 3.2)
    assert (ref.source, ref.architecture, ref.weights_file) == ("file", "my-clip", weights.name)
    assert ref.model_config == tiny_config()
    torch.manual_seed(0)
    expected = load_foundation(TINY_VIT)
    assert torch.equal(encode(f), encode(expected))
    # the file reference loads back from a path the user gives, or from the bundle directory,
    # with the fingerprint checked
    assert load_foundation(ref, weights=weights).fingerprint == fp
    assert load_foundation(ref, bundle_dir=tmp_path).fingerprint == fp


def test_custom_config_in_open_clip_config_form_sets_preprocess(tmp_path):
    weights, fp = random_model_file(tmp_path)
    cfg = tmp_path / "open_clip_config.json"
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    cfg.write_text(json.dumps({"model_cfg": tiny_config(), "preprocess_cfg": pp}))
    f = load_foundation(f"{cfg}:{weights}")
    assert (f.mean, f.std, f.interpolation) == (pp["mean"], pp["std"], "bilinear")
    assert (f.reference.mean, f.reference.interpolation) == (pp["mean"], "bilinear")
    assert f.fingerprint == fp


def test_custom_config_named_like_a_builtin_does_not_replace_it(tmp_path):
    import open_clip

    before = open_clip.get_model_config("ViT-B-32")
    cfg = tmp_path / "ViT-B-32.json"
    cfg.write_text(json.dumps(tiny_config()))
    f = load_foundation(str(cfg))  # config only: random init, embedded
    assert f.reference.source == "embedded" and f.image_size == 32
    assert open_clip.get_model_config("ViT-B-32") == before


def test_embed_turns_a_file_reference_into_an_embedded_one(tmp_path):
    weights, fp = random_model_file(tmp_path)
    cfg = tmp_path / "my-clip.json"
    cfg.write_text(json.dumps(tiny_config()))
    f = load_foundation(f"{cfg}:{weights}", embed=True)
    assert (f.reference.source, f.reference.weights_file) == ("embedded", EMBEDDED_WEIGHTS_FILE)
    assert f.fingerprint == fp


def test_weights_that_do_not_fit_the_config(tmp_path):
    weights, _ = random_model_file(tmp_path, arch=TINY_RN)
    cfg = tmp_path / "my-clip.json"
    cfg.write_text(json.dumps(tiny_config(TINY_VIT)))
    with pytest.raises(FoundationError) as e:
        load_foundation(f"{cfg}:{weights}")
    assert "missing" in str(e.value) and "unexpected" in str(e.value)


def test_file_errors(tmp_path):
    cfg = tmp_path / "my-clip.json"
    cfg.write_text(json.dumps(tiny_config()))
    with pytest.raises(FoundationError, match="not found"):
        load_foundation(f"{cfg}:{tmp_path / 'absent.safetensors'}")
    with pytest.raises(FoundationError, match="not found"):
        load_foundation(str(tmp_path / "absent.json"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(FoundationError, match="safetensors"):
        load_foundation(f"{cfg}:{corrupt}")
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text(json.dumps({"vision_cfg": {}}))
    with pytest.raises(FoundationError, match="embed_dim"):
        load_foundation(str(bad_cfg))
    not_json = tmp_path / "nj.json"
    not_json.write_text("{")
    with pytest.raises(FoundationError):
        load_foundation(str(not_json))


def test_pickled_weights_refused_even_if_present(tmp_path):
    cfg = tmp_path / "my-clip.json"
    cfg.write_text(json.dumps(tiny_config()))
    pt = tmp_path / "weights.bin"
    pt.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(FoundationError) as e:
        load_foundation(FoundationSpec(kind="file", architecture="x", config_path=str(cfg), weights_path=str(pt)))
    assert "convert" in e.value.fix


# --------------------------------------------------------------------------------------------------
# Embedded weights (a bundle's foundation.safetensors)
# --------------------------------------------------------------------------------------------------
def write_embedded(bundle_dir: Path, arch: str = TINY_VIT, seed: int = 0):
    torch.manual_seed(seed)
    f = load_foundation(arch)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    save_file(foundation_tensors(f.model), str(bundle_dir / EMBEDDED_WEIGHTS_FILE), foundation_metadata(f.reference))
    return f


@pytest.mark.parametrize("arch", [TINY_VIT, TINY_RN])
def test_embedded_round_trip(tmp_path, arch):
    f = write_embedded(tmp_path, arch)
    g = load_foundation(f.reference, bundle_dir=tmp_path)
    assert g.fingerprint == f.fingerprint
    assert g.reference is f.reference
    assert (g.image_size, g.mean, g.std) == (f.image_size, f.mean, f.std)
    assert torch.equal(encode(f), encode(g))


def test_embedded_without_model_config_uses_the_registered_architecture(tmp_path):
    f = write_embedded(tmp_path)
    ref = copy.deepcopy(f.reference)
    ref.model_config = None
    assert load_foundation(ref, bundle_dir=tmp_path).fingerprint == f.fingerprint


def test_embedded_errors(tmp_path):
    f = write_embedded(tmp_path)
    with pytest.raises(FoundationError, match="bundle directory"):
        load_foundation(f.reference)
    with pytest.raises(FoundationError, match="not found"):
        load_foundation(f.reference, bundle_dir=tmp_path / "elsewhere")
    ref = copy.deepcopy(f.reference)
    ref.weights_file = "../escape.safetensors"
    with pytest.raises(HellofmtError):
        load_foundation(ref, bundle_dir=tmp_path)
    # wrong metadata: some other safetensors file placed there
    save_file(foundation_tensors(f.model), str(tmp_path / EMBEDDED_WEIGHTS_FILE), {"format": "hellofmt-projector"})
    with pytest.raises(TensorFileError, match="hellofmt-foundation"):
        load_foundation(f.reference, bundle_dir=tmp_path)
    (tmp_path / EMBEDDED_WEIGHTS_FILE).write_bytes(b"truncated")
    with pytest.raises(TensorFileError):
        load_foundation(f.reference, bundle_dir=tmp_path)


def test_fingerprint_mismatch_is_refused_unless_allowed(tmp_path):
    f = write_embedded(tmp_path)
    tensors = foundation_tensors(f.model)
    tensors["visual.proj"][0, 0] += 1e-3
    save_file(tensors, str(tmp_path / EMBEDDED_WEIGHTS_FILE), foundation_metadata(f.reference))
    with pytest.raises(FingerprintMismatchError) as e:
        load_foundation(f.reference, bundle_dir=tmp_path)
    assert e.value.field == "foundation.weights_sha256"
    assert "allow_mismatch" in e.value.fix
    with pytest.warns(UserWarning, match="fingerprint"):
        g = load_foundation(f.reference, bundle_dir=tmp_path, allow_mismatch=True)
    assert g.fingerprint == fingerprint(tensors) != f.fingerprint


def test_expected_fingerprint_for_a_spec(tmp_path):
    weights, fp = random_model_file(tmp_path)
    cfg = tmp_path / "my-clip.json"
    cfg.write_text(json.dumps(tiny_config()))
    assert load_foundation(f"{cfg}:{weights}", expected_fingerprint=fp).fingerprint == fp
    with pytest.raises(FingerprintMismatchError):
        load_foundation(f"{cfg}:{weights}", expected_fingerprint="0" * 64)


# --------------------------------------------------------------------------------------------------
# The Hub: hf-hub:ORG/REPO and pretrained tags, offline from a populated cache
# --------------------------------------------------------------------------------------------------
def _safetensors_bytes(tmp_path: Path, arch=TINY_VIT, seed=0) -> tuple[bytes, str]:
    path, fp = random_model_file(tmp_path, arch, seed)
    return path.read_bytes(), fp


def test_hf_hub_offline_from_cache(tmp_path, offline_hub):
    data, fp = _safetensors_bytes(tmp_path)
    pp = {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.3, 0.4], "interpolation": "bicubic"}
    config = json.dumps({"model_cfg": tiny_config(), "preprocess_cfg": pp}).encode()
    offline_hub("test-org/tiny-clip", "open_clip_config.json", config)
    offline_hub("test-org/tiny-clip", "open_clip_model.safetensors", data)
    f = load_foundation("hf-hub:test-org/tiny-clip")
    assert f.fingerprint == fp
    assert (f.reference.source, f.reference.hf_hub_id) == ("hf-hub", "test-org/tiny-clip")
    assert f.std == pp["std"]
    g = load_foundation(f.reference)  # and back from the reference, fingerprint checked
    assert g.fingerprint == fp


def test_hf_hub_without_safetensors_is_refused(tmp_path, offline_hub):
    offline_hub("test-org/pickled", "open_clip_config.json", json.dumps({"model_cfg": tiny_config()}).encode())
    offline_hub("test-org/pickled", "open_clip_pytorch_model.bin", b"\x80\x04pickle")
    with pytest.raises(FoundationError) as e:
        load_foundation("hf-hub:test-org/pickled")
    assert "open_clip_model.safetensors" in str(e.value)


def test_hf_hub_offline_and_not_cached(offline_hub):
    with pytest.raises(FoundationError) as e:
        load_foundation("hf-hub:test-org/absent")
    assert "cache" in str(e.value)


def test_pretrained_tag_offline_from_cache(tmp_path, offline_hub, monkeypatch):
    from open_clip import pretrained as oc_pretrained

    monkeypatch.setitem(
        oc_pretrained._PRETRAINED,
        TINY_VIT,
        {
            "fake": {
                "hf_hub": "test-org/tiny-vit-fake/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "quick_gelu": True
            }
        },
    )
    data, _ = _safetensors_bytes(tmp_path)
    offline_hub("test-org/tiny-vit-fake", "open_clip_model.safetensors", data)
    f = load_foundation(f"{TINY_VIT}:fake")
    ref = f.reference
    assert (ref.source, ref.architecture, ref.pretrained, ref.model_config) == ("pretrained", TINY_VIT, "fake", None)
    assert f.mean == [0.5, 0.5, 0.5]
    # the tag's QuickGELU is honoured (open_clip itself would only warn)
    from open_clip.transformer import QuickGELU

    assert any(isinstance(m, QuickGELU) for m in f.model.modules())
    assert load_foundation(ref).fingerprint == f.fingerprint


def test_pretrained_tag_with_only_a_pickle_url_is_refused(monkeypatch):
    from open_clip import pretrained as oc_pretrained

    monkeypatch.setitem(oc_pretrained._PRETRAINED, TINY_VIT, {"urlonly": {"url": "https://example.invalid/w.pt"}})
    with pytest.raises(FoundationError) as e:
        load_foundation(f"{TINY_VIT}:urlonly")
    assert "pickled" in str(e.value)


@pytest.mark.live
@pytest.mark.skipif(
    os.environ.get("HELLOFMT_LIVE") != "1",
    reason="live test: downloads ViT-B-32:openai weights (~600 MB); set HELLOFMT_LIVE=1 to run it",
)
def test_live_vit_b_32_openai():
    f = load_foundation("ViT-B-32:openai")
    assert f.image_size == 224 and f.interpolation == "bicubic"
    assert f.reference.source == "pretrained" and f.reference.pretrained == "openai"
    assert load_foundation(f.reference).fingerprint == f.fingerprint


def test_oversized_model_config_is_refused_before_building(tmp_path, monkeypatch):
    """A manifest's model_config could describe a huge model; it is checked on the meta device."""
    f = write_embedded(tmp_path)
    ref = copy.deepcopy(f.reference)
    ref.model_config["vision_cfg"].update(width=1024, layers=4, head_width=64)
    import open_clip.model as oc_model

    built_for_real = []
    real_init = oc_model.CLIP.__init__

    def spy(self, *args, **kwargs):
        built_for_real.append(torch.empty(0).device.type != "meta")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(oc_model.CLIP, "__init__", spy)
    with pytest.raises(TensorFileError, match="describes"):
        load_foundation(ref, bundle_dir=tmp_path)
    assert built_for_real == [False]  # only the meta-device build happened


def test_manifest_image_size_must_match_the_model(tmp_path):
    f = write_embedded(tmp_path)
    ref = copy.deepcopy(f.reference)
    ref.image_size = 48
    with pytest.raises(FoundationError) as e:
        load_foundation(ref, bundle_dir=tmp_path)
    assert e.value.field == "foundation.image_size"


def test_foundation_tensors_are_complete_copies():
    f = load_foundation(TINY_VIT)
    tensors = foundation_tensors(f.model)
    assert set(tensors) == set(f.model.state_dict())
    before = tensors["visual.proj"].clone()
    with torch.no_grad():
        f.model.visual.proj.add_(1.0)
    assert torch.equal(tensors["visual.proj"], before)
    # once the projector dropped the text tower, the weights would be incomplete: refused
    from hellofmt.projector import Projector

    Projector(f, ["cat", "dog"], ["a {}."])
    with pytest.raises(FoundationError, match="text tower"):
        foundation_tensors(f.model)
