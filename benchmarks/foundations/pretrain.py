"""Pretrain a small open_clip model on this machine, with CLIP's contrastive objective, on
image-caption pairs generated here (``captions.py``: rendered characters, compositional shapes).

The foundations that hellofmt's defaults are chosen under: no weights can be downloaded here, and a
random-weight foundation is the method's worst case, not its use. One command each::

    python benchmarks/foundations/pretrain.py --preset clip32   # 32 px: digits32, shapes32 (~30 min on one core)
    python benchmarks/foundations/pretrain.py --preset clip64   # 64 px: shapes64 (~15 min more)

What it uses from open_clip: the model (``create_model`` on the JSON config, registered with
``add_model_config``), its BPE tokenizer (``get_tokenizer``) and its loss (``open_clip.loss.ClipLoss``);
written here: the generated data and a plain AdamW/cosine loop. Deterministic for a seed and a thread
count (``--threads``, default 1): the data of step k comes from ``numpy.random.default_rng([seed, k])``.

It writes ``OUT/NAME.json`` (the model config: ``--foundation OUT/NAME.json:OUT/NAME.safetensors``),
``OUT/NAME.safetensors`` (float32; ``--half`` adds ``NAME-fp16.safetensors``) and ``OUT/NAME.log.json``
(settings, loss curve, time, and each evaluation set's zero-shot top-1 with the class names only,
through hellofmt's own zero-shot head: ``hellofmt.projector.Projector`` with its default templates).
``OUT`` defaults to ``$HELLOFMT_FOUNDATIONS`` or ``~/.cache/hellofmt/foundations``; weights are not
committed (they are 10-20 MB); the benchmark scripts call :func:`ensure` to make them on first use.

No evaluation image enters pretraining: the evaluation sets (``benchmarks/defaults/data.py``) are only
read at the end, for the zero-shot figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "defaults"))
import captions  # noqa: E402

DEFAULT_OUT = Path(os.environ.get("HELLOFMT_FOUNDATIONS", Path.home() / ".cache" / "hellofmt" / "foundations"))

# The presets: the model configs live beside this file (clip32.json, clip64.json).
PRESETS: dict[str, dict] = {
    "clip32": {"config": "clip32.json", "steps": 3500, "batch": 256, "lr": 1e-3, "sources": ["glyphs", "shapes"],
               "evals": ["digits32", "shapes32", "shapes64"]},
    # clip64 starts from clip32 (the same 16 patches, each now 16 px: see init_state), then learns 64 px.
    "clip64": {"config": "clip64.json", "steps": 1500, "batch": 256, "lr": 5e-4, "warmup": 100,
               "sources": ["glyphs", "shapes"], "init": "clip32", "evals": ["shapes64", "digits32", "shapes32"]},
}
# What this loop sustains against hellofmt's (generous) cost estimate of the config, measured on the
# 2-core development machine: clip32 at batch 256 runs 1.9 steps/s on one thread and barely faster on
# two (small matrices). Used only to refuse runs far over budget before they start.
FLOPS_PER_S = 45e9


class BudgetError(SystemExit):
    pass


def estimate_seconds(config: dict, steps: int, batch: int) -> float:
    """Wall time of ``steps`` steps: forward and backward (x3) of one image and one caption per pair,
    from hellofmt's own cost estimate of the config, at this machine's measured throughput."""
    from hellofmt.foundation import estimate_model_cost

    _, flops = estimate_model_cost(config)
    return 3.0 * flops * batch * steps / FLOPS_PER_S


def init_state(model, path: Path) -> None:
    """Start ``model`` from another foundation's weights (``--init``). A patch kernel of another side
    (clip32's 8x8 for clip64's 16x16) is upsampled by pixel repetition and divided by the area ratio,
    so that on a 2x larger image the model computes what the source computed on the smaller one."""
    from safetensors.torch import load_file

    src, own = load_file(str(path)), model.state_dict()
    missing = sorted(set(own) - set(src))
    if missing:
        raise SystemExit(f"error: --init {path}: not the same architecture ({len(missing)} tensors missing, "
                         f"e.g. {missing[0]})")
    for k, v in own.items():
        w = src[k]
        if w.shape != v.shape:
            if w.ndim == 4 and w.shape[:2] == v.shape[:2] and v.shape[2] % w.shape[2] == 0:
                r = v.shape[2] // w.shape[2]
                w = w.repeat_interleave(r, 2).repeat_interleave(r, 3) / (r * r)
            else:
                raise SystemExit(f"error: --init {path}: {k} is {tuple(w.shape)}, the config wants {tuple(v.shape)}")
        own[k] = w
    model.load_state_dict(own)


def _register(config: dict, name: str) -> str:
    import open_clip

    with tempfile.TemporaryDirectory(prefix="hellofmt-pretrain-") as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
    return name


class PairStream(torch.utils.data.IterableDataset):
    """Batches of (images uint8 [B,S,S,3], token ids [B,L]) for steps ``start..steps-1``; step k's
    batch depends only on (seed, k), so a worker process changes nothing."""

    def __init__(self, sources: list[str], weights: list[float], seed: int, start: int, steps: int, batch: int,
                 side: int, tokenizer, fonts: list[str] | None) -> None:
        self.names, self.weights, self.seed = sources, weights, seed
        self.start, self.steps, self.batch, self.side = start, steps, batch, side
        self.tokenizer, self.fonts = tokenizer, fonts

    def __iter__(self):
        srcs = captions.make_sources(self.names, self.fonts)
        for k in range(self.start, self.steps):
            rng = np.random.default_rng([self.seed, k])
            images, texts = captions.batch(srcs, self.weights, rng, self.batch, self.side)
            yield torch.from_numpy(images), self.tokenizer(texts)


def zero_shot(config_path: Path, weights_path: Path, sets: list[str], cache: Path) -> dict[str, float]:
    """Top-1 of the zero-shot head (class names only, hellofmt's default templates) on each evaluation
    set's held-out split, as a build would start from it."""
    from hellofmt.foundation import load_foundation
    from hellofmt.projector import Projector

    import data as bdata

    out = {}
    for name in sets:
        root = bdata.make_data(name, cache)
        x, y, folders = bdata.load_folder(root / "test")
        classes = [f.replace("_", " ") for f in folders]
        proj = Projector(load_foundation(f"{config_path}:{weights_path}"), classes)
        with torch.no_grad():
            pred = torch.cat([proj(x[i:i + 256].float() / 255).argmax(1) for i in range(0, len(x), 256)])
        out[name] = round(float((pred == y).float().mean()), 4)
    return out


def train(args) -> dict:
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    config = json.loads(Path(args.config).read_text())
    side = int(config["vision_cfg"]["image_size"])
    est = estimate_seconds(config, args.steps, args.batch)
    print(f"{args.name}: {args.steps} steps of {args.batch} pairs at {side} px; estimated {est / 60:.1f} min "
          f"on {args.threads} thread(s)", flush=True)
    if est > args.budget_minutes * 60 and not args.force:
        raise BudgetError(
            f"error: estimated {est / 60:.0f} min, over the budget of {args.budget_minutes:.0f} min "
            f"(--budget-minutes): a smaller config or fewer --steps, or --force to run it anyway")
    captions.make_sources(args.sources, args.fonts)  # a source that yields nothing stops here, not mid-run
    torch.manual_seed(args.seed)
    name = _register(config, f"hellofmt-pretrain-{args.name}")
    model = open_clip.create_model(name, pretrained=None)
    if args.init:
        init = Path(args.init)
        if args.init in PRESETS:  # a preset: made first if it is not cached
            init = Path(ensure(args.init, Path(args.out), Path(args.cache)).split(":")[1])
        init_state(model, init)
    tokenizer = open_clip.get_tokenizer(name)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(k: int) -> float:
        if k < args.warmup:
            return args.lr * (k + 1) / args.warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (k - args.warmup) / max(1, args.steps - args.warmup)))

    loss_fn = ClipLoss()
    stream = PairStream(args.sources, args.source_weights, args.seed, 0, args.steps, args.batch, side, tokenizer,
                        args.fonts)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers,
                                         prefetch_factor=4 if args.workers else None)
    from tqdm import tqdm

    curve, t0 = [], time.perf_counter()
    model.train()
    bar = tqdm(loader, total=args.steps, desc=f"pretrain {args.name}", disable=args.quiet, mininterval=5)
    running = None
    for k, (images, tokens) in enumerate(bar):
        for g in opt.param_groups:
            g["lr"] = lr_at(k)
        x = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
        img_f, txt_f, scale = model(x, tokens)
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # CLIP's clamp: the temperature stays above 1/100
            model.logit_scale.clamp_(0, math.log(100))
        lv = float(loss.detach())
        running = lv if running is None else 0.98 * running + 0.02 * lv
        if (k + 1) % 100 == 0 or k + 1 == args.steps:
            curve.append([k + 1, round(running, 4)])
            bar.set_postfix(loss=f"{running:.3f}", scale=f"{float(model.logit_scale.detach().exp()):.1f}")
    train_s = time.perf_counter() - t0
    model.eval()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, w_path = out / f"{args.name}.json", out / f"{args.name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = w_path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, w_path)
    if args.half:
        tmp = out / f"{args.name}-fp16.tmp"
        save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(tmp))
        os.replace(tmp, out / f"{args.name}-fp16.safetensors")
    cfg_path.write_text(json.dumps(config, indent=4) + "\n")
    zs = zero_shot(cfg_path, w_path, args.evals, Path(args.cache)) if args.evals else {}
    record = {
        "name": args.name, "config": config, "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "warmup": args.warmup, "init": args.init, "wd": args.wd, "seed": args.seed, "sources": args.sources,
        "source_weights": args.source_weights,
        "fonts": len(captions.find_fonts() if args.fonts is None else args.fonts),
        "threads": args.threads, "train_s": round(train_s, 1), "steps_per_s": round(args.steps / train_s, 3),
        "final_loss": curve[-1][1] if curve else None, "logit_scale": round(float(model.logit_scale.detach().exp()), 2),
        "weights_sha256": hashlib.sha256(w_path.read_bytes()).hexdigest(),
        "zero_shot_top1": zs, "loss_curve": curve, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "torch": torch.__version__, "open_clip": open_clip.__version__,
    }
    (out / f"{args.name}.log.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {cfg_path} and {w_path} ({w_path.stat().st_size / 2**20:.1f} MiB) in {train_s / 60:.1f} min",
          flush=True)
    for s, acc in zs.items():
        print(f"zero-shot top-1 on {s} (held-out, class names only): {acc:.1%}", flush=True)
    return record


