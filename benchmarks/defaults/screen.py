"""Screen projector-distillation settings by label quality alone, before students: for each
configuration, distil a fresh projector on a dataset's training images exactly as ``hellofmt build``
does (same views, loss, schedule), then measure it against the teacher on the held-out images
(top-1 agreement, and KL at T = 1 and at the student's T = 4). One process, configurations in turn:
cheap enough to run many on one device before the student sweep (``sweep.py``) confirms the best.

    python benchmarks/defaults/screen.py --dataset digits32 --config default --config 'r16={"rank":16}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as bdata  # noqa: E402


def screen(info: dict, name: str, overrides: dict, device: str) -> dict:
    from hellofmt.builder.checkpoint import CheckpointStore
    from hellofmt.builder.config import BuildConfig
    from hellofmt.builder.dist import World
    from hellofmt.builder.distill import DistillConfig, distill_projector
    from hellofmt.builder.fidelity import measure
    from hellofmt.builder.inputs import TensorData, dataset_for, load_all, scan_image_folder
    from hellofmt.builder.teachers import load_teachers
    from hellofmt.foundation import load_foundation
    from hellofmt.projector import DEFAULT_TEMPLATES, Projector

    dev = torch.device(device)
    size = info["size"]
    c = BuildConfig(ipc=10, **overrides).resolved(size)
    lsize = c.load_size  # resolved as the build reads originals (config.load_side)
    folder = scan_image_folder(str(info["train"]))
    x, y = load_all(folder, list(range(len(folder.samples))), lsize)
    data = TensorData(x, y, list(folder.names))
    test = scan_image_folder(str(info["test"]))
    tx, ty = load_all(test, list(range(len(test.samples))), size)
    tx, ty = tx.to(dev), ty.to(dev)
    teacher, _ = load_teachers([info["teacher_spec"]], num_classes=len(folder.names), probe=tx[:16].float() / 255,
                               device=dev)
    torch.manual_seed(c.seed)
    fnd = load_foundation(info["foundation"], device=dev)
    proj = Projector(fnd, list(folder.names), list(c.templates or DEFAULT_TEMPLATES)).to(dev)
    proj.attach_deltas(rank=c.rank, alpha=c.alpha, targets=list(c.targets) if c.targets else None,
                       head_rank=c.head_rank, head_alpha=c.head_alpha, generator=torch.Generator().manual_seed(c.seed))
    cfg = DistillConfig(steps=c.steps, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay,
                        loss=c.loss, ce_weight=c.ce_weight, temperature=c.temperature, view_size=size,
                        mix=c.distill_mix or c.mix, scale=tuple(c.scale), min_steps=c.min_steps, checkpoint_every=0,
                        seed=c.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        st = distill_projector(proj, teacher, dataset_for(data, list(range(len(y))), lsize), cfg,
                               world=World(0, 1, 0, dev, False), store=CheckpointStore(tmp, enabled=False),
                               progress=False)
    secs = time.perf_counter() - t0
    proj.eval()
    out = {"dataset": info["root"].name, "config": name, "overrides": overrides, "steps": st["distill_steps"],
           "train_agreement": round(st["agreement"], 4), "seconds": round(secs, 1)}
    for T in (1.0, 4.0):
        m = measure(proj, teacher, tx, ty, view_size=size, views=4, temperature=T, mix="none", scale=tuple(c.scale))
        out[f"kl_T{T:g}"] = round(m["kl"], 4)
        out.update({"agreement": round(m["top1_agreement"], 4), "projector_top1": round(m["projector_top1"], 4),
                    "teacher_top1": round(m["teacher_top1"], 4)})
    whole = measure(proj, teacher, tx, ty, view_size=size, views=1, mix="none", scale=(1.0, 1.0))
    out["agreement_whole"] = round(whole["top1_agreement"], 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True, choices=bdata.DATASETS)
    ap.add_argument("--config", action="append", default=[], help="NAME or NAME=JSON BuildConfig overrides")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cache", default=os.environ.get("HELLOFMT_BENCH_CACHE", "/tmp/hellofmt-defaults"))
    ap.add_argument("--out", default="-")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = bdata.prepare(args.dataset, Path(args.cache), device=args.device)
    for c in args.config or ["default"]:
        name, _, js = c.partition("=")
        bdata.emit(screen(info, name, json.loads(js) if js else {}, args.device), args.out)


if __name__ == "__main__":
    main()
