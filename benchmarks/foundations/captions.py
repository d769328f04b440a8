"""Image-caption pairs generated on this machine, for pretraining small open_clip foundations.

Nothing here reads an evaluation set. The shapes and textures come from a generator of their own
(six shapes, seven textures, named colours, clutter, gradients; other size, period and placement
ranges than ``examples/quickstart.py`` and ``benchmarks/defaults/data.py``), and the characters are
*rendered* from fonts, never scanned: scikit-learn's handwritten digits (the ``digits32`` set) are
not used. Every caption says only what the generator drew.

Sources (``SOURCES``):

- ``glyphs``: a digit or a letter rendered in a random installed TrueType font (Debian's
  ``fonts-dejavu-core`` at least; ``apt-get install fonts-liberation fonts-freefont-ttf
  fonts-noto-core fonts-urw-base35`` gives more), at a random size, weight, slant, position and
  polarity, sometimes rendered small and upsampled (a blurry low-resolution copy);
  "the digit 7", "a photo of the digit seven", "the letter g".
- ``emoji``: an emoji from a colour emoji font (``apt-get install fonts-noto-color-emoji``; about
  1,200 of them), captioned with its Unicode name ("a photo of a llama.", "the hot beverage emoji"),
  on the shapes' backgrounds at a random size, place and tilt. Not in the clip32/clip64 presets.
- ``shapes``: a textured shape (disk, bar, square, triangle, ring, cross) on a plain, gradient or
  noisy background, sometimes with clutter; "a horizontal disk", "a large red bar with checker
  pattern on the left".

A caption is a *phrase* (what is in the image) placed in a *template* ("a photo of a {}.", ...). The
templates mix CLIP's ImageNet prompt style with plain phrases, the way web alt-text does.
"""

from __future__ import annotations

import glob
import os
import unicodedata
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SHAPES = ("disk", "bar", "square", "triangle", "ring", "cross")
TEXTURES = ("horizontal", "vertical", "diagonal", "checker", "dotted", "grid", "plain")
COLOURS = {
    "red": (0.85, 0.1, 0.1), "green": (0.1, 0.7, 0.2), "blue": (0.15, 0.25, 0.9), "yellow": (0.95, 0.9, 0.1),
    "orange": (1.0, 0.55, 0.05), "purple": (0.55, 0.15, 0.7), "pink": (1.0, 0.5, 0.75), "cyan": (0.1, 0.85, 0.9),
    "white": (0.97, 0.97, 0.97), "black": (0.05, 0.05, 0.05), "gray": (0.5, 0.5, 0.5), "brown": (0.5, 0.3, 0.1),
}
TEMPLATES = (
    "{}", "a {}.", "a photo of a {}.", "a picture of the {}.", "an image of a {}.", "a close-up photo of a {}.",
    "itap of a {}.", "a bad photo of the {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a blurry photo of a {}.", "a low resolution photo of the {}.", "a drawing of a {}.", "art of the {}.",
    "a {} in a video game.", "a origami {}.", "there is a {} in this image.",
)


def _article(phrase: str) -> str:
    return phrase  # templates carry their own article ("a {}"), like CLIP's ImageNet prompts


def _font_files(extra_dirs: Sequence[str] = ()) -> set[str]:
    """Every TrueType/OpenType font file under the usual system folders (and ``extra_dirs``)."""
    found: set[str] = set()
    for root in ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"), *extra_dirs):
        for ext in ("ttf", "otf", "TTF", "OTF"):
            found.update(glob.glob(os.path.join(root, "**", f"*.{ext}"), recursive=True))
    return found


def find_fonts(extra_dirs: Sequence[str] = ()) -> list[str]:
    """Every font file of :func:`_font_files`, sorted, without colour-bitmap emoji fonts (Pillow renders
    those at one size only; the ``emoji`` source has them)."""
    return sorted(f for f in _font_files(extra_dirs) if "emoji" not in os.path.basename(f).lower())