def ensure(preset: str, out: Path = DEFAULT_OUT, cache: Path | None = None) -> str:
    """The ``--foundation`` spec of a preset's pretrained weights, training them first when they are
    not under ``out`` yet (for the benchmark scripts: made on first use, then cached)."""
    cfg, w = out / f"{preset}.json", out / f"{preset}.safetensors"
    if not (cfg.is_file() and w.is_file()):
        argv = ["--preset", preset, "--out", str(out)]
        if cache is not None:
            argv += ["--cache", str(cache)]
        train(parse(argv))
    return f"{cfg}:{w}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a foundation this project uses (sets the rest)")
    ap.add_argument("--config", help="open_clip model config JSON (with --name) instead of a preset")
    ap.add_argument("--name", help="output name (default: the preset's)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--init", help="start from these weights (a .safetensors file, or a preset name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sources", nargs="+", choices=sorted(captions.SOURCES))
    ap.add_argument("--source-weights", nargs="+", type=float, help="sampling weight of each source (default: equal)")
    ap.add_argument("--fonts", nargs="+", help="font files for the glyphs source (default: every installed one)")
    ap.add_argument("--evals", nargs="*", help="evaluation sets for the zero-shot figures (default: the preset's)")
    ap.add_argument("--cache", default=os.environ.get("HELLOFMT_BENCH_CACHE", "/tmp/hellofmt-defaults"),
                    help="where the evaluation sets are written (benchmarks/defaults/data.py)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: as fast as 2 for these small models, "
                    "measured, and the thread count the recorded runs used)")
    ap.add_argument("--workers", type=int, default=1, help="data-generating processes (0: in the main process)")
    ap.add_argument("--budget-minutes", type=float, default=45.0)
    ap.add_argument("--force", action="store_true", help="run even when the estimate is over --budget-minutes")
    ap.add_argument("--half", action="store_true", help="also write float16 weights (NAME-fp16.safetensors)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    preset = PRESETS.get(args.preset or "", {})
    if not preset and not (args.config and args.name):
        ap.error("give --preset, or --config and --name")
    args.config = args.config or str(HERE / preset["config"])
    if not Path(args.config).is_file():
        ap.error(f"--config {args.config}: no such file (an open_clip model config JSON)")
    args.name = args.name or args.preset
    args.steps = args.steps or preset.get("steps", 3000)
    args.batch = args.batch or preset.get("batch", 256)
    args.lr = args.lr or preset.get("lr", 1e-3)
    args.warmup = args.warmup if args.warmup is not None else preset.get("warmup", 200)
    args.init = args.init or preset.get("init")
    args.sources = args.sources or preset.get("sources", ["glyphs", "shapes"])
    args.source_weights = args.source_weights or [1.0] * len(args.sources)
    if len(args.source_weights) != len(args.sources):
        ap.error("--source-weights needs one weight per source")
    args.evals = preset.get("evals", []) if args.evals is None else args.evals
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        train(args)
    except captions.CaptionError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
