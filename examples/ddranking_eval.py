"""Score a hellofmt bundle with DD-Ranking, the bundle's projector labelling every view as a live teacher.

DD-Ranking (NUS-HPC-AI-Lab, https://github.com/NUS-HPC-AI-Lab/DD-Ranking) scores a distilled set by
its improvement over a random real subset of the same size trained the same way (IOR) and by how much
of the real data's accuracy it recovers with hard labels (HLR), combined into a label-robust score
(LRS). Its soft-label evaluator, ``ddranking.metrics.LabelRobustScoreSoft``, has a mode
(``soft_label_mode="M"``) in which teacher models label each augmented batch online. This script:

1. opens the bundle with :class:`hellofmt.DistilledDataset`;
2. writes its images as an image folder (``OUT/images/00000/00000.png``, one folder per class in the
   bundle's class order, which ``ImageFolder`` keeps because the names sort that way);
3. builds ``ds.as_teacher(mean, std)`` with the normalisation DD-Ranking applies to that dataset
   (CIFAR-10/100: its CIFAR mean and std; TinyImageNet and ImageNet-1K: ImageNet's), and the same
   ``Normalize`` in the student's training transform, so teacher and student see the same view;
4. runs ``LabelRobustScoreSoft(..., soft_label_mode="M").compute_metrics(image_path=...)`` with the
   projector as its only teacher (the random real subset is labelled by the same projector), and
   prints and saves (``OUT/results.json``, ``OUT/scores.csv``) HLR, IOR and LRS.

Run::

    python examples/ddranking_eval.py BUNDLE --dataset ImageNet1K --real-data-path /data/imagenet \\
        --model ResNet-18-BN --out runs/ddranking [--epochs 300 --num-eval 5 --device cuda]

Install DD-Ranking (tested with ddranking 0.2.0)::

    pip install ddranking

Its metadata pins ``numpy<2`` and ``scipy<1.16``; if pip would downgrade your stack (or torch) for that,
install it without dependencies and add the few it imports instead::

    pip install --no-deps ddranking && pip install kornia pandas tqdm pyyaml

What DD-Ranking 0.2.0 needs (read from its source):

- ``--dataset`` is one of its names: ``CIFAR10``, ``CIFAR100`` (torchvision's, under
  ``--real-data-path``; downloaded if absent), ``TinyImageNet`` or ``ImageNet1K`` (image folders
  ``train/`` and ``val/`` under ``--real-data-path``); the number of classes is fixed by the name (10,
  100, 200, 1000) and must be the bundle's, in the same order (``ImageFolder`` sorts class folders by
  name: ImageNet's synset folders give the standard index order). Its top-5 accuracy needs >= 5 classes.
- The real data must be on disk; nothing else is downloaded: the students are built untrained and the
  teacher is the projector (no ``teacher_dir`` checkpoints are loaded).
- Without ``--eval-full-data`` the real-data accuracy (for HLR) comes from its cache, which holds
  only ``ImageNet1K-ResNet-18-BN`` and ``TinyImageNet-ResNet-18-BN``; other pairs need
  ``--eval-full-data``, which trains on the real data with its preset for that pair (presets exist for
  those two and for ``TinyImageNet-ConvNet-4-BN``, ``CIFAR10/100-ConvNet-3[-BN]``).
- It validates every 20 epochs, so ``--epochs`` below 20 reports 0 accuracies.
- Without ``--lr`` it searches 5 learning rates for every student (DD-Ranking's default).
- Under ``torchrun`` pass ``--dist``: DD-Ranking shards its loaders by rank; each rank opens the
  bundle on its own GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from PIL import Image

from hellofmt import DistilledDataset
from hellofmt.teacher import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

DATASETS = ("CIFAR10", "CIFAR100", "TinyImageNet", "ImageNet1K")
NUM_CLASSES = {"CIFAR10": 10, "CIFAR100": 100, "TinyImageNet": 200, "ImageNet1K": 1000}
DEFAULT_IM_SIZE = {"CIFAR10": 32, "CIFAR100": 32, "TinyImageNet": 64, "ImageNet1K": 224}
# What DD-Ranking 0.2.0's ddranking.utils.data.get_dataset normalises each dataset with.
NORMALISATION = {
    "CIFAR10": (CIFAR_MEAN, CIFAR_STD),
    "CIFAR100": (CIFAR_MEAN, CIFAR_STD),
    "TinyImageNet": (IMAGENET_MEAN, IMAGENET_STD),
    "ImageNet1K": (IMAGENET_MEAN, IMAGENET_STD),
}


def write_image_folder(ds: DistilledDataset, root: Path) -> tuple[Path, int]:
    """Write the bundle's images as PNGs under ``root/<class index:05d>/<n:05d>.png`` (``root`` is
    recreated) and return ``(root, images per class)``. Every class must have at least one image:
    ``ImageFolder`` would otherwise renumber the classes after an empty one."""
    counts = torch.bincount(ds.targets.cpu(), minlength=ds.num_classes).tolist()
    empty = [ds.classes[c] for c, n in enumerate(counts) if n == 0]
    if empty:
        raise SystemExit(f"error: classes without images in the bundle: {empty[:5]}; DD-Ranking needs every class")
    if root.exists():
        shutil.rmtree(root)
    seen = [0] * ds.num_classes
    for i in range(len(ds)):
        image, c = ds[i]
        folder = root / f"{c:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(folder / f"{seen[c]:05d}.png")
        seen[c] += 1
    if len(set(counts)) > 1:
        print(f"note: images per class range over {min(counts)}..{max(counts)}; the random subset uses the mean")
    return root, max(1, round(sum(counts) / ds.num_classes))


def build_evaluator(args: argparse.Namespace, ds: DistilledDataset, ipc: int, out: Path):
    """DD-Ranking's soft-label evaluator in live-teacher mode, with the projector as its teacher."""
    # DD-Ranking is an optional dependency (and pulls in torchvision, kornia, pandas): imported only
    # here, so that --help works without it.
    from ddranking.metrics import LabelRobustScoreSoft
    from torchvision import transforms

    mean, std = NORMALISATION[args.dataset]
    size = args.im_size or DEFAULT_IM_SIZE[args.dataset]
    train_transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(args.min_scale, 1.0), antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=mean, std=std),
        ]
    )
    aug_params = {"cutmix": {"beta": args.mix_beta}, "mixup": {"lambda": args.mix_beta}}.get(args.aug, {})
    optimizer_kwargs = {"sgd": 0.9, "adam": (0.9, 0.999), "adamw": (0.9, 0.999)}
    evaluator = LabelRobustScoreSoft(
        dataset=args.dataset,
        real_data_path=str(args.real_data_path),
        ipc=ipc,
        model_name=args.model,
        soft_label_criterion="kl",
        loss_fn_kwargs={"temperature": args.temperature, "scale_loss": False},
        data_aug_func=args.aug,
        aug_params=aug_params,
        soft_label_mode="M",  # labels come from the teacher models, online, for every augmented batch
        optimizer=args.optimizer,
        lr_scheduler=args.scheduler,
        step_size=args.step_size,
        weight_decay=args.weight_decay,
        momentum=optimizer_kwargs[args.optimizer],
        num_eval=args.num_eval,
        im_size=(size, size),
        num_epochs=args.epochs,
        use_zca=False,  # the teacher un-normalises with mean/std; ZCA-whitened inputs cannot be undone so
        random_data_format="image",
        random_data_path=str(out / "random"),
        real_batch_size=args.batch_size,
        syn_batch_size=args.batch_size,
        save_path=str(out / "scores.csv"),
        eval_full_data=args.eval_full_data,
        num_workers=args.workers,
        teacher_dir=str(out / "no-teacher-checkpoints"),
        teacher_model_names=[],  # nothing to load: the projector is set as the teacher below
        custom_train_trans=train_transform,
        custom_val_trans=None,  # DD-Ranking's own validation transform, as on its leaderboard
        device=args.device,
        dist=args.dist,
    )
    if evaluator.num_classes != ds.num_classes:
        raise SystemExit(
            f"error: {args.dataset} has {evaluator.num_classes} classes in DD-Ranking, the bundle {ds.num_classes}"
        )
    # Set after construction: DD-Ranking wraps the teachers it loads itself in DDP under --dist, which a
    # module without trainable parameters does not need (and DDP refuses).
    evaluator.teacher_models = [ds.as_teacher(mean=mean, std=std)]
    return evaluator


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("bundle", help="a bundle directory or a Hub id (user/name)")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="DD-Ranking's name of the real dataset")
    p.add_argument("--real-data-path", required=True, type=Path, help="where DD-Ranking finds the real dataset")
    p.add_argument("--model", default="ResNet-18-BN", help="the student, by DD-Ranking's name (ConvNet-3, ...)")
    p.add_argument("--out", type=Path, default=Path("ddranking-out"), help="working folder: images/, random/, scores")
    p.add_argument("--im-size", type=int, default=None, help="student input size (default: the dataset's)")
    p.add_argument("--epochs", type=int, default=300, help="epochs per student (>= 20: DD-Ranking validates every 20)")
    p.add_argument("--num-eval", type=int, default=5, help="repetitions (DD-Ranking's num_eval)")
    p.add_argument("--lr", type=float, default=None, help="the synthetic set's learning rate (default: search 5)")
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="adamw")
    p.add_argument("--scheduler", choices=("cosine", "cosineannealing", "step"), default="cosine")
    p.add_argument("--step-size", type=int, default=None, help="StepLR step (epochs) with --scheduler step")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="KL temperature (default: the bundle's recipe)")
    p.add_argument("--aug", choices=("cutmix", "mixup", "none"), default="cutmix", help="batch augmentation")
    p.add_argument("--mix-beta", type=float, default=1.0, help="Beta parameter of cutmix/mixup")
    p.add_argument("--min-scale", type=float, default=0.08, help="RandomResizedCrop's smallest area fraction")
    p.add_argument("--eval-full-data", action="store_true", help="train on the real data for HLR (else its cache)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dist", action="store_true", help="under torchrun: DD-Ranking's distributed mode")
    args = p.parse_args(argv)
    if args.scheduler == "step" and args.step_size is None:
        p.error("--scheduler step needs --step-size")
    if args.aug == "none":
        args.aug = None
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    if args.dist and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    ds = DistilledDataset(args.bundle, device=device)
    if args.temperature is None:
        args.temperature = ds.temperature
    args.out.mkdir(parents=True, exist_ok=True)
    images, ipc = write_image_folder(ds, args.out / "images")
    evaluator = build_evaluator(args, ds, ipc, args.out)
    try:
        results = evaluator.compute_metrics(image_path=str(images), syn_lr=args.lr)
    except UnboundLocalError:
        # DD-Ranking 0.2.0 computes its summary on rank 0 only, and the other ranks' return fails.
        if args.dist and int(os.environ.get("RANK", "0")) != 0:
            return {}
        raise
    results = {k: float(v) for k, v in results.items()}
    print(json.dumps(results, indent=2))
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
