"""Reports on a bundle: :func:`summarize` (a JSON-ready dict) and :func:`format_summary` (text).

``hellofmt info`` prints them, the Hub dataset card (:func:`hellofmt.hub.dataset_card`) and the
builder's closing summary are made from them; :func:`format_verified` is what ``hellofmt verify``
prints for a sound bundle. :func:`format_bytes` is the package's one byte
formatter (binary units: KiB, MiB, GiB, TiB), used by these reports and the loader's log lines.

This module reads only the manifest of an opened :class:`~hellofmt.bundle.Bundle` and imports
nothing heavy, so the CLI and the Hub code can import it at start-up.
"""

from __future__ import annotations

import math
import statistics
import textwrap
from typing import TYPE_CHECKING

from .manifest import Foundation
from .units import format_bytes  # re-exported: the package's one byte formatter

if TYPE_CHECKING:
    from .bundle import Bundle

__all__ = [
    "STORED_LABEL_EPOCHS",
    "format_bytes",
    "ratio_text",
    "foundation_reference",
    "summarize",
    "format_summary",
    "format_metric",
    "format_verified",
    "DEFAULT_MAX_CLASSES",
]

STORED_LABEL_EPOCHS = 300  # SRe2L-style stored soft labels: one float16 vector per image per epoch
DEFAULT_MAX_CLASSES = 100  # classes ``hellofmt info`` lists by default (--max-classes)
_WIDTH = 110  # text width of the wrapped lines of format_summary
_LABEL = 12  # width of format_summary's label column
# metric name endings that are counts (shown and given in JSON as integers) or fractions (shown in percent)
_COUNT_ENDINGS = ("steps", "resumed_from", "count", "views", "_images", "_classes")
_FRACTION_ENDINGS = ("agreement", "top1", "confidence", "accuracy", "fraction")
# the builder's stages, in the order format_summary shows their metrics (others follow, sorted)
_STAGES = ("distill", "images", "refine", "delta_encoding")


def ratio_text(ratio: float | None) -> str:
    """How the label payload compares with stored labels, in words that stay right both ways.

    Args:
        ratio: stored-label bytes over projector bytes (``summarize(...)["label_payload"]["ratio"]``),
            or None when there is nothing to compare.

    Returns:
        ``'40x smaller than stored labels'``, ``'2.0x larger than stored labels (...)'`` or ``'n/a'``.
    """
    if not ratio:
        return "n/a"
    if ratio >= 1:
        if ratio < 10:
            return f"{ratio:,.1f}x smaller than stored labels"
        return f"{ratio:,.0f}x smaller than stored labels"
    return f"{1 / ratio:,.1f}x larger than stored labels (the projector pays off only at larger scale)"


def foundation_reference(f: Foundation) -> str:
    """A manifest's foundation reference as one readable string: ``ARCH:TAG``, ``hf-hub:ORG/REPO``,
    ``ARCH (embedded: FILE)`` or ``ARCH (file: FILE)``."""
    if f.source == "pretrained":
        return f"{f.architecture}:{f.pretrained}"
    if f.source == "hf-hub":
        return f"hf-hub:{f.hf_hub_id}"
    if f.source == "embedded":
        return f"{f.architecture} (embedded: {f.weights_file})"
    return f"{f.architecture} (file: {f.weights_file or 'given at load'})"


