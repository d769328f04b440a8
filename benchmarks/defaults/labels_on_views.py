"""How close a bundle's labels are to its teacher's on the views a student actually trains on: the
``hellofmt eval`` loader of one seed (``--protocol quick`` by default: the recipe's crops, flips and
CutMix at the student's side), the projector and the teacher run on the same views. Prints one JSON
line: top-1 agreement, each labeller's top-1 against the views' hard labels, KL(teacher || projector)
at T = 1 and at the protocol's T, the entropy of both at that T, and the KL after multiplying the
projector's logits by a few scales (a calibration check: a best scale far from 1 would mean the
labels are too sharp or too flat at the students' temperature).

    python benchmarks/defaults/labels_on_views.py --dataset shapes32 --bundle CACHE/bundles/shapes32-default-KEY
"""
import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hellofmt.builder.teachers import load_teachers  # noqa: E402
from hellofmt.dataset import DistilledDataset, ds_forward  # noqa: E402
from hellofmt.evaluation import arm_loader  # noqa: E402
from hellofmt.students import get_protocol  # noqa: E402

import data as bdata  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--dataset", required=True)
ap.add_argument("--bundle", required=True)
ap.add_argument("--protocol", default="quick")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--epochs", type=int, default=8, help="loader epochs sampled (of the protocol's)")
ap.add_argument("--out", default="-")
a = ap.parse_args()
torch.set_num_threads(1)
cache = Path(os.environ.get("HELLOFMT_BENCH_CACHE", "/tmp/hellofmt-defaults"))
info = bdata.prepare(a.dataset, cache, device="cpu")
ds = DistilledDataset(a.bundle, device="cpu")
proto = get_protocol(a.protocol).resolved(num_images=len(ds), num_classes=ds.num_classes, image_size=ds.image_size[0],
                                          recipe_scale=ds.manifest.labels.scale,
                                          build_args=ds.manifest.provenance.build_args)
teacher, _ = load_teachers(info["teacher_spec"], num_classes=ds.num_classes,
                           probe=ds.images[:4].float() / 255, device=torch.device("cpu"))
teacher.eval()

views: list[torch.Tensor] = []
logits: list[torch.Tensor] = []


class _Capture(torch.nn.Module):
    """The projector, keeping each label view it is given (the view at the projector's side) and its
    logits on it."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        out = ds_forward(self.proj, x)
        views.append(x.clone())
        logits.append(out.float())
        return out


tapped = copy.copy(ds)
tapped.projector = _Capture(ds.projector)
loader = arm_loader(tapped, proto, a.seed)
hard = torch.cat([h for e in range(min(a.epochs, proto.epochs)) for _, _, h in loader.epoch_batches(e)])
v, p = torch.cat(views), torch.cat(logits)
with torch.no_grad():
    q = torch.cat([teacher(v[i:i + 256]) for i in range(0, len(v), 256)]).float()
t = float(proto.temperature)


def kl(scale: float, temp: float) -> float:
    return float(F.kl_div(F.log_softmax(p * scale / temp, 1), F.log_softmax(q / temp, 1), log_target=True,
                          reduction="batchmean"))


def entropy(x: torch.Tensor) -> float:
    lp = F.log_softmax(x / t, 1)
    return float(-(lp.exp() * lp).sum(1).mean())


res = {"dataset": a.dataset, "bundle": Path(a.bundle).name, "protocol": proto.name, "seed": a.seed,
       "views": len(v), "temperature": t,
       "agreement": round(float((p.argmax(1) == q.argmax(1)).float().mean()), 4),
       "top1_vs_view_label": {"projector": round(float((p.argmax(1) == hard).float().mean()), 4),
                              "teacher": round(float((q.argmax(1) == hard).float().mean()), 4)},
       "kl_t1": round(kl(1.0, 1.0), 4), "kl_t": round(kl(1.0, t), 4),
       "entropy_t": {"projector": round(entropy(p), 4), "teacher": round(entropy(q), 4),
                     "uniform": round(float(torch.log(torch.tensor(float(ds.num_classes)))), 4)},
       "kl_t_by_scale": {str(s): round(kl(s, t), 4) for s in (0.5, 0.75, 1.0, 1.5, 2.0)}}
bdata.emit(res, a.out)
