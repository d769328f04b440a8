"""The ``hellofmt`` command line: a thin shell that parses arguments and calls library functions.

Every command's logic lives in the library (``hellofmt.bundle.summarize``, ``Bundle.verify``, ...)
so that users can call the same functions from Python. A :class:`~hellofmt.errors.HellofmtError`
is printed as one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__
from .errors import HellofmtError
from .manifest import CODECS, MIX_MODES


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


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_friendly_errors
def info(bundle: str, as_json: bool) -> None:
    """Summarise BUNDLE: classes, images, codec, foundation, ranks, file sizes, label payload."""
    from .bundle import Bundle, format_summary, summarize

    summary = summarize(Bundle.open(bundle))
    if as_json:
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        click.echo(format_summary(summary))


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@_friendly_errors
def verify(bundle: str) -> None:
    """Check every file of BUNDLE (sizes, sha256, images, projector tensors, probe); exit 1 on a problem."""
    from .bundle import verify_bundle

    problems = verify_bundle(bundle)
    for line in problems:
        click.echo(line)
    if problems:
        sys.exit(1)
    click.echo(f"{bundle}: ok")


@main.command()
@click.option("--train-data", required=True, type=click.Path(path_type=str), help="Image-folder tree: DIR/CLASS/IMAGE.")
@click.option("--teacher", "teachers", required=True, multiple=True,
              help="timm:NAME or FILE.py:FACTORY; repeat to average several teachers.")
@click.option("--teacher-weights", multiple=True, type=click.Path(path_type=str),
              help="safetensors weights of each timm teacher, in order.")
@click.option("--foundation", required=True, help="ARCH:TAG, hf-hub:ORG/REPO or CONFIG.json[:WEIGHTS.safetensors].")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Bundle directory to write.")
@click.option("--images", type=click.Path(path_type=str), help="Pre-made distilled images (image folder, same classes).")
@click.option("--ipc", type=int, help="Images per class, selected RDED-style from the training data.")
@click.option("--classes", type=click.Path(path_type=str), help="JSON or TSV map: class folder -> readable name.")
@click.option("--template", "templates", multiple=True, help="Prompt template with {} for the class name (repeatable).")
@click.option("--rank", default=8, show_default=True, help="Rank of the encoder deltas.")
@click.option("--head-rank", default=8, show_default=True, help="Rank of the head delta (0: none).")
@click.option("--alpha", type=float, help="Delta scale alpha (default: the rank).")
@click.option("--head-alpha", type=float, help="Head delta scale (default: the head rank).")
@click.option("--targets", multiple=True, help="Regex over foundation parameter names (repeatable; default per family).")
@click.option("--epochs", default=10.0, show_default=True, help="Distillation epochs over the original data.")
@click.option("--steps", type=int, help="Distillation steps (overrides --epochs).")
@click.option("--batch-size", default=64, show_default=True, help="Batch size per process.")
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--weight-decay", default=0.01, show_default=True)
@click.option("--loss", type=click.Choice(["kl", "mse"]), default="kl", show_default=True,
              help="Imitation loss: KL to the teacher at --temperature, or MSE on logits.")
@click.option("--ce-weight", default=0.1, show_default=True, help="Weight of the hard-label cross-entropy.")
@click.option("--temperature", default=1.0, show_default=True, help="Label temperature (KL loss, manifest recipe).")
@click.option("--mix", type=click.Choice(MIX_MODES), default="cutmix", show_default=True,
              help="The loader's default mixing (label recipe).")
@click.option("--distill-mix", type=click.Choice(MIX_MODES),
              help="Mixing of the distillation views (default: --mix).")
@click.option("--image-size", type=int, help="Synthetic image side (default: the foundation's input size).")
@click.option("--load-size", type=int, help="Side original images are loaded at (default: 8/7 of --image-size).")
@click.option("--factor", default=2, show_default=True, help="Patches per side stitched into each image.")
@click.option("--candidates", default=4, show_default=True, help="RDED candidate crops per kept patch.")
@click.option("--refine-steps", default=0, show_default=True, help="Image refinement steps (0: off).")
@click.option("--refine-lr", default=0.01, show_default=True)
@click.option("--refine-prior", default=1.0, show_default=True, help="Weight of the stay-near-init term.")
@click.option("--codec", type=click.Choice(CODECS), default="png", show_default=True)
@click.option("--quality", type=int, help="jpeg/webp quality.")
@click.option("--holdout", default=0.05, show_default=True, help="Fraction of original images held out for fidelity.")
@click.option("--fidelity-views", default=4, show_default=True, help="Augmented views per image for fidelity.")
@click.option("--embed-foundation/--no-embed-foundation", default=None,
              help="Embed the foundation weights (default: only for random-init or config-file foundations).")
@click.option("--checkpoint-dir", type=click.Path(path_type=str), help="Checkpoint folder (default OUT.ckpt).")
@click.option("--checkpoint-every", default=200, show_default=True, help="Checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint.")
@click.option("--keep-checkpoints", is_flag=True, help="Keep the checkpoint folder after success.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--device", help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available).")
@click.option("--num-workers", default=0, show_default=True, help="Data-loading worker processes.")
@click.option("--seed", default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_friendly_errors
def build(**opts) -> None:
    """Build a bundle from original data and teacher(s): distil the projector, make the images."""
    from .builder import build_bundle as run_build

    quiet = opts.pop("quiet")
    opts["teacher"] = list(opts.pop("teachers"))
    opts["teacher_weights"] = list(opts["teacher_weights"]) or None
    opts["templates"] = list(opts["templates"]) or None
    opts["targets"] = list(opts["targets"]) or None
    result = run_build(opts.pop("train_data"), opts.pop("teacher"), opts.pop("foundation"), opts.pop("out"),
                       progress=not quiet, **opts)
    if result.path is None:  # torchrun ranks other than 0 write nothing
        return
    click.echo(result["summary"])
    click.echo("stage times   " + ", ".join(f"{k} {v:.1f}s" for k, v in result["timings"].items()))
    click.echo(f"wrote {result.path}")


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private (when it does not exist yet).")
@click.option("--revision", default=None, help="Branch to commit to (created if needed; default: main).")
@click.option("--message", default=None, help="Commit message.")
@click.option("--token", default=None, help="Hugging Face token (default: HF_TOKEN or `hf auth login`).")
@click.option("--license", "license_", default=None, help="License id for the dataset card (e.g. apache-2.0).")
@_friendly_errors
def push(bundle: str, repo_id: str, private: bool, revision: str | None, message: str | None,
         token: str | None, license_: str | None) -> None:
    """Verify BUNDLE and upload it, with a dataset card, to the Hub dataset REPO_ID (USER/NAME) in one commit."""
    from .hub import push as push_bundle

    url = push_bundle(bundle, repo_id, private=private, revision=revision, message=message, token=token,
                      license=license_)
    click.echo(url)


@main.command()
@click.argument("repo_id")
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=str))
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@click.option("--token", default=None, help="Hugging Face token, for private repositories.")
@click.option("--force-download", is_flag=True, help="Download again even if the files are cached.")
@_friendly_errors
def pull(repo_id: str, directory: str | None, revision: str | None, token: str | None, force_download: bool) -> None:
    """Download the bundle REPO_ID (USER/NAME) into DIRECTORY (default: the Hugging Face cache), check every
    file's sha256, and print its path."""
    from .hub import pull as pull_bundle

    click.echo(str(pull_bundle(repo_id, directory, revision=revision, token=token, force_download=force_download)))


if __name__ == "__main__":  # pragma: no cover
    main()
