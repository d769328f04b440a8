"""Crashes, races and permissions around writing a bundle (spec section 10).

- A writer SIGKILLed at every filesystem step of a first write or a replace leaves the target
  holding the old complete bundle or the new complete one (or, for a first write, nothing), and the
  next writer sweeps what it left; both the atomic exchange (Linux, macOS) and the two-rename
  fallback are stopped at every step.
- Readers racing a stream of replaces get one version whole or a HellofmtError, never a manifest
  of one version with the files of another, even with ``verify=False`` and files of equal sizes.
- Two writers to one path are serialised by its lock; a sweep deletes only hellofmt's own debris.
- Bundles get the umask's permissions.

Writers are forked (``os.fork``): a fresh interpreter per kill point would take seconds each.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import threading

import pytest
import torch

from hellofmt import bundle as bundle_mod
from hellofmt.bundle import DEBRIS_MARKER, Bundle, BundleWriter
from hellofmt.errors import BundleExistsError, BundleLockedError, HellofmtError
from hellofmt.manifest import MANIFEST_NAME

from bundles import make_format_bundle, smooth_images

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    # Python >= 3.12 warns on any fork of a process with threads; the children here only write files
    pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning"),
]

# Two versions with the same class counts, image sizes and file sizes (raw codec): only the
# contents differ, so no size or count check can tell them apart; only reading one version can.
N, SIDE = 6, 8
LABELS = {1: torch.tensor([0, 1, 2, 0, 1, 2]), 2: torch.tensor([2, 1, 0, 2, 1, 0])}
IMAGES = {v: smooth_images(N, SIDE, SIDE, seed=v) for v in (1, 2, 3)}
LABELS[3] = LABELS[1]


def write(path, version: int, *, overwrite: bool = True):
    return make_format_bundle(path, images=IMAGES[version], labels=LABELS[version], seed=version, codec="raw",
                              height=SIDE, max_shard_bytes=3 * SIDE * SIDE * 2, overwrite=overwrite)


def version_of(path, *, verify: bool = False) -> int:
    """The version a reader gets, checked whole: manifest, images, labels and projector."""
    with Bundle.open(path, verify=verify) as b:
        v = b.manifest.provenance.seed
        images, labels = b.read_images()
        proj = b.projector_tensors()
    assert torch.equal(images, IMAGES[v]) and torch.equal(labels, LABELS[v]), f"images of another version ({v})"
    assert torch.equal(proj["visual.proj.lora_A"], EXPECTED_PROJ[v]), f"projector of another version (manifest {v})"
    return v


EXPECTED_PROJ: dict[int, torch.Tensor] = {}


@pytest.fixture(scope="module", autouse=True)
def _expected(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    for v in (1, 2, 3):
        with Bundle.open(write(root / str(v), v)) as b:
            EXPECTED_PROJ[v] = b.projector_tensors()["visual.proj.lora_A"]


def leftovers(parent, name="b"):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def steps_of(fn) -> list[str]:
    names: list[str] = []
    bundle_mod._step_hook = names.append
    try:
        fn()
    finally:
        bundle_mod._step_hook = None
    return names


def run_killed_at(k: int, fn, *, exchange: bool) -> bool:
    """Run ``fn`` in a forked child that SIGKILLs itself at its k-th writer step (1-based).
    Returns True if the child was killed there, False if it finished first."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            torch.set_num_threads(1)
            count = [0]

            def hook(name):
                count[0] += 1
                if count[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)

            bundle_mod._step_hook = hook
            if not exchange:
                bundle_mod._flagged_rename = lambda src, dst, flag: False
            fn()
            os._exit(0)
        except BaseException:  # noqa: BLE001 - a forked child must never return into pytest
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the writer failed rather than being killed"
    return False


# ---- 4. atomic replace: a kill at every step -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("scenario", ["replace", "first-write"])
def test_a_writer_killed_at_any_step_leaves_a_whole_bundle(tmp_path, monkeypatch, exchange, scenario):
    if not exchange:
        monkeypatch.setattr(bundle_mod, "_flagged_rename", lambda src, dst, flag: False)
    out = tmp_path / "b"
    old = 1 if scenario == "replace" else None
    if old:
        write(out, old)
    steps = steps_of(lambda: write(out, 2))
    if old:
        assert len(steps) >= 35 and ("exchange" in steps) == exchange
    seen = set()
    for k in range(1, len(steps) + 1):
        if old:
            write(out, old)  # back to the old version
        elif os.path.lexists(out):
            shutil.rmtree(out)
        assert leftovers(tmp_path) == []
        assert run_killed_at(k, lambda: write(out, 2), exchange=exchange), f"step {k} ({steps[k - 1]}) not reached"
        if exchange or not old:
            # the target itself is whole at every instant: there is nothing to recover before reading
            assert os.path.isdir(out) if old else (not os.path.lexists(out) or (out / MANIFEST_NAME).is_file())
        if old or os.path.lexists(out):
            got = version_of(out, verify=True)  # Bundle.open finishes an interrupted two-rename replace
            assert got in ({old, 2} if old else {2}), steps[k - 1]
            seen.add(got)
        # the next writer sweeps (or finishes) whatever the kill left, and writes normally
        write(out, 3)
        assert version_of(out) == 3 and leftovers(tmp_path) == []
    assert seen == ({1, 2} if old else {2})


