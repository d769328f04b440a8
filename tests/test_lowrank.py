"""Low-rank deltas: maths, training form (parametrize), inference form (merge), files, bad input."""

from __future__ import annotations

import copy
import math

import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from hellofmt import lowrank as lr
from hellofmt.errors import HellofmtError, ProjectorError
from hellofmt.manifest import LowRankTarget

TINY_VIT = "hf-test-tiny-vit"
TINY_RN = "hf-test-tiny-rn"
FILE = "bundle/projector.safetensors"


def _model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(arch).eval()


@pytest.fixture(scope="module")
def vit_base():
    return _model(TINY_VIT)


@pytest.fixture(scope="module")
def rn_base():
    return _model(TINY_RN)


@pytest.fixture
def vit(vit_base):
    return copy.deepcopy(vit_base)


@pytest.fixture
def rn(rn_base):
    return copy.deepcopy(rn_base)


def _images(model, n=2, seed=0):
    size = model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _encode(model, x):
    with torch.no_grad():
        return model.encode_image(x)


def _random_tensors(targets, seed=1, scale=0.2, dtype=torch.float32):
    """Non-zero A and B for every target (B random, so the delta really changes the model)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in targets:
        o, i = lr.as_matrix_shape(t.shape)
        out[f"{t.name}.lora_A"] = (torch.randn(t.rank, i, generator=g) * scale).to(dtype)
        out[f"{t.name}.lora_B"] = (torch.randn(o, t.rank, generator=g) * scale).to(dtype)
    return out


def _plain_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# names, families, patterns
# ------------------------------------------------------------------------------------------------
def test_model_family(vit, rn):
    assert lr.model_family(vit) == "vit"
    assert lr.model_family(rn) == "resnet"
    assert lr.model_family(vit.visual) == "vit"
    with pytest.raises(ProjectorError, match="no default low-rank targets"):
        lr.model_family(nn.Linear(3, 3))


def test_default_targets_vit(vit):
    names = lr.resolve_targets(vit)
    expected = [
        f"visual.transformer.resblocks.{b}.{p}"
        for b in range(2)
        for p in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ]
    assert names == expected
    # The text tower has the same block names without the "visual." prefix: never targeted.
    assert not any(n.startswith("transformer.") for n in names)


def test_default_targets_resnet(rn):
    names = lr.resolve_targets(rn)
    convs = [n for n in names if ".conv" in n]
    # layers [1, 1, 1, 1]: one bottleneck per stage, three convs each.
    assert convs == [f"visual.layer{s}.0.conv{c}.weight" for s in range(1, 5) for c in (1, 2, 3)]
    assert [n for n in names if "attnpool" in n] == [
        f"visual.attnpool.{p}_proj.weight" for p in ("k", "q", "v", "c")
    ]
    assert "visual.conv1.weight" not in names  # stem left out
    assert not any("downsample" in n for n in names)
    params = dict(rn.named_parameters())
    assert all(params[n].dim() >= 2 for n in names)


def test_default_targets_bare_tower(vit):
    names = lr.resolve_targets(vit.visual)
    assert names[0] == "transformer.resblocks.0.attn.in_proj_weight"
    assert len(names) == 8


def test_resolve_targets_is_in_model_order_and_deduplicated(vit):
    names = lr.resolve_targets(vit, [r"visual\.proj", r"visual\.conv1\.weight", r"visual\.(proj|conv1\.weight)"])
    order = [n for n, _ in vit.named_parameters()]
    assert sorted(names) == ["visual.conv1.weight", "visual.proj"]
    assert names == sorted(names, key=order.index)


def test_resolve_targets_same_names_when_parametrized(vit):
    before = lr.resolve_targets(vit)
    lr.attach(vit, lr.make_targets(vit))
    assert lr.resolve_targets(vit) == before


@pytest.mark.parametrize(
    "patterns, match",
    [
        ([r"visual\.nothing\.weight"], "matches no parameter"),
        ([r"visual\.transformer\.resblocks\.0\.mlp\.c_fc\.bias"], "at least 2 dimensions"),
        ([r"visual\.ln_post\..*"], "at least 2 dimensions"),
        ([r"visual\.(proj"], "not a valid regular expression"),
        ([r"visual\.proj", r"visual\.nope"], "nope"),
    ],
)
def test_resolve_targets_errors(vit, patterns, match):
    with pytest.raises(ProjectorError, match=match) as e:
        lr.resolve_targets(vit, patterns)
    assert e.value.field == "targets"
    assert isinstance(e.value, HellofmtError)


def test_as_matrix_shape():
    assert lr.as_matrix_shape((8, 3, 2, 2)) == (8, 12)
    assert lr.as_matrix_shape(torch.Size([64, 32])) == (64, 32)
    for bad in [(5,), (), (0, 3)]:
        with pytest.raises(ProjectorError):
            lr.as_matrix_shape(bad)


# ------------------------------------------------------------------------------------------------
# pure maths
# ------------------------------------------------------------------------------------------------
def test_delta_weight_formula():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 12, generator=g)
    B = torch.randn(8, 3, generator=g)
    dw = lr.delta_weight(A, B, 6.0, (8, 3, 2, 2))
    assert dw.shape == (8, 3, 2, 2)
    torch.testing.assert_close(dw.reshape(8, 12), B @ A * 2.0)  # alpha / rank = 6 / 3
    # Head use: a [C, D] matrix, differentiable in A and B.
    A.requires_grad_(True)
    B.requires_grad_(True)
    lr.delta_weight(A, B, 3.0, (8, 12)).sum().backward()
    assert A.grad is not None and B.grad is not None and B.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "a_shape, b_shape, shape",
    [((3, 12), (8, 2), (8, 12)), ((3, 11), (8, 3), (8, 12)), ((3, 12), (7, 3), (8, 12)), ((3, 12, 1), (8, 3), (8, 12))],
)
def test_delta_weight_shape_errors(a_shape, b_shape, shape):
    with pytest.raises(ProjectorError):
        lr.delta_weight(torch.zeros(a_shape), torch.zeros(b_shape), 1.0, shape)


@settings(max_examples=40, deadline=None)
@given(
    out_f=st.integers(1, 9),
    in_c=st.integers(1, 5),
    k=st.integers(1, 3),
    rank=st.integers(1, 6),
    alpha=st.floats(0.1, 32.0),
    seed=st.integers(0, 2**16),
)
def test_conv_parametrized_equals_merged(out_f, in_c, k, rank, alpha, seed):
    """Property: on a Conv2d of any shape, W + dW through parametrize equals the merged kernel."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(in_c, out_f, k, padding=k // 2)
    merged = copy.deepcopy(conv)
    x = torch.randn(2, in_c, 6, 6)
    t = LowRankTarget(name="weight", rank=rank, alpha=alpha, shape=list(conv.weight.shape))
    tensors = _random_tensors([t], seed=seed)
    lr.load_deltas(conv, tensors, [t])
    lr.merge_(merged, tensors, [t])
    with torch.no_grad():
        torch.testing.assert_close(conv(x), merged(x), atol=1e-5, rtol=1e-5)
        dw = tensors["weight.lora_B"] @ tensors["weight.lora_A"] * (alpha / rank)
        torch.testing.assert_close(merged.weight - conv.parametrizations.weight.original, dw.view_as(merged.weight))


