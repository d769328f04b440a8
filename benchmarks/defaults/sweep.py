"""Choose build defaults by the students they train: build a bundle per configuration, then train
students on it (bundle labels, hard labels, the teacher online, a random real subset labelled by the
same projector), several seeds, and append one JSON line per (dataset, config) to ``--out``.

    python benchmarks/defaults/sweep.py --dataset digits32 --config default --config factor1 --seeds 3

The student protocol is ``hellofmt eval --protocol quick`` when ``--use-eval`` is given, otherwise a
fixed one like a user's first script: a small CNN, ``--steps`` steps of batch ``--batch`` through
``DistilledDataset.loader`` at temperature ``--temperature`` with the bundle's recipe (crop scale,
CutMix). See benchmarks/README.md for the tables this produced.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import images_sha256, projector_sha256  # noqa: E402

import data as bdata  # noqa: E402

# Build options per named configuration (on top of hellofmt's current defaults).
CONFIGS: dict[str, dict] = {
    "default": {},
    "v010": {"factor": 2, "candidates": 4, "selection": "confidence", "min_steps": 0, "scale": [0.08, 1.0]},
    "factor1": {"factor": 1},
    "factor2": {"factor": 2},
    "conf": {"selection": "confidence"},
    "kmeans": {"selection": "kmeans"},
    "randsel": {"selection": "random"},
    "cand16": {"candidates": 16},
    "cand4": {"candidates": 4},
    "scale08": {"scale": [0.08, 1.0]},
    "scale25": {"scale": [0.25, 1.0]},
    "scale50": {"scale": [0.5, 1.0]},
    "steps0": {"min_steps": 0},
    "steps1000": {"min_steps": 1000},
    "steps2000": {"min_steps": 2000},
    "refine50": {"refine_steps": 50},
    "mse": {"loss": "mse"},
    "klT4": {"temperature": 4.0},
    "klT1": {"temperature": 1.0},
    "rank8": {"rank": 8, "head_rank": 8},
    "rank8-head128": {"rank": 8, "head_rank": 128},
    "lr01": {"lr": 0.01},
    "lr002": {"lr": 0.002},
    "distmix": {"distill_mix": "cutmix"},
    "adapt2000": {"adapt_steps": 2000},
    # Not a build option: the build's teachers are checkpoints of the teacher's own training run, averaged
    # (data.weak_teachers); the eval's teacher arm keeps the finished teacher.
    "weak4": {"weak_teachers": [10, 20, 30, 40]},
}


def small_cnn(num_classes: int, size: int, width: int = 16):
    return bdata.net(num_classes, size, width)


def train_student(ds, arm: str, teacher, *, steps: int, batch: int, T: float, seed: int, size: int):
    torch.manual_seed(seed)
    student = small_cnn(ds.num_classes, size).to(ds.device)
    loader = ds.loader(batch_size=batch, image_size=size, seed=seed, temperature=T)
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    student.train()
    done, epoch = 0, 0
    while done < steps:
        loader.set_epoch(epoch)
        epoch += 1
        for images, soft, hard in loader:
            out = student(images)
            if arm == "hard":
                loss = F.cross_entropy(out, hard)
            else:
                if arm == "teacher":
                    with torch.no_grad():
                        soft = F.softmax(teacher(images) / T, 1)
                loss = F.kl_div(F.log_softmax(out / T, 1), soft, reduction="batchmean") * T * T
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done >= steps:
                break
    return student.eval()


@torch.no_grad()
def accuracy(model, x, y, device) -> float:
    correct = 0
    for i in range(0, len(x), 256):
        correct += (model(x[i:i + 256].to(device).float() / 255).argmax(1).cpu() == y[i:i + 256]).sum().item()
    return correct / len(x)


def random_subset(ds, train_dir: Path, seed: int):
    """The bundle's dataset with its images replaced by the same number of random real training
    images per class (whole images at the bundle's size), labelled by the same projector."""
    from hellofmt.builder.inputs import load_all, scan_image_folder

    folder = scan_image_folder(str(train_dir))
    labels = torch.tensor([c for _, c in folder.samples])
    counts = torch.bincount(ds.targets.cpu(), minlength=ds.num_classes)
    g = torch.Generator().manual_seed(1000 + seed)
    pick = []
    for c in range(ds.num_classes):
        pool = (labels == c).nonzero().flatten()
        pick += pool[torch.randperm(pool.numel(), generator=g)[: int(counts[c])]].tolist()
    imgs, labs = load_all(folder, pick, int(ds.images.shape[-1]))
    if hasattr(ds, "with_images"):
        return ds.with_images(imgs, labs)
    r = copy.copy(ds)
    r.images = imgs.to(ds.images.device)
    r.targets = labs.to(ds.images.device)
    r._targets_cpu = labs
    return r


def run(args, name: str, overrides: dict, info: dict) -> dict:
    from hellofmt import build_bundle
    from hellofmt.dataset import DistilledDataset

    opts = {"ipc": args.ipc, "device": args.device, "seed": 0, **overrides}
    fnd = args.foundation or info["foundation"]
    key = hashlib.sha1(json.dumps([args.dataset, opts] + ([fnd] if args.foundation else []),
                                  sort_keys=True).encode()).hexdigest()[:10]
    weak = opts.pop("weak_teachers", None)
    teachers = bdata.weak_teachers(info, tuple(weak), device=args.device) if weak else info["teacher_spec"]
    out = Path(args.cache) / "bundles" / f"{args.dataset}-{name}-{key}"
    t0 = time.perf_counter()
    timings = None  # seconds per build stage, when this run built the bundle
    if not (out / "hellofmt.json").is_file():
        built = build_bundle(str(info["train"]), teachers, fnd, out, overwrite=True,
                             progress=not args.quiet, **opts)
        timings = {k: round(v, 1) for k, v in built["timings"].items()}
    build_s = time.perf_counter() - t0
    ds = DistilledDataset(str(out), device=args.device)
    m = ds.manifest.metrics
    teacher = info["teacher"].to(args.device)
    arms = {"bundle": [], "hard": [], "teacher": [], "random": []}
    eval_s = None
    if args.use_eval:  # hellofmt eval --protocol quick: the protocol of the issue's Done-when
        from hellofmt import evaluate

        t1 = time.perf_counter()
        ev = evaluate(str(out), str(info["test"]), teacher=info["teacher_spec"], train_data=str(info["train"]),
                      seeds=args.seeds, first_seed=args.first_seed, device=args.device, progress=False, arms=args.arms)
        eval_s = time.perf_counter() - t1
        arms = {k: list(v["accuracies"]) for k, v in ev.to_dict()["arms"].items()}
    for seed in range(0 if args.use_eval else args.seeds):
        rnd = random_subset(ds, info["train"], seed)
        for arm in arms:
            src = rnd if arm == "random" else ds
            st = train_student(src, arm, teacher, steps=args.steps, batch=args.batch, T=args.temperature, seed=seed,
                               size=info["size"])
            arms[arm].append(accuracy(st, info["test_x"], info["test_y"], args.device))
    res = {"dataset": args.dataset, "config": name, "overrides": overrides, "ipc": args.ipc,
           "first_seed": args.first_seed if args.use_eval else 0,
           "foundation": getattr(args, "foundation_name", None) or Path(fnd).name,
           "image_size": int(ds.images.shape[-1]),
           "teacher_acc": info["teacher_acc"], "build_s": round(build_s, 1),
           "eval_s": None if eval_s is None else round(eval_s, 1), "threads": torch.get_num_threads(),
           "timings": timings,
           "agreement_heldout": m.get("fidelity.heldout.top1_agreement"),
           # Arms other than bundle and random depend on the images alone: rows with the same images_sha256
           # share them (run with --arms bundle,random and pair with the row that has them).
           "images_sha256": images_sha256(ds), "projector_sha256": projector_sha256(out),
           "distill_steps": m.get("distill.steps"), "init_teacher_top1": m.get("images.init_teacher_top1"),
           "arms": {k: [round(v, 4) for v in vs] for k, vs in arms.items()},
           "mean": {k: round(float(np.mean(v)), 4) for k, v in arms.items()},
           "std": {k: round(float(np.std(v)), 4) for k, v in arms.items()}}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True, choices=bdata.DATASETS)
    ap.add_argument("--config", action="append", default=[], help="a name from CONFIGS, or NAME=JSON overrides")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="with --use-eval: the first student seed (add seeds to an earlier row)")
    ap.add_argument("--foundation", help="the foundation: a spec string, or a pretrained preset of "
                    "benchmarks/foundations/pretrain.py (clip32, clip64: made on first use and cached) "
                    "(default: the dataset's random-weight tiny ViT, data.FOUNDATIONS)")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cache", default=os.environ.get("HELLOFMT_BENCH_CACHE", "/tmp/hellofmt-defaults"))
    ap.add_argument("--out", default="-")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--use-eval", action="store_true", help="students by hellofmt.evaluate (--protocol quick)")
    ap.add_argument("--arms", help="with --use-eval: the arms to train (comma-separated; default: all four). "
                    "hard and teacher depend on the images alone, so a lever that keeps the images needs only "
                    "bundle,random (pair by images_sha256)")
    ap.add_argument("--prepare-only", action="store_true", help="make the data and teacher, then stop")
    args = ap.parse_args()
    configs = []
    for c in args.config or ["default"]:
        if "=" in c:
            name, js = c.split("=", 1)
            try:
                configs.append((name, json.loads(js)))
            except json.JSONDecodeError as e:
                ap.error(f"--config {name}=...: the overrides are not JSON ({e}): write them as NAME='{{\"rank\": 8}}'")
        elif c in CONFIGS:
            configs.append((c, CONFIGS[c]))
        else:
            ap.error(f"unknown --config {c!r}: one of {', '.join(CONFIGS)}, or NAME=JSON overrides")
    torch.set_num_threads(args.threads)
    info = bdata.prepare(args.dataset, Path(args.cache), device=args.device)
    args.foundation_name = args.foundation
    if args.foundation in bdata.PRETRAINED:
        args.foundation = bdata.pretrained_foundation(args.foundation, Path(args.cache))
    if args.prepare_only:
        print(f"{args.dataset}: teacher {info['teacher_acc']:.1%} on {len(info['test_y'])} held-out images")
        return
    for name, overrides in configs:
        res = run(args, name, overrides, info)
        bdata.emit(res, args.out)


if __name__ == "__main__":
    main()
