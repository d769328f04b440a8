"""The ``hellofmt`` command line: a thin shell that parses arguments and calls library functions.

Every command's logic lives in the library (``hellofmt.summary.summarize``, ``hellofmt.verify.verify_bundle``, ...)
so that users can call the same functions from Python. A :class:`~hellofmt.errors.HellofmtError`
is printed as one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings

import click

from . import __version__
from .errors import HellofmtError
from .manifest import DELTA_ENCODINGS, MIX_MODES
from .summary import DEFAULT_MAX_CLASSES, format_summary, format_verified, summarize


def _friendly_errors(fn):
    """Turn a HellofmtError into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HellofmtError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="hellofmt")
def main() -> None:
    """hellofmt: distilled image datasets whose soft labels come from a low-rank CLIP projector."""
    warnings.formatwarning = _format_warning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """hellofmt's warnings (an unlisted file, a manifest without a digest) as one line, no source line."""
    return f"warning: {message}\n"


@main.command(short_help="Summarise a bundle, section by section.")
@click.argument("bundle", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (counts as integers).")
@click.option("--max-classes", type=click.IntRange(min=0), default=DEFAULT_MAX_CLASSES, show_default=True,
              help="List at most N classes (0: all of them).")
@_friendly_errors
def info(bundle: str, as_json: bool, max_classes: int) -> None:
    """Summarise BUNDLE (a folder, or a Hub id pulled through the cache): contents, classes, foundation,
    projector, label recipe, teacher(s), files, label payload, fidelity, build metrics, evaluations."""
    from .bundle import open_for_report  # imports torch: kept out of the CLI's start-up
    from .hub import local_bundle

    # A damaged bundle (a missing shard, an edited manifest) is still described: everything its manifest
    # says, then the problems, and exit status 1.
    b, problems = open_for_report(local_bundle(bundle))
    summary = summarize(b)
    if as_json:
        click.echo(json.dumps({**summary, "problems": problems}, indent=2, ensure_ascii=False))
    else:
        click.echo(format_summary(summary, max_classes=max_classes))
        if problems:
            click.echo(f"problems    {len(problems)} (hellofmt verify checks everything)")
            for line in problems:
                click.echo(f"  {line}")
    if problems:
        sys.exit(1)


@main.command(short_help="Check every file of a bundle.")
@click.argument("bundle", type=str)
@click.option("--fix-digest", is_flag=True,
              help="First accept the manifest as it is now and write it back with a fresh manifest_sha256 (after "
              "an edit made on purpose, or to give a bundle written before 0.3 one), then check as usual.")
@_friendly_errors
def verify(bundle: str, fix_digest: bool) -> None:
    """Check every file of BUNDLE (a folder, or a Hub id pulled through the cache): the manifest's digest, sizes,
    sha256, images, projector tensors, probe; print what was checked, or each problem and exit 1."""
    from .bundle import Bundle  # imports torch and the model: kept out of the CLI's start-up
    from .hub import local_bundle
    from .verify import verify_bundle

    path = local_bundle(bundle, verify=False)  # verify_bundle hashes every file and lists each problem
    problems = verify_bundle(path, fix_digest=fix_digest)
    if fix_digest:
        click.echo(f"wrote a new manifest_sha256 in {path}/hellofmt.json")
    for line in problems:
        click.echo(line)
    if problems:
        sys.exit(1)
    b = Bundle.open_unchecked(path)
    click.echo(format_verified(summarize(b), probe_checked=b.manifest.probe is not None))


class _BuildCommand(click.Command):
    """``hellofmt build``: its inputs are written below; its options are generated from the fields of
    :class:`~hellofmt.builder.config.BuildConfig` the first time click asks for them (to parse or to
    print ``--help``), not at import, so that the CLI's start-up never imports the builder."""

    @property
    def params(self) -> list[click.Parameter]:
        if self._all_params is None:
            # here, on first use, not at the top: see the class docstring
            from .builder.config import BuildConfig, click_options

            self._all_params = [*self._own_params, *click_options(BuildConfig)]
        return self._all_params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._own_params = list(value)
        self._all_params: list[click.Parameter] | None = None


@main.command(cls=_BuildCommand, short_help="Build a bundle from data and teacher(s).")
@click.option("--train-data", required=True, type=click.Path(path_type=str),
              help="Image-folder tree DIR/CLASS/IMAGE; or a Hugging Face dataset with image and label columns: a "
              "save_to_disk folder or hf://datasets/ORG/NAME[@REVISION][:SPLIT] (needs hellofmt[hf-datasets]).")
@click.option("--classes", type=click.Path(path_type=str),
              help="JSON or TSV map: class folder (or ClassLabel name) -> readable name (default: the folder "
              "names).")
@click.option("--teacher", "teachers", required=True, multiple=True,
              help="timm:NAME (with --teacher-weights) or FILE.py:FACTORY, where FACTORY is a function of FILE.py "
              "with no arguments returning an nn.Module in eval mode that takes float images in [0, 1] "
              "([B, 3, H, W]) and returns logits [B, C] over the classes in class-folder (sorted) order. "
              "Repeat to average several teachers (their logits).")
@click.option("--teacher-weights", multiple=True, type=click.Path(path_type=str),
              help="safetensors weights of each timm teacher, in order (required for timm:NAME teachers).")
@click.option("--foundation", required=True, help="ARCH:TAG, hf-hub:ORG/REPO or CONFIG.json[:WEIGHTS.safetensors].")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Bundle directory to write.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--images", type=click.Path(path_type=str),
              help="Pre-made distilled images (image folder, same class folders; e.g. from hellofmt export), "
              "instead of --ipc.")
