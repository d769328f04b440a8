"""`DistilledDataset.as_teacher`: the projector behind a teacher model's interface (normalised images
in, logits out), as SRe2L's train_KD, RDED's validation and DD-Ranking call a teacher."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hellofmt import DistilledDataset
from hellofmt.errors import InputError
from hellofmt.teacher import IMAGENET_MEAN, IMAGENET_STD, ProjectorTeacher


@pytest.fixture(scope="module")
def ds(tiny_bundle):
    return DistilledDataset(tiny_bundle, device="cpu")


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _images(ds, size: int | None = None) -> torch.Tensor:
    x = ds.images.float() / 255
    return x if size is None else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)


def test_logits_equal_the_projectors_on_the_unnormalised_images(ds):
    x = _images(ds)
    teacher = ds.as_teacher()
    assert isinstance(teacher, ProjectorTeacher) and isinstance(teacher, nn.Module)
    out = teacher(_normalise(x, IMAGENET_MEAN, IMAGENET_STD))
    assert out.shape == (len(ds), ds.num_classes) and out.dtype == torch.float32
    torch.testing.assert_close(out, ds.logits(x), rtol=1e-4, atol=1e-4)
    # Another tool's normalisation (CIFAR's, as DD-Ranking uses for CIFAR-10/100).
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    torch.testing.assert_close(ds.as_teacher(mean, std)(_normalise(x, mean, std)), ds.logits(x), rtol=1e-4, atol=1e-4)
    # Images in [0, 1]: mean 0, std 1 is the identity.
    torch.testing.assert_close(ds.as_teacher((0, 0, 0), (1, 1, 1))(x), ds.logits(x))


def test_the_wrong_normalisation_gives_other_logits(ds):
    """Guards the test above: the un-normalisation is really applied."""
    x = _images(ds)
    assert not torch.allclose(ds.as_teacher()(x), ds.logits(x), atol=1e-3)


def test_out_of_range_values_are_clamped_like_pixels(ds):
    x = _images(ds)
    z = _normalise(x, IMAGENET_MEAN, IMAGENET_STD)
    teacher = ds.as_teacher()
    z_far = z.clone()
    z_far[:, :, :4] = 50.0  # far above white after un-normalising
    z_white = z.clone()
    z_white[:, :, :4] = _normalise(torch.ones(1, 3, 1, 1), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(teacher(z_far), teacher(z_white))


def test_temperature_divides_the_logits(ds):
    z = _normalise(_images(ds), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(ds.as_teacher(temperature=4)(z), ds.as_teacher()(z) / 4)


def test_any_input_size(ds):
    teacher = ds.as_teacher()
    for h, w in [(17, 23), (64, 64), (224, 224)]:
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        out = teacher(_normalise(x, IMAGENET_MEAN, IMAGENET_STD))
        assert out.shape == (2, ds.num_classes) and torch.isfinite(out).all()
        torch.testing.assert_close(out, ds.logits(x), rtol=1e-4, atol=1e-4)


def test_output_follows_the_input_dtype(ds):
    z = _normalise(_images(ds), IMAGENET_MEAN, IMAGENET_STD)
    teacher = ds.as_teacher()
    ref = teacher(z)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        out = teacher(z.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_always_eval_and_frozen(ds):
    teacher = ds.as_teacher()
    assert not teacher.training
    assert teacher.train() is teacher and teacher.train(True) is teacher
    assert not teacher.training and not ds.projector.training and not ds.projector.clip.training
    assert teacher.eval() is teacher and not teacher.training
    assert all(not p.requires_grad for p in ds.projector.parameters())


def test_state_dict_holds_no_projector_weights(ds):
    teacher = ds.as_teacher()
    assert teacher.state_dict() == {}
    assert list(teacher.parameters()) == [] and list(teacher.buffers()) == []
    teacher.load_state_dict({})  # a tool that round-trips the (empty) state still works
    dtypes = {p.dtype for p in ds.projector.parameters()}
    teacher.half().to(torch.float64)  # casts nothing of the dataset's projector
    assert {p.dtype for p in ds.projector.parameters()} == dtypes
    assert teacher.projector is ds.projector  # shared, not copied


def test_gradients_flow_to_an_input_that_requires_them(ds):
    teacher = ds.as_teacher()
    z = _normalise(_images(ds), IMAGENET_MEAN, IMAGENET_STD)
    assert not teacher(z).requires_grad  # no graph without an input that asks for one
    z = z.clone().requires_grad_(True)
    out = teacher(z)
    assert out.requires_grad
    out[:, 0].sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in ds.projector.parameters())


class _Student(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def test_drop_in_teacher_for_an_sre2l_rded_style_kd_step(ds):
    """The loop of SRe2L's train_KD / RDED's validation: Normalize(ImageNet), a DataParallel-wrapped
    teacher with its parameters frozen and put in eval mode, KLDiv(log_softmax(s/T), softmax(t/T)).
    With a GPU, student and batch live there and DataParallel scatters to cuda:0: the CPU projector's
    logits come back to cuda:0; without one, DataParallel calls the module itself."""
    torch.manual_seed(0)
    T = 4.0
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = nn.DataParallel(ds.as_teacher())
    teacher.eval()
    for p in teacher.parameters():  # what both tools do; nothing to freeze here
        p.requires_grad = False
    student = _Student(ds.num_classes).to(dev)
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=0.5, momentum=0.9)
    kl = nn.KLDivLoss(reduction="batchmean")
    images = _normalise(_images(ds), IMAGENET_MEAN, IMAGENET_STD).to(dev)
    losses = []
    for _ in range(30):
        soft = F.softmax(teacher(images).detach() / T, dim=1)
        loss = kl(F.log_softmax(student(images) / T, dim=1), soft)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert soft.device == images.device
    torch.testing.assert_close(soft.cpu(), ds.soft_labels(_images(ds), temperature=T), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"mean": (0.5, 0.5, 0.5, 0.5)}, "mean"),
        ({"mean": (0.5, float("nan"), 0.5)}, "mean"),
        ({"mean": "0.5"}, "mean"),
        ({"mean": 0.5}, "mean"),
        ({"mean": (0.5, True, 0.5)}, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"std": (0.2, -0.1, 0.2)}, "std"),
        ({"std": (0.2, float("inf"), 0.2)}, "std"),
        ({"std": [0.2]}, "std"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_bad_arguments_raise_input_error_naming_the_field(ds, kwargs, field):
    with pytest.raises(InputError) as exc:
        ds.as_teacher(**kwargs)
    assert exc.value.field == field


def test_mean_and_std_may_be_tensors_or_lists(ds):
    z = _normalise(_images(ds), IMAGENET_MEAN, IMAGENET_STD)
    teacher = ds.as_teacher(torch.tensor(IMAGENET_MEAN, dtype=torch.float64), list(IMAGENET_STD))
    assert teacher.mean == IMAGENET_MEAN and teacher.std == IMAGENET_STD
    torch.testing.assert_close(teacher(z), ds.as_teacher()(z))


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
        torch.zeros(3, 8, 8),
        torch.zeros(2, 1, 8, 8),
        torch.zeros(0, 3, 8, 8),
        [[0.0]],
    ],
    ids=["uint8", "no-batch-dim", "one-channel", "empty", "not-a-tensor"],
)
def test_bad_images_raise_input_error(ds, images):
    with pytest.raises(InputError) as exc:
        ds.as_teacher()(images)
    assert exc.value.field == "images"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: inputs on the CPU, the projector on the GPU")
def test_inputs_on_another_device_are_moved_and_the_output_comes_back(tiny_bundle):
    gpu = DistilledDataset(tiny_bundle, device="cuda")
    teacher = gpu.as_teacher()
    x = _images(gpu).cpu()
    z = _normalise(x, IMAGENET_MEAN, IMAGENET_STD)
    out = teacher(z)
    assert out.device.type == "cpu" and out.dtype == torch.float32
    assert teacher(z.cuda()).device.type == "cuda"
    # bf16 autocast on CUDA: close to the CPU reference, not equal.
    ref = DistilledDataset(tiny_bundle, device="cpu").logits(x)
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    torch.testing.assert_close(out, gpu.logits(x).cpu())
