"""`hellofmt show`: a bundle's images as a PNG contact sheet, one row per class with its name."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from hellofmt.cli import main
from hellofmt.errors import InputError
from hellofmt.show import (
    GAP,
    MIN_TILE,
    class_folder_names,
    contact_sheet,
    export_images,
    resolve_classes,
    write_contact_sheet,
)

from bundles import make_format_bundle, write_manifest


def _solid_bundle(path, num_classes=3, per_class=4, side=16):
    """Class c's images are one solid colour, (60 * (c + 1), 0, 255 - 60 * c), so tiles can be told apart."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.zeros(len(labels), 3, side, side, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        images[i, 0], images[i, 2] = 60 * (c + 1), 255 - 60 * c
    b = make_format_bundle(path, classes=[f"class {c}" for c in range(num_classes)], images=images, labels=labels)
    obj = json.loads((b / "hellofmt.json").read_text())
    obj["class_folders"] = [f"n{c:08d}" for c in range(num_classes)]
    write_manifest(b, obj)
    return b


def test_sheet_grid_size_and_tiles(tmp_path):
    b = _solid_bundle(tmp_path / "b")
    layout = write_contact_sheet(b, tmp_path / "grid.png", per_class=3)
    img = Image.open(tmp_path / "grid.png")
    assert img.format == "PNG"
    tile = MIN_TILE  # 16-px images are enlarged to the minimum tile
    assert (layout.columns, layout.tile, layout.rows) == (3, tile, [0, 1, 2])
    assert img.size == (layout.label_width + 3 * (tile + GAP) + GAP, 3 * (tile + GAP) + GAP)
    # row r, column j holds a tile of class r's colour
    for r in range(3):
        for j in range(3):
            x = layout.label_width + GAP + j * (tile + GAP) + tile // 2
            y = GAP + r * (tile + GAP) + tile // 2
            assert img.getpixel((x, y)) == (60 * (r + 1), 0, 255 - 60 * r)
    # the label column has ink (the class name) on the white background
    label = img.crop((0, GAP, layout.label_width, GAP + tile)).convert("L")
    assert label.getextrema()[0] < 128


def test_classes_by_name_folder_or_index_in_the_order_asked(tmp_path):
    b = _solid_bundle(tmp_path / "b")
    sheet = contact_sheet(b, classes=["class 2", "n00000000"], per_class=1, tile=20)
    assert sheet.height == 2 * (20 + GAP) + GAP
    assert resolve_classes(["1", "class 0", "1"], ["class 0", "class 1"]) == [1, 0]
    with pytest.raises(InputError) as e:
        resolve_classes(["clas 1"], ["class 0", "class 1"])
    assert "did you mean 'class 1'" in str(e.value) and e.value.field == "--classes"
    with pytest.raises(InputError):
        resolve_classes(["7"], ["class 0", "class 1"])


def test_cli_show(tmp_path):
    b = _solid_bundle(tmp_path / "b", num_classes=4, per_class=2, side=200)
    out = tmp_path / "sheets" / "s.png"
    r = CliRunner().invoke(main, ["show", str(b), "--out", str(out), "--classes", "class 1,class 3",
                                  "--max-per-class", "5"])
    assert r.exit_code == 0, r.output
    img = Image.open(out)
    # 200-px images are shrunk to the largest tile; only 2 images per class exist
    assert img.height == 2 * (160 + GAP) + GAP
    assert "2 classes x up to 2 images" in r.output and f"{img.width}x{img.height} px" in r.output
    r = CliRunner().invoke(main, ["show", str(b), "--out", str(tmp_path / "s.jpg")])
    assert r.exit_code == 2 and "PNG" in r.output
    r = CliRunner().invoke(main, ["show", str(b), "--out", str(tmp_path / "x.png"), "--classes", "nope"])
    assert r.exit_code == 2 and "'nope' is not a class of the bundle" in r.output


# --------------------------------------------------------------------------------------------------
# hellofmt export: the images as an image folder
# --------------------------------------------------------------------------------------------------
def _read_folder(root, folders):
    """uint8 [N, 3, H, W] of root/FOLDER/*.png, folders in the order given, files in name order."""
    import numpy as np

    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                        for d in folders for f in sorted((root / d).iterdir())])


def test_export_writes_each_class_folder_with_the_stored_pixels(tiny_bundle, tmp_path):
    from hellofmt.bundle import Bundle

    b = Bundle.open(tiny_bundle)
    folders = class_folder_names(b.manifest.classes, b.manifest.class_folders)
    out = tmp_path / "export"
    counts = export_images(tiny_bundle, out)
    assert counts == dict(zip(folders, b.manifest.images.per_class))
    assert sorted(p.name for p in out.iterdir()) == sorted(folders)
    assert [len(list((out / f).glob("*.png"))) for f in folders] == b.manifest.images.per_class
    images, _ = b.read_images()
    assert torch.equal(_read_folder(out, folders), images)  # class-major order, lossless


def test_export_refuses_a_folder_that_is_not_empty(tiny_bundle, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    r = CliRunner().invoke(main, ["export", str(tiny_bundle), str(out)])
    assert r.exit_code == 2 and "not empty" in r.output and "DIR" in r.output and str(out) in r.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    with pytest.raises(InputError):
        export_images(tiny_bundle, out / "keep.txt")
    r = CliRunner().invoke(main, ["export", str(tiny_bundle), str(tmp_path / "new")])
    assert r.exit_code == 0, r.output
    assert "wrote 6 images" in r.output and str(tmp_path / "new") in r.output


def test_class_folder_names_are_safe_and_distinct():
    assert class_folder_names(["red fox", "Red Fox", "a/b"]) == ["red_fox", "Red_Fox_1", "a_b"]
    assert class_folder_names(["x", "y"], ["../up", ""]) == ["up", "class_1"]
    assert class_folder_names(["cat"], ["n0212"]) == ["n0212"]


def test_export_then_build_images_round_trips(tiny_bundle, tmp_path):
    """``hellofmt export`` then ``build --images`` with the same class folders gives the same images."""
    from test_build import TEACHER_PY, TINY_CONFIG, _small, _write_data

    import hellofmt
    from hellofmt.bundle import Bundle

    b = Bundle.open(tiny_bundle)
    folders = class_folder_names(b.manifest.classes, b.manifest.class_folders)
    export_images(b, tmp_path / "export")
    train = _write_data(tmp_path / "train", classes=folders, per_class=3, size=b.manifest.images.height)
    (tmp_path / "teacher.py").write_text(TEACHER_PY)
    res = hellofmt.build_bundle(str(train), f"{tmp_path / 'teacher.py'}:make", TINY_CONFIG, tmp_path / "rebuilt",
                                images=str(tmp_path / "export"), **_small(ipc=None, steps=2, head_rank=0))
    rebuilt = Bundle.open(res.path)
    assert rebuilt.manifest.class_folders == sorted(folders)  # an image folder's classes sort by folder name
    images, labels = rebuilt.read_images()
    assert labels.tolist() == sorted(labels.tolist())
    assert torch.equal(images, _read_folder(tmp_path / "export", rebuilt.manifest.class_folders))
