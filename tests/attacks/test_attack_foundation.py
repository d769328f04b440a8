"""A hostile manifest's foundation: no code, no network, no file outside the bundle, bounded cost.

The model config in a manifest is numbers only (``hellofmt.foundation.check_model_config``): a
tokenizer, Hugging Face or timm name, a keyword dictionary passed through, an unknown key, or sizes
that would take unbounded time or memory are refused with a ModelConfigError naming the key, before
open_clip, transformers or huggingface_hub are reached. A ``file`` foundation is a plain name
inside the bundle, or a path the user passes at load time, never a path from the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types

import pytest

from hellofmt.errors import (
    FoundationError,
    HellofmtError,
    ModelConfigError,
    UnsafePathError,
)
from hellofmt.manifest import FOUNDATION_FILE, MANIFEST_NAME

from _hostile import edit_manifest, snapshot


class Tripwire:
    """Stand-ins for everything that could run code or reach the network: a fake ``transformers``
    module whose AutoTokenizer / AutoConfig / AutoModel record their calls, and recording
    replacements for huggingface_hub's download functions and open_clip's model and tokenizer
    factories. ``calls`` lists every call; the tests assert it stays empty."""

    def __init__(self, monkeypatch, *, downloads: bool = True):
        import huggingface_hub
        import open_clip

        self.calls: list[tuple] = []
        fake = types.ModuleType("transformers")
        for cls in ("AutoTokenizer", "AutoConfig", "AutoModel"):
            setattr(fake, cls, types.SimpleNamespace(from_pretrained=self._record(f"transformers.{cls}")))
        monkeypatch.setitem(sys.modules, "transformers", fake)
        # every module-level name a download is reached through (modules imported first, so that
        # none of them binds a stand-in for good)
        import huggingface_hub._snapshot_download
        import huggingface_hub.file_download
        import open_clip.pretrained

        targets = [(huggingface_hub, "hf_hub_download"), (huggingface_hub, "snapshot_download"),
                   (huggingface_hub.file_download, "hf_hub_download"),
                   (huggingface_hub._snapshot_download, "hf_hub_download"),
                   (huggingface_hub._snapshot_download, "snapshot_download"),
                   (open_clip.pretrained, "hf_hub_download")]
        for module, name in targets if downloads else ():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, self._record(f"{module.__name__}.{name}"))
        for name in ("create_model", "get_tokenizer", "create_model_and_transforms"):
            monkeypatch.setattr(open_clip, name, self._record(f"open_clip.{name}"))
        monkeypatch.setattr("open_clip.factory._get_hf_config", self._record("open_clip._get_hf_config"))

    def _record(self, what):
        def call(*args, **kwargs):
            self.calls.append((what, args, kwargs))
            raise RuntimeError(f"tripwire: {what} was called")

        return call


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "b")


def set_config(bundle, fn):
    def edit(obj):
        fn(obj["foundation"]["model_config"])

    edit_manifest(bundle, edit)


def every_load(bundle):
    """Open the bundle every way a user can; each must raise a HellofmtError (returned)."""
    from hellofmt import DistilledDataset
    from hellofmt.bundle import Bundle
    from hellofmt.projector import Projector
    from hellofmt.verify import verify_bundle

    errors = []
    for load in (lambda: DistilledDataset(bundle, device="cpu"),
                 lambda: DistilledDataset(bundle, device="cpu", verify=False),
                 lambda: Projector.from_bundle(Bundle.open(bundle))):
        with pytest.raises(HellofmtError) as e:
            load()
        errors.append(e.value)
    problems = verify_bundle(bundle)
    assert len(problems) == 1
    errors.append(problems[0])
    return errors


# ---- 1. no code and no network from a model config -------------------------------------------------
HOSTILE_CONFIGS = {
    # the reproduced attack: open_clip's tokenizer factory would call
    # transformers.AutoTokenizer.from_pretrained("attacker/evil-tokenizer", trust_remote_code=True)
    "text_cfg.hf_tokenizer_name": lambda c: c["text_cfg"].update(
        hf_tokenizer_name="attacker/evil-tokenizer", tokenizer_kwargs={"trust_remote_code": True}),
    "text_cfg.tokenizer_kwargs": lambda c: c["text_cfg"].update(tokenizer_kwargs={"trust_remote_code": True}),
    "text_cfg.hf_model_name": lambda c: c["text_cfg"].update(hf_model_name="attacker/evil-model"),
    "vision_cfg.timm_model_name": lambda c: c["vision_cfg"].update(timm_model_name="hf-hub:attacker/evil"),
    "vision_cfg.timm_model_pretrained": lambda c: c["vision_cfg"].update(timm_model_pretrained=True),
    "vision_cfg.act_kwargs.inplace": lambda c: c["vision_cfg"].update(act_kwargs={"inplace": True}),
    "multimodal_cfg": lambda c: c.update(multimodal_cfg={"width": 32}),
    "text_cfg.surprise": lambda c: c["text_cfg"].update(surprise=1),
}


@pytest.mark.parametrize("key", HOSTILE_CONFIGS)
def test_a_named_or_unknown_config_key_runs_nothing_and_fetches_nothing(bundle, monkeypatch, key):
    set_config(bundle, HOSTILE_CONFIGS[key])
    trip = Tripwire(monkeypatch)
    before = snapshot(bundle)
    errors = every_load(bundle)
    for err in errors[:-1]:
        assert isinstance(err, ModelConfigError)
        assert err.field == f"foundation.model_config.{key}"
        assert err.file == str(bundle / MANIFEST_NAME)
    assert f"foundation.model_config.{key}" in errors[-1]  # hellofmt verify's report line
    assert trip.calls == []
    assert snapshot(bundle) == before


def test_a_hub_load_of_the_hostile_manifest_reaches_nothing(bundle, monkeypatch, tmp_path):
    # DistilledDataset("user/name"): pulled (a dataset download, allowed), then refused before
    # open_clip, transformers or a model download
    from huggingface_hub import constants

    from hellofmt import DistilledDataset, hub

    from fakehub import WRITE_TOKEN, FakeHub, point_client_at

    set_config(bundle, HOSTILE_CONFIGS["text_cfg.hf_tokenizer_name"])
    with FakeHub() as server:
        point_client_at(server.url, monkeypatch)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        hub.push(bundle, "user/evil", token=WRITE_TOKEN)
        trip = Tripwire(monkeypatch, downloads=False)
        with pytest.raises(ModelConfigError) as e:
            DistilledDataset("user/evil", device="cpu")
    assert e.value.field == "foundation.model_config.text_cfg.hf_tokenizer_name"
    assert trip.calls == []


def test_the_hostile_tokenizer_manifest_loads_once_the_key_is_gone(bundle, monkeypatch):
    # control: the same bundle without the two keys loads, so the refusal above is the allow-list
    from hellofmt import DistilledDataset

    set_config(bundle, HOSTILE_CONFIGS["text_cfg.hf_tokenizer_name"])
    with pytest.raises(ModelConfigError):
        DistilledDataset(bundle, device="cpu")
    set_config(bundle, lambda c: [c["text_cfg"].pop(k) for k in ("hf_tokenizer_name", "tokenizer_kwargs")])
    assert len(DistilledDataset(bundle, device="cpu")) == 6


def test_an_hf_hub_foundation_without_its_config_is_not_fetched(bundle, monkeypatch):
    def edit(obj):
        f = obj["foundation"]
        f.update(source="hf-hub", hf_hub_id="attacker/evil")
        del f["model_config"]

    edit_manifest(bundle, edit)
    trip = Tripwire(monkeypatch)
    for err in every_load(bundle)[:-1]:
        assert isinstance(err, ModelConfigError) and err.field == "foundation.model_config"
    assert trip.calls == []


@pytest.mark.parametrize("arch", ["hf-hub:attacker/evil", "local-dir:/etc", "evil.json", "../x.json"])
@pytest.mark.parametrize("source", ["pretrained", "embedded"])
def test_an_architecture_name_is_looked_up_only_in_open_clips_registry(bundle, monkeypatch, tmp_path, arch, source):
    # a name that open_clip or the spec parser would turn into a download or a file read
    (tmp_path / "evil.json").write_text(json.dumps({"embed_dim": 1}))

    def edit(obj):
        f = obj["foundation"]
        f.update(architecture=arch, source=source)
        del f["model_config"]
        if source == "pretrained":
            f["pretrained"] = "x.safetensors"

    edit_manifest(bundle, edit)
    trip = Tripwire(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for err in every_load(bundle)[:-1]:
        assert isinstance(err, FoundationError)
        assert err.field in ("foundation.architecture", "foundation.model_config")
    assert trip.calls == []


# ---- 2. bounded model construction -----------------------------------------------------------------
HUGE = {
    "text_cfg.layers": (lambda c: c["text_cfg"].update(layers=8000), "outside the allowed range"),
    "vision_cfg.layers": (lambda c: c["vision_cfg"].update(layers=2**70), "outside the allowed range"),
    "text_cfg.width": (lambda c: c["text_cfg"].update(width=2**40), "outside the allowed range"),
    "text_cfg.vocab_size": (lambda c: c["text_cfg"].update(vocab_size=10**9), "outside the allowed range"),
    "text_cfg.context_length": (lambda c: c["text_cfg"].update(context_length=10**6), "outside the allowed range"),
    "vision_cfg.image_size": (lambda c: c["vision_cfg"].update(image_size=10**5), "outside the allowed range"),
    "vision_cfg.patch_size": (lambda c: c["vision_cfg"].update(patch_size=0), "outside the allowed range"),
    "text_cfg.heads": (lambda c: c["text_cfg"].update(heads=3), "not a multiple of heads"),
    "vision_cfg.head_width": (lambda c: c["vision_cfg"].update(width=1024, head_width=1), "heads is over"),
    "text_cfg.mlp_ratio": (lambda c: c["text_cfg"].update(mlp_ratio=float("1e300")), "outside the allowed range"),
    "embed_dim": (lambda c: c.update(embed_dim=True), "expected an integer"),
    # each number in range, the whole far over the caps: refused from the estimate, nothing built
    "": (lambda c: (c["text_cfg"].update(width=16384, heads=128, layers=256),
                    c["vision_cfg"].update(width=16384, head_width=128, layers=256)), "over the caps"),
}


@pytest.mark.parametrize("key", HUGE)
def test_a_huge_model_is_refused_before_anything_is_built(bundle, monkeypatch, key):
    edit, match = HUGE[key]
    set_config(bundle, edit)
    trip = Tripwire(monkeypatch)
    for err in every_load(bundle)[:-1]:
        assert isinstance(err, ModelConfigError)
        assert match in err.message
        assert err.field == "foundation.model_config" + (f".{key}" if key else "")
    assert trip.calls == []


def test_the_allow_list_accepts_open_clips_own_plain_configs():
    import open_clip

    from hellofmt.foundation import check_model_config

    plain = [n for n in open_clip.list_models() if not any(
        k in json.dumps(open_clip.get_model_config(n)) for k in ("hf_", "timm_", "tokenizer", "multimodal"))]
    assert len(plain) > 20
    for name in plain:
        assert check_model_config(open_clip.get_model_config(name)) == open_clip.get_model_config(name)


# ---- 3. a "file" foundation never reads outside the bundle ----------------------------------------
@pytest.fixture
def file_bundle(bundle):
    """The tiny bundle with its foundation turned into a 'file' reference to the same weights."""
    edit_manifest(bundle, lambda obj: obj["foundation"].update(source="file", weights_file=FOUNDATION_FILE))
    return bundle


def test_a_file_foundation_inside_the_bundle_loads(file_bundle):
    from hellofmt import DistilledDataset

    assert len(DistilledDataset(file_bundle, device="cpu")) == 6


@pytest.mark.parametrize("where", ["absolute", "home", "parent", "cwd"])
def test_a_file_foundation_naming_a_path_outside_is_refused(file_bundle, tmp_path, monkeypatch, where):
    from hellofmt import DistilledDataset
    from hellofmt.errors import UnsafeFileNameError

    # the weights outside are the right ones: only the refusal stops them being read
    outside = tmp_path / "outside.safetensors"
    shutil.copy(file_bundle / FOUNDATION_FILE, outside)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    name = {"absolute": str(outside), "home": "~/outside.safetensors", "parent": "../outside.safetensors",
            "cwd": "outside.safetensors"}[where]
    edit_manifest(file_bundle, lambda obj: obj["foundation"].update(weights_file=name))
    (file_bundle / FOUNDATION_FILE).unlink()  # so nothing inside could satisfy it either
    edit_manifest(file_bundle, lambda obj: obj["files"].pop(FOUNDATION_FILE))
    with pytest.raises(HellofmtError) as e:
        DistilledDataset(file_bundle, device="cpu")
    assert e.value.field in ("foundation.weights_file", "weights")
    if where != "cwd":
        assert isinstance(e.value, UnsafeFileNameError)
    else:  # a plain name is looked for in the bundle only, never in the working directory
        assert "load time" in e.value.message or "not found" in e.value.message


@pytest.mark.filterwarnings("ignore::hellofmt.bundle.UnlistedFileWarning")
def test_a_file_foundation_symlink_leading_out_is_refused(file_bundle, tmp_path):
    from hellofmt import DistilledDataset

    outside = tmp_path / "outside.safetensors"
    shutil.copy(file_bundle / FOUNDATION_FILE, outside)
    edit_manifest(file_bundle, lambda obj: (obj["foundation"].update(weights_file="w.safetensors")))
    os.symlink(outside, file_bundle / "w.safetensors")
    with pytest.raises(UnsafePathError, match="leads out of the bundle") as e:
        DistilledDataset(file_bundle, device="cpu")
    assert e.value.field == "foundation.weights_file"


def test_file_weights_outside_the_bundle_are_the_callers_to_give(file_bundle, tmp_path):
    from hellofmt.bundle import Bundle
    from hellofmt.foundation import load_foundation

    outside = tmp_path / "mine.safetensors"
    shutil.move(file_bundle / FOUNDATION_FILE, outside)
    ref = Bundle.open_unchecked(file_bundle).manifest.foundation
    with pytest.raises(FoundationError, match="not found") as e:
        load_foundation(ref, bundle_dir=file_bundle)
    assert "weights=" in e.value.fix
    assert load_foundation(ref, bundle_dir=file_bundle, weights=outside).fingerprint == ref.weights_sha256
