"""Students on a build option that acts after the distillation (``--adapt-steps``; with ``--reselect``
also the selection's options, such as ``--factor``, which a checkpoint records): copy the checkpoint
of a finished ``sweep.py`` build (kept with ``{"keep_checkpoints": true}``), resume it with the option
changed, so the distillation (and, without ``--reselect``, the images) is reused and only the later
stages run, then ``hellofmt.evaluate --protocol quick`` on the chosen arms; one JSON line per run to ``--out``.

    python benchmarks/defaults/adapt.py --dataset shapes32 --base CACHE/bundles/shapes32-default-KEY \
        --name adapt2000 --over '{"adapt_steps": 2000}' --arms bundle,random
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import images_sha256, projector_sha256  # noqa: E402

import data as bdata  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--dataset", required=True)
ap.add_argument("--base", required=True, help="the default bundle dir (its .ckpt is copied)")
ap.add_argument("--name", required=True)
ap.add_argument("--over", default="{}")
ap.add_argument("--arms", default="bundle,random")
ap.add_argument("--seeds", type=int, default=3)
ap.add_argument("--first-seed", type=int, default=0, help="train seeds F .. F+K-1 (hellofmt eval --first-seed)")
ap.add_argument("--out", default="-")
ap.add_argument("--foundation", help="the base build's foundation: a pretrained preset (clip32, clip64) or a spec "
                "string (default: the dataset's random-weight tiny ViT, as sweep.py)")
ap.add_argument("--reselect", action="store_true",
                help="also redo the image selection (for options such as --factor that the checkpoint records): "
                     "the copied checkpoint keeps only its distillation")
a = ap.parse_args()
try:
    over = json.loads(a.over)
except json.JSONDecodeError as e:
    ap.error(f"--over is not JSON ({e}): write it as --over '{{\"adapt_steps\": 2000}}'")
torch.set_num_threads(1)
cache = Path(os.environ.get("HELLOFMT_BENCH_CACHE", "/tmp/hellofmt-defaults"))
info = bdata.prepare(a.dataset, cache, device="cpu")
fnd = a.foundation or info["foundation"]
if fnd in bdata.PRETRAINED:
    fnd = bdata.pretrained_foundation(fnd, cache)
out = cache / "bundles" / f"{a.dataset}-{a.name}"
ck = Path(str(out) + ".ckpt")
from hellofmt import build_bundle, evaluate  # noqa: E402
from hellofmt.dataset import DistilledDataset  # noqa: E402

t0 = time.perf_counter()
if not (out / "hellofmt.json").is_file():
    if ck.exists():
        shutil.rmtree(ck)
    shutil.copytree(a.base + ".ckpt", ck)
    for f in ck.glob("adapt*"):
        f.unlink()
    if a.reselect:  # keep the distilled deltas; the build record and the selection are made anew
        for f in [ck / "build.json", *ck.glob("images*")]:
            f.unlink()
    build_bundle(str(info["train"]), info["teacher_spec"], fnd, out, overwrite=True, progress=False,
                 ipc=10, device="cpu", seed=0, keep_checkpoints=True, checkpoint_dir=str(ck), resume=True, **over)
build_s = time.perf_counter() - t0
ds = DistilledDataset(str(out), device="cpu")
m = ds.manifest.metrics
t1 = time.perf_counter()
ev = evaluate(str(out), str(info["test"]), arms=a.arms, teacher=info["teacher_spec"], train_data=str(info["train"]),
              seeds=a.seeds, first_seed=a.first_seed, device="cpu", progress=False)
eval_s = time.perf_counter() - t1
d = ev.to_dict()
# the fields compare.py reads, as sweep.py writes them
res = {"dataset": a.dataset, "config": a.name, "overrides": over, "build_s": round(build_s, 1),
       "eval_s": round(eval_s, 1), "first_seed": a.first_seed, "foundation": a.foundation or Path(fnd).name,
       "images_sha256": images_sha256(ds), "projector_sha256": projector_sha256(out),
       "distill_steps": m.get("distill.steps"),
       "agreement_heldout": m.get("fidelity.heldout.top1_agreement"),
       "agreement_synthetic": m.get("fidelity.synthetic.top1_agreement"),
       "kl_synthetic": m.get("fidelity.synthetic.kl"), "adapt_train_agreement": m.get("adapt.train_agreement"),
       "random_adapted": d["random_adapted"],
       "arms": {k: v["accuracies"] for k, v in d["arms"].items()},
       "mean": {k: round(v["mean"], 4) for k, v in d["arms"].items()},
       "std": {k: round(v["std"], 4) for k, v in d["arms"].items()},
       "seconds": {k: v["seconds"] for k, v in d["arms"].items()}}
bdata.emit(res, a.out)
