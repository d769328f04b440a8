"""``hellofmt eval --plot`` / ``EvalResult.plot``: the chart, the per-class figures behind it, and its
bad inputs (each a clear error before any training).

Runs on the session's tiny bundle (3 classes x 2 images, 32 px) with a tiny ConvNet, one epoch and
one or two seeds, as tests/test_eval.py does.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from hellofmt import evaluation
from hellofmt.errors import EvalInputError, InputError
from hellofmt.plots import PLOT_DPI, PLOT_SIZE, plot_eval

from bundles import class_names, make_images

CLASSES = class_names(3)
FAST = {"student": "convnet:width=8", "epochs": 1, "progress": False}
PNG_SIZE = (round(PLOT_SIZE[0] * PLOT_DPI), round(PLOT_SIZE[1] * PLOT_DPI))
TEACHER_PY = textwrap.dedent(
    """
    from torch import nn

    def colour_teacher():
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)).eval()
    """
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval-plot")
    images, labels = make_images(3, 3, 40, seed=7)
    for i, (x, y) in enumerate(zip(images, labels)):
        d = tmp / "val" / CLASSES[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(d / f"{i:03d}.png")
    (tmp / "models.py").write_text(TEACHER_PY)
    return {"tmp": tmp, "val": tmp / "val", "teacher": f"{tmp / 'models.py'}:colour_teacher"}


def _evaluate(bundle, val, **kw):
    from hellofmt import evaluate

    return evaluate(bundle, val, **{**FAST, **kw})


def test_eval_plot_writes_a_png_of_the_expected_size(tiny_bundle, dirs):
    out = dirs["tmp"] / "eval.png"
    r = _evaluate(tiny_bundle, dirs["val"], arms="bundle,hard,teacher", teacher=dirs["teacher"], seeds=2, plot=out)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == PNG_SIZE == (1200, 500)
    pc = r.per_class
    assert pc["classes"] == CLASSES and pc["count"] == [3, 3, 3]  # every val image counted once, by class
    for key in ("projector_top1", "teacher_agreement"):
        assert len(pc[key]) == 3 and all(v * 3 == round(v * 3) and 0 <= v <= 1 for v in pc[key])
    assert json.loads(json.dumps(r.to_dict(), allow_nan=False))["per_class"] == pc
    assert "worst classes:" in r.format_table() and "agreement with the teacher" in r.format_table()

    again = r.plot(dirs["tmp"] / "again.png")  # the Python form
    assert Image.open(again).size == PNG_SIZE


def test_per_class_without_a_teacher_is_the_projectors_top1(tiny_bundle, dirs):
    r = _evaluate(tiny_bundle, dirs["val"], arms="hard", seeds=1)
    assert r.per_class["teacher_agreement"] is None and len(r.per_class["projector_top1"]) == 3
    assert "top-1 on the held-out images, worst classes:" in r.format_table()
    out = r.plot(dirs["tmp"] / "no-teacher.png")
    assert Image.open(out).size == PNG_SIZE


def test_per_class_agreement_counts_agreeing_images(tiny_bundle):
    from hellofmt import DistilledDataset

    ds = DistilledDataset(tiny_bundle, device="cpu")
    images = ds.images[:6]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = ds.logits(images.float() / 255).argmax(1)

    class Copy(torch.nn.Module):  # a teacher that agrees with the projector on every image but the first
        def forward(self, x):
            out = torch.nn.functional.one_hot(pred, 3).float()
            out[0] = torch.nn.functional.one_hot((pred[0] + 1) % 3, 3).float()
            return out

    pc = evaluation._per_class(ds, Copy(), images, labels, torch.device("cpu"), 0, 1)
    assert pc["teacher_agreement"] == [0.5, 1.0, 1.0]
    assert pc["projector_top1"] == [float((pred[2 * c:2 * c + 2] == c).float().mean()) for c in range(3)]
    assert pc["count"] == [2, 2, 2]


def test_plot_into_a_missing_folder_fails_before_training(tiny_bundle, dirs, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("a student was trained")

    monkeypatch.setattr(evaluation, "_train_one", no_training)
    with pytest.raises(EvalInputError, match="folder does not exist") as err:
        _evaluate(tiny_bundle, dirs["val"], plot=dirs["tmp"] / "missing" / "eval.png")
    assert err.value.field == "--plot" and "mkdir" in err.value.fix
    with pytest.raises(EvalInputError, match="is a PNG") as err:
        _evaluate(tiny_bundle, dirs["val"], plot=dirs["tmp"] / "eval.svg")
    assert err.value.field == "--plot"


def test_plot_without_matplotlib_names_the_extra(tiny_bundle, dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(EvalInputError, match="needs matplotlib") as err:
        _evaluate(tiny_bundle, dirs["val"], plot=dirs["tmp"] / "eval.png")
    assert 'hellofmt[plot]' in err.value.fix and err.value.field == "--plot"
    with pytest.raises(InputError, match="needs matplotlib"):
        plot_eval({"arms": {}}, dirs["tmp"] / "x.png")


def test_cli_eval_plot_to_a_missing_folder_is_refused(tiny_bundle, dirs):
    # the successful --plot run shares tests/test_eval.py::test_cli_eval's students
    from hellofmt.cli import main

    r = CliRunner().invoke(main, ["eval", str(tiny_bundle), "--val", str(dirs["val"]), "--plot",
                                  str(dirs["tmp"] / "nowhere" / "x.png")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "--plot" in r.output


def test_plot_eval_from_recorded_json(tmp_path):
    # What `hellofmt eval --json` wrote (or an older result without per-class figures) draws too.
    result = {"bundle": "b", "protocol": "quick", "student": "convnet", "seeds": [0, 1], "val_count": 10,
              "arms": {"bundle": {"accuracies": [0.5, 0.6], "mean": 0.55, "std": 0.07},
                       "random": {"accuracies": [0.5, 0.5], "mean": 0.5, "std": 0.0}},
              "comparisons": {"bundle/teacher": None, "bundle-hard": None, "ior": 0.05}}
    out = plot_eval(result, tmp_path / "r.png")
    assert Path(out).is_file() and Image.open(out).size == PNG_SIZE
