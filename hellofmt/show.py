"""Contact sheets: a bundle's images as one PNG, a row per class with its name (``hellofmt show``).

Distilled images are the half of a bundle a user can judge by eye (are they the classes? are they
mosaics of patches? do they repeat?), and the only other way to see them is ``ds.images`` and a
plotting library. :func:`contact_sheet` draws them with Pillow alone: a label column (the class name,
its image folder when that differs, and its image count), then up to ``per_class`` tiles. Small
images are enlarged with nearest-neighbour resampling so their pixels stay as stored.

:func:`export_images` (``hellofmt export``) writes the same images as an image folder
``DIR/CLASS_FOLDER/NNNNN.png`` for tools that read folders; lossless PNG, so the pixels are the stored ones
and ``hellofmt build --images DIR`` reads them back unchanged.
"""

from __future__ import annotations

import difflib
import io
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .bundle import Bundle
from .errors import InputError

__all__ = ["PREVIEW_MAX_BYTES", "PREVIEW_MAX_CLASSES", "Preview", "SheetLayout", "class_folder_names",
           "contact_sheet", "export_images", "preview_png", "resolve_classes", "write_contact_sheet"]

GAP = 2  # pixels between tiles and rows
MIN_TILE = 64  # smaller images are enlarged to this side, so a 32-px image is visible
MAX_TILE = 160  # larger ones are shrunk to this side, so a row of 8 fits a screen
MAX_LABEL = 240  # the label column's widest, in pixels (longer names are cut with "...")
# The Hub page's preview (hellofmt push): a sheet of at most this many classes (evenly spaced over the
# label order; ImageNet's 1,000 rows would be a 160,000-pixel-tall strip), shrunk until its PNG fits the cap.
PREVIEW_MAX_CLASSES = 32
PREVIEW_MAX_BYTES = 20 * 1000 * 1000
_PREVIEW_MIN_BYTES = 1000  # a smaller cap cannot hold a legible PNG of any sheet
_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)


@dataclass
class SheetLayout:
    """Where things go on a sheet: ``rows`` (class indices, top to bottom), ``columns`` (tiles per row),
    ``tile`` (side in pixels), ``label_width`` (pixels), and the sheet's ``width`` x ``height``."""

    rows: list[int]
    columns: int
    tile: int
    label_width: int

    @property
    def width(self) -> int:
        return self.label_width + self.columns * (self.tile + GAP) + GAP

    @property
    def height(self) -> int:
        return len(self.rows) * (self.tile + GAP) + GAP


def resolve_classes(requested: Sequence[str | int] | None, classes: Sequence[str],
                    folders: Sequence[str] | None = None) -> list[int]:
    """Class indices for ``requested`` entries: a class name, an image-folder name, or an index.

    Args:
        requested: what the user asked for (None or empty: every class, in label order).
        classes: the bundle's class names.
        folders: the bundle's class folder names (``manifest.class_folders``), if recorded.

    Returns:
        The class indices, in the order asked, without repeats.

    Raises:
        InputError: an entry that is none of these (with the closest names).
    """
    if not requested:
        return list(range(len(classes)))
    by_name = {c: i for i, c in enumerate(classes)}
    by_folder = {f: i for i, f in enumerate(folders or [])}
    out: list[int] = []
    for r in requested:
        text = str(r).strip()
        i = by_name.get(text, by_folder.get(text))
        if i is None and text.lstrip("-").isdigit():
            i = int(text)
            if not 0 <= i < len(classes):
                raise InputError(f"class index {i} is out of range for {len(classes)} classes", field="--classes")
        if i is None:
            close = difflib.get_close_matches(text, [*classes, *(folders or [])], n=3)
            raise InputError(
                f"{text!r} is not a class of the bundle", field="--classes",
                fix=(f"did you mean {', '.join(map(repr, close))}? " if close else "")
                + "give class names, folder names or indices (hellofmt info lists them)",
            )
        if i not in out:
            out.append(i)
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:  # Pillow >= 10.1 scales its built-in font; older ones have one fixed size
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - old Pillow
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut with '...' to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(
    bundle: Bundle | str | os.PathLike[str],
    *,
    classes: Sequence[str | int] | None = None,
    per_class: int = 8,
    tile: int | None = None,
) -> Image.Image:
    """Draw a bundle's images as a grid: one row per class (its label on the left), ``per_class`` images each.

    Args:
        bundle: an opened :class:`~hellofmt.bundle.Bundle` or a bundle directory.
        classes: the classes to show (names, folder names or indices; default: all, in label order).
        per_class: at most this many images per class, the first ones of the class in the bundle.
        tile: side of each tile in pixels (default: the images' side, kept between 64 and 160).

    Returns:
        An RGB ``PIL.Image`` of :class:`SheetLayout`'s ``width`` x ``height``.

    Raises:
        InputError: an unknown class, or ``per_class`` / ``tile`` below 1.
        HellofmtError: the bundle cannot be opened or its images decoded.
    """
    return _draw(bundle, classes, per_class, tile)[0]