@_friendly_errors
def build(train_data: str, classes: str | None, teachers: tuple[str, ...], teacher_weights: tuple[str, ...],
          foundation: str, out: str, quiet: bool, images: str | None, **options) -> None:
    """Build a bundle from original data and teacher(s): distil the projector, make the images.

    The inputs come first; every other option is a field of hellofmt.BuildConfig."""
    from .builder import BuildConfig, build_bundle  # the pipeline imports torch: loaded only when a build runs

    result = build_bundle(train_data, list(teachers), foundation, out, BuildConfig(**options), images=images,
                          classes=classes, teacher_weights=list(teacher_weights) or None, progress=not quiet)
    if result.path is None:  # torchrun ranks other than 0 write nothing
        return
    click.echo(result["summary"])
    click.echo(f"wrote {result.path}")
    for w in result.get("warnings") or []:  # last, where they are seen; also in `hellofmt info`
        click.echo(f"warning: {w}", err=True)


@main.command(short_help="Upload a bundle to the Hugging Face Hub.")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private (when it does not exist yet).")
@click.option("--revision", default=None, help="Branch to commit to (created if needed; default: main).")
@click.option("--message", default=None,
              help="Commit message (default: a one-line summary of the bundle).")
@click.option("--token", default=None, help="Hugging Face token (default: HF_TOKEN or `hf auth login`).")
@click.option("--license", "license_", default=None,
              help="License id for the dataset card, e.g. apache-2.0 (default: none given).")
@click.option("--no-preview", is_flag=True,
              help="Upload no preview.png (the contact sheet at the top of the card) and no viewer table.")
@click.option("--viewer-table", is_flag=True,
              help="Also upload viewer.parquet, the images with their class names, so that the Hub's dataset viewer "
              "shows them: a second copy of the images, about the shards' size (needs pyarrow).")
@_friendly_errors
def push(bundle: str, repo_id: str, private: bool, revision: str | None, message: str | None,
         token: str | None, license_: str | None, no_preview: bool, viewer_table: bool) -> None:
    """Verify BUNDLE and upload it, with a dataset card and a preview image, to the Hub dataset REPO_ID
    (USER/NAME) in one commit."""
    from .hub import push as push_bundle

    url = push_bundle(bundle, repo_id, private=private, revision=revision, message=message, token=token,
                      license=license_, preview=not no_preview, viewer_table=viewer_table)
    click.echo(url)


@main.command(short_help="Download a bundle from the Hub, checked.")
@click.argument("repo_id")
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=str))
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@click.option("--token", default=None,
              help="Hugging Face token, for private repositories (default: HF_TOKEN or `hf auth login`).")
