"""Every command and Python snippet in README.md, docs/*.md and examples/*.md runs (issue 22).

Each fenced block is either run here, offline, against a tiny bundle, or carries a marker comment on
the line right before its opening fence saying why it is not:

    <!-- example: skip REASON: what it needs -->   REASON one of SKIP_REASONS (network, gpu, ...)
    <!-- example: output -->                       a sample of what a command prints
    <!-- ci:install -->, <!-- ci:test -->          run by .ci/run itself (the install, the whole suite)

A block without a marker must be runnable: ``bash`` blocks hold ``hellofmt ...`` commands (run
in-process through click's runner; exit status 0 expected), ``python`` blocks run as a script. An
unknown marker, or a block of another language without one, fails the test: nothing is skipped
silently. Placeholders the examples use are replaced as PLACEHOLDERS says, visibly. The blocks run in
order, per file, in a copy of one scratch folder holding ``my-bundle`` (the session's tiny bundle
re-encoded to int8 deltas, like a default build), image folders ``val/`` and ``train/`` of its classes
and a ``teacher.py``; ``hellofmt eval`` runs one seed of one epoch.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from hellofmt.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*.md"))]

SKIP_REASONS = {
    "network": "downloads or uploads (PyPI, the Hugging Face Hub)",
    "gpu": "needs CUDA or several GPUs (torchrun)",
    "weights": "needs real model weights and data of your own",
    "data": "needs a real dataset on disk (ImageNet-1K)",
    "slow": "minutes or more on a CPU (a whole build, students trained)",
}
OTHER_MARKERS = {"example: output", "ci:install", "ci:test"}
_MARKER = re.compile(r"^<!--\s*(.*?)\s*-->$")

# What the examples' placeholders become here: (text in the example, text run), applied in order.
PLACEHOLDERS = [
    # README.md
    ('"path/to/bundle"', '"my-bundle"'),  # the scratch folder holds the bundle under the README's own name
    ('device="cuda"', 'device="cpu"'),  # no GPU in the test suite
    ("student = ...  # any model taking images in [0, 1]",
     "student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(ds.num_classes))"),
    # docs/eval.md: the scratch folder's val/, train/ and teacher.py; one seed of one epoch, on the CPU
    ("BUNDLE --val VAL_DIR", "my-bundle --val val --seeds 1 --epochs 1"),
    ("TRAIN_DIR", "train"),
    ("--device cuda", "--device cpu"),
    ('hellofmt.evaluate("bundle", "val",', 'hellofmt.evaluate("my-bundle", "val",'),
    ("seeds=3)", "seeds=1, epochs=1)"),
]


@dataclass
class Block:
    file: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: str | None  # the comment on the line before the fence, without <!-- -->

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.lang or 'no language'})"


def blocks(text: str, file: str = "<text>") -> list[Block]:
    """The fenced blocks of a Markdown text, each with the marker comment right before it (if any)."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        prev = lines[i - 1].strip() if i else ""
        mm = _MARKER.match(prev)
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        out.append(Block(file, start + 1, m.group(1), "\n".join(body) + "\n", mm.group(1) if mm else None))
        i += 1
    return out


def marker_problem(block: Block) -> str | None:
    """Why a block's marker (or its lack) is not acceptable, or None."""
    if block.marker is None:
        if block.lang in ("bash", "python"):
            return None
        return f"{block}: a block that is not bash or python needs a marker (<!-- example: output -->?)"
    if block.marker in OTHER_MARKERS:
        return None
    m = re.fullmatch(r"example: skip (\w+): (.+)", block.marker)
    if not m:
        return f"{block}: unknown marker <!-- {block.marker} -->; use <!-- example: skip REASON: why -->"
    if m.group(1) not in SKIP_REASONS:
        return f"{block}: unknown skip reason {m.group(1)!r}; one of {', '.join(SKIP_REASONS)}"
    return None


def substitute(code: str) -> str:
    for old, new in PLACEHOLDERS:
        code = code.replace(old, new)
    return code


