"""Tabulate ``sweep.py --use-eval`` results with paired statistics, as benchmarks/README.md reports them.

    python benchmarks/defaults/compare.py results-pretrained.jsonl results-levers.jsonl --dataset shapes32 \\
        --foundation clip32 --reference conf

Per row: each arm's mean and standard deviation over seeds; ``b - h`` (bundle minus hard labels) and IOR
(bundle minus the random real subset labelled by the same projector) with their paired standard errors
(the per-seed differences' standard deviation / sqrt(seeds): every arm of a seed trains from the same
initialisation on the same schedule); bundle/teacher; and, against ``--reference``, the change of the
bundle arm and of the random arm (the random arm's images are the same in every row of a set, so its
change is the labels' alone), each with its paired standard error.

A row run with ``--arms bundle,random`` (a lever that keeps the images) takes its hard and teacher arms from
the row of the same set and foundation whose images are the same (``images_sha256``; for rows written
before that field, the hash is computed from the row's bundle in ``--cache``). Likewise a row without a
random arm (a selection redone on a kept projector, ``adapt.py --reselect --arms bundle``) takes it from the
row whose projector is the same (``projector_sha256``, or computed from the bundle): the random arm trains on
the seed's random real images labelled by that projector, so it depends on nothing else. A row with no such
partner shows ``-`` for what it lacks.

Rows of one run trained in parts (``sweep.py --first-seed``) are joined first, seed after seed; paired figures
and bundle/teacher use the seeds both sides have (a 16-seed bundle arm against an 8-seed hard arm: seeds 0-7).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np


def images_sha256(ds) -> str:
    """A short sha256 of an opened bundle's decoded images and labels (``DistilledDataset``): equal for two
    bundles with the same images. The image files' own sha256 would not do: safetensors writes its header's
    metadata in an order that varies from run to run."""
    return hashlib.sha256(ds.images.cpu().contiguous().numpy().tobytes()
                          + ds.targets.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def projector_sha256(bundle: str | os.PathLike) -> str:
    """A short sha256 of a bundle's projector deltas (tensor names and values, not the file's bytes,
    whose header order varies): equal for two bundles whose projectors label every view the same."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(Path(bundle) / "projector.safetensors"), framework="pt") as f:
        for k in sorted(f.keys()):
            h.update(k.encode() + f.get_tensor(k).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _bundle_dirs(row: dict, cache: Path) -> list[Path]:
    """The row's bundle in ``cache``: ``bundles/{dataset}-{config}-*`` (sweep.py) or ``-{config}`` (adapt.py),
    whose ``hellofmt.json`` records the row's foundation."""
    stem, found = f"{row['dataset']}-{row['config']}", []
    for d in sorted((cache / "bundles").glob(f"{stem}*")):
        if (d.name != stem and not d.name.startswith(stem + "-")) or not (d / "hellofmt.json").is_file():
            continue
        if row.get("foundation") and row["foundation"] not in (d / "hellofmt.json").read_text():
            continue
        found.append(d)
    return found


def images_hash(row: dict, cache: Path) -> str | None:
    """The row's ``images_sha256``, or the same hash computed from its bundle in ``cache``."""
    if row.get("images_sha256"):
        return row["images_sha256"]
    from hellofmt.dataset import DistilledDataset

    for d in _bundle_dirs(row, cache):
        return images_sha256(DistilledDataset(str(d), device="cpu"))
    return None


def projector_hash(row: dict, cache: Path) -> str | None:
    """The row's ``projector_sha256``, or the same hash computed from its bundle in ``cache``."""
    if row.get("projector_sha256"):
        return row["projector_sha256"]
    for d in _bundle_dirs(row, cache):
        return projector_sha256(d)
    return None


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of ``a - b`` per seed and its standard error, in points."""
    d = np.asarray(a[:len(b)]) - np.asarray(b[:len(a)])
    return 100 * float(d.mean()), 100 * float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else float("nan")


def aligned(a: list[float], first_a: int, b: list[float], first_b: int) -> tuple[list[float], list[float]]:
    """The seeds two rows share, in order: ``a`` starts at seed ``first_a``, ``b`` at ``first_b``."""
    start = max(first_a, first_b)
    return a[start - first_a:], b[start - first_b:]


def merge_seeds(rows: list[dict]) -> list[dict]:
    """Join the rows of one run whose seeds were trained in parts (``sweep.py --first-seed``): same set,
    config, overrides, foundation and images. Each arm is extended only where the next part starts at
    the seed after its last (a part that repeats seeds, or leaves a gap, adds nothing to that arm)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = json.dumps([r["dataset"], r["config"], r.get("foundation"), r["overrides"], r.get("images_sha256")],
                         sort_keys=True)
        groups.setdefault(key, []).append(r)
    out = []
    for parts in groups.values():
        parts = sorted(parts, key=lambda r: r.get("first_seed", 0))
        merged = {**parts[0], "arms": {k: list(v) for k, v in parts[0]["arms"].items()}}
        first = merged.get("first_seed", 0)
        for p in parts[1:]:
            start = p.get("first_seed", 0) - first  # the seeds an arm must already have for this part to follow
            for k, v in p["arms"].items():
                have = merged["arms"].get(k, [])
                if v and len(have) == start:
                    merged["arms"][k] = have + list(v)
        out.append(merged)
    return out


def vs_ref(arm: list[float], row: dict, ref: dict, ref_arm: list[float] | None) -> str:
    """An arm of ``row`` against the same arm of the reference row (``ref_arm``, filled from its partners),
    paired on the seeds both have; ``-`` when the reference lacks it."""
    if not ref_arm:
        return "-"
    return fmt_pair(paired(*aligned(arm, row.get("first_seed", 0), ref_arm, ref.get("first_seed", 0))))


def ratio(b: list[float], t: list[float]) -> str:
    """bundle/teacher on the seeds both arms have (both start at the row's first seed)."""
    n = min(len(b), len(t))
    return f"{np.mean(b[:n]) / np.mean(t[:n]):.2f}"


def fmt_arm(v: list[float] | None) -> str:
    return "-" if not v else f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}"


