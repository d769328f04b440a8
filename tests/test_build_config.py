"""BuildConfig: the build options written once. The options of ``hellofmt build`` are generated from its
fields (and nothing else, apart from the inputs), defaults and help texts included; unknown option names
are refused with the closest field as the fix; ``to_dict`` round-trips and is what a bundle's provenance
records; invalid values raise what they raised before the options moved into the config.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hellofmt.builder.config import (
    RESUME_FIELDS,
    BuildConfig,
    click_options,
    option,
    option_name,
)
from hellofmt.cli import main
from hellofmt.errors import BuildInputError

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "tests" / "data" / "hf-test-tiny-vit.json")

# `hellofmt build`'s own inputs (arguments of build_bundle, not config fields), by click parameter name.
INPUTS = {"train_data", "classes", "teachers", "teacher_weights", "foundation", "out", "images", "quiet"}

# Every option `hellofmt build --help` listed before the options moved into BuildConfig.
OPTIONS_BEFORE = """
--train-data --teacher --teacher-weights --foundation --out --images --ipc --classes --template --rank --head-rank
--alpha --head-alpha --targets --epochs --steps --batch-size --lr --weight-decay --loss --ce-weight --temperature
--mix --distill-mix --image-size --load-size --factor --candidates --refine-steps --refine-lr --refine-prior
--codec --quality --holdout --fidelity-views --embed-foundation --no-embed-foundation --checkpoint-dir
--checkpoint-every --resume --keep-checkpoints --overwrite --device --num-workers --seed --quiet
""".split()


def _build_command() -> click.Command:
    return main.commands["build"]


def _help_text() -> str:
    r = CliRunner().invoke(main, ["build", "--help"], terminal_width=400, max_content_width=400)
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())


# --------------------------------------------------------------------------------------------------
# one source: fields <-> options
# --------------------------------------------------------------------------------------------------
def test_every_option_comes_from_a_field_and_every_field_is_an_option():
    params = {p.name: p for p in _build_command().params if p.name != "_click_default_help"}
    fields = {f.name: f for f in dataclasses.fields(BuildConfig)}
    assert not INPUTS & set(fields)
    assert set(params) == set(fields) | INPUTS
    for name, f in fields.items():
        p = params[name]
        assert p.help == f.metadata["help"] and p.help, name
        assert option_name(name) in p.opts, name


def test_option_defaults_are_the_field_defaults():
    params = {p.name: p for p in _build_command().params}
    for f in dataclasses.fields(BuildConfig):
        assert params[f.name].default == f.default, f.name


def test_help_lists_every_option_it_listed_before_with_the_field_help():
    text = _help_text()
    for opt in OPTIONS_BEFORE:
        assert f"{opt} " in text or f"{opt}," in text, opt
    for f in dataclasses.fields(BuildConfig):
        assert " ".join(f.metadata["help"].split()) in text, f.name
    assert "[default: 0.005]" in text and "[default: cutmix]" in text  # shown from the field defaults
    assert "--loss [kl|mse]" in text and "--embed-foundation / --no-embed-foundation" in text


@pytest.fixture
def captured(monkeypatch):
    """Replace the pipeline by a recorder, so that the CLI's parsing is tested without a build."""
    from hellofmt.builder import pipeline

    calls = []

    def fake(train_data, teacher, foundation, out, config=None, **kw):
        calls.append(dict(train_data=train_data, teacher=teacher, foundation=foundation, out=out, config=config,
                          **kw))
        return pipeline.BuildResult(path=None)

    monkeypatch.setattr(pipeline, "build_bundle", fake)
    return calls


REQUIRED = ["build", "--train-data", "d", "--teacher", "t.py:make", "--foundation", "ViT-B-32", "--out", "o"]