def commands(code: str) -> list[list[str]]:
    """A bash block as commands: continuation lines joined, comments dropped, words split as bash does."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def run_block(block: Block) -> None:
    """Run one unmarked block in the current folder; AssertionError naming it if it fails."""
    code = substitute(block.code)
    if block.lang == "python":
        try:
            exec(compile(code, str(block), "exec"), {"__name__": "__main__"})
        except Exception as e:
            raise AssertionError(f"{block} failed: {type(e).__name__}: {e}") from e
        return
    for words in commands(code):
        assert words[0] == "hellofmt", f"{block}: {shlex.join(words)}: only hellofmt commands run here; mark it"
        r = CliRunner().invoke(main, words[1:])
        assert r.exit_code == 0, f"{block}: {shlex.join(words)} exited {r.exit_code}:\n{r.output}"


# ---- the documents -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch(tiny_bundle, tmp_path_factory) -> Path:
    """A folder holding ``my-bundle`` (the tiny bundle with int8 deltas, as a default build has), image
    folders ``val/`` and ``train/`` of its classes, and ``teacher.py`` (``make``: a colour teacher)."""
    from PIL import Image
    from test_build import TEACHER_PY

    from hellofmt.bundle import Bundle
    from hellofmt.compress import compress_bundle

    from bundles import make_images

    root = tmp_path_factory.mktemp("readme")
    compress_bundle(tiny_bundle, "int8", root / "my-bundle", device="cpu")
    names = Bundle.open(tiny_bundle).manifest.classes
    for split, ipc, seed in (("val", 2, 1), ("train", 4, 2)):
        images, labels = make_images(len(names), ipc, 32, seed=seed)
        for i, (img, c) in enumerate(zip(images, labels.tolist())):
            (root / split / names[c]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / split / names[c] / f"{i}.png")
    (root / "teacher.py").write_text(TEACHER_PY)
    return root


ALL = [b for doc in DOCS for b in blocks(doc.read_text(encoding="utf-8"), str(doc.relative_to(ROOT)))]


def test_every_block_is_run_or_carries_a_valid_marker():
    problems = [p for b in ALL if (p := marker_problem(b))]
    assert problems == []
    run = [b for b in ALL if b.marker is None]
    assert len(run) >= 2  # README's quickstart and its bundle commands at least
    assert all(b.lang in ("bash", "python") for b in run)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_examples_run(doc, scratch, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(scratch, work)
    monkeypatch.chdir(work)
    ran = 0
    for b in blocks(doc.read_text(encoding="utf-8"), str(doc.relative_to(ROOT))):
        if b.marker is None:
            run_block(b)
            ran += 1
    if doc.name == "README.md":
        assert ran >= 2
        assert (work / "grid.png").is_file() and (work / "images").is_dir()  # what the commands write
        assert (work / "my-bundle-float32" / "hellofmt.json").is_file()
    if doc.name == "eval.md":
        from hellofmt.bundle import Bundle
        from hellofmt.verify import verify_bundle

        assert ran >= 2 and (work / "eval.json").is_file()
        # --record appended an evaluation, and the manifest's digest still verifies
        assert len(Bundle.open(work / "my-bundle").manifest.evaluations) == 1
        assert verify_bundle(work / "my-bundle") == []


# ---- the checker itself fails on a broken example --------------------------------------------------
def test_a_broken_example_fails_the_checker(scratch, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(scratch, work)
    monkeypatch.chdir(work)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    # the example this issue found broken: int8 deltas re-encoded as int8 are refused
    broken = readme.replace("--delta-dtype float32 --out my-bundle-float32", "--delta-dtype int8 --out my-bundle-int8")
    assert broken != readme
    target = [b for b in blocks(broken, "README.md") if "hellofmt compress" in b.code and b.marker is None]
    assert len(target) == 1
    with pytest.raises(AssertionError, match="already int8"):
        run_block(target[0])
    # a Python snippet that raises fails too
    with pytest.raises(AssertionError, match="NameError"):
        run_block(Block("README.md", 1, "python", "print(undefined_name)\n", None))


def test_a_bad_or_missing_marker_fails_the_checker():
    text = ("<!-- example: skip because -->\n```bash\nhellofmt info x\n```\n\n"
            "<!-- example: skip cloud: somewhere -->\n```python\npass\n```\n\n"
            "```\nsome output\n```\n\n"
            "<!-- example: skip network: the Hub -->\n```bash\nhellofmt pull you/x\n```\n")
    problems = [marker_problem(b) for b in blocks(text)]
    assert "unknown marker" in problems[0] and "unknown skip reason 'cloud'" in problems[1]
    assert "needs a marker" in problems[2] and problems[3] is None
    # a bash block of something other than hellofmt is not run silently: it must be marked
    with pytest.raises(AssertionError, match="only hellofmt commands run here"):
        run_block(Block("x.md", 1, "bash", "pip install hellofmt\n", None))