def _background(rng: np.random.Generator, s: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """A float ``[s, s, 3]`` background: plain, a gradient, or noise blocks."""
    kind = rng.random()
    if kind < 0.4:
        img = np.tile(rng.uniform(0, 1, 3), (s, s, 1))
    elif kind < 0.75:
        a, b = rng.uniform(0, 1, (2, 3))
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / s
        t = ((t - t.min()) / max(1e-6, float(t.max() - t.min())))[..., None]
        img = a * (1 - t) + b * t
    else:
        g = int(rng.integers(2, 6))
        blocks = rng.uniform(0, 1, (g, g, 3))
        img = np.asarray(Image.fromarray((blocks * 255).astype(np.uint8)).resize((s, s), Image.Resampling.BILINEAR),
                         dtype=np.float32) / 255.0
    return img


class Glyphs:
    """Rendered characters: digits (twice as often as letters) in random fonts and styles."""

    name = "glyphs"

    def __init__(self, fonts: Sequence[str] | None = None) -> None:
        self.fonts = list(find_fonts() if fonts is None else fonts)
        self._cache: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}
        usable = []
        for path in self.fonts:
            try:
                f = ImageFont.truetype(path, 20)
                if f.getbbox("0")[2] > 0 and f.getbbox("A")[2] > 0:  # has Latin digits and letters
                    usable.append(path)
            except OSError:
                continue
        self.fonts = usable

    def __len__(self) -> int:
        return len(self.fonts)

    def _font(self, i: int, size: int) -> ImageFont.FreeTypeFont:
        key = (i, size)
        if key not in self._cache:
            self._cache[key] = ImageFont.truetype(self.fonts[i], size)
        return self._cache[key]

    def sample(self, rng: np.random.Generator, side: int) -> tuple[np.ndarray, str]:
        digit = rng.random() < 0.67
        if digit:
            d = int(rng.integers(10))
            char = str(d)
            phrase = f"digit {d}" if rng.random() < 0.6 else (f"number {DIGIT_WORDS[d]}" if rng.random() < 0.5
                                                             else f"digit {DIGIT_WORDS[d]}")
        else:
            char = LETTERS[int(rng.integers(len(LETTERS)))]
            case = "uppercase" if char.isupper() else "lowercase"
            phrase = f"letter {char}" if rng.random() < 0.6 else f"{case} letter {char}"
        # Render on a canvas 4x the side (then downsample): antialiased strokes at any size; a third
        # of the time at a low resolution first (8-14 px), the blur of a small scan.
        canvas = side * 4
        low = rng.random() < 0.35
        font = self._font(int(rng.integers(len(self.fonts))), int(canvas * rng.uniform(0.5, 0.95)))
        dark_bg = rng.random() < 0.6
        if rng.random() < 0.5:  # gray levels, like a scan
            ink, paper = (1.0, 0.0) if dark_bg else (0.0, 1.0)
            ink_rgb = np.full(3, ink * rng.uniform(0.7, 1.0) + (1 - ink) * rng.uniform(0.0, 0.3))
            paper_rgb = np.full(3, paper * rng.uniform(0.7, 1.0) + (1 - paper) * rng.uniform(0.0, 0.3))
        else:
            ink_rgb = rng.uniform(0, 1, 3)
            paper_rgb = np.where(rng.uniform(0, 1, 3) < 0.5, 1 - ink_rgb, rng.uniform(0, 1, 3))
            if np.abs(ink_rgb - paper_rgb).mean() < 0.25:
                paper_rgb = 1 - ink_rgb
        mask = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(mask)
        stroke = int(rng.integers(0, max(1, canvas // 24)))
        box = draw.textbbox((0, 0), char, font=font, stroke_width=stroke)
        w, h = box[2] - box[0], box[3] - box[1]
        x = (canvas - w) / 2 - box[0] + rng.uniform(-0.12, 0.12) * canvas
        y = (canvas - h) / 2 - box[1] + rng.uniform(-0.12, 0.12) * canvas
        draw.text((x, y), char, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
        angle = rng.uniform(-18, 18)
        shear = rng.uniform(-0.25, 0.25)
        mask = mask.transform((canvas, canvas), Image.Transform.AFFINE,
                              (1, shear, -shear * canvas / 2, 0, 1, 0), resample=Image.Resampling.BILINEAR)
        mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR)
        small = int(rng.integers(8, 15)) if low else side
        mask = mask.resize((small, small), Image.Resampling.BOX)
        if small != side:
            mask = mask.resize((side, side), Image.Resampling.BILINEAR)
        if rng.random() < 0.25:
            mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * side / 32))
        m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
        img = m * ink_rgb + (1 - m) * paper_rgb
        img = img + rng.normal(0, rng.uniform(0, 0.08), img.shape)
        return (img.clip(0, 1) * 255).astype(np.uint8), phrase


class Shapes:
    """Textured shapes with compositional captions: texture, shape, and sometimes colour, size and
    place ("a small red dotted triangle on the left")."""

    name = "shapes"

    def sample(self, rng: np.random.Generator, side: int) -> tuple[np.ndarray, str]:
        s = side
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        img = _background(rng, s, xx, yy)
        for _ in range(int(rng.integers(0, 3))):  # clutter: small soft squares and blobs
            cx, cy, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0.04, 0.12) * s
            blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if rng.random() < 0.5 else (
                (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r))
            img[blob] = rng.uniform(0, 1, 3)
        size_word = ""
        r = rng.uniform(0.16, 0.42) * s
        if r < 0.22 * s:
            size_word = "small"
        elif r > 0.36 * s:
            size_word = "large"
        cx = rng.uniform(r * 0.8, s - r * 0.8)
        cy = rng.uniform(r * 0.8, s - r * 0.8)
        dx, dy = xx - cx, yy - cy
        a = rng.uniform(0, np.pi)
        u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
        if shape == "disk":
            mask = dx**2 + dy**2 <= r * r
        elif shape == "bar":
            mask = (np.abs(u) <= r * rng.uniform(1.1, 1.5)) & (np.abs(v) <= r * rng.uniform(0.3, 0.5))
        elif shape == "square":
            mask = (np.abs(u) <= r * 0.8) & (np.abs(v) <= r * 0.8)
        elif shape == "triangle":
            # three half-planes at 120 degrees: an equilateral triangle of inradius r/2
            mask = np.ones_like(xx, dtype=bool)
            for k in range(3):
                t = a + k * 2 * np.pi / 3
                mask &= (dx * np.cos(t) + dy * np.sin(t)) <= r * 0.5
        elif shape == "ring":
            d2 = dx**2 + dy**2
            mask = (d2 <= r * r) & (d2 >= (r * rng.uniform(0.45, 0.65)) ** 2)
        else:  # cross
            w = r * rng.uniform(0.25, 0.4)
            mask = ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
        period = rng.uniform(0.07, 0.2) * s
        ph = rng.uniform(0, period, 2)
        jitter = rng.uniform(-0.15, 0.15)  # stripes near, not exactly at, their named direction
        if texture == "horizontal":
            on = ((yy + jitter * xx + ph[0]) % period) < period / 2
        elif texture == "vertical":
            on = ((xx + jitter * yy + ph[0]) % period) < period / 2
        elif texture == "diagonal":
            sgn = 1.0 if rng.random() < 0.5 else -1.0
            on = ((xx + sgn * yy + ph[0]) % (period * 1.4)) < period * 0.7
        elif texture == "checker":
            on = (((xx + ph[0]) % period) < period / 2) ^ (((yy + ph[1]) % period) < period / 2)
        elif texture == "dotted":
            on = (((xx + ph[0]) % period - period / 2) ** 2 + ((yy + ph[1]) % period - period / 2) ** 2) < (
                period / 3.2) ** 2
        elif texture == "grid":
            on = (((xx + ph[0]) % period) < period * 0.25) | (((yy + ph[1]) % period) < period * 0.25)
        else:
            on = np.ones_like(xx, dtype=bool)
        colour_name = None
        if rng.random() < 0.4:
            colour_name = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            fg1 = np.clip(np.array(COLOURS[colour_name]) + rng.normal(0, 0.05, 3), 0, 1)
        else:
            fg1 = rng.uniform(0, 1, 3)
        fg2 = 1.0 - fg1 if rng.random() < 0.6 else rng.uniform(0, 1, 3)
        img = np.where(mask[..., None], np.where(on[..., None], fg1, fg2), img)
        img = img + rng.normal(0, rng.uniform(0.0, 0.12), img.shape)
        img = (img.clip(0, 1) * 255).astype(np.uint8)
        # the phrase: "<texture> <shape>" as the core, sometimes with size, colour and place
        core = f"{texture} {shape}" if texture != "plain" else f"plain {shape}"
        style = rng.random()
        if style < 0.5:
            phrase = core
        elif style < 0.7 and texture not in ("plain",):
            pattern = {"horizontal": "horizontal stripes", "vertical": "vertical stripes",
                       "diagonal": "diagonal stripes", "checker": "a checker pattern", "dotted": "dots",
                       "grid": "a grid pattern"}[texture]
            phrase = f"{shape} with {pattern}"
        else:
            words = [w for w in (size_word, colour_name) if w and rng.random() < 0.7]
            phrase = " ".join([*words, core])
            if rng.random() < 0.4:
                horiz = "left" if cx < s / 3 else ("right" if cx > 2 * s / 3 else None)
                vert = "top" if cy < s / 3 else ("bottom" if cy > 2 * s / 3 else None)
                where = " ".join(w for w in (vert, horiz) if w)
                if where:
                    phrase += f" at the {where}" if vert else f" on the {where}"
        return img, phrase


