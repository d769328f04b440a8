"""Charts of ``hellofmt eval`` results: :func:`plot_eval` (``hellofmt eval --plot``, ``EvalResult.plot``).

A table of means hides what decides whether a difference is real: the spread over seeds, and where
the projector's labels go wrong. The chart puts each arm's held-out top-1 per seed (dots) beside its
mean (bar, ± std), marks bundle/teacher and IOR (bundle - random), and names the classes on which
the projector agrees least with the teacher on the held-out images.

matplotlib is an optional extra (``pip install "hellofmt[plot]"``); it is imported only when a chart is
drawn, through the object-oriented API (a ``Figure`` of its own, no pyplot state), so drawing is safe
in a library and under any backend setting. :func:`check_plot_path` checks a destination before any
work starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import InputError
from .summary import comparison_parts

__all__ = ["PLOT_DPI", "PLOT_SIZE", "INSTALL", "check_plot_path", "plot_eval"]

INSTALL = 'pip install "hellofmt[plot]"  (or: pip install matplotlib)'
PLOT_SIZE = (12.0, 5.0)  # inches; at PLOT_DPI the PNG is 1200 x 500 pixels, whatever it shows
PLOT_DPI = 100
_WORST = 12  # classes named in the per-class panel
_NAME = 28  # characters of a class name shown
_COLOURS = {"bundle": "#1f77b4", "hard": "#7f7f7f", "teacher": "#2ca02c", "random": "#ff7f0e"}


def _require_matplotlib(field: str) -> None:
    try:
        import matplotlib  # noqa: F401  (imported here only to see that it is installed)
    except ImportError:
        raise InputError("drawing a chart needs matplotlib, which is not installed", field=field,
                         fix=INSTALL) from None


def check_plot_path(path: str | os.PathLike[str], *, field: str = "path") -> Path:
    """Check that a chart can be written at ``path``: matplotlib installed, a ``.png`` name, an existing folder.

    Args:
        path: the PNG file to write (replaced if it exists).
        field: the option or argument to name in an error (``--plot`` for the command line).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InputError: matplotlib is missing, the name does not end in ``.png``, or its folder does not exist.
    """
    _require_matplotlib(field)
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise InputError(f"the chart is a PNG; got {out.name!r}", file=out, field=field, fix="name it FILE.png")
    folder = out.parent
    if not folder.is_dir():
        raise InputError("its folder does not exist" if not folder.exists() else "its folder is not a folder",
                         file=out, field=field, fix=f"create {folder} first (mkdir -p), or write the chart elsewhere")
    if out.is_dir():
        raise InputError("is a folder", file=out, field=field, fix="give a file name, FILE.png")
    return out


def _short(name: str) -> str:
    return name if len(name) <= _NAME else name[: _NAME - 1] + "…"


def _arms_panel(ax, result: dict[str, Any]) -> None:
    arms = list(result["arms"])
    means = {}
    for i, name in enumerate(arms):
        a = result["arms"][name]
        accs = [100 * x for x in a["accuracies"]]
        mean, std = 100 * a["mean"], 100 * a["std"]
        means[name] = (i, mean)
        colour = _COLOURS.get(name, "#9467bd")
        ax.bar(i, mean, width=0.6, color=colour, alpha=0.3, edgecolor=colour)
        ax.errorbar(i, mean, yerr=std, color=colour, capsize=6, linewidth=1.5)
        k = len(accs)
        xs = [i + (j - (k - 1) / 2) * (0.3 / max(1, k - 1)) for j in range(k)]
        ax.scatter(xs, accs, color=colour, s=22, zorder=3, edgecolors="white", linewidths=0.5)
        ax.annotate(f"{mean:.1f}", (i, 0), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                    fontsize=9, fontweight="bold")  # at the bar's foot: clear of the dots, bars and IOR arrow
    ax.set_xticks(range(len(arms)), arms)
    ax.set_xlim(-0.6, len(arms) - 0.4)
    ax.set_ylabel("held-out top-1 (%): seeds (dots), mean ± std")
    ax.grid(axis="y", alpha=0.3)
    c = result.get("comparisons") or {}
    top = max((100 * max(a["accuracies"] or [0]) for a in result["arms"].values()), default=0)
    if "teacher" in means:  # bundle/teacher: the bundle's bar against this line
        yt = means["teacher"][1]
        ax.axhline(yt, color=_COLOURS["teacher"], linestyle="--", linewidth=0.8)
        if c.get("bundle/teacher") is not None:
            ax.annotate(f"teacher mean; bundle/teacher {c['bundle/teacher']:.3f}", (0, yt),
                        xycoords=("axes fraction", "data"), xytext=(3, 3), textcoords="offset points",
                        fontsize=8, color=_COLOURS["teacher"])
    if c.get("ior") is not None and "bundle" in means and "random" in means:
        # IOR: the random arm's mean drawn across the bundle's bar, and the gap between them as an arrow
        (xb, yb), (_, yr) = means["bundle"], means["random"]
        ax.hlines(yr, xb - 0.3, xb + 0.42, colors=_COLOURS["random"], linestyles=":", linewidth=1.2)
        ax.annotate("", xy=(xb + 0.38, yb), xytext=(xb + 0.38, yr),
                    arrowprops={"arrowstyle": "<->", "color": "black", "linewidth": 0.8, "shrinkA": 0, "shrinkB": 0})
        ax.annotate(f"IOR {100 * c['ior']:+.1f}", (xb + 0.38, (yb + yr) / 2), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.set_ylim(0, max(10.0, top * 1.25))
    marks = comparison_parts(c, minus="−")
    seeds = len(result.get("seeds") or [])
    head = f"{result.get('protocol', '?')}, {result.get('student', '?')}, {seeds} seed(s)"
    if result.get("val_count") is not None:
        head += f", {result['val_count']:,} val images"
    ax.set_title(head + ("\n" + ", ".join(marks) + " (points)" if marks else ""), fontsize=10)


def ranked_classes(per_class: dict[str, Any] | None) -> tuple[str, list, list[tuple[float, str]]] | None:
    """The per-class figure an evaluation is judged by (``teacher_agreement`` when a teacher was given,
    else ``projector_top1``), its values, and ``(value, class name)`` pairs worst first; None when the
    result has no per-class figures (``EvalResult.per_class``)."""
    pc = per_class or {}
    key = "teacher_agreement" if pc.get("teacher_agreement") else "projector_top1" if pc.get("projector_top1") else None
    if key is None:
        return None
    values = pc[key]
    return key, values, sorted((v, n) for n, v in zip(pc["classes"], values) if v is not None)


def _classes_panel(ax, result: dict[str, Any]) -> None:
    pc = result.get("per_class") or {}
    ranked = ranked_classes(pc)
    if ranked is None:
        ax.axis("off")
        ax.text(0.5, 0.5, "no per-class figures in this result", ha="center", va="center")
        return
    key, values, rows = ranked
    what = "projector's top-1 = teacher's" if key == "teacher_agreement" else "projector's top-1 (no teacher given)"
    counts = pc.get("count") or [1] * len(values)
    shown = rows[:_WORST]
    total = sum(k for v, k in zip(values, counts) if v is not None)
    overall = sum(v * k for v, k in zip(values, counts) if v is not None) / max(1, total)
    ys = list(range(len(shown)))
    ax.barh(ys, [100 * v for v, _ in shown], color="#d62728", alpha=0.6)
    ax.set_yticks(ys, [_short(n) for _, n in shown], fontsize=8 if len(shown) > 8 else 9)
    ax.set_ylim(max(_WORST, len(shown)) - 0.5, -0.5)  # the worst class on top; bars as thin for 2 classes as 12
    ax.axvline(100 * overall, color="black", linestyle="--", linewidth=0.8)
    ax.annotate(f"all classes {100 * overall:.1f}%", (100 * overall, 1.0), xycoords=("data", "axes fraction"),
                xytext=(3, -12), textcoords="offset points", fontsize=8)
    for y, (v, _) in zip(ys, shown):
        ax.annotate(f"{100 * v:.0f}%", (100 * v, y), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_xlabel(f"{what}, % of the class's held-out images")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"per class: the {len(shown)} worst of {len(rows)}", fontsize=10)


def plot_eval(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw an evaluation (``EvalResult.to_dict()``, or the JSON ``hellofmt eval --json`` writes) as a PNG.

    Left: each arm's held-out top-1 per seed (dots) and mean ± std (bar), the teacher's mean as a dashed
    line, IOR (bundle - random) as a bracket, bundle/teacher, bundle - hard and IOR in the title.
    Right: per class, the projector's top-1 agreement with the teacher on the held-out images (its top-1
    against the true labels when no teacher was given), the worst classes named, worst on top, and the
    figure over all classes. The PNG is :data:`PLOT_SIZE` x :data:`PLOT_DPI` (1200 x 500 pixels).

    Args:
        result: the evaluation as a dict.
        path: the PNG to write; its folder must exist.

    Returns:
        The path written.

    Raises:
        InputError: see :func:`check_plot_path`.
    """
    out = check_plot_path(path)
    from matplotlib.figure import Figure  # optional and heavy: only when a chart is drawn

    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, 1.0]})
    _arms_panel(left, result)
    _classes_panel(right, result)
    fig.suptitle(f"hellofmt eval  {_short(Path(str(result.get('bundle', ''))).name or '?')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=PLOT_DPI)
    return out