def fmt_pair(m: tuple[float, float] | None) -> str:
    return "-" if m is None else f"{m[0]:+.1f} ({m[1]:.1f})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--foundation", help="keep rows of this foundation only")
    ap.add_argument("--reference", help="the config the last two columns compare against")
    ap.add_argument("--only", nargs="+", help="these configs only, in this order")
    ap.add_argument("--cache", type=Path,
                    default=Path(os.environ.get("HELLOFMT_BENCH_CACHE", "/tmp/hellofmt-defaults")))
    args = ap.parse_args(argv)
    rows = [json.loads(line) for f in args.files for line in f.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["dataset"] == args.dataset and r.get("eval_s") is not None
            and (args.foundation is None or r.get("foundation") == args.foundation)]
    for r in rows:
        r["images_sha256"] = images_hash(r, args.cache)
        if not r["arms"].get("random"):
            r["projector_sha256"] = projector_hash(r, args.cache)
    rows = merge_seeds(rows)
    shown = rows if not args.only else [r for c in args.only for r in rows if r["config"] == c]
    full = {r["images_sha256"]: r for r in rows if all(r["arms"].get(k) for k in ("hard", "teacher"))}
    # rows that lack a random arm look for one with the same projector; only those rows are hashed
    want = {r["projector_sha256"] for r in rows if not r["arms"].get("random") and r.get("projector_sha256")}
    labelled = {}
    for r in rows:
        if r["arms"].get("random") and want:
            h = projector_hash(r, args.cache)
            if h in want and h not in labelled:
                labelled[h] = r

    def filled(r: dict) -> dict:
        """The row's arms, with those it lacks taken from its partners (same images, same projector)."""
        arms = dict(r["arms"])
        partner = full.get(r["images_sha256"])
        for k in ("hard", "teacher"):
            if not arms.get(k) and partner is not None:
                arms[k] = partner["arms"][k]
        if not arms.get("random") and r.get("projector_sha256") in labelled:
            arms["random"] = labelled[r["projector_sha256"]]["arms"]["random"]
        return arms

    ref = next((r for r in rows if r["config"] == args.reference), None)
    ref_arms = filled(ref) if ref else {}
    print(f"| {args.dataset} config | overrides | agreement | bundle | hard | teacher | random | b - h (s.e.) "
          f"| IOR (s.e.) | b/t | bundle vs {args.reference} | random vs {args.reference} |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in shown:
        arms = filled(r)
        b, h, t, rnd = (arms.get(k) for k in ("bundle", "hard", "teacher", "random"))
        agree = r.get("agreement_heldout")
        cells = [r["config"], json.dumps(r["overrides"]) if r["overrides"] else "(defaults)",
                 "-" if agree is None else f"{100 * agree:.1f}",
                 fmt_arm(b), fmt_arm(h), fmt_arm(t), fmt_arm(rnd),
                 fmt_pair(paired(b, h) if b and h else None), fmt_pair(paired(b, rnd) if b and rnd else None),
                 ratio(b, t) if b and t else "-",
                 vs_ref(b, r, ref, ref_arms.get("bundle")) if ref and ref is not r else "",
                 vs_ref(rnd, r, ref, ref_arms.get("random")) if ref and ref is not r and rnd else ""]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