# ------------------------------------------------------------------------------------------------
# LowRankDelta
# ------------------------------------------------------------------------------------------------
def test_fresh_delta_is_identity_and_initialised():
    d = lr.LowRankDelta((16, 4, 3, 3), rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    assert d.lora_A.shape == (4, 36) and d.lora_B.shape == (16, 4)
    assert torch.count_nonzero(d.lora_B) == 0
    assert d.lora_A.abs().max() <= 1 / math.sqrt(36) and d.lora_A.std() > 0.05  # kaiming-uniform(a=sqrt 5)
    W = torch.randn(16, 4, 3, 3)
    assert torch.equal(d(W), W)
    assert d.scaling == 2.0
    assert d.alpha == 8.0 and lr.LowRankDelta((4, 4), rank=2).alpha == 2.0  # default alpha = rank


def test_delta_init_is_deterministic():
    def a(seed):
        return lr.LowRankDelta((8, 8), 2, generator=torch.Generator().manual_seed(seed)).lora_A

    assert torch.equal(a(3), a(3))
    assert not torch.equal(a(3), a(4))


def test_from_tensors_does_not_touch_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    lr.LowRankDelta.from_tensors(torch.ones(2, 4), torch.ones(3, 2), 2.0, (3, 4))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("rank, alpha", [(0, 1.0), (2.5, 1.0), (2, 0.0), (2, -1.0), (2, float("nan"))])
def test_delta_bad_rank_alpha(rank, alpha):
    with pytest.raises(ProjectorError):
        lr.LowRankDelta((4, 4), rank, alpha)


# ------------------------------------------------------------------------------------------------
# merged == unmerged for every parameter kind, on real open_clip towers
# ------------------------------------------------------------------------------------------------
KINDS = {
    "vit-linear-mlp": (TINY_VIT, [r"visual\.transformer\.resblocks\.\d+\.mlp\.c_(fc|proj)\.weight"]),
    "vit-mha-in_proj": (TINY_VIT, [r"visual\.transformer\.resblocks\.\d+\.attn\.in_proj_weight"]),
    "vit-mha-out_proj": (TINY_VIT, [r"visual\.transformer\.resblocks\.\d+\.attn\.out_proj\.weight"]),
    "vit-conv-patch": (TINY_VIT, [r"visual\.conv1\.weight"]),
    "vit-bare-proj": (TINY_VIT, [r"visual\.proj"]),
    "vit-defaults": (TINY_VIT, None),
    "rn-conv": (TINY_RN, [r"visual\.layer\d\.0\.conv2\.weight", r"visual\.conv1\.weight"]),
    "rn-attnpool": (TINY_RN, [r"visual\.attnpool\.[qkvc]_proj\.weight"]),
    "rn-defaults": (TINY_RN, None),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_merged_equals_unmerged(kind, vit_base, rn_base):
    arch, patterns = KINDS[kind]
    base_model = vit_base if arch == TINY_VIT else rn_base
    x = _images(base_model)
    base_out = _encode(base_model, x)

    unmerged = copy.deepcopy(base_model)
    targets = lr.make_targets(unmerged, patterns, rank=3, alpha=6.0)
    tensors = _random_tensors(targets, scale=1.0)
    lr.load_deltas(unmerged, tensors, targets, file=FILE)
    assert all(parametrize.is_parametrized(*_owner(unmerged, t.name)) for t in targets)
    out_unmerged = _encode(unmerged, x)  # eval + no_grad: MHA takes its fused fast path
    with torch.enable_grad():
        out_slow = unmerged.encode_image(x).detach()  # grad enabled: MHA's Python path
    merged = copy.deepcopy(base_model)
    lr.merge_(merged, tensors, targets, file=FILE)
    out_merged = _encode(merged, x)

    # The delta really is read where the module uses the weight (not bypassed by a fast path).
    change = (out_unmerged - base_out).abs().max() / base_out.abs().max()
    assert change > 0.01, float(change)
    tol = dict(atol=1e-5 * float(out_unmerged.abs().max()), rtol=1e-4)
    torch.testing.assert_close(out_merged, out_unmerged, **tol)
    torch.testing.assert_close(out_slow, out_unmerged, **tol)
    # The merged model is a plain model: same names as the foundation, no parametrization.
    assert list(merged.state_dict()) == list(base_model.state_dict())
    # Training form -> inference form through remove(merge=True) gives the same weights.
    lr.remove(unmerged, merge=True)
    assert list(unmerged.state_dict()) == list(base_model.state_dict())
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(unmerged.state_dict()[k], v, atol=1e-6, rtol=0)


def _owner(model, name):
    prefix, _, attr = name.rpartition(".")
    return model.get_submodule(prefix), attr


def test_mha_fast_path_reads_parametrized_weight(vit, monkeypatch):
    """nn.MultiheadAttention's fused inference path must see W + dW, not the stored original."""
    calls = []
    native = torch._native_multi_head_attention

    def spy(*args, **kwargs):
        calls.append(args[5].clone())  # (query, key, value, embed_dim, num_heads, qkv_weight, ...)
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", spy)
    t = lr.make_targets(vit, [r"visual\.transformer\.resblocks\.0\.attn\.in_proj_weight"], rank=2)
    tensors = _random_tensors(t)
    lr.load_deltas(vit, tensors, t)
    _encode(vit, _images(vit))
    assert calls, "the fast path was not taken"
    mha = vit.visual.transformer.resblocks[0].attn
    torch.testing.assert_close(calls[0], mha.in_proj_weight)
    assert not torch.equal(calls[0], mha.parametrizations.in_proj_weight.original)


@pytest.mark.parametrize("arch", [TINY_VIT, TINY_RN])
def test_zero_deltas_give_exactly_the_base_model(arch, vit_base, rn_base):
    base = vit_base if arch == TINY_VIT else rn_base
    x = _images(base)
    ref = _encode(base, x)
    targets = lr.make_targets(base, rank=2)
    zeros = {k: torch.zeros_like(v) for k, v in _random_tensors(targets).items()}

    fresh = copy.deepcopy(base)
    lr.attach(fresh, targets, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_encode(fresh, x), ref)

    loaded = copy.deepcopy(base)
    lr.load_deltas(loaded, zeros, targets)
    assert torch.equal(_encode(loaded, x), ref)

    merged = copy.deepcopy(base)
    lr.merge_(merged, zeros, targets)
    assert torch.equal(_encode(merged, x), ref)
    for k, v in base.state_dict().items():
        assert torch.equal(merged.state_dict()[k], v), k


# ------------------------------------------------------------------------------------------------
# training form
# ------------------------------------------------------------------------------------------------
def test_attach_trains_only_the_deltas(vit):
    x = _images(vit)
    ref = _encode(vit, x)
    targets = lr.make_targets(vit, rank=2)
    deltas = lr.attach(vit, targets, generator=torch.Generator().manual_seed(0))
    assert list(deltas) == [t.name for t in targets]
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(targets)
    assert lr.deltas_of(vit) == deltas
    params = [p for d in deltas.values() for p in d.parameters()]
    opt = torch.optim.SGD(params, lr=1.0)
    vit.encode_image(x).pow(2).sum().backward()
    first = deltas[targets[0].name]
    assert first.lora_B.grad is not None and first.lora_B.grad.abs().sum() > 0
    assert vit.visual.transformer.resblocks[0].attn.parametrizations.in_proj_weight.original.grad is None
    opt.step()
    assert (_encode(vit, x) - ref).abs().max() > 1e-4
    n = lr.num_delta_parameters(targets)
    assert n == sum(p.numel() for p in params)


def test_cached_forward_computes_each_delta_once(vit, monkeypatch):
    x = _images(vit)
    targets = lr.make_targets(vit, rank=2)
    lr.load_deltas(vit, _random_tensors(targets), targets, trainable=True)
    plain = vit.encode_image(x)
    calls = []
    forward = lr.LowRankDelta.forward
    monkeypatch.setattr(lr.LowRankDelta, "forward", lambda self, W: calls.append(1) or forward(self, W))
    with parametrize.cached():
        cached = vit.encode_image(x)
    assert len(calls) == len(targets)
    torch.testing.assert_close(cached, plain)
    cached.sum().backward()
    assert all(d.lora_A.grad is not None for d in lr.deltas_of(vit).values())


def test_attach_is_deterministic(vit_base):
    def run():
        m = copy.deepcopy(vit_base)
        return lr.delta_tensors(lr.attach(m, lr.make_targets(m), generator=torch.Generator().manual_seed(7)))

    a, b = run(), run()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_remove_without_merge_restores_base(vit, vit_base):
    targets = lr.make_targets(vit, rank=2)
    lr.load_deltas(vit, _random_tensors(targets), targets)
    lr.remove(vit, merge=False)
    assert not any(parametrize.is_parametrized(m) for m in vit.modules())
    sd = vit.state_dict()
    assert list(sd) == list(vit_base.state_dict())
    for k, v in vit_base.state_dict().items():
        assert torch.equal(sd[k], v), k
    assert lr.deltas_of(vit) == {}


def test_attach_twice_refused(vit):
    targets = lr.make_targets(vit, rank=2)
    lr.attach(vit, targets)
    with pytest.raises(ProjectorError, match="already carries a delta"):
        lr.attach(vit, targets)


def test_attach_refuses_duplicate_and_missing_targets(vit):
    t = lr.make_targets(vit, [r"visual\.proj"])
    with pytest.raises(ProjectorError, match="listed twice"):
        lr.attach(vit, t + t)
    with pytest.raises(ProjectorError, match="not a parameter"):
        lr.attach(vit, [LowRankTarget(name="visual.nope.weight", rank=2, alpha=2, shape=[4, 4])])


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def test_safetensors_round_trip(tmp_path, vit_base):
    trained = copy.deepcopy(vit_base)
    targets = lr.make_targets(trained, rank=2, alpha=4.0)
    deltas = lr.attach(trained, targets, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for d in deltas.values():
            d.lora_B.normal_(0, 0.1)
    tensors = lr.delta_tensors(deltas)
    assert set(tensors) == {f"{t.name}.{ab}" for t in targets for ab in ("lora_A", "lora_B")}
    assert all(not v.requires_grad and v.is_contiguous() and v.device.type == "cpu" for v in tensors.values())
    path = tmp_path / "projector.safetensors"
    save_file(tensors, str(path), metadata={"format": "hellofmt-projector"})
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)

    x = _images(vit_base)
    want = _encode(trained, x)
    loaded = copy.deepcopy(vit_base)
    lr.load_deltas(loaded, back, targets, file=path, dtype="float32")
    assert torch.equal(_encode(loaded, x), want)
    merged = copy.deepcopy(vit_base)
    lr.merge_(merged, back, targets, file=path, dtype="float32")
    torch.testing.assert_close(_encode(merged, x), want, atol=1e-5, rtol=1e-5)
    half = lr.delta_tensors(deltas, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in half.values())


def test_head_tensors_are_left_to_the_projector(vit):
    targets = lr.make_targets(vit, [r"visual\.proj"], rank=2)
    tensors = _random_tensors(targets)
    tensors["head.lora_A"] = torch.zeros(2, 32)
    tensors["head.lora_B"] = torch.zeros(5, 2)
    lr.merge_(vit, tensors, targets)  # no "unexpected tensor"


def test_half_precision_base_merges_in_float32(vit_base):
    m = copy.deepcopy(vit_base).half()
    w16 = m.visual.proj.clone()
    targets = lr.make_targets(m, [r"visual\.proj"], rank=2)
    tensors = _random_tensors(targets)
    lr.merge_(m, tensors, targets)
    dw = tensors["visual.proj.lora_B"] @ tensors["visual.proj.lora_A"]  # alpha = rank
    assert m.visual.proj.dtype == torch.float16
    # One rounding, of the float32 sum (not W16 + half(dW), which rounds twice).
    assert torch.equal(m.visual.proj, (w16.float() + dw).half())


# ------------------------------------------------------------------------------------------------
# bad input: every failure is a ProjectorError naming the file and the tensor; model untouched
# ------------------------------------------------------------------------------------------------
P = "visual.transformer.resblocks.0.mlp.c_fc.weight"  # [256, 64]


def _case(name):
    targets = [LowRankTarget(name=P, rank=2, alpha=2.0, shape=[256, 64])]
    t = {f"{P}.lora_A": torch.randn(2, 64), f"{P}.lora_B": torch.randn(256, 2)}
    field = f"{P}.lora_A"
    dtype = None
    if name == "missing-A":
        del t[f"{P}.lora_A"]
    elif name == "missing-B":
        del t[f"{P}.lora_B"]
        field = f"{P}.lora_B"
    elif name == "unexpected":
        t["visual.proj.lora_A"] = torch.randn(2, 32)
        field = "visual.proj.lora_A"
    elif name == "wrong-shape-A":
        t[f"{P}.lora_A"] = torch.randn(2, 63)
    elif name == "wrong-shape-B":
        t[f"{P}.lora_B"] = torch.randn(255, 2)
        field = f"{P}.lora_B"
    elif name == "3d-A":
        t[f"{P}.lora_A"] = torch.randn(2, 64, 1)
    elif name == "rank-disagrees":
        t = {f"{P}.lora_A": torch.randn(3, 64), f"{P}.lora_B": torch.randn(256, 3)}
    elif name == "target-not-in-model":
        targets = [
            LowRankTarget(name="visual.transformer.resblocks.9.mlp.c_fc.weight", rank=2, alpha=2.0, shape=[256, 64])
        ]
        t = {f"{targets[0].name}.lora_A": torch.randn(2, 64), f"{targets[0].name}.lora_B": torch.randn(256, 2)}
        field = targets[0].name
    elif name == "not-a-parameter":  # a module, not a parameter
        targets = [LowRankTarget(name="visual.transformer.resblocks.0.mlp", rank=2, alpha=2.0, shape=[256, 64])]
        t = {f"{targets[0].name}.lora_A": torch.randn(2, 64), f"{targets[0].name}.lora_B": torch.randn(256, 2)}
        field = targets[0].name
    elif name == "manifest-shape-differs-from-model":
        targets = [LowRankTarget(name=P, rank=2, alpha=2.0, shape=[128, 64])]
        t = {f"{P}.lora_A": torch.randn(2, 64), f"{P}.lora_B": torch.randn(128, 2)}
        field = P
    elif name == "int-dtype":
        t[f"{P}.lora_A"] = torch.zeros(2, 64, dtype=torch.int32)
    elif name == "dtype-vs-manifest":
        t = {k: v.half() for k, v in t.items()}
        dtype = "float32"
    elif name == "A-B-dtypes-differ":
        t[f"{P}.lora_B"] = t[f"{P}.lora_B"].double()
        field = f"{P}.lora_B"
    elif name == "nan":
        t[f"{P}.lora_A"][0, 0] = float("nan")
    elif name == "not-a-tensor":
        t[f"{P}.lora_A"] = [[0.0] * 64] * 2
    elif name == "duplicate-target":
        targets = targets * 2
        field = "projector.targets"
    else:  # pragma: no cover
        raise AssertionError(name)
    return t, targets, field, dtype


BAD = [
    "missing-A",
    "missing-B",
    "unexpected",
    "wrong-shape-A",
    "wrong-shape-B",
    "3d-A",
    "rank-disagrees",
    "target-not-in-model",
    "not-a-parameter",
    "manifest-shape-differs-from-model",
    "int-dtype",
    "dtype-vs-manifest",
    "A-B-dtypes-differ",
    "nan",
    "not-a-tensor",
    "duplicate-target",
]


@pytest.mark.parametrize("how", ["load_deltas", "merge_"])
@pytest.mark.parametrize("name", BAD)
def test_bad_projector_tensors(name, how, vit, vit_base):
    tensors, targets, field, dtype = _case(name)
    fn = lr.load_deltas if how == "load_deltas" else lr.merge_
    with pytest.raises(ProjectorError) as e:
        fn(vit, tensors, targets, file=FILE, dtype=dtype)
    err = e.value
    assert err.file == FILE and err.field == field, str(err)
    assert FILE in str(err) and field in str(err)
    if name == "rank-disagrees":
        assert "rank 3" in err.message and "rank 2" in err.message
    # Nothing was applied: the model is exactly the foundation.
    assert not any(parametrize.is_parametrized(m) for m in vit.modules())
    for k, v in vit_base.state_dict().items():
        assert torch.equal(vit.state_dict()[k], v), k


def test_check_delta_tensors_without_model():
    tensors, targets, _, _ = _case("missing-B")
    with pytest.raises(ProjectorError, match="missing tensor"):
        lr.check_delta_tensors(tensors, targets, file=FILE)
    good, targets, _, _ = _case("target-not-in-model")
    lr.check_delta_tensors(good, targets, file=FILE, dtype="float32")  # fine without a model


def test_merge_twice_refused(vit):
    targets = lr.make_targets(vit, [r"visual\.proj"], rank=2)
    tensors = _random_tensors(targets)
    lr.merge_(vit, tensors, targets, file=FILE)
    once = vit.visual.proj.clone()
    with pytest.raises(ProjectorError, match="already merged") as e:
        lr.merge_(vit, tensors, targets, file=FILE)
    assert e.value.field == "visual.proj"
    with pytest.raises(ProjectorError, match="already merged"):
        lr.load_deltas(vit, tensors, targets, file=FILE)
    assert torch.equal(vit.visual.proj, once)


def test_merge_onto_parametrized_refused(vit):
    targets = lr.make_targets(vit, [r"visual\.proj"], rank=2)
    tensors = _random_tensors(targets)
    lr.load_deltas(vit, tensors, targets)
    with pytest.raises(ProjectorError, match="already carries a delta"):
        lr.merge_(vit, tensors, targets, file=FILE)


# ------------------------------------------------------------------------------------------------
# encodings (spec 5.1): float32, float16, bfloat16, int8 with one float32 scale per row
# ------------------------------------------------------------------------------------------------
def test_quantize_int8_rule_and_error_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, generator=g) * torch.tensor([1e-4, 1e-2, 1.0, 30.0, 0.0])[:, None]
    q, s = lr.quantize_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (5,)
    assert int(q.min()) >= -127 and int(q.max()) <= 127  # symmetric: -128 is never written
    assert torch.equal(s[:4], x[:4].abs().amax(1) / 127) and s[4] == 1.0  # an all-zero row gets scale 1
    assert torch.equal(q[4], torch.zeros(40, dtype=torch.int8))
    assert (q[:4].abs().amax(1) == 127).all()  # each row's largest value uses the full range
    back = lr.dequantize_int8(q, s)
    assert back.dtype == torch.float32
    assert ((back - x).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()  # within half a step per element
    assert torch.equal(back, q.float() * s[:, None])  # the spec's rule, exactly


def test_quantize_int8_refuses_non_finite_and_non_matrices():
    with pytest.raises(ProjectorError, match="NaN or infinite"):
        lr.quantize_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ProjectorError, match="2-D floating-point"):
        lr.quantize_int8(torch.ones(3))
    with pytest.raises(ProjectorError, match="2-D floating-point"):
        lr.quantize_int8(torch.ones(2, 2, dtype=torch.int64))


@pytest.mark.parametrize("encoding", ["float32", "float16", "bfloat16", "int8"])
def test_encode_decode_round_trip_each_encoding(encoding, vit_base):
    m = copy.deepcopy(vit_base)
    targets = lr.make_targets(m, rank=2)
    deltas = lr.attach(m, targets, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for d in deltas.values():
            d.lora_B.normal_(0, 0.05)
    plain = lr.delta_tensors(deltas)
    stored = lr.delta_tensors(deltas, encoding=encoding)
    names = {f"{t.name}.{ab}" for t in targets for ab in ("lora_A", "lora_B")}
    scales = {n + ".scale" for n in names} if encoding == "int8" else set()
    assert set(stored) == names | scales
    want = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
    assert all(stored[n].dtype == want[encoding] for n in names)
    assert all(stored[n].dtype == torch.float32 and stored[n].shape == (plain[n[:-6]].shape[0],) for n in scales)
    lr.check_delta_tensors(stored, targets, file=FILE, dtype=encoding)
    back = lr.decode_delta_tensors(stored, encoding)
    assert set(back) == names and all(v.dtype == torch.float32 for v in back.values())
    tol = {"float32": 0.0, "float16": 1e-3, "bfloat16": 8e-3, "int8": 1 / 254}[encoding]
    for n in names:  # relative to each row's largest value
        err = (back[n] - plain[n]).abs().amax(1) / plain[n].abs().amax(1).clamp_min(1e-12)
        assert float(err.max()) <= tol * 1.0001, (n, float(err.max()))
    # Encoding what a file gave back changes nothing more: the stored values are a fixed point.
    again = lr.decode_delta_tensors(lr.encode_delta_tensors(back, encoding), encoding)
    assert all(torch.allclose(again[n], back[n], rtol=1e-6, atol=0) for n in names)


@pytest.mark.parametrize("how", ["load_deltas", "merge_"])
def test_int8_file_loads_as_its_dequantised_values(how, vit_base):
    targets = lr.make_targets(vit_base, rank=2)
    tensors = _random_tensors(targets)
    stored = lr.encode_delta_tensors(tensors, "int8")
    dequantised = lr.decode_delta_tensors(stored, "int8")
    x = _images(vit_base)
    fn = getattr(lr, how)
    a, b = copy.deepcopy(vit_base), copy.deepcopy(vit_base)
    fn(a, stored, targets, file=FILE, dtype="int8")
    fn(b, dequantised, targets, file=FILE, dtype="float32")
    assert torch.equal(_encode(a, x), _encode(b, x))
    c = copy.deepcopy(vit_base)  # and it is close to, but not the same as, the float32 deltas
    fn(c, tensors, targets, file=FILE, dtype="float32")
    diff = float((_encode(a, x) - _encode(c, x)).abs().max())
    assert 0 < diff < 1e-2 * float(_encode(c, x).abs().max())


def test_int8_checks_name_the_tensor_and_leave_the_model_untouched(vit, vit_base):
    targets = [LowRankTarget(name=P, rank=2, alpha=2.0, shape=[256, 64])]
    good = lr.encode_delta_tensors({f"{P}.lora_A": torch.randn(2, 64), f"{P}.lora_B": torch.randn(256, 2)}, "int8")
    cases = {
        "missing scale": ({k: v for k, v in good.items() if k != f"{P}.lora_B.scale"}, f"{P}.lora_B.scale", "missing"),
        "scale shape": ({**good, f"{P}.lora_A.scale": torch.ones(3)}, f"{P}.lora_A.scale", r"shape \[3\]"),
        "scale dtype": ({**good, f"{P}.lora_A.scale": torch.ones(2, dtype=torch.float64)}, f"{P}.lora_A.scale",
                        "float64"),
        "scale zero": ({**good, f"{P}.lora_B.scale": torch.zeros(256)}, f"{P}.lora_B.scale", "not > 0"),
        "scale nan": ({**good, f"{P}.lora_B.scale": torch.full((256,), float("nan"))}, f"{P}.lora_B.scale", "NaN"),
        "float tensor": ({**good, f"{P}.lora_A": torch.randn(2, 64)}, f"{P}.lora_A", "needs int8"),
        "orphan scale": ({**good, "visual.proj.lora_A.scale": torch.ones(2)}, "visual.proj.lora_A.scale",
                         "unexpected"),
    }
    for name, (tensors, field, match) in cases.items():
        for fn in (lr.load_deltas, lr.merge_):
            with pytest.raises(ProjectorError, match=match) as e:
                fn(vit, tensors, targets, file=FILE, dtype="int8")
            assert e.value.field == field and e.value.file == FILE, name
    assert not any(parametrize.is_parametrized(m) for m in vit.modules())
    for k, v in vit_base.state_dict().items():
        assert torch.equal(vit.state_dict()[k], v), k
    # Scales under a float encoding: the manifest and the file disagree.
    with pytest.raises(ProjectorError, match="int8 scale") as e:
        lr.check_delta_tensors(good | {f"{P}.lora_A": torch.randn(2, 64), f"{P}.lora_B": torch.randn(256, 2)},
                               targets, file=FILE, dtype="float32")
    assert "disagree" in e.value.fix
    with pytest.raises(ProjectorError, match="unknown delta encoding") as e:
        lr.check_delta_tensors(good, targets, file=FILE, dtype="int4")
    assert e.value.field == "projector.dtype"