def summarize(bundle: Bundle) -> dict:
    """A JSON-ready summary of a bundle, as ``hellofmt info`` shows it.

    Includes classes, image count and per-class counts, codec, image size, the foundation
    reference, projector ranks and parameter count, bytes per file, and the label payload: the
    projector file's bytes and its delta encoding (``projector.dtype``: float32, float16, bfloat16
    or int8) against what SRe2L-style stored labels would take for the same images (images x 300
    epochs x classes x 2 bytes, float16), with the ratio.

    Args:
        bundle: an opened :class:`~hellofmt.bundle.Bundle`; only its manifest and path are read.

    Returns:
        A dict of plain JSON values (see ``hellofmt info BUNDLE --json``).
    """
    m = bundle.manifest
    im = m.images
    files = {name: e.size for name, e in sorted(m.files.items())}
    proj_bytes = files.get(m.projector.file, 0)
    stored = im.count * STORED_LABEL_EPOCHS * m.num_classes * 2
    # A delta for a parameter of shape [out, *rest] is B [out, r] @ A [r, prod(rest)] (the rule of
    # lowrank.as_matrix_shape), so it holds r * (out + prod(rest)) numbers.
    params = sum(t.rank * (t.shape[0] + math.prod(t.shape[1:])) for t in m.projector.targets)
    ranks = sorted({t.rank for t in m.projector.targets})
    f = m.foundation
    return {
        "path": str(bundle.path),
        "format_version": m.format_version,
        "manifest_sha256": m.manifest_sha256,  # None: an older manifest without a digest
        "num_classes": m.num_classes,
        "classes": list(m.classes),
        "images": {
            "count": im.count,
            "per_class": list(im.per_class),
            "per_class_min": min(im.per_class) if im.per_class else 0,
            "per_class_max": max(im.per_class) if im.per_class else 0,
            "codec": im.codec,
            "quality": im.quality,
            "height": im.height,
            "width": im.width,
            "shards": len(im.shards),
        },
        "foundation": {
            "reference": foundation_reference(f),
            "library": f.library,
            "architecture": f.architecture,
            "source": f.source,
            "weights_sha256": f.weights_sha256,
            "image_size": f.image_size,
        },
        "projector": {
            "file": m.projector.file,
            "targets": len(m.projector.targets),
            "ranks": ranks,
            "head_rank": m.projector.head.rank if m.projector.head else None,
            "dtype": m.projector.dtype,
            "encoder_delta_parameters": params,
        },
        "files": files,
        "total_bytes": sum(files.values()),
        "label_payload": {
            "encoding": m.projector.dtype,
            "projector_bytes": proj_bytes,
            "stored_label_bytes": stored,
            "stored_label_rule": f"images x {STORED_LABEL_EPOCHS} epochs x classes x 2 bytes (float16)",
            "ratio": (stored / proj_bytes) if proj_bytes else None,
        },
        "embedded_foundation": (
            {"file": f.weights_file, "bytes": files.get(f.weights_file, 0),
             "requested": m.provenance.build_args.get("embed_foundation") is True}
            if f.source == "embedded" else None
        ),
        "class_folders": list(m.class_folders) if m.class_folders is not None else None,
        "labels": {
            "temperature": m.labels.temperature,
            "augmentation": m.labels.augmentation,
            "scale": list(m.labels.scale),
            "ratio": list(m.labels.ratio),
            "mix": m.labels.mix,
        },
        "teachers": list(m.provenance.teachers),
        "provenance": {
            "hellofmt_version": m.provenance.hellofmt_version,
            "created": m.provenance.created,
            "seed": m.provenance.seed,
            "warnings": _build_warnings(m.provenance.extra),
        },
        "metrics": {k: _metric_value(k, v) for k, v in m.metrics.items()},
        "evaluations": [_evaluation_summary(e) for e in m.evaluations],
        "probe_views": len(m.probe.views) if m.probe else 0,
    }


def _build_warnings(extra: dict) -> list[str]:
    """The builder's warnings recorded in ``provenance.extra`` (strings only; anything else is ignored)."""
    w = extra.get("warnings") if isinstance(extra, dict) else None
    return [x for x in w if isinstance(x, str)] if isinstance(w, list) else []


def _metric_value(name: str, value: float) -> float | int:
    """A metric as JSON: counts (``distill.steps``) as integers, the rest as recorded."""
    if name.endswith(_COUNT_ENDINGS) and float(value).is_integer():
        return int(value)
    return value


def _evaluation_summary(e) -> dict:
    """One manifest ``evaluations`` entry with each arm's mean and std over seeds, and the comparisons
    ``hellofmt eval`` prints: ``bundle/teacher`` (ratio), ``bundle-hard`` and ``ior`` (bundle - random)."""
    arms = {
        name: {"mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "accuracies": list(accs)}
        for name, accs in e.arms.items()
    }
    mean = {k: a["mean"] for k, a in arms.items()}
    b = mean.get("bundle")
    return {
        "protocol": e.protocol,
        "student": e.student,
        "seeds": list(e.seeds),
        "val_count": e.val_count,
        "date": e.date,
        "hellofmt_version": e.hellofmt_version,
        "arms": arms,
        "comparisons": {
            "bundle/teacher": b / mean["teacher"] if b is not None and mean.get("teacher") else None,
            "bundle-hard": b - mean["hard"] if b is not None and "hard" in mean else None,
            "ior": b - mean["random"] if b is not None and "random" in mean else None,
        },
    }


def format_metric(name: str, value: float) -> str:
    """One metric for people: fractions (agreements, top-1s, confidences) in percent, times
    (``*_s``) in seconds, counts as integers, anything else to 4 significant digits.

    Args:
        name: the metric's manifest name (``fidelity.heldout.top1_agreement``).
        value: its value.

    Returns:
        ``'89.1%'``, ``'12.3 s'``, ``'680'`` or ``'0.01234'``.
    """
    if name.endswith("_s"):
        return f"{value:.1f} s"
    if name.endswith(_FRACTION_ENDINGS):
        return f"{100 * value:.1f}%"
    if name.endswith(_COUNT_ENDINGS) and float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.4g}"


