"""A Hugging Face ``datasets`` dataset as ``--train-data``: a ``save_to_disk`` folder (or a
``datasets.Dataset``, or a ``hf://datasets/...`` id) with ``image`` and ``label`` columns.

The datasets are made in the test (3 colour classes x 5 images of 32 px, as in test_build.py), so
nothing is downloaded; the Hub path is checked with ``load_dataset`` replaced by a fake.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hellofmt.errors import BuildInputError

datasets = pytest.importorskip(
    "datasets", reason='the optional `datasets` library is not installed (pip install "hellofmt[hf-datasets]")')

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "tests" / "data" / "hf-test-tiny-vit.json")
CLASSES = ["blue", "green", "red"]  # class 0 is blue: channel 2


class ColourTeacher(torch.nn.Module):
    """Logits from the mean colour: blue, green, red images are classes 0, 1, 2."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(3).flip(0) * 12 - 4)
            self.lin.bias.zero_()

    def forward(self, x):
        return self.lin(x.mean((2, 3)))


def _images(per_class=5, size=32, seed=0):
    rng = np.random.default_rng(seed)
    out, labels = [], []
    for c in range(3):
        for _ in range(per_class):
            img = rng.integers(0, 90, (size, size + 8, 3))  # not square: the loader crops the centre
            img[..., 2 - c] += 120 + rng.integers(0, 40)
            x, y = rng.integers(0, size - 8, 2)
            img[y:y + 8, x:x + 8] = 255
            out.append(Image.fromarray(img.clip(0, 255).astype(np.uint8)))
            labels.append(c)
    return out, labels


def _dataset(image_col="image", label_feature=None, **kw):
    images, labels = _images(**kw)
    label_feature = label_feature or datasets.ClassLabel(names=CLASSES)
    feats = datasets.Features({image_col: datasets.Image(), "label": label_feature})
    return datasets.Dataset.from_dict({image_col: images, "label": labels}, features=feats)


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "hfdata"
    _dataset().save_to_disk(str(path))
    return path


def _small(**kw):
    opts = dict(ipc=1, factor=2, steps=4, batch_size=8, rank=2, head_rank=2, holdout=0.2, fidelity_views=1,
                refine_steps=2, checkpoint_every=2, progress=False, device="cpu", seed=0, keep_checkpoints=False)
    opts.update(kw)
    return opts


# --------------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------------
def test_build_from_save_to_disk_folder(saved, tmp_path):
    import hellofmt
    from hellofmt.bundle import Bundle

    res = hellofmt.build_bundle(str(saved), ColourTeacher().eval(), TINY_CONFIG, tmp_path / "bundle", **_small())
    b = Bundle.open(res.path, verify=True)
    assert b.verify() == []
    m = b.manifest
    assert m.classes == CLASSES  # from the ClassLabel feature
    assert m.images.count == 3 and m.images.per_class == [1, 1, 1]
    assert m.metrics["distill.steps"] == 4
    images, labels = b.read_images()
    assert labels.tolist() == [0, 1, 2]
    # the RDED patches come from the right class's rows: blue -> channel 2, green -> 1, red -> 0
    assert images.float().mean((2, 3)).argmax(1).tolist() == [2, 1, 0]


def test_cli_accepts_a_saved_dataset(saved, tmp_path):
    from click.testing import CliRunner

    from hellofmt.cli import main

    teacher = tmp_path / "teacher.py"
    teacher.write_text("import torch\n"
                       "def make():\n"
                       "    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),\n"
                       "                               torch.nn.Linear(3, 3)).eval()\n")
    classes = tmp_path / "classes.tsv"
    classes.write_text("blue\tthe blue class\ngreen\tthe green class\nred\tthe red class\n")
    out = tmp_path / "bundle"
    r = CliRunner().invoke(main, ["build", "--train-data", str(saved), "--classes", str(classes),
                                  "--teacher", f"{teacher}:make", "--foundation", TINY_CONFIG, "--out", str(out),
                                  "--ipc", "1", "--steps", "2", "--batch-size", "8", "--rank", "2", "--quiet",
                                  "--device", "cpu", "--refine-steps", "0"])
    assert r.exit_code == 0, r.output
    from hellofmt.bundle import Bundle

    assert Bundle.open(out).manifest.classes == ["the blue class", "the green class", "the red class"]