def test_cli_without_options_gives_the_default_config(captured):
    r = CliRunner().invoke(main, [*REQUIRED, "--ipc", "3"])
    assert r.exit_code == 0, r.output
    (call,) = captured
    assert call["config"] == BuildConfig(ipc=3)
    assert (call["train_data"], call["teacher"], call["foundation"], call["out"]) == ("d", ["t.py:make"], "ViT-B-32",
                                                                                       "o")
    assert call["images"] is None and call["classes"] is None and call["teacher_weights"] is None
    assert call["progress"] is True


def test_cli_options_reach_the_config(captured):
    args = [*REQUIRED, "--images", "imgs", "--teacher", "u.py:make", "--teacher-weights", "w.safetensors",
            "--template", "a photo of {}", "--template", "{}", "--targets", "attn", "--rank", "4", "--lr", "0.5",
            "--loss", "mse", "--distill-mix", "none", "--embed-foundation", "--resume", "--device", "cpu",
            "--checkpoint-dir", "ck", "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    c = captured[0]["config"]
    assert c == BuildConfig(templates=("a photo of {}", "{}"), targets=("attn",), rank=4, lr=0.5, loss="mse",
                            distill_mix="none", embed_foundation=True, resume=True, device="cpu", checkpoint_dir="ck")
    assert captured[0]["teacher"] == ["t.py:make", "u.py:make"] and captured[0]["images"] == "imgs"
    assert captured[0]["teacher_weights"] == ["w.safetensors"] and captured[0]["progress"] is False
    r = CliRunner().invoke(main, [*REQUIRED, "--ipc", "1", "--no-embed-foundation"])
    assert r.exit_code == 0 and captured[1]["config"].embed_foundation is False


def test_cli_choices_come_from_the_fields():
    r = CliRunner().invoke(main, [*REQUIRED, "--ipc", "1", "--loss", "l1"])
    assert r.exit_code == 2 and "'l1' is not one of" in r.output


def test_generated_options_for_tuples_flags_and_choices():
    """The generator is generic: a pair of floats is ``--scale MIN MAX`` (click's nargs), a ``tuple[int, ...]``
    repeatable, a bool a flag (``--x/--no-x`` when the default is None)."""

    @dataclasses.dataclass
    class Toy:
        scale: tuple[float, float] | None = option(None, "Crop scale range.", metavar="MIN MAX")
        sizes: tuple[int, ...] | None = option(None, "Sizes (repeatable).", name="--size")
        fast: bool = option(False, "Go fast.")
        embed: bool | None = option(None, "Embed or not.")
        mode: str = option("a", "The mode.", choices=("a", "b"))

    got = {}

    @click.command(params=click_options(Toy))
    def cmd(**values):
        got.update(values)

    r = CliRunner().invoke(cmd, ["--scale", "0.25", "1", "--size", "3", "--size", "4", "--fast", "--no-embed",
                                 "--mode", "b"])
    assert r.exit_code == 0, r.output
    assert Toy(**got) == Toy(scale=(0.25, 1.0), sizes=(3, 4), fast=True, embed=False, mode="b")
    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 0 and got["scale"] is None and got["fast"] is False and got["embed"] is None
    r = CliRunner().invoke(cmd, ["--help"], terminal_width=200, max_content_width=200)
    assert "--scale MIN MAX" in r.output and "--size INTEGER" in r.output and "--embed / --no-embed" in r.output
    assert "[default: a]" in r.output
    r = CliRunner().invoke(cmd, ["--scale", "0.25"])
    assert r.exit_code == 2 and "requires 2 arguments" in r.output


# --------------------------------------------------------------------------------------------------
# unknown names, conversions
# --------------------------------------------------------------------------------------------------
def test_unknown_override_is_refused_with_a_suggestion(tmp_path):
    from hellofmt import build_bundle

    with pytest.raises(BuildInputError, match="unknown build option") as e:
        build_bundle(str(tmp_path / "nowhere"), "t.py:make", TINY_CONFIG, tmp_path / "out", ipc=1, rnak=4)
    assert e.value.field == "rnak" and "did you mean 'rank'" in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()
    with pytest.raises(BuildInputError, match="did you mean 'epochs'"):
        BuildConfig().replace(epoch=3)
    with pytest.raises(BuildInputError, match="hellofmt build --help"):
        BuildConfig().replace(zzzzzz=1)
    with pytest.raises(BuildInputError, match="did you mean 'head_rank'"):
        BuildConfig.from_dict({"ipc": 1, "headrank": 2})


def test_replace_leaves_the_original_alone():
    base = BuildConfig(ipc=2)
    c = base.replace(rank=32, templates=["{}"])
    assert (c.rank, c.ipc, c.templates) == (32, 2, ("{}",)) and base.rank == 16 and base.templates is None


def test_to_dict_round_trips_through_json():
    import torch

    c = BuildConfig(ipc=10, templates=["a {}"], targets=("attn",), alpha=4, device=torch.device("cpu"),
                    checkpoint_dir=Path("ck"), embed_foundation=True, codec="jpeg", quality=80)
    d = c.to_dict()
    assert d["templates"] == ["a {}"] and d["device"] == "cpu" and d["checkpoint_dir"] == "ck"
    assert isinstance(d["alpha"], float)
    assert list(d) == [f.name for f in dataclasses.fields(BuildConfig)]
    back = BuildConfig.from_dict(json.loads(json.dumps(d)))
    assert back == c and back.to_dict() == d
    assert BuildConfig.from_dict({}) == BuildConfig()
    assert BuildConfig(templates=[], targets=()) == BuildConfig()  # empty means the default


def test_resume_compares_the_same_options_as_before():
    from hellofmt.builder import pipeline

    assert set(pipeline._RESUME_KEYS) == {"foundation", "rank", "head_rank", "alpha", "head_alpha", "targets", "seed",
                                          "batch_size", "loss", "ipc", "factor", "image_size", "refine_steps",
                                          "selection", "select_scale"}
    assert set(RESUME_FIELDS) <= {f.name for f in dataclasses.fields(BuildConfig)}


# --------------------------------------------------------------------------------------------------
# validation: the same errors as before
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field, message", [
    (dict(ipc=0), "--ipc", "expected an integer >= 1, got 0"),
    (dict(factor=0), "--factor", "expected an integer >= 1, got 0"),
    (dict(rank=0), "--rank", "ranks must be >= 1"),
    (dict(head_rank=-1), "--rank", "--head-rank 0 turns the head delta off"),
    (dict(loss="l1"), "--loss", "expected mse or kl, got 'l1'"),
    (dict(mix="blend"), "--mix", "expected one of none, cutmix, mixup, cutmix-mixup, got 'blend'"),
    (dict(distill_mix="blend"), "--distill-mix", "expected one of none, cutmix"),
    (dict(codec="gif"), "--codec", "expected one of png, jpeg, webp, raw, got 'gif'"),
    (dict(temperature=0.0), "--temperature", "expected a number > 0"),
    (dict(holdout=1.0), "--holdout", r"expected a fraction in \[0, 1\)"),
    (dict(refine_steps=-1), "--refine-steps", "expected an integer >= 0"),
    (dict(steps=0), "--steps", "expected an integer >= 1"),
    (dict(batch_size=0), "--batch-size", "expected an integer >= 1"),
    (dict(image_size=4), "--image-size", "expected an integer >= 8"),
    (dict(load_size=0), "--load-size", "expected an integer >= 1"),
    (dict(lr=0.0), "--lr", "expected a number > 0, got 0.0"),
    (dict(weight_decay=-0.1), "--weight-decay", "expected a number >= 0, got -0.1"),
    (dict(refine_steps=2, refine_lr=0.0), "--refine-lr", "expected a number > 0, got 0.0"),
    (dict(num_workers=-1), "--num-workers", "expected an integer >= 0, got -1"),
    (dict(fidelity_views=0), "--fidelity-views", "expected an integer >= 1, got 0"),
    (dict(candidates=0), "--candidates", "expected an integer >= 1, got 0"),
    (dict(codec="png", quality=90), "--quality", "lossless and takes no quality"),
    (dict(codec="jpeg", quality=0), "--quality", "quality must be an integer in 1..100"),
    (dict(device="foo"), "--device", "not a device: 'foo'"),
    (dict(device="cuda:99"), "--device", "cuda:99"),
    # wrong types name the option too, instead of a TypeError from a comparison
    (dict(rank="8"), "--rank", "expected an integer, got '8'"),
    (dict(rank=True), "--rank", "expected an integer, got True"),
    (dict(lr="fast"), "--lr", "expected a number, got 'fast'"),
    (dict(templates="a photo of {}"), "--template", "expected a list of strings"),
    (dict(resume="yes"), "--resume", "expected true or false, got 'yes'"),
])
def test_invalid_values_raise_what_they_raised_before(kw, field, message):
    with pytest.raises(BuildInputError, match=message) as e:
        BuildConfig(**{"ipc": 1, **kw}).validate()
    assert e.value.field == field