def _wrap(label: str, text: str) -> list[str]:
    """``text`` wrapped under a ``label`` column (continuation lines indented to the values)."""
    if len(label) >= _LABEL:  # a label wider than its column ("delta encoding") gets a line of its own
        return [label] + textwrap.wrap(text, _WIDTH, initial_indent=" " * _LABEL, subsequent_indent=" " * _LABEL,
                                       break_long_words=False, break_on_hyphens=False)
    return textwrap.wrap(text, _WIDTH, initial_indent=f"{label:<{_LABEL - 1}} ", subsequent_indent=" " * _LABEL,
                         break_long_words=False, break_on_hyphens=False) or [label]


def _per_class(im: dict) -> str:
    lo, hi = im["per_class_min"], im["per_class_max"]
    return f"{lo} per class" if lo == hi else f"{lo} to {hi} per class"


def _class_list(s: dict, max_classes: int | None) -> str:
    """The classes in label order: ``name`` plus its image folder when that differs (``tench
    (n01440764)``) and its image count when the counts are uneven; at most ``max_classes``."""
    folders = s.get("class_folders") or [None] * s["num_classes"]
    counts = s["images"]["per_class"]
    uneven = s["images"]["per_class_min"] != s["images"]["per_class_max"]
    shown = s["classes"] if not max_classes else s["classes"][:max_classes]
    items = []
    for i, name in enumerate(shown):
        extra = [x for x in ((folders[i] if folders[i] not in (None, name) else None),
                             (f"{counts[i]} images" if uneven else None)) if x]
        items.append(name + (f" ({', '.join(extra)})" if extra else ""))
    rest = s["num_classes"] - len(shown)
    more = f"; ... and {rest} more (--max-classes 0 lists all)" if rest > 0 else ""
    return "; ".join(items) + more if any(";" in x or "," in x for x in shown) else ", ".join(items) + more