@click.option("--force-download", is_flag=True, help="Download again even if the files are cached.")
@_friendly_errors
def pull(repo_id: str, directory: str | None, revision: str | None, token: str | None, force_download: bool) -> None:
    """Download the bundle REPO_ID (USER/NAME) into DIRECTORY (default: the Hugging Face cache), check every
    file's sha256, and print its path."""
    from .hub import pull as pull_bundle

    click.echo(str(pull_bundle(repo_id, directory, revision=revision, token=token, force_download=force_download)))


@main.command(short_help="Write a contact sheet PNG of a bundle.")
@click.argument("bundle", type=str)
@click.option("--out", type=click.Path(dir_okay=False, path_type=str),
              help="PNG file to write (default: NAME-grid.png in the current folder, NAME the bundle folder's).")
@click.option("--per-class", "--max-per-class", "per_class", type=click.IntRange(min=1), default=8,
              show_default=True, help="Images per class (the first ones of each class).")
@click.option("--classes", "classes", multiple=True,
              help="Classes to show: names, folder names or indices, comma-separated or repeated (default: all).")
@click.option("--tile", type=click.IntRange(min=1, max=4096),
              help="Tile side in pixels (default: the image side, kept between 64 and 160).")
@_friendly_errors
def show(bundle: str, out: str | None, per_class: int, classes: tuple[str, ...], tile: int | None) -> None:
    """Write a contact sheet of BUNDLE's images: a PNG grid, one row per class with its name."""
    from .bundle import Bundle  # imports torch: kept out of the CLI's start-up
    from .hub import local_bundle
    from .show import write_contact_sheet

    b = Bundle.open(local_bundle(bundle))
    wanted = [part for c in classes for part in ([c] if c in b.manifest.classes else c.split(",")) if part.strip()]
    out = out or f"{b.path.resolve().name}-grid.png"
    layout = write_contact_sheet(b, out, classes=wanted or None, per_class=per_class, tile=tile)
    click.echo(f"wrote {out}: {len(layout.rows)} classes x up to {layout.columns} images, "
               f"{layout.width}x{layout.height} px")


@main.command(short_help="Write a bundle's images as an image folder.")
@click.argument("bundle", type=str)
@click.argument("directory", metavar="DIR", type=click.Path(path_type=str))
@_friendly_errors
def export(bundle: str, directory: str) -> None:
    """Write BUNDLE's images (a folder, or a Hub id pulled through the cache) as an image folder
    DIR/CLASS_FOLDER/NNNNN.png, lossless, for tools that read folders (and `hellofmt build --images`).

    Class folders are the ones the bundle was built from, when recorded, else safe forms of the class
    names. DIR must be new or empty: nothing is replaced."""
    from .bundle import Bundle  # imports torch: kept out of the CLI's start-up
    from .hub import local_bundle
    from .show import export_images

    b = Bundle.open(local_bundle(bundle))
    counts = export_images(b, directory)
    click.echo(f"wrote {sum(counts.values())} images ({b.manifest.images.height}x{b.manifest.images.width} PNG) "
               f"in {len(counts)} class folders to {directory}")
    for folder, n in counts.items():
        click.echo(f"  {folder}/: {n}")


@main.command("eval", short_help="Train students on a bundle; report top-1.")
@click.argument("bundle", type=str)
@click.option("--val", required=True, type=click.Path(path_type=str),
              help="Held-out image folder VAL/CLASS/IMAGE with the bundle's classes (undecodable images are skipped).")
@click.option("--val-classes", type=click.Path(path_type=str),
              help="JSON or TSV map: val folder -> bundle class name, as build's --classes "
              "(default: the folder names).")
@click.option("--arms", help="Comma-separated arms: bundle, hard, teacher, random (default: all the inputs allow).")
@click.option("--student",
              help="convnet[:depth=D,width=W,norm=N], timm:NAME or FILE.py:FACTORY (default: the protocol's).")
@click.option("--protocol", default="quick", show_default=True, help="Student recipe: quick, rded or sre2l.")
@click.option("--teacher", "teachers", multiple=True,
              help="The teacher arm's labeller: timm:NAME or FILE.py:FACTORY, as build's --teacher (repeat to average "
              "several; default: none, no teacher arm).")
