"""The chart of ``hellofmt eval --plot`` for a quickstart bundle, on one thread of a busy CPU.

``examples/quickstart.py``'s setting: the same procedural data (8 classes: 2 shapes x 4 textures,
32 px, 150 originals and 50 held-out images per class), the same teacher CNN (20 epochs), the tiny
random-weight open_clip ViT the quickstart used before it moved to a pretrained foundation, 10 images
per class, students under the ``quick`` protocol (2 seeds), with one difference: ``--steps``
distillation steps (default 1,500) instead of the default 6,000, to fit a shared CPU. It writes
``benchmarks/eval-plot-quickstart.png`` (the figure in ``benchmarks/README.md``) and prints the table.
The figures are those of a toy set with a random-weight foundation (the design's floor), not a
benchmark of the method.

    OMP_NUM_THREADS=1 python benchmarks/eval_plot.py [--out FILE.png] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The figure in benchmarks/README.md was made under the tests' random-weight tiny ViT (the quickstart's
# foundation until it moved to the pretrained examples/foundation/clip32).
TINY_FOUNDATION = str(ROOT / "tests" / "data" / "hf-test-tiny-vit.json")


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, default=150, help="original training images per class")
    ap.add_argument("--val-per-class", type=int, default=50, help="held-out images per class")
    ap.add_argument("--ipc", type=int, default=10, help="distilled images per class")
    ap.add_argument("--teacher-epochs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=1500, help="distillation steps (the build's default: 6,000)")
    ap.add_argument("--epochs", type=int, help="student epochs (default: the quick protocol's)")
    ap.add_argument("--seeds", type=int, default=2, help="students per arm")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "eval-plot-quickstart.png")
    ap.add_argument("--keep", type=Path, help="keep the data and bundle here (a second run reuses them)")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import hellofmt

    qs = _quickstart()
    work = args.keep or Path(tempfile.mkdtemp(prefix="hellofmt-eval-plot-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_dir, test_dir = work / "train", work / "test"
    if not train_dir.is_dir():
        qs.make_dataset(train_dir, args.per_class, seed=0)
        qs.make_dataset(test_dir, args.val_per_class, seed=1)
    train_x, train_y = qs.load_folder(train_dir)
    test_x, test_y = qs.load_folder(test_dir)
    teacher = qs.train_teacher(train_x, train_y, args.teacher_epochs, seed=0)
    print(f"teacher: {qs.accuracy(teacher, test_x, test_y):.1%} on {len(test_y)} held-out images "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    bundle = work / "bundle"
    if not (bundle / "hellofmt.json").is_file():
        bundle = hellofmt.build_bundle(str(train_dir), teacher, TINY_FOUNDATION, bundle, ipc=args.ipc,
                                       steps=args.steps, device="cpu", overwrite=True, progress=False).path
    print(f"bundle: {bundle} ({time.perf_counter() - t0:.0f} s)", flush=True)
    result = hellofmt.evaluate(bundle, test_dir, teacher=teacher, train_data=train_dir, seeds=args.seeds,
                               protocol="quick", epochs=args.epochs, device="cpu", progress=False, plot=args.out,
                               json_path=args.json)
    print(result.format_table())
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