def _draw(bundle, classes, per_class: int, tile: int | None) -> tuple[Image.Image, SheetLayout]:
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    if per_class < 1:
        raise InputError(f"expected at least 1 image per class, got {per_class}", field="--per-class")
    if tile is not None and not 1 <= tile <= 4096:
        raise InputError(f"expected a tile side in [1, 4096] pixels, got {tile}", field="--tile")
    m = bundle.manifest
    rows = resolve_classes(classes, m.classes, m.class_folders)
    images, labels = bundle.read_images()
    side = max(m.images.height, m.images.width)
    tile = tile or min(MAX_TILE, max(MIN_TILE, side))
    font = _font(max(10, min(16, tile // 5)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def label(i: int) -> list[str]:
        folder = m.class_folders[i] if m.class_folders else None
        lines = [m.classes[i]]
        if folder and folder != m.classes[i]:
            lines.append(folder)
        lines.append(f"{m.images.per_class[i]} images")
        return lines

    texts = {i: label(i) for i in rows}
    widest = max((measure.textlength(t, font=font) for i in rows for t in texts[i]), default=0)
    columns = max(1, min(per_class, max((m.images.per_class[i] for i in rows), default=1)))
    layout = SheetLayout(rows=rows, columns=columns, tile=tile, label_width=int(min(MAX_LABEL, widest + 12)))
    sheet = Image.new("RGB", (layout.width, layout.height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    line_h = font.getbbox("Ag")[3] + 2 if hasattr(font, "getbbox") else 12
    for r, c in enumerate(rows):
        y = GAP + r * (tile + GAP)
        for k, t in enumerate(texts[c]):
            if (k + 1) * line_h <= tile:
                draw.text((4, y + k * line_h), _fit(draw, t, font, layout.label_width - 8), fill=_INK, font=font)
        idx = (labels == c).nonzero().flatten()[:columns].tolist()
        for j, n in enumerate(idx):
            img = Image.fromarray(images[n].permute(1, 2, 0).numpy(), "RGB")
            if side != tile:  # enlarge pixel by pixel (the pixels as stored), shrink smoothly
                scale = tile / side
                size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
                img = img.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)
            sheet.paste(img, (layout.label_width + GAP + j * (tile + GAP), y))
    return sheet, layout


def write_contact_sheet(
    bundle: Bundle | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    classes: Sequence[str | int] | None = None,
    per_class: int = 8,
    tile: int | None = None,
) -> SheetLayout:
    """Write :func:`contact_sheet` as a PNG at ``out`` (parent folders created) and return its layout.

    Args:
        bundle: an opened :class:`~hellofmt.bundle.Bundle` or a bundle directory.
        out: the PNG file to write (replaced if it exists).
        classes: as :func:`contact_sheet`.
        per_class: as :func:`contact_sheet`.
        tile: as :func:`contact_sheet`.

    Returns:
        The :class:`SheetLayout` drawn (rows, columns, tile, size).
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"the contact sheet is a PNG; got {out.name!r}", field="--out", fix="name it FILE.png")
    sheet, layout = _draw(bundle, classes, per_class, tile)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return layout


@dataclass
class Preview:
    """The PNG :func:`preview_png` made: its bytes, pixel size, the classes shown (of how many), the
    images per row, and ``scale`` (1.0, or the factor the sheet was shrunk by to fit the byte cap)."""

    data: bytes
    width: int
    height: int
    classes_shown: int
    num_classes: int
    per_class: int
    scale: float = 1.0


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def preview_png(
    bundle: Bundle | str | os.PathLike[str],
    *,
    max_bytes: int = PREVIEW_MAX_BYTES,
    max_classes: int = PREVIEW_MAX_CLASSES,
    per_class: int = 8,
) -> Preview:
    """The contact sheet ``hellofmt push`` shows at the top of the Hub card, as PNG bytes under a cap.

    The sheet is :func:`contact_sheet`'s, of every class when there are at most ``max_classes``, else of
    ``max_classes`` classes evenly spaced over the label order. A PNG larger than ``max_bytes`` is
    downscaled (smoothly, by the square root of the excess and a margin, until it fits), never
    uploaded as it is.

    Args:
        bundle: an opened :class:`~hellofmt.bundle.Bundle` or a bundle directory.
        max_bytes: the most bytes the PNG may have (default 20 MB).
        max_classes: the most class rows the sheet shows.
        per_class: images per row (the first ones of each class).

    Returns:
        A :class:`Preview`.

    Raises:
        InputError: ``max_bytes`` below 1000 or ``max_classes`` below 1.
    """
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    if max_bytes < _PREVIEW_MIN_BYTES:
        raise InputError(f"a preview cap of {max_bytes} bytes cannot hold a legible PNG", field="preview_max_bytes",
                         fix=f"give at least {_PREVIEW_MIN_BYTES} bytes (default {PREVIEW_MAX_BYTES:,})")
    if max_classes < 1:
        raise InputError(f"expected at least 1 class in the preview, got {max_classes}", field="max_classes")
    n = bundle.manifest.num_classes
    rows = list(range(n)) if n <= max_classes else sorted({i * n // max_classes for i in range(max_classes)})
    sheet, layout = _draw(bundle, rows, per_class, None)
    data, img, scale = _png(sheet), sheet, 1.0
    while len(data) > max_bytes and min(img.size) > 1:
        # PNG bytes grow about with the pixel count: shrink both sides by the square root of the excess.
        scale *= min(0.9, 0.95 * (max_bytes / len(data)) ** 0.5)
        size = (max(1, round(sheet.width * scale)), max(1, round(sheet.height * scale)))
        img = sheet.resize(size, Image.LANCZOS)
        data = _png(img)
    return Preview(data=data, width=img.width, height=img.height, classes_shown=len(rows), num_classes=n,
                   per_class=layout.columns, scale=scale)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_folder(name: str) -> str:
    """``name`` as one portable path component: runs of other characters become ``_``; no dot or ``_`` at the ends."""
    return _UNSAFE.sub("_", name.strip()).strip("._")[:100]


def class_folder_names(classes: Sequence[str], folders: Sequence[str] | None = None) -> list[str]:
    """The folder each class is exported to: its recorded image folder, else a filesystem-safe class name.

    A recorded folder that is not one plain path component (a separator, ``..``, a control character) is
    made safe the same way, so a bundle can never make :func:`export_images` write outside its folder.
    Names that would clash (also ignoring case, as macOS and Windows do) get ``_<index>`` appended.

    Args:
        classes: the bundle's class names.
        folders: the bundle's class folder names (``manifest.class_folders``), if recorded.

    Returns:
        One distinct folder name per class, in label order.
    """
    out: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(classes):
        folder = folders[i] if folders else name
        if not folder or _safe_folder(folder) != folder:
            folder = _safe_folder(folder) or f"class_{i}"
        if folder.lower() in seen:
            folder = f"{folder}_{i}"
        seen.add(folder.lower())
        out.append(folder)
    return out


def export_images(bundle: Bundle | str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Write a bundle's images as an image folder ``out_dir/CLASS_FOLDER/NNNNN.png`` (numbered per class).

    The class folders are the manifest's ``class_folders`` when recorded, else filesystem-safe class
    names (:func:`class_folder_names`). ``out_dir`` may exist only if empty: nothing is ever replaced.

    Args:
        bundle: an opened :class:`~hellofmt.bundle.Bundle` or a bundle directory.
        out_dir: the folder to create (or an empty folder to fill).

    Returns:
        The number of images written to each class folder, in label order.

    Raises:
        InputError: ``out_dir`` is a file, or a folder that is not empty.
        HellofmtError: the bundle cannot be opened or its images decoded.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError("is a file, not a folder", file=out, field="DIR",
                         fix="give a new folder name for the exported images")
    if out.is_dir() and any(out.iterdir()):
        raise InputError("already exists and is not empty; export never replaces files", file=out, field="DIR",
                         fix="give a new (or empty) folder, or remove this one yourself")
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    m = bundle.manifest
    folders = class_folder_names(m.classes, m.class_folders)
    images, labels = bundle.read_images()  # decode everything first: a bad bundle leaves no half-written folder
    counts = dict.fromkeys(folders, 0)
    created = not out.exists()  # else an empty folder of the user's: kept, emptied again on failure
    try:
        for f in folders:
            (out / f).mkdir(parents=True, exist_ok=True)
        for img, c in zip(images, labels.tolist()):
            f = folders[c]
            Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB").save(out / f / f"{counts[f]:05d}.png", format="PNG")
            counts[f] += 1
    except BaseException:  # a full disk, an interrupt: remove what this run wrote, nothing else
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for f in folders:
                shutil.rmtree(out / f, ignore_errors=True)
        raise
    return counts