# --------------------------------------------------------------------------------------------------
# what counts as a Hugging Face dataset, and how it opens
# --------------------------------------------------------------------------------------------------
def test_sources_are_told_apart(saved, tmp_path):
    from hellofmt.builder.hfdata import hf_source

    folder = tmp_path / "imagefolder" / "cat"
    folder.mkdir(parents=True)
    assert hf_source(str(saved)) == str(saved)
    assert hf_source(saved) == str(saved)
    assert hf_source(str(folder.parent)) is None  # an image-folder tree stays an image folder
    assert hf_source("ILSVRC/imagenet-1k") is None  # a bare id is a (missing) local path, never the Hub
    assert hf_source("hf://datasets/ILSVRC/imagenet-1k:train") == "hf://datasets/ILSVRC/imagenet-1k:train"
    ds = _dataset()
    assert hf_source(ds) is ds
    assert hf_source((torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1))) is None


def test_open_reads_labels_and_decodes_like_an_image_folder(saved, tmp_path):
    from hellofmt.builder.hfdata import open_hf_data
    from hellofmt.builder.inputs import data_labels, dataset_for, load_all, load_image, source_side

    data = open_hf_data(str(saved))
    assert data.names == CLASSES and data.num_classes == 3 and len(data) == 15
    assert data_labels(data).tolist() == [0] * 5 + [1] * 5 + [2] * 5
    img, label, failed = dataset_for(data, [6, 12], 24)[1]
    assert img.dtype == torch.uint8 and img.shape == (3, 24, 24) and label == 2 and failed == ()
    # the same resize and crop as a file on disk
    images, _ = _images()
    images[12].save(tmp_path / "12.png")
    assert torch.equal(img, load_image(str(tmp_path / "12.png"), 24))
    imgs, labels = load_all(data, [0, 5, 10], 16, num_workers=2)
    assert imgs.shape == (3, 3, 16, 16) and labels.tolist() == [0, 1, 2]
    # the stored size, from the header (the default --image-size reads it)
    assert data.native_size(3) == (40, 32) and source_side(data, [0, 5, 10]) == 32


def test_rows_load_in_dataloader_workers(saved):
    """At scale the distillation reads through worker processes: the rows must travel there."""
    from hellofmt.builder.hfdata import open_hf_data
    from hellofmt.builder.inputs import collate_samples

    data = open_hf_data(str(saved))
    loader = torch.utils.data.DataLoader(data.dataset_for(list(range(15)), 16), batch_size=5, num_workers=2,
                                         collate_fn=collate_samples)
    batches = list(loader)
    assert [b[1].tolist() for b in batches] == [[0] * 5, [1] * 5, [2] * 5]
    assert all(b[0].shape == (5, 3, 16, 16) and b[2] == [] for b in batches)


def test_dataset_dict_uses_train_or_asks_for_a_split(tmp_path):
    from hellofmt.builder.hfdata import hf_source, open_hf_data

    ds = _dataset()
    datasets.DatasetDict(train=ds, test=ds.select([0, 5, 10])).save_to_disk(str(tmp_path / "dd"))
    assert hf_source(str(tmp_path / "dd")) is not None
    assert len(open_hf_data(str(tmp_path / "dd"))) == 15
    assert len(open_hf_data(str(tmp_path / "dd" / "test"))) == 3  # a split's own folder
    datasets.DatasetDict(a=ds, b=ds).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(BuildInputError, match="no 'train'") as e:
        open_hf_data(str(tmp_path / "ab"))
    assert "ab/a" in str(e.value)  # the fix names a split's folder


def test_classes_override_the_classlabel_names(saved, tmp_path):
    from hellofmt.builder.hfdata import open_hf_data

    assert open_hf_data(str(saved), ["b", "g", "r"]).names == ["b", "g", "r"]
    assert open_hf_data(str(saved), {"blue": "navy", "green": "lime", "red": "crimson"}).names == [
        "navy", "lime", "crimson"]
    with pytest.raises(BuildInputError, match="no name in the class map"):
        open_hf_data(str(saved), {"blue": "navy"})
    with pytest.raises(BuildInputError, match="expected 3 class names"):
        open_hf_data(str(saved), ["b", "g"])


def test_integer_labels_take_names_from_classes(tmp_path):
    from hellofmt.builder.hfdata import open_hf_data

    ds = _dataset(label_feature=datasets.Value("int64"))
    data = open_hf_data(ds, {"0": "blue", "1": "green", "2": "red"})
    assert data.names == CLASSES and data.folders == ["0", "1", "2"]


# --------------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------------
def test_wrong_image_column_names_it_and_the_fix(tmp_path):
    from hellofmt.builder.hfdata import open_hf_data

    _dataset(image_col="img").save_to_disk(str(tmp_path / "d"))
    with pytest.raises(BuildInputError) as e:
        open_hf_data(str(tmp_path / "d"))
    msg = str(e.value)
    assert "no 'image' column" in msg and "'img' holds images" in msg and "rename_column" in msg
    assert e.value.field == "image"