# The blocks whose emoji have a name worth a caption: pictographs, faces, transport, supplemental
# symbols, and the older miscellaneous symbols and dingbats.
EMOJI_RANGES = ((0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF),
                (0x1FA70, 0x1FAFF), (0x2600, 0x27BF))
# Names that are not things (skin-tone modifiers, flag letters) or that would caption a digit or a
# letter, which belong to the glyphs source.
EMOJI_SKIP = ("EMOJI MODIFIER", "REGIONAL INDICATOR", "DIGIT", "LETTER", "NUMBER", "KEYCAP", "VARIATION")


def find_emoji_fonts(extra_dirs: Sequence[str] = ()) -> list[str]:
    """Colour emoji font files (``emoji`` in the file name) of :func:`_font_files`, sorted."""
    return sorted(f for f in _font_files(extra_dirs) if "emoji" in os.path.basename(f).lower())


class Emoji:
    """Emoji from a colour emoji font (Debian's ``fonts-noto-color-emoji``), captioned with their
    Unicode names ("a photo of a llama.", "the hot beverage emoji"), on the shapes' backgrounds at a
    random size, place and tilt.

    Bitmap colour fonts (Noto's CBDT) render at one pixel size only (109 px): every emoji is rendered
    once at the font's size, cropped to its box, and scaled down per sample."""

    name = "emoji"

    def __init__(self, fonts: Sequence[str] | None = None) -> None:
        self.font_path: str | None = None
        self.glyphs: list[Image.Image] = []  # RGBA, cropped to the emoji's box
        self.names: list[str] = []
        for path in (find_emoji_fonts() if fonts is None else fonts):
            font = self._open(path)
            if font is None:
                continue
            self._render_all(font)
            if self.glyphs:
                self.font_path = path
                break

    @staticmethod
    def _open(path: str) -> ImageFont.FreeTypeFont | None:
        for size in (109, 136, 137, 128, 96, 64):  # bitmap fonts accept their strike's size only
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
        return None

    def _render_all(self, font: ImageFont.FreeTypeFont) -> None:
        side = int(font.size * 1.3)

        def render(ch: str) -> Image.Image:
            im = Image.new("RGBA", (side, side), (0, 0, 0, 0))
            ImageDraw.Draw(im).text((0, 0), ch, font=font, embedded_color=True)
            return im

        missing = np.asarray(render("\U000F0000"))  # a private-use code point: the font's "no glyph"
        for lo, hi in EMOJI_RANGES:
            for cp in range(lo, hi + 1):
                try:
                    name = unicodedata.name(chr(cp))
                except ValueError:
                    continue
                if any(w in name for w in EMOJI_SKIP):
                    continue
                im = render(chr(cp))
                a = np.asarray(im)
                box = im.getbbox()
                if box is None or a[..., 3].max() == 0 or np.array_equal(a, missing):
                    continue
                self.glyphs.append(im.crop(box))
                self.names.append(name.lower())

    def __len__(self) -> int:
        return len(self.glyphs)

    def sample(self, rng: np.random.Generator, side: int) -> tuple[np.ndarray, str]:
        s = side
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        img = _background(rng, s, xx, yy)
        k = int(rng.integers(len(self.glyphs)))
        glyph = self.glyphs[k]
        # Scale the emoji's longer side to 45-95% of the image, tilt it a little, place it anywhere it fits.
        target = rng.uniform(0.45, 0.95) * s
        scale = target / max(glyph.size)
        w, h = max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale))
        small = glyph.resize((w, h), Image.Resampling.LANCZOS)
        small = small.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR, expand=True)
        w, h = small.size
        x = int(rng.integers(0, max(1, s - w + 1))) if w < s else (s - w) // 2
        y = int(rng.integers(0, max(1, s - h + 1))) if h < s else (s - h) // 2
        layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
        layer.paste(small, (x, y), small)
        rgba = np.asarray(layer, dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        img = rgba[..., :3] * alpha + img * (1 - alpha)
        img = img + rng.normal(0, rng.uniform(0.0, 0.06), img.shape)
        name = self.names[k]
        phrase = name if rng.random() < 0.7 else f"{name} emoji"
        return (img.clip(0, 1) * 255).astype(np.uint8), phrase


SOURCES: dict[str, Callable[[], object]] = {"glyphs": Glyphs, "shapes": Shapes, "emoji": Emoji}


class CaptionError(ValueError):
    """A caption source that yields nothing, or an unknown source name."""


def make_sources(names: Sequence[str], fonts: Sequence[str] | None = None) -> list:
    """The named sources, each checked to yield images: a glyph source with no usable font is an
    error naming the font packages to install, not an empty run."""
    out = []
    for n in names:
        if n not in SOURCES:
            raise CaptionError(f"unknown caption source {n!r}: one of {', '.join(SOURCES)}")
        src = Glyphs(fonts) if n == "glyphs" else SOURCES[n]()
        if n == "emoji" and len(src) == 0:
            raise CaptionError(
                "the emoji source found no colour emoji font that renders (looked for *emoji*.ttf under "
                "/usr/share/fonts, /usr/local/share/fonts, ~/.fonts): apt-get install fonts-noto-color-emoji, "
                "or drop 'emoji' from --sources"
            )
        if n == "glyphs" and len(src) == 0:
            raise CaptionError(
                "the glyphs source found no usable TrueType font (looked under /usr/share/fonts, "
                "/usr/local/share/fonts, ~/.fonts): apt-get install fonts-dejavu-core (or pass --fonts DIR), "
                "or drop 'glyphs' from --sources"
            )
        out.append(src)
    if not out:
        raise CaptionError("no caption source given: --sources needs at least one of " + ", ".join(SOURCES))
    return out


def batch(sources: Sequence, weights: Sequence[float], rng: np.random.Generator, n: int,
          side: int) -> tuple[np.ndarray, list[str]]:
    """``n`` pairs: uint8 images ``[n, side, side, 3]`` and their captions (a phrase in a template)."""
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    which = rng.choice(len(sources), size=n, p=p)
    images = np.empty((n, side, side, 3), dtype=np.uint8)
    captions = []
    for i, k in enumerate(which):
        img, phrase = sources[k].sample(rng, side)
        images[i] = img
        captions.append(TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(_article(phrase)))
    return images, captions