def format_summary(summary: dict, *, max_classes: int | None = DEFAULT_MAX_CLASSES,
                   show_warnings: bool = True) -> str:
    """Render :func:`summarize`'s dict as the readable text ``hellofmt info`` prints.

    Sections: the contents (images, every class up to ``max_classes``), the foundation and projector,
    the label recipe and teacher(s), files, the label payload against stored labels (with the embedded
    foundation's bytes said apart), fidelity (explained), the other build metrics by stage, stage
    times, recorded student evaluations and the builder's warnings.

    Args:
        summary: what :func:`summarize` returned.
        max_classes: list at most this many classes (``None`` or 0: all of them).
        show_warnings: include the builder's recorded warnings (the build command prints them itself).

    Returns:
        Several lines of text, without a trailing newline.
    """
    s = summary
    im, fd, pr, lp = s["images"], s["foundation"], s["projector"], s["label_payload"]
    codec = im["codec"] + (f" (quality {im['quality']})" if im["quality"] is not None else "")
    lines = [
        f"bundle      {s['path']} (hellofmt format {s['format_version']})",
        (f"contents    {im['count']:,} images ({_per_class(im)}), {im['width']}x{im['height']}, {codec}, "
         f"{im['shards']} shard(s)"),
        *_wrap("classes", f"{s['num_classes']}: {_class_list(s, max_classes)}"),
        (f"foundation  {fd['reference']} [{fd['library']}, input {fd['image_size']}px, "
         f"sha256 {fd['weights_sha256'][:12]}...]"),
        (f"projector   {pr['targets']} targets, rank(s) {', '.join(map(str, pr['ranks'])) or '-'}, "
         f"head rank {pr['head_rank'] if pr['head_rank'] is not None else '-'}, {pr['dtype']}, "
         f"{pr['encoder_delta_parameters']:,} encoder delta parameters"),
        "files",
    ]
    width = max((len(n) for n in s["files"]), default=0)
    for name, size in s["files"].items():
        lines.append(f"  {name:<{width}}  {size:>14,} B  ({format_bytes(size)})")
    lines.append(f"  {'total':<{width}}  {s['total_bytes']:>14,} B  ({format_bytes(s['total_bytes'])})")
    lines += [
        "label payload",
        (f"  projector      {format_bytes(lp['projector_bytes'])} "
         f"({lp['projector_bytes']:,} B, {lp['encoding']} deltas)"),
        f"  stored labels  {format_bytes(lp['stored_label_bytes'])}  ({lp['stored_label_rule']})",
        f"  ratio          {ratio_text(lp['ratio'])}",
    ]
    lines += _embedded_lines(s)
    lines += _recipe_lines(s)
    lines += _fidelity_lines(s)
    lines += _stage_lines(s["metrics"])
    lines += _evaluation_lines(s.get("evaluations") or [])
    warnings = s.get("provenance", {}).get("warnings") or []
    if show_warnings and warnings:
        lines.append("warnings    (recorded by the build)")
        for w in warnings:
            lines += textwrap.wrap(w, _WIDTH, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(lines)


def _embedded_lines(s: dict) -> list[str]:
    """Why a bundle with an embedded foundation is larger than its label payload suggests."""
    emb = s.get("embedded_foundation")
    if not emb:
        return []
    lp = s["label_payload"]
    why = ("the build asked for a self-contained bundle (--embed-foundation)" if emb.get("requested") else
           "it has no public name to be fetched by (random weights, or a model config of one's own)")
    return textwrap.wrap(
        f"the ratio compares the label payload (projector, {format_bytes(lp['projector_bytes'])}) with stored "
        f"labels ({format_bytes(lp['stored_label_bytes'])}). The bundle also embeds its foundation "
        f"({emb['file']}, {format_bytes(emb['bytes'])}) because {why}: a fixed cost of the model, the same "
        f"whatever the number of images, and not a cost of the labels.",
        _WIDTH, initial_indent="  note: ", subsequent_indent="        ",
    )


def _recipe_lines(s: dict) -> list[str]:
    out = []
    lab = s.get("labels")
    if lab:
        lo, hi = lab["scale"]
        rlo, rhi = lab["ratio"]
        out += _wrap("labels", f"T {lab['temperature']:g}, {lab['augmentation']} (scale {lo:g}-{hi:g}, "
                               f"ratio {rlo:.3g}-{rhi:.3g}), mix {lab['mix']} (the loader's defaults)")
    teachers = s.get("teachers") or []
    if teachers:
        kind = "averaged" if len(teachers) > 1 else ""
        out += _wrap("teacher(s)", ", ".join(teachers) + (f" ({len(teachers)} {kind})" if kind else ""))
    return out


def _fidelity_lines(s: dict) -> list[str]:
    """The fidelity section: per view set, agreement and KL, then the teacher's and the projector's own
    top-1 on the same views, with what the sets are (so the two top-1s are not taken for each other)."""
    m = s["metrics"]
    rows = [("held-out", "fidelity.heldout."), ("bundle views", "fidelity.synthetic.")]
    rows = [(name, p) for name, p in rows if f"{p}top1_agreement" in m]
    train = m.get("distill.train_agreement")
    if not rows and train is None:
        return []
    chance = 1 / s["num_classes"]
    out = _wrap("fidelity", f"projector vs teacher: top-1 agreement (chance {100 * chance:.1f}% for "
                            f"{s['num_classes']} classes) and KL(teacher || projector); then each model's own "
                            "top-1 on the same views")
    for name, p in rows:
        parts = [f"agreement {format_metric('top1_agreement', m[p + 'top1_agreement'])}"]
        if p + "kl" in m:
            parts.append(f"KL {m[p + 'kl']:.4g}")
        for who in ("teacher", "projector"):
            if f"{p}{who}_top1" in m:
                parts.append(f"{who} top-1 {format_metric('top1', m[p + who + '_top1'])}")
        out.append(f"  {name:<13} " + ", ".join(parts))
    if train is not None:
        out.append(f"  {'training':<13} agreement {format_metric('agreement', train)} "
                   "(moving average over the last distillation steps)")
    lab = s.get("labels") or {}
    scale = "-".join(f"{x:g}" for x in lab.get("scale", [])) or "the recipe's"
    out += textwrap.wrap(
        f"held-out: original images never used to distil, as random-resized crops (scale {scale}), no "
        f"mixing; bundle views: the loader's views of the bundle's images (crop + {lab.get('mix', 'mix')}). "
        "'teacher top-1' is the teacher's own accuracy on those crops against the true labels, usually "
        "lower than its accuracy on whole, clean images. Agreement is not label quality: students are "
        "(hellofmt eval).",
        _WIDTH, initial_indent="  ", subsequent_indent="  ",
    )
    return out


def _stage_lines(metrics: dict) -> list[str]:
    """The non-fidelity metrics, one line per build stage, units shown; stage times last."""
    groups: dict[str, list[str]] = {}
    times = []
    for k in sorted(metrics, key=lambda k: (k.startswith("time."), k if not k.startswith("time.") else "")):
        stage, _, rest = k.partition(".")  # stage times keep the build's order, the rest sorts by name
        if stage == "fidelity" or k == "distill.train_agreement":
            continue
        if k.endswith("resumed_from") and not metrics[k]:  # a fresh build resumed from nothing: say nothing
            continue
        if stage == "time":
            times.append(f"{rest.removesuffix('_s')} {format_metric(k, metrics[k])}")
            continue
        groups.setdefault(stage, []).append(f"{(rest or stage).replace('_', ' ')} {format_metric(k, metrics[k])}")
    order = [g for g in _STAGES if g in groups] + sorted(g for g in groups if g not in _STAGES)
    out = []
    for g in order:
        out += _wrap(g.replace("_", " "), ", ".join(groups[g]))
    if times:
        total = sum(v for k, v in metrics.items() if k.startswith("time."))
        out += _wrap("time", ", ".join(times) + f"; total {total:.1f} s")
    return out


def comparison_parts(c: dict, *, minus: str = "-", unit: str = "") -> list[str]:
    """An evaluation's comparisons as text: bundle/teacher, bundle - hard and IOR, those present
    (``c`` as in ``EvalResult.to_dict()["comparisons"]``; differences in points)."""
    parts = []
    if c.get("bundle/teacher") is not None:
        parts.append(f"bundle/teacher {c['bundle/teacher']:.3f}")
    if c.get("bundle-hard") is not None:
        parts.append(f"bundle {minus} hard {100 * c['bundle-hard']:+.1f}{unit}")
    if c.get("ior") is not None:
        parts.append(f"IOR (bundle {minus} random) {100 * c['ior']:+.1f}{unit}")
    return parts


def _evaluation_lines(evaluations: list[dict]) -> list[str]:
    """Recorded student evaluations, one line each: the setting, per arm mean ± std over seeds, then the
    comparisons (long lines are not wrapped, so that each evaluation stays one line to grep)."""
    if not evaluations:
        return ["evaluations none recorded (hellofmt eval BUNDLE --val DIR --record)"]
    out = ["evaluations student top-1 on held-out images, mean ± std over seeds (hellofmt eval --record)"]
    for e in evaluations:
        head = f"{e['protocol']}, student {e['student']}, {len(e['seeds'])} seed(s)"
        if e.get("val_count") is not None:
            head += f", {e['val_count']:,} val images"
        if e.get("date"):
            head += f", {e['date']}"
        parts = [", ".join(f"{k} {100 * a['mean']:.1f}% ± {100 * a['std']:.1f}" for k, a in e["arms"].items())]
        parts += comparison_parts(e.get("comparisons") or {}, unit=" points")
        out.append(f"  {head}: " + "; ".join(parts))
    return out


def format_verified(summary: dict, *, probe_checked: bool) -> str:
    """What ``hellofmt verify`` checked, for a bundle that passed: files, bytes, images, projector, probe.

    Args:
        summary: :func:`summarize` of the verified bundle.
        probe_checked: whether the probe was recomputed (the manifest has one and probe checking was on).

    Returns:
        A few lines of text, the first ``PATH: ok``, without a trailing newline.
    """
    s = summary
    im, pr = s["images"], s["projector"]
    emb = s.get("embedded_foundation")
    digest = s.get("manifest_sha256")
    lines = [
        f"{s['path']}: ok",
        "  manifest    " + (f"its canonical form matches its manifest_sha256 ({digest[:16]}...)" if digest else
                            "no manifest_sha256 (hellofmt verify --fix-digest adds one)"),
        f"  files       {len(s['files'])} files, {s['total_bytes']:,} bytes ({format_bytes(s['total_bytes'])}): "
        "each one's size and sha256 as the manifest lists them, and no unlisted file",
        f"  images      {im['count']:,} images decoded ({im['width']}x{im['height']} {im['codec']}, "
        f"{im['shards']} shard(s)), their labels and per-class counts as the manifest says",
        f"  projector   {pr['targets']} low-rank targets: tensor names, shapes and {pr['dtype']} encoding",
        "  foundation  " + (f"embedded {emb['file']}: its fingerprint matches the manifest's sha256" if emb else
                            f"{s['foundation']['reference']} (referenced; fetched and fingerprint-checked "
                            f"when the probe or a loader builds the model)"),
    ]
    if probe_checked:
        lines.append(f"  probe       {s['probe_views']} fixed views: the projector rebuilt from the foundation "
                     "and deltas, and its top-k logits recomputed to the builder's within the probe's tolerance")
    else:
        lines.append("  probe       none recorded: the labels could not be checked against the builder's")
    return "\n".join(lines)