def test_wrong_label_column_type(tmp_path):
    from hellofmt.builder.hfdata import open_hf_data

    ds = datasets.Dataset.from_dict({"image": _images(per_class=1)[0], "label": ["a", "b", "c"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("string")}))
    with pytest.raises(BuildInputError, match="not integer class labels") as e:
        open_hf_data(ds)
    assert e.value.field == "label" and "ClassLabel" in str(e.value)
    with pytest.raises(BuildInputError, match="no 'label' column"):
        open_hf_data(ds.rename_column("label", "target"))


def test_unlabelled_rows_and_empty_classes_refused():
    from hellofmt.builder.hfdata import open_hf_data

    ds = _dataset(label_feature=datasets.Value("int64"))
    unlabelled = ds.map(lambda r: {"label": -1 if r["label"] == 0 else r["label"]})
    with pytest.raises(BuildInputError, match="label -1 is outside"):
        open_hf_data(unlabelled, CLASSES)
    four = _dataset(label_feature=datasets.ClassLabel(names=[*CLASSES, "yellow"]))
    with pytest.raises(BuildInputError, match="1 class\\(es\\) have no rows: yellow"):
        open_hf_data(four)


def test_undecodable_row_is_skipped_and_counted():
    from hellofmt.builder.hfdata import open_hf_data
    from hellofmt.builder.inputs import SkippedImages, collate_samples

    images, labels = _images()
    cells = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": None})
    cells[6] = {"bytes": b"\x89PNG\r\n\x1a\n not really", "path": None}  # class 1
    ds = datasets.Dataset.from_dict({"image": cells, "label": labels},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=CLASSES)}))
    data = open_hf_data(ds)
    rows = data.dataset_for(list(range(15)), 16)
    with pytest.raises(BuildInputError, match="row 6"):  # no SkippedImages: the build stops at once
        rows[6]
    data.skipped = SkippedImages(limit=1, total=15)
    img, label, failed = rows[6]
    assert torch.equal(img, rows[7][0]) and label == 1  # the next row stands in
    assert len(failed) == 1 and failed[0][0].endswith("#row=6")
    _, _, batch_failed = collate_samples([rows[5], rows[6], rows[7]])  # what the distillation loop records
    assert [f for f, _ in batch_failed] == [failed[0][0]]
    imgs, got = data.load_all([5, 6, 7], 16)
    assert imgs.shape == (3, 3, 16, 16) and got.tolist() == [1, 1, 1] and len(data.skipped) == 1
    cells[7] = cells[6]
    two_bad = open_hf_data(ds.cast_column("image", datasets.Image(decode=False)).map(
        lambda r, i: {"image": cells[i]}, with_indices=True))
    two_bad.skipped = SkippedImages(limit=1, total=15)
    with pytest.raises(BuildInputError, match="max-bad-images"):  # past the limit
        two_bad.load_all([5, 6, 7, 8], 16)


def test_missing_datasets_library_says_how_to_install(monkeypatch, saved):
    from hellofmt.builder.hfdata import open_hf_data

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(BuildInputError, match="hellofmt\\[hf-datasets\\]"):
        open_hf_data(str(saved))


def test_hub_id_loads_the_split_without_remote_code(monkeypatch):
    from hellofmt.builder.hfdata import _parse_hub, open_hf_data

    calls = []

    def fake_load_dataset(path, **kw):
        calls.append((path, kw))
        return _dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = open_hf_data("hf://datasets/someone/colours@v1:validation")
    assert len(data) == 15 and data.names == CLASSES
    assert calls == [("someone/colours", {"split": "validation", "revision": "v1"})]  # no trust_remote_code
    assert _parse_hub("hf://datasets/ILSVRC/imagenet-1k") == ("ILSVRC/imagenet-1k", None, "train")
    for bad in ("hf://datasets/", "hf://datasets/a/b/c", "hf://models/a/b", "hf://datasets/a/b:"):
        with pytest.raises(BuildInputError, match="as a Hub dataset"):
            _parse_hub(bad)


def test_hub_failure_is_a_build_input_error(monkeypatch):
    from hellofmt.builder.hfdata import open_hf_data

    def offline(path, **kw):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BuildInputError, match="cannot load the Hub dataset: ConnectionError") as e:
        open_hf_data("hf://datasets/someone/colours")
    assert e.value.file == "hf://datasets/someone/colours"
