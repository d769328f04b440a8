"""hellofmt.projector: zero-shot head, forward, deltas (training and merged forms), bundles, input checks."""

from __future__ import annotations

import copy
import math
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RN, TINY_VIT
from safetensors.torch import save_file

import hellofmt.manifest as mf
from hellofmt.errors import FingerprintMismatchError, InputError, ProjectorError
from hellofmt.foundation import EMBEDDED_WEIGHTS_FILE, foundation_metadata, foundation_tensors, load_foundation
from hellofmt.projector import DEFAULT_TEMPLATES, LabelChange, Projector, check_label_input, zeroshot_weights

CLASSES = ["cat", "dog", "car", "tree"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {c}."]
ARCHS = [TINY_VIT, TINY_RN]


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def foundation(arch=TINY_VIT, seed=0):
    torch.manual_seed(seed)
    return load_foundation(arch)


def randomise_deltas(proj: Projector, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in proj.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def trained_projector(arch=TINY_VIT, *, seed=0, rank=2, head_rank=2):
    proj = Projector(foundation(arch, seed), CLASSES, TEMPLATES)
    proj.attach_deltas(rank=rank, head_rank=head_rank, generator=torch.Generator().manual_seed(seed + 7))
    randomise_deltas(proj, seed + 1)
    return proj


def embed(tmp_path: Path, f) -> Path:
    """Write the foundation's weights as a bundle would (before the projector drops the text tower)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(foundation_tensors(f.model), str(tmp_path / EMBEDDED_WEIGHTS_FILE), foundation_metadata(f.reference))
    return tmp_path


# --------------------------------------------------------------------------------------------------
# Zero-shot head
# --------------------------------------------------------------------------------------------------
def by_hand_zeroshot(model, tokenizer, classes, templates) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for c in classes:
            texts = [t.replace("{c}", c).replace("{}", c) for t in templates]
            e = F.normalize(model.encode_text(tokenizer(texts)), dim=-1).mean(0)
            rows.append(e / e.norm())
    return torch.stack(rows)


def test_zeroshot_weights_is_normalised_mean_text_embedding():
    f = foundation()
    zs = zeroshot_weights(f.model, f.tokenizer, CLASSES, TEMPLATES)
    assert zs.shape == (len(CLASSES), 32) and zs.dtype == torch.float32
    assert torch.allclose(zs.norm(dim=1), torch.ones(len(CLASSES)), atol=1e-6)
    assert torch.allclose(zs, by_hand_zeroshot(f.model, f.tokenizer, CLASSES, TEMPLATES), atol=1e-6)
    # "{c}" and "{}" are the same placeholder
    assert torch.allclose(
        zs, zeroshot_weights(f.model, f.tokenizer, CLASSES, ["a photo of a {c}.", "a drawing of a {}."])
    )
    # class order matters and is kept
    swapped = zeroshot_weights(f.model, f.tokenizer, CLASSES[::-1], TEMPLATES)
    assert torch.allclose(swapped, zs.flip(0), atol=1e-6)


def test_zeroshot_weights_input_errors():
    f = foundation()
    with pytest.raises(InputError, match="placeholder"):
        zeroshot_weights(f.model, f.tokenizer, CLASSES, ["no placeholder"])
    with pytest.raises(InputError):
        zeroshot_weights(f.model, f.tokenizer, [], TEMPLATES)
    with pytest.raises(InputError):
        zeroshot_weights(f.model, f.tokenizer, CLASSES, [])


def test_default_templates_are_open_clips_simple_imagenet_templates():
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    assert [t.format("X") for t in DEFAULT_TEMPLATES] == [fn("X") for fn in SIMPLE_IMAGENET_TEMPLATES]


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_deltas_give_exactly_zero_shot_clip(arch):
    f = foundation(arch)
    model, tok = f.model, f.tokenizer
    scale = model.logit_scale.exp().item()
    zs = by_hand_zeroshot(model, tok, CLASSES, TEMPLATES)
    x = images(3, f.image_size)
    mean = torch.tensor(f.mean).view(1, 3, 1, 1)
    std = torch.tensor(f.std).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = model.encode_image((x - mean) / std, normalize=True)
    expected = scale * feats @ zs.t()

    proj = Projector(f, CLASSES, TEMPLATES)
    assert proj.logit_scale == pytest.approx(scale)
    with torch.no_grad():
        got = proj(x)
    assert got.dtype == torch.float32 and got.shape == (3, len(CLASSES))
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    # freshly attached deltas (lora_B = 0) change nothing, bit for bit
    proj.attach_deltas(rank=2, head_rank=2)
    with torch.no_grad():
        assert torch.equal(proj(x), got)


def test_text_tower_is_dropped_after_the_head_is_built():
    f = foundation()
    proj = Projector(f, CLASSES, TEMPLATES)
    assert f.model.transformer is None and f.model.token_embedding is None
    assert not any(n.startswith(("transformer.", "token_embedding")) for n, _ in proj.named_parameters())
    assert "head_weight" not in proj.state_dict()  # recomputed at load, never stored
    with pytest.raises(ProjectorError):
        zeroshot_weights(f.model, f.tokenizer, CLASSES, TEMPLATES)
    g = foundation()
    Projector(g, CLASSES, TEMPLATES, keep_text_tower=True)
    assert g.model.transformer is not None


def test_explicit_logit_scale():
    proj = Projector(foundation(), CLASSES, TEMPLATES, logit_scale=100.0)
    ref = Projector(foundation(), CLASSES, TEMPLATES, logit_scale=1.0)
    assert torch.allclose(proj.head_weight, 100.0 * ref.head_weight, rtol=1e-6)
    with pytest.raises(InputError):
        Projector(foundation(), CLASSES, TEMPLATES, logit_scale=-1.0)


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [8, 32, 50])
def test_preprocess_resizes_any_size_and_normalises(size):
    f = foundation()
    proj = Projector(f, CLASSES, TEMPLATES)
    x = torch.full((2, 3, size, size), 0.25)
    out = proj.preprocess(x)
    assert out.shape == (2, 3, 32, 32)
    want = (0.25 - torch.tensor(f.mean)) / torch.tensor(f.std)
    assert torch.allclose(out, want.view(1, 3, 1, 1).expand_as(out), atol=1e-5)


def test_preprocess_matches_antialiased_bicubic_resize():
    proj = Projector(foundation(), CLASSES, TEMPLATES)
    x = images(2, 64)
    want = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    assert torch.allclose(proj.preprocess(x), (want - proj.mean) / proj.std, atol=1e-6)
    assert torch.equal(proj(x), proj(x))  # deterministic


def test_same_image_at_other_sizes_gives_close_logits():
    proj = Projector(foundation(), CLASSES, TEMPLATES)
    smooth = F.interpolate(images(2, 8), size=(32, 32), mode="bilinear", align_corners=False)
    big = F.interpolate(smooth, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(proj(smooth), proj(big), atol=0.05 * proj.logit_scale)


# --------------------------------------------------------------------------------------------------
# Deltas: training form, merged form, head delta
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_merged_equals_unmerged(arch):
    proj = trained_projector(arch)
    zero_shot = Projector(foundation(arch), CLASSES, TEMPLATES)
    f = proj.foundation
    x = images(3, f.image_size + 8)
    with torch.no_grad():
        unmerged = proj(x)
        base = zero_shot(x)
    assert (unmerged - base).abs().max() > 1e-3  # the deltas do something
    proj.merge()
    assert proj.merged and proj.head is None
    assert not any(p.requires_grad for p in proj.parameters())
    assert not any("parametrizations" in n or "lora" in n for n, _ in proj.named_parameters())
    with torch.no_grad():
        merged = proj(x)
    assert torch.allclose(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_head_delta_adds_feats_times_delta():
    proj = Projector(foundation(), CLASSES, TEMPLATES)
    x = images(3, 32)
    with torch.no_grad():
        before = proj(x)
    info = proj.attach_deltas(targets=[], head_rank=3, head_alpha=6.0, generator=torch.Generator().manual_seed(0))
    assert info.targets == [] and (info.head.rank, info.head.alpha) == (3, 6.0)
    randomise_deltas(proj, std=0.5)
    A, B = proj.head.lora_A.detach(), proj.head.lora_B.detach()
    assert A.shape == (3, 32) and B.shape == (len(CLASSES), 3)
    with torch.no_grad():
        feats = F.normalize(proj.clip.encode_image(proj.preprocess(x)), dim=-1)
        after = proj(x)
    want = before + feats @ (B @ A * (6.0 / 3)).t()
    assert torch.allclose(after, want, atol=1e-5)
    assert (after - before).abs().max() > 1e-2
    proj.merge()
    with torch.no_grad():
        assert torch.allclose(proj(x), want, atol=1e-5)


def test_head_rank_zero_means_no_head_delta():
    proj = Projector(foundation(), CLASSES, TEMPLATES)
    info = proj.attach_deltas(rank=2, head_rank=0)
    assert info.head is None and proj.head is None
    assert not any(k.startswith("head.") for k in proj.delta_tensors())


def test_training_form_trains_only_the_deltas():
    proj = trained_projector()
    trainable = {n for n, p in proj.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert "head.lora_A" in trainable
    x = images(2, 32)
    proj(x).logsumexp(1).sum().backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in proj.named_parameters() if n.endswith("lora_B")
    )


def test_merged_projector_passes_gradients_to_images():
    """Image refinement optimises images through the frozen projector."""
    proj = trained_projector()
    proj.merge()
    x = images(2, 32).requires_grad_(True)
    proj(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_delta_tensors_and_projector_info():
    proj = trained_projector(rank=2, head_rank=3)
    info = proj.projector_info()
    tensors = proj.delta_tensors()
    assert tensors["head.lora_A"].shape == (3, 32) and tensors["head.lora_B"].shape == (len(CLASSES), 3)
    assert len(info.targets) > 0
    names = {t.name for t in info.targets}
    assert set(tensors) == {f"{n}.{ab}" for n in names for ab in ("lora_A", "lora_B")} | {"head.lora_A", "head.lora_B"}
    for t in info.targets:
        out_f, in_f = t.shape[0], math.prod(t.shape[1:])
        assert tensors[f"{t.name}.lora_A"].shape == (2, in_f)
        assert tensors[f"{t.name}.lora_B"].shape == (out_f, 2)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" and v.is_contiguous() for v in tensors.values())
    # a valid manifest section
    again = mf.ProjectorInfo.parse(mf._Reader(mf._to_dict(info), "projector", None))
    assert [t.name for t in again.targets] == [t.name for t in info.targets]
    # copies: merging afterwards does not change them, and they survive the merge
    proj.merge()
    after = proj.delta_tensors()
    assert set(after) == set(tensors) and all(torch.equal(after[k], tensors[k]) for k in tensors)


def test_head_delta_tensors_are_detached_copies_of_the_head():
    proj = trained_projector(rank=2, head_rank=3)
    tensors = proj.delta_tensors()
    for key in ("lora_A", "lora_B"):
        p = getattr(proj.head, key)
        t = tensors[f"head.{key}"]
        assert torch.equal(t, p.detach().float().cpu()) and not t.requires_grad
        assert t.data_ptr() != p.data_ptr()


def test_attach_or_merge_twice_is_refused():
    proj = trained_projector()
    with pytest.raises(ProjectorError):
        proj.attach_deltas()
    proj.merge()
    with pytest.raises(ProjectorError):
        proj.merge()
    with pytest.raises(ProjectorError):
        proj.attach_deltas()


def test_unknown_target_pattern():
    proj = Projector(foundation(), CLASSES, TEMPLATES)
    with pytest.raises(ProjectorError):
        proj.attach_deltas(targets=[r"visual\.nothing\.here"])


# --------------------------------------------------------------------------------------------------
# load_deltas: the round trip through saved tensors
# --------------------------------------------------------------------------------------------------
def _saved(tmp_path, arch=TINY_VIT):
    f = foundation(arch)
    embed(tmp_path, f)
    ref = f.reference
    proj = Projector(f, CLASSES, TEMPLATES)
    proj.attach_deltas(rank=2, head_rank=2, generator=torch.Generator().manual_seed(3))
    randomise_deltas(proj)
    x = images(3, f.image_size)
    with torch.no_grad():
        logits = proj(x)
    return ref, proj.delta_tensors(), proj.projector_info(), x, logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("merge", [True, False])
def test_load_deltas_round_trip(tmp_path, arch, merge):
    ref, tensors, info, x, logits = _saved(tmp_path, arch)
    fresh = Projector(load_foundation(ref, bundle_dir=tmp_path), CLASSES, TEMPLATES)
    fresh.load_deltas(tensors, info, merge=merge)
    assert fresh.merged is merge
    assert not any(p.requires_grad for p in fresh.parameters())
    with torch.no_grad():
        assert torch.allclose(fresh(x), logits, rtol=1e-4, atol=1e-5)


def test_load_deltas_trainable_resumes_training(tmp_path):
    ref, tensors, info, x, logits = _saved(tmp_path)
    fresh = Projector(load_foundation(ref, bundle_dir=tmp_path), CLASSES, TEMPLATES)
    fresh.load_deltas(tensors, info, merge=False, trainable=True)
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert "head.lora_B" in trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    saved = fresh.delta_tensors()
    assert all(torch.equal(saved[k], tensors[k]) for k in tensors)


def _bad_cases(tensors, info):
    name = info.targets[0].name
    missing = {k: v for k, v in tensors.items() if k != f"{name}.lora_B"}
    wrong_head = {**tensors, "head.lora_B": torch.zeros(len(CLASSES) + 1, 2)}
    no_head = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    info_no_head = copy.deepcopy(info)
    info_no_head.head = None
    info_rank = copy.deepcopy(info)
    info_rank.targets[0].rank = 3
    info_head_rank = copy.deepcopy(info)
    info_head_rank.head.rank = 4
    extra = {**tensors, "visual.ghost.lora_A": torch.zeros(2, 2)}
    return [
        ("missing target tensor", missing, info),
        ("wrong head shape", wrong_head, info),
        ("head tensors missing", no_head, info),
        ("head not in manifest", tensors, info_no_head),
        ("rank disagrees", tensors, info_rank),
        ("head rank disagrees", tensors, info_head_rank),
        ("unexpected tensor", extra, info),
    ]


@pytest.mark.parametrize("case", range(7))
def test_load_deltas_errors_leave_projector_untouched(tmp_path, case):
    ref, tensors, info, x, _ = _saved(tmp_path)
    label, bad_tensors, bad_info = _bad_cases(tensors, info)[case]
    fresh = Projector(load_foundation(ref, bundle_dir=tmp_path), CLASSES, TEMPLATES)
    with torch.no_grad():
        before = fresh(x)
    with pytest.raises(ProjectorError) as e:
        fresh.load_deltas(bad_tensors, bad_info, file="projector.safetensors", merge=True)
    assert e.value.file == "projector.safetensors", label
    with torch.no_grad():
        assert torch.equal(fresh(x), before), label
    assert not fresh.merged
    fresh.load_deltas(tensors, info)  # still loadable after the refusal


# --------------------------------------------------------------------------------------------------
# from_bundle
# --------------------------------------------------------------------------------------------------
def write_bundle(out: Path, *, arch=TINY_VIT, weights_sha256: str | None = None):
    from hellofmt.bundle import BundleWriter

    f = foundation(arch)
    weights = foundation_tensors(f.model)
    proj = Projector(f, CLASSES, TEMPLATES)
    proj.attach_deltas(rank=2, head_rank=2, generator=torch.Generator().manual_seed(5))
    randomise_deltas(proj)
    tensors, info = proj.delta_tensors(), proj.projector_info()
    proj.merge()
    ref = copy.deepcopy(f.reference)
    if weights_sha256:
        ref.weights_sha256 = weights_sha256
    imgs = (images(len(CLASSES), 16) * 255).round().to(torch.uint8)
    with BundleWriter(out) as w:
        images_info = w.write_images(imgs, torch.arange(len(CLASSES)), num_classes=len(CLASSES), codec="raw")
        w.write_tensors(info.file, tensors, {"format": "hellofmt-projector"})
        w.write_tensors(ref.weights_file, weights, foundation_metadata(ref))
        man = mf.Manifest(
            classes=list(CLASSES),
            foundation=ref,
            head=mf.Head(templates=list(TEMPLATES), logit_scale=proj.logit_scale),
            projector=info,
            images=images_info,
            labels=mf.LabelRecipe(),
            provenance=mf.Provenance(
                hellofmt_version="test", created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            ),
        )
        path = w.commit(man)
    return Path(path), proj


@pytest.mark.parametrize("arch", ARCHS)
def test_from_bundle_round_trip(tmp_path, arch):
    from hellofmt.bundle import Bundle

    path, built = write_bundle(tmp_path / "b", arch=arch)
    loaded = Projector.from_bundle(Bundle.open(path))
    assert loaded.merged and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.classes == CLASSES and loaded.num_classes == len(CLASSES)
    x = images(4, 24)
    with torch.no_grad():
        assert torch.allclose(loaded(x), built(x), rtol=1e-4, atol=1e-5)
    # the logits are ordinary tensors (not inference-mode ones): usable as loss targets
    student = torch.randn(4, len(CLASSES), requires_grad=True)
    with torch.no_grad():
        soft = loaded(x).softmax(1)
    (-(soft * student.log_softmax(1)).sum()).backward()


def test_from_bundle_fingerprint_mismatch(tmp_path):
    from hellofmt.bundle import Bundle

    path, built = write_bundle(tmp_path / "b", weights_sha256="0" * 64)
    with pytest.raises(FingerprintMismatchError) as e:
        Projector.from_bundle(Bundle.open(path))
    assert e.value.field == "foundation.weights_sha256"
    with pytest.warns(UserWarning, match="fingerprint"):
        loaded = Projector.from_bundle(Bundle.open(path), check_fingerprint=False)
    x = images(2, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), built(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Label input checks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, words",
    [
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "floating"),
        (torch.zeros(3, 8, 8), "batch"),
        (torch.zeros(2, 1, 8, 8), "3 channels"),
        (torch.zeros(2, 8, 8, 3), "3 channels"),
        (torch.zeros(0, 3, 8, 8), "empty"),
        (torch.full((2, 3, 8, 8), 1.5), "[0, 1]"),
        (torch.full((2, 3, 8, 8), -0.1), "[0, 1]"),
        (torch.full((2, 3, 8, 8), float("nan")), "[0, 1]"),
        ([[0.0]], "Tensor"),
    ],
)
def test_check_label_input_errors(bad, words):
    with pytest.raises(InputError) as e:
        check_label_input(bad, file="bundle")
    assert words in str(e.value)
    assert e.value.file == "bundle"


def test_check_label_input_accepts_valid_batches():
    check_label_input(torch.rand(2, 3, 5, 7))
    check_label_input(torch.rand(1, 3, 8, 8, dtype=torch.float16))
    check_label_input(torch.zeros(1, 3, 4, 4))
    check_label_input(torch.ones(1, 3, 4, 4))


def test_forward_refuses_wrong_dtype_and_shape():
    proj = Projector(foundation(), CLASSES, TEMPLATES)
    with pytest.raises(InputError):
        proj(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(InputError):
        proj(torch.zeros(3, 32, 32))
    with pytest.raises(InputError):
        proj(torch.zeros(2, 4, 32, 32))


# --------------------------------------------------------------------------------------------------
# CUDA: bf16 autocast inside, float32 out
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_gives_float32_close_to_float32_reference():
    proj = trained_projector()
    proj.merge()
    proj.to("cuda")
    x = images(4, 48).cuda()
    with torch.no_grad():
        fast = proj(x)
        exact = proj.forward_float32(x)
    assert fast.dtype == torch.float32 and fast.device.type == "cuda"
    assert torch.allclose(fast, exact, atol=0.05 * proj.logit_scale)


def test_compile_encoder_keeps_the_logits():
    proj = trained_projector()
    proj.merge()
    x = images(2, 32)
    with torch.no_grad():
        ref = proj(x)
        proj.compile_encoder(backend="eager")  # the wiring; inductor needs a compiler and minutes
        assert torch.allclose(proj(x), ref, atol=1e-5)


def test_train_mode_keeps_the_foundation_in_eval():
    proj = trained_projector(TINY_RN)
    proj.train()
    assert proj.training and not proj.clip.training
    assert not any(m.training for m in proj.clip.modules())
    stats = {k: v.clone() for k, v in proj.clip.state_dict().items() if "running_" in k}
    assert stats
    x = images(4, 64)
    out = proj(x)
    out.sum().backward()
    assert all(torch.equal(proj.clip.state_dict()[k], v) for k, v in stats.items())
    assert torch.allclose(proj(x[:1]), out[:1], atol=1e-5)  # no batch statistics: per-sample outputs


def test_forward_refuses_images_on_another_device():
    proj = Projector(foundation(), CLASSES, TEMPLATES)
    with pytest.raises(InputError, match="meta"):
        proj(torch.zeros(2, 3, 32, 32, device="meta"))


def test_training_form_fingerprints_as_its_base_weights():
    from hellofmt.foundation import fingerprint

    f = foundation()
    proj = Projector(f, CLASSES, TEMPLATES, keep_text_tower=True)
    before = fingerprint(f.model)
    assert before == f.fingerprint
    proj.attach_deltas(rank=2)
    randomise_deltas(proj)
    assert fingerprint(f.model) == before
    proj.merge()
    assert fingerprint(f.model) != before  # merged weights are no longer the foundation's


# --------------------------------------------------------------------------------------------------
# Delta encodings: round_deltas_, load_deltas of encoded files, LabelChange
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["float16", "bfloat16", "int8"])
def test_round_deltas_gives_the_labels_of_the_encoded_file(tmp_path, encoding):
    ref, tensors, info, x, logits = _saved(tmp_path)
    proj = Projector(load_foundation(ref, bundle_dir=tmp_path), CLASSES, TEMPLATES)
    proj.load_deltas(tensors, info, merge=False)
    change = proj.round_deltas_(encoding, lambda: iter([x]), temperature=2.0)
    assert set(change) == {"kl", "top1_agreement", "max_logit_diff", "views"} and change["views"] == 3
    assert 0 < change["max_logit_diff"] < 0.05 and 0 <= change["kl"] < 1e-4
    stored = proj.delta_tensors(encoding)
    enc_info = proj.projector_info(encoding)
    assert enc_info.dtype == encoding and enc_info.format_version == ("2.0" if encoding == "int8" else "1.0")
    loaded = Projector(load_foundation(ref, bundle_dir=tmp_path), CLASSES, TEMPLATES)
    loaded.load_deltas(stored, enc_info, merge=True)
    with torch.no_grad():
        rounded, from_file = proj.forward_float32(x), loaded.forward_float32(x)
    torch.testing.assert_close(from_file, rounded, rtol=1e-5, atol=1e-5)  # the probe's premise
    expected = LabelChange(2.0)
    expected.update(logits, rounded)
    assert change["max_logit_diff"] == pytest.approx(expected.result()["max_logit_diff"], rel=1e-3, abs=1e-6)
    # After merging, delta_tensors() gives back the decoded (rounded) float32 values.
    loaded_tensors = loaded.delta_tensors()
    assert all(v.dtype == torch.float32 for v in loaded_tensors.values())
    assert not any(k.endswith(".scale") for k in loaded_tensors)


def test_round_deltas_refuses_merged_and_unknown(tmp_path):
    ref, tensors, info, _, _ = _saved(tmp_path)
    proj = Projector(load_foundation(ref, bundle_dir=tmp_path), CLASSES, TEMPLATES)
    proj.load_deltas(tensors, info, merge=False)
    before = {k: v.clone() for k, v in proj.delta_tensors().items()}
    with pytest.raises(ProjectorError, match="unknown delta encoding"):
        proj.round_deltas_("int4")
    with pytest.raises(ProjectorError, match="unknown delta encoding"):
        proj.projector_info("int4")
    assert all(torch.equal(v, proj.delta_tensors()[k]) for k, v in before.items())  # untouched
    assert proj.round_deltas_("float32") == {}
    assert all(torch.equal(v, proj.delta_tensors()[k]) for k, v in before.items())  # float32: no change
    proj.merge()
    with pytest.raises(ProjectorError, match="already merged"):
        proj.round_deltas_("int8")


@pytest.mark.parametrize("merge", [True, False])
def test_load_int8_deltas_training_and_inference_forms_agree(tmp_path, merge):
    ref, tensors, info, x, _ = _saved(tmp_path)
    proj = Projector(load_foundation(ref, bundle_dir=tmp_path), CLASSES, TEMPLATES)
    proj.load_deltas(tensors, info, merge=False)
    proj.round_deltas_("int8")
    with torch.no_grad():
        want = proj.forward_float32(x)
    stored, enc = proj.delta_tensors("int8"), proj.projector_info("int8")
    fresh = Projector(load_foundation(ref, bundle_dir=tmp_path), CLASSES, TEMPLATES)
    fresh.load_deltas(stored, enc, merge=merge)
    assert fresh.merged is merge
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_float32(x), want, rtol=1e-5, atol=1e-5)


def test_label_change_maths():
    ref = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    same = LabelChange(1.0)
    same.update(ref, ref.clone())
    assert same.result() == {"kl": 0.0, "top1_agreement": 1.0, "max_logit_diff": 0.0, "views": 2.0}
    new = ref.clone()
    new[1] = torch.tensor([2.0, 1.0, 0.5])  # the second view's top class changes
    ch = LabelChange(2.0)
    ch.update(ref[:1], new[:1])
    ch.update(ref[1:], new[1:])
    p, q = F.softmax(ref[1] / 2, 0), F.softmax(new[1] / 2, 0)
    kl = float((p * (p.log() - q.log())).sum()) / 2  # mean over the two views; the first did not change
    r = ch.result()
    assert r["kl"] == pytest.approx(kl, rel=1e-5)
    assert r["top1_agreement"] == 0.5 and r["max_logit_diff"] == 2.0 and r["views"] == 2
    with pytest.raises(InputError, match="temperature"):
        LabelChange(0.0)
    with pytest.raises(InputError, match="one shape"):
        ch.update(ref, ref[:, :2])
