"""benchmarks/foundations/pretrain.py: the script that pretrains the project's own small open_clip
foundations. The real runs take half an hour; these tests run it for a few steps on the tests' tiny
config, and check the refusals (over budget, a source with nothing to draw, weights that do not fit)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
FOUNDATIONS = ROOT / "benchmarks" / "foundations"
TINY = ROOT / "tests" / "data" / "hf-test-tiny-vit.json"


def _load(name: str):
    return load_script(FOUNDATIONS / f"{name}.py", f"hellofmt_bench_{name}")


@pytest.fixture(autouse=True)
def _keep_threads():
    import torch

    n = torch.get_num_threads()  # train() sets the thread count for its run; the rest of the suite keeps its own
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pretrain():
    return _load("pretrain")


@pytest.fixture(scope="module")
def captions():
    return _load("captions")


def _args(pretrain, out: Path, seed: int = 0, steps: int = 3):
    return pretrain.parse(["--config", str(TINY), "--name", "tiny", "--out", str(out), "--steps", str(steps),
                           "--batch", "8", "--warmup", "1", "--seed", str(seed), "--sources", "shapes",
                           "--evals", "--threads", "1", "--workers", "0", "--quiet"])


def test_shapes_captions_say_what_was_drawn(captions):
    rng = np.random.default_rng(0)
    imgs, caps = captions.batch([captions.Shapes()], [1.0], rng, 32, 32)
    assert imgs.shape == (32, 32, 32, 3) and imgs.dtype == np.uint8
    assert len(caps) == 32
    # every caption names one of the generator's shapes
    assert all(any(s in c for s in captions.SHAPES) for c in caps)
    # different draws differ: the generator is not stuck on one image
    assert len({imgs[i].tobytes() for i in range(32)}) == 32


def test_glyph_source_without_fonts_is_an_error_not_an_empty_run(captions):
    with pytest.raises(captions.CaptionError, match="no usable TrueType font"):
        captions.make_sources(["glyphs"], fonts=[])
    with pytest.raises(captions.CaptionError, match="no caption source"):
        captions.make_sources([])


def _emoji_or_symbol_font(captions) -> list[str]:
    """A colour emoji font if installed (fonts-noto-color-emoji), else any installed font with some of the
    emoji ranges' older symbols (DejaVu has the sun, the snowman...): the source's code runs either way."""
    fonts = captions.find_emoji_fonts() or captions.find_fonts()
    if not fonts:
        pytest.skip("no font installed: apt-get install fonts-noto-color-emoji (or fonts-dejavu-core)")
    return fonts


def test_emoji_captions_are_the_unicode_names_of_what_was_drawn(captions):
    fonts = _emoji_or_symbol_font(captions)
    src = captions.Emoji(fonts)
    if captions.find_emoji_fonts():
        assert len(src) > 1000, src.font_path  # Noto Color Emoji: about 1,250 named emoji in these ranges
    elif len(src) == 0:
        pytest.skip("no installed font draws any of the emoji ranges: apt-get install fonts-noto-color-emoji")
    assert len(src.names) == len(src.glyphs)
    # the font's "no glyph" box is not an emoji, and neither digits, letters nor keycaps are (glyphs' work)
    assert not any(w.lower() in n for n in src.names for w in captions.EMOJI_SKIP)
    rng = np.random.default_rng(0)
    imgs, caps = captions.batch([src], [1.0], rng, 24, 32)
    assert imgs.shape == (24, 32, 32, 3) and imgs.dtype == np.uint8
    assert all(any(n in c for n in src.names) for c in caps)
    assert len({imgs[i].tobytes() for i in range(24)}) == 24
    # deterministic by the generator's seed
    again, caps2 = captions.batch([src], [1.0], np.random.default_rng(0), 24, 32)
    assert caps2 == caps and np.array_equal(again, imgs)


def test_emoji_source_without_a_colour_font_is_an_error_naming_the_package(captions, monkeypatch):
    monkeypatch.setattr(captions, "find_emoji_fonts", lambda extra_dirs=(): [])
    with pytest.raises(captions.CaptionError, match="fonts-noto-color-emoji"):
        captions.make_sources(["emoji"])
    assert len(captions.Emoji(fonts=[])) == 0


def test_a_config_over_the_budget_is_refused_with_the_estimate_and_the_flag(pretrain, tmp_path):
    import open_clip

    big = tmp_path / "vitb.json"
    big.write_text(json.dumps(open_clip.get_model_config("ViT-B-16")))
    args = pretrain.parse(["--config", str(big), "--name", "vitb", "--out", str(tmp_path / "out"), "--evals"])
    with pytest.raises(pretrain.BudgetError, match=r"estimated \d+ min.*--force"):
        pretrain.train(args)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_pretraining_is_deterministic_by_seed_and_loads_as_a_foundation(pretrain, tmp_path):
    from hellofmt.foundation import load_foundation

    a = pretrain.train(_args(pretrain, tmp_path / "a", seed=0))
    b = pretrain.train(_args(pretrain, tmp_path / "b", seed=0))
    pretrain.train(_args(pretrain, tmp_path / "c", seed=1))
    wa, wb, wc = ((tmp_path / d / "tiny.safetensors").read_bytes() for d in "abc")
    assert wa == wb
    assert wa != wc
    assert a["loss_curve"] == b["loss_curve"] and a["final_loss"] is not None
    log = json.loads((tmp_path / "a" / "tiny.log.json").read_text())
    assert log["steps"] == 3 and log["sources"] == ["shapes"]
    # the pair it writes is a --foundation CONFIG.json:WEIGHTS.safetensors spec, through the real loader
    loaded = load_foundation(f"{tmp_path / 'a' / 'tiny.json'}:{tmp_path / 'a' / 'tiny.safetensors'}")
    assert loaded.image_size == 32


def test_weights_that_do_not_fit_the_config_are_refused_naming_a_tensor(pretrain, tmp_path):
    from hellofmt.errors import HellofmtError
    from hellofmt.foundation import load_foundation

    pretrain.train(_args(pretrain, tmp_path, steps=1))
    cfg = json.loads(TINY.read_text())
    cfg["vision_cfg"]["width"] = 96  # another model than the one the weights were trained as
    other = tmp_path / "other.json"
    other.write_text(json.dumps(cfg))
    first = r"first mismatching tensor: visual\.class_embedding is \(64,\) in the file, \(96,\)"
    with pytest.raises(HellofmtError, match=first):
        load_foundation(f"{other}:{tmp_path / 'tiny.safetensors'}")


def test_init_from_a_smaller_side_computes_the_same_function_on_a_2x_image(pretrain, tmp_path):
    import open_clip
    import torch
    import torch.nn.functional as F

    pretrain.train(_args(pretrain, tmp_path, steps=1))
    cfg = json.loads(TINY.read_text())
    cfg["vision_cfg"].update(image_size=64, patch_size=16)  # the same 16 patches, each twice the side
    name = pretrain._register(cfg, "hellofmt-test-init64")
    small = open_clip.create_model(pretrain._register(json.loads(TINY.read_text()), "hellofmt-test-init32"))
    small.load_state_dict(__import__("safetensors.torch").torch.load_file(str(tmp_path / "tiny.safetensors")))
    big = open_clip.create_model(name)
    pretrain.init_state(big, tmp_path / "tiny.safetensors")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a = small.eval().encode_image(x)
        b = big.eval().encode_image(F.interpolate(x, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
