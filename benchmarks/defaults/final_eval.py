"""The check behind the build defaults: for each dataset, build a bundle with hellofmt's DEFAULT
options (only ``--ipc`` given), then ``hellofmt eval --protocol quick`` with all four arms and 3 seeds.
Optionally (``--int8-check``) the same bundle built with float32 deltas and re-encoded to int8 with
``hellofmt compress``, bundle arm only, to compare students on float32 and int8 deltas.

    python benchmarks/defaults/final_eval.py --dataset digits32 --dataset shapes32 [--int8-check]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as bdata  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", action="append", choices=bdata.DATASETS, required=True)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cache", default=os.environ.get("HELLOFMT_BENCH_CACHE", "/tmp/hellofmt-defaults"))
    ap.add_argument("--out", default="-", help="append one JSON line per dataset here")
    ap.add_argument("--int8-check", action="store_true")
    args = ap.parse_args()
    for name in args.dataset:
        info = bdata.prepare(name, Path(args.cache), device=args.device)
        root = Path(args.cache) / "final"
        runs = [("default", [])]
        if args.int8_check:
            runs.append(("float32", ["--delta-dtype", "float32"]))
        res = {"dataset": name, "teacher_acc": info["teacher_acc"]}
        for tag, extra in runs:
            out = root / f"{name}-{tag}"
            t0 = time.perf_counter()
            if not (out / "hellofmt.json").is_file():
                subprocess.run(["hellofmt", "build", "--train-data", str(info["train"]), "--teacher",
                                info["teacher_spec"], "--foundation", info["foundation"], "--ipc", str(args.ipc),
                                "--out", str(out), "--device", args.device, "--overwrite", "--quiet", *extra],
                               check=True)
            res[f"{tag}_build_s"] = round(time.perf_counter() - t0, 1)
            arms = ["--teacher", info["teacher_spec"], "--train-data", str(info["train"])] if tag == "default" \
                else ["--arms", "bundle"]
            js = root / f"{name}-{tag}.json"
            subprocess.run(["hellofmt", "eval", str(out), "--val", str(info["test"]), "--seeds", str(args.seeds),
                            "--device", args.device, "--json", str(js), "--quiet", *arms], check=True)
            res[tag] = json.loads(js.read_text())
            if tag == "float32":
                q = root / f"{name}-int8"
                if not (q / "hellofmt.json").is_file():
                    subprocess.run(["hellofmt", "compress", str(out), "--delta-dtype", "int8", "--out", str(q)],
                                   check=True)
                jq = root / f"{name}-int8.json"
                subprocess.run(["hellofmt", "eval", str(q), "--val", str(info["test"]), "--seeds", str(args.seeds),
                                "--device", args.device, "--json", str(jq), "--quiet", "--arms", "bundle"], check=True)
                res["int8"] = json.loads(jq.read_text())
        bdata.emit(res, args.out)


if __name__ == "__main__":
    main()