def test_valid_configs_pass():
    BuildConfig(ipc=1).validate()
    BuildConfig(ipc=1, refine_lr=0.0).validate()  # no refinement: its learning rate is unused
    BuildConfig(ipc=1, codec="jpeg", head_rank=None, alpha=16, device="cpu").validate()


def test_images_and_ipc_are_exclusive_before_anything_loads(tmp_path):
    from hellofmt import build_bundle

    for kw in (dict(), dict(ipc=1, images=str(tmp_path))):
        with pytest.raises(BuildInputError, match="exactly one of --images DIR and --ipc N") as e:
            build_bundle(str(tmp_path / "nowhere"), "t.py:make", TINY_CONFIG, tmp_path / "out", **kw)
        assert e.value.field == "--ipc"


# --------------------------------------------------------------------------------------------------
# provenance and imports
# --------------------------------------------------------------------------------------------------
def test_provenance_records_the_config(tmp_path):
    import torch

    from hellofmt import build_bundle
    from hellofmt.bundle import Bundle

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(9, 3, 32, 32, generator=g) * 80).to(torch.uint8)
    labels = torch.arange(9) % 3
    for i in range(9):
        images[i, int(labels[i])] += 150
    teacher = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 3)).eval()
    config = BuildConfig(ipc=1, steps=2, batch_size=6, rank=2, head_rank=2, holdout=0.34, fidelity_views=1,
                         device="cpu", seed=3)
    res = build_bundle((images, labels), teacher, TINY_CONFIG, tmp_path / "b", config, classes=["r", "g", "b"],
                       progress=False, factor=1)
    m = Bundle.open(res.path).manifest
    # provenance records the size-dependent defaults as used, and --num-workers as resolved (0: in-memory data)
    want = config.replace(factor=1, num_workers=0).resolved(32)
    assert want.scale == (0.25, 1.0) and want.select_scale == (1.0, 1.0)
    assert m.provenance.build_args == want.to_dict()
    assert BuildConfig.from_dict(m.provenance.build_args) == want
    assert m.provenance.seed == 3 and m.images.count == 3


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return set(out.split())


def test_build_config_and_build_help_do_not_import_torch():
    loaded = _loaded_after("import hellofmt\nassert hellofmt.BuildConfig().rank == 16\n"
                           "from hellofmt.builder import BuildConfig\nassert BuildConfig is hellofmt.BuildConfig")
    assert "torch" not in loaded and "hellofmt.builder.pipeline" not in loaded
    loaded = _loaded_after("from click.testing import CliRunner\nfrom hellofmt.cli import main\n"
                           "r = CliRunner().invoke(main, ['build', '--help'])\nassert '--refine-prior' in r.output")
    assert "torch" not in loaded