def test_debris_is_recognised_by_name_and_marker_only(tmp_path):
    out = write(tmp_path / "b", 1)
    parent = tmp_path
    # hellofmt's own debris: a temporary dir with the marker, an old bundle, an empty one
    (parent / ".b.hellofmt-tmp-000000000001").mkdir()
    (parent / ".b.hellofmt-tmp-000000000001" / DEBRIS_MARKER).write_text("x")
    (parent / ".b.hellofmt-tmp-000000000001" / "images-00000-of-00001.safetensors").write_bytes(b"x")
    write(parent / ".b.hellofmt-old-000000000002", 2)
    (parent / ".b.hellofmt-tmp-000000000003").mkdir()
    # things that only look like it: a user's folder, a file, a symlink to debris, another bundle's
    (parent / ".b.hellofmt-tmp-00000000000a").mkdir()
    (parent / ".b.hellofmt-tmp-00000000000a" / "notes.txt").write_text("mine")
    (parent / ".b.hellofmt-old-00000000000b").write_text("a file")
    os.symlink(parent / ".b.hellofmt-tmp-000000000001", parent / ".b.hellofmt-tmp-00000000000c")
    (parent / ".b.hellofmt-tmp-short").mkdir()
    (parent / ".b.hellofmt-tmp-short" / DEBRIS_MARKER).write_text("x")
    (parent / ".c.hellofmt-tmp-000000000004").mkdir()
    (parent / ".c.hellofmt-tmp-000000000004" / DEBRIS_MARKER).write_text("x")
    write(out, 3)
    assert leftovers(parent) == [".b.hellofmt-old-00000000000b", ".b.hellofmt-tmp-00000000000a",
                                 ".b.hellofmt-tmp-00000000000c", ".b.hellofmt-tmp-short"]
    assert (parent / ".b.hellofmt-tmp-00000000000a" / "notes.txt").read_text() == "mine"
    assert (parent / ".c.hellofmt-tmp-000000000004" / DEBRIS_MARKER).exists()
    assert version_of(out) == 3


# ---- 4. readers racing replaces ------------------------------------------------------------------
@pytest.mark.slow
def test_readers_racing_replaces_get_one_version_whole(tmp_path):
    out = write(tmp_path / "b", 1)
    replaces = 120
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            for i in range(replaces):
                write(out, 2 if i % 2 == 0 else 1)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - a forked child must never return into pytest
            os._exit(3)
    got = {1: 0, 2: 0}
    errors: list[HellofmtError] = []
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        try:
            got[version_of(out)] += 1
        except HellofmtError as e:  # the version it opened was swept away mid-read
            errors.append(e)
        if done:
            break
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    # every read saw one version whole (version_of asserts it); raw exceptions would have failed
    assert sum(got.values()) >= 1
    assert all(type(e).__name__ in ("BundleChangedError", "MissingFileError", "ImageStoreError", "TensorFileError")
               for e in errors), [str(e) for e in errors[:3]]
    assert version_of(out) == 1 and leftovers(tmp_path) == []


def test_a_reader_keeps_reading_the_version_it_opened(tmp_path):
    out = write(tmp_path / "b", 1)
    with Bundle.open(out) as b:
        write(out, 2)  # replaced (and the old version swept) between open and read
        assert b.manifest.provenance.seed == 1
        with pytest.raises(HellofmtError, match="replaced or removed while it was being read"):
            b.read_images()
    with Bundle.open(out) as b:
        assert b.manifest.provenance.seed == 2
        os.rename(out, tmp_path / "moved")  # moved, not deleted: the reader follows its directory
        write(out, 1)
        images, labels = b.read_images()
        assert torch.equal(images, IMAGES[2]) and torch.equal(labels, LABELS[2])


# ---- 4. concurrent writers -----------------------------------------------------------------------
def test_a_second_writer_is_refused_or_waits_for_the_lock(tmp_path):
    out = write(tmp_path / "b", 1)
    first = BundleWriter(out, overwrite=True)
    with pytest.raises(BundleLockedError, match=f"process {os.getpid()} is writing this bundle") as e:
        BundleWriter(out, overwrite=True)
    assert e.value.file == str(out)
    order = []

    def second():
        with BundleWriter(out, overwrite=True, lock_timeout=None) as w:
            order.append("second has the lock")
            w.abort()

    t = threading.Thread(target=second)
    t.start()
    order.append("first aborts")
    first.abort()
    t.join(timeout=60)
    assert order == ["first aborts", "second has the lock"]
    assert version_of(out) == 1 and leftovers(tmp_path) == []


def test_overwrite_replaces_only_a_bundle_or_an_empty_folder(tmp_path):
    mine = tmp_path / "b"
    mine.mkdir()
    (mine / "my_notes.txt").write_text("keep me")
    with pytest.raises(BundleExistsError, match="my_notes.txt"):
        write(mine, 1)
    assert (mine / "my_notes.txt").read_text() == "keep me" and leftovers(tmp_path) == []
    (mine / "my_notes.txt").unlink()
    assert version_of(write(mine, 1)) == 1  # an empty folder may be replaced


# ---- 5. permissions -----------------------------------------------------------------------------
@pytest.mark.parametrize("umask, dmode, fmode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_a_bundle_gets_the_umasks_permissions(tmp_path, umask, dmode, fmode):
    old = os.umask(umask)
    try:
        out = write(tmp_path / "b", 1)
        write(out, 2)  # a replace too
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dmode
    files = list(out.iterdir())
    assert len(files) >= 3 and MANIFEST_NAME in {p.name for p in files}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {fmode}
