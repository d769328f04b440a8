"""DD-Ranking's soft-label evaluator (live-teacher mode) run with a bundle's projector as its teacher,
through ``examples/ddranking_eval.py``. Opt-in: set ``HELLOFMT_DDRANKING=1`` with ``ddranking``
installed (``pip install ddranking``; see the example's docstring). About 6 minutes on two CPU cores,
20 s on a GPU.

DD-Ranking 0.2.0 knows only its own dataset names, each with a fixed class count, so the test lays out a
miniature "TinyImageNet" on disk (200 classes of 16-px procedural images, ``train/`` and ``val/``) and
a 200-class tiny bundle; nothing is downloaded and DD-Ranking runs unmodified.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from scripts import load_script

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        os.environ.get("HELLOFMT_DDRANKING") != "1",
        reason="opt-in: runs DD-Ranking's evaluator (~6 min on CPU, 20 s on a GPU); "
        "set HELLOFMT_DDRANKING=1 with ddranking installed",
    ),
]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddranking_eval.py"
NUM_CLASSES = 200  # DD-Ranking's TinyImageNet
SIZE = 16


def _example():
    return load_script(EXAMPLE, "ddranking_eval")


def _write_folder(root: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    from PIL import Image

    for i, (image, c) in enumerate(zip(images, labels.tolist())):
        folder = root / f"{c:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")


def test_ddranking_soft_label_evaluator_with_the_projector_as_teacher(tmp_path):
    pytest.importorskip("ddranking", reason="HELLOFMT_DDRANKING=1 but ddranking is missing: pip install ddranking")
    from hellofmt import DistilledDataset
    from hellofmt.teacher import ProjectorTeacher

    from bundles import make_images, make_tiny_bundle

    example = _example()
    bundle = make_tiny_bundle(tmp_path / "bundle", num_classes=NUM_CLASSES, ipc=1, size=SIZE)
    real = tmp_path / "tiny-imagenet"
    for split, seed in (("train", 1), ("val", 2)):
        _write_folder(real / split, *make_images(NUM_CLASSES, 1, SIZE, seed=seed))

    out = tmp_path / "out"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = example.parse_args(
        [str(bundle), "--dataset", "TinyImageNet", "--real-data-path", str(real), "--out", str(out),
         # ConvNet-4-BN has a DD-Ranking preset for training on the real data (HLR's reference).
         "--model", "ConvNet-4-BN", "--eval-full-data", "--im-size", str(SIZE), "--epochs", "20",
         "--num-eval", "1", "--lr", "0.01", "--batch-size", "256", "--workers", "0", "--device", device]
    )
    ds = DistilledDataset(args.bundle, device=device)
    args.temperature = ds.temperature
    images, ipc = example.write_image_folder(ds, out / "images")
    assert ipc == 1 and len(list(images.glob("*/*.png"))) == NUM_CLASSES
    evaluator = example.build_evaluator(args, ds, ipc, out)
    (teacher,) = evaluator.teacher_models
    assert isinstance(teacher, ProjectorTeacher) and teacher.projector is ds.projector

    seen = {"calls": 0, "pixels": 0, "outside": 0}

    def spy(module, inputs, output):
        (x,) = inputs
        raw = x.float() * module._std + module._mean  # the view before the clamp
        seen["calls"] += 1
        seen["pixels"] += raw.numel()
        seen["outside"] += int(((raw < -0.02) | (raw > 1.02)).sum())
        assert x.shape[-2:] == (SIZE, SIZE) and output.shape == (x.shape[0], NUM_CLASSES)

    teacher.register_forward_hook(spy)
    results = evaluator.compute_metrics(image_path=str(images), syn_lr=args.lr)

    expected = {"hard_label_recovery", "improvement_over_random", "label_robust_score"}
    assert {k.rsplit("_", 1)[0] for k in results} == expected
    assert all(math.isfinite(float(v)) for v in results.values()), results
    # The teacher labelled DD-Ranking's batches (20 epochs on the bundle, 20 on the random subset)...
    assert seen["calls"] >= 40
    # ...normalised the way the example told it: un-normalised, the views are pixels in [0, 1].
    assert seen["outside"] <= 0.001 * seen["pixels"], seen
    assert (out / "scores.csv").is_file() and len(list((out / "random").rglob("*.jpg"))) == NUM_CLASSES