@click.option("--teacher-weights", multiple=True, type=click.Path(path_type=str),
              help="safetensors weights of each timm teacher, in order (required for timm:NAME teachers).")
@click.option("--train-data", type=click.Path(path_type=str),
              help="The original training image folder, for the random arm (default: none, no random arm).")
@click.option("--train-classes", type=click.Path(path_type=str),
              help="Class map for --train-data's folders (default: --val-classes).")
@click.option("--seeds", default=3, show_default=True, help="Students per arm (seeds F..F+K-1, F: --first-seed).")
@click.option("--first-seed", default=0, show_default=True,
              help="The first seed: --first-seed 3 --seeds 5 adds seeds 3..7 to an earlier run of --seeds 3.")
@click.option("--epochs", type=int, help="Student epochs (default: the protocol's).")
@click.option("--batch-size", type=int, help="Batch size, global under torchrun (default: the protocol's).")
@click.option("--lr", type=float, help="Student learning rate (default: the protocol's).")
@click.option("--weight-decay", type=float, help="Student weight decay (default: the protocol's).")
@click.option("--temperature", type=float, help="Label and student temperature (default: the protocol's).")
@click.option("--mix", type=click.Choice(MIX_MODES),
              help="Mixing of the student's batches (default: the protocol's).")
@click.option("--image-size", type=int, help="Student and val image side (default: the bundle's image size).")
@click.option("--device", help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available).")
@click.option("--json", "json_path", type=click.Path(path_type=str),
              help="Also write the results as JSON here (default: not written).")
@click.option("--record", is_flag=True, help="Append the results to the bundle manifest's evaluations.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str),
              help="Also draw the results as a PNG here: each arm per seed, bundle/teacher and IOR, and the classes "
              "the projector labels worst (needs hellofmt[plot]; default: none).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_friendly_errors
def eval_(bundle: str, teachers: tuple[str, ...], teacher_weights: tuple[str, ...], quiet: bool, **opts) -> None:
    """Train students on BUNDLE (a folder or a Hub id) and report their top-1 on --val, per arm: the bundle's
    labels, hard labels, the teacher online, and a random real subset labelled by the same projector."""
    from .evaluation import evaluate

    result = evaluate(bundle, opts.pop("val"), teacher=list(teachers) or None,
                      teacher_weights=list(teacher_weights) or None, progress=not quiet, **opts)
    if result.rank != 0:  # under torchrun, rank 0 reports
        return
    click.echo(result.format_table())
    if opts.get("json_path"):
        click.echo(f"wrote {opts['json_path']}")
    if opts.get("record"):
        click.echo(f"recorded in {result.bundle}/hellofmt.json (evaluations)")
    if opts.get("plot"):
        click.echo(f"wrote {opts['plot']}")



@main.command(short_help="Re-encode a bundle's deltas, e.g. to int8.")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@click.option("--delta-dtype", type=click.Choice(DELTA_ENCODINGS), default="int8", show_default=True,
              help="The new encoding of the deltas (int8: per-row scales, a quarter of float32).")
@click.option("--out", type=click.Path(path_type=str), help="Write the new bundle here (default: replace BUNDLE).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (re-encoding BUNDLE in place needs it).")
@click.option("--device", help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option("--views", "views_per_image", default=4, show_default=True,
              help="Augmented views per image the labels are compared on (at most 2048 in all).")
@_friendly_errors
def compress(bundle: str, delta_dtype: str, out: str | None, overwrite: bool, device: str | None,
             views_per_image: int) -> None:
    """Re-encode BUNDLE's deltas (e.g. float32 -> int8): measure how far the labels move on the bundle's own
    images, record it in the manifest's metrics (delta_encoding.*), recompute the probe, write atomically."""
    from .compress import compress_bundle, format_compress_result  # imports torch and the model

    result = compress_bundle(bundle, delta_dtype, out, overwrite=overwrite, device=device,
                             views_per_image=views_per_image)
    click.echo(format_compress_result(result))


if __name__ == "__main__":  # pragma: no cover
    main()
