"""push / pull through the real huggingface_hub client against a fake Hub on 127.0.0.1.

The fake Hub (tests/fakehub.py) keeps every commit as an immutable snapshot; the client is pointed
at it by patching ``huggingface_hub.constants`` (it reads ``HF_ENDPOINT`` once, at import) and its
cache goes to the test's tmp dir. One opt-in test talks to the real Hub.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import constants

from hellofmt import hub
from hellofmt.bundle import Bundle
from hellofmt.cli import main
from hellofmt.errors import (
    AuthenticationError,
    BundleNotFoundError,
    HubError,
    InputError,
    IntegrityError,
    OfflineError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from hellofmt.manifest import MANIFEST_NAME, Manifest
from hellofmt.show import preview_png
from hellofmt.summary import summarize

from bundles import make_format_bundle
from fakehub import READ_TOKEN, WRITE_TOKEN, running_fake_hub

REPO = "user/tiny"
COMMIT_URL = re.compile(r"^http://127\.0\.0\.1:\d+/datasets/user/tiny/commit/([0-9a-f]{40})$")


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A running fake Hub, huggingface_hub pointed at it, its cache in this test's tmp dir."""
    yield from running_fake_hub(monkeypatch, tmp_path)


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_format_bundle(tmp_path / "bundle", num_classes=3, per_class=2, seed=0)


def bundle_files(path: Path) -> dict[str, bytes]:
    """The manifest and every file it lists, name -> bytes (what 'the same bundle' means)."""
    man = Bundle.open(path).manifest
    return {n: (Path(path) / n).read_bytes() for n in [MANIFEST_NAME, *man.files]}


def go_offline(monkeypatch) -> None:
    # huggingface_hub read HF_HUB_OFFLINE at import; the constant is what its calls consult.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# --------------------------------------------------------------------------------------------------
# Hub ids
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source, expected",
    [
        ("user/name", ("user/name", None)),
        ("hf://datasets/user/name", ("user/name", None)),
        ("hf://datasets/org-1/my.set_2@v1.0", ("org-1/my.set_2", "v1.0")),
        ("user/name@" + "a" * 40, ("user/name", "a" * 40)),
    ],
)
def test_hub_ids_are_recognised(source, expected):
    assert hub.is_hub_id(source)
    assert hub.parse_hub_id(source) == expected


@pytest.mark.parametrize(
    "source",
    ["name", "./user/name", "/abs/user/name", "a/b/c", "user/", "user/na--me", "user/..", "user/name@",
     "hf://models/user/name", "user/name.git", "", 3],
)
def test_non_hub_ids_are_refused(source):
    assert not hub.is_hub_id(source)


def test_revision_given_twice_must_agree(fake_hub, bundle):
    with pytest.raises(InputError, match="two revisions"):
        hub.pull("user/tiny@v1", revision="v2")


# --------------------------------------------------------------------------------------------------
# push then pull
# --------------------------------------------------------------------------------------------------
def test_push_then_pull_gives_the_bundle_byte_for_byte(fake_hub, bundle, tmp_path):
    url = hub.push(bundle, REPO, token=WRITE_TOKEN)

    assert COMMIT_URL.match(url), url
    assert fake_hub.commit_requests() == 1  # manifest, shards, projector, card and preview in ONE commit
    head = fake_hub.repo(REPO).resolve("main")
    assert url.endswith(head.oid)
    assert set(head.files) == {".gitattributes", "README.md", "preview.png", *bundle_files(bundle)}

    path = hub.pull(REPO)
    assert Path(path).is_relative_to(tmp_path / "hf-cache")  # the huggingface_hub cache, not ~/.cache
    assert bundle_files(path) == bundle_files(bundle)
    assert not (Path(path) / ".gitattributes").exists()  # the Hub's own file is not part of a bundle


def test_pull_into_a_directory(fake_hub, bundle, tmp_path):
    hub.push(bundle, REPO, token=WRITE_TOKEN)
    out = tmp_path / "pulled"
    path = hub.pull(REPO, out)
    assert Path(path) == out.resolve()
    assert bundle_files(out) == bundle_files(bundle)


def test_a_second_push_is_a_new_revision_and_the_first_stays_pullable(fake_hub, bundle, tmp_path):
    first_url = hub.push(bundle, REPO, token=WRITE_TOKEN)
    first = COMMIT_URL.match(first_url).group(1)
    # A different bundle with another shard layout: the first one's shard must not linger on main.
    second_dir = make_format_bundle(tmp_path / "second", num_classes=3, per_class=3, seed=1, max_shard_bytes=1)
    assert set(Bundle.open(second_dir).manifest.files) != set(Bundle.open(bundle).manifest.files)
    second = COMMIT_URL.match(hub.push(second_dir, REPO, token=WRITE_TOKEN, message="v2")).group(1)

    assert first != second
    assert fake_hub.repo(REPO).commits[second].message == "v2"
    assert bundle_files(hub.pull(REPO)) == bundle_files(second_dir)
    stale = set(Bundle.open(bundle).manifest.files) - set(Bundle.open(second_dir).manifest.files)
    assert stale and not stale & set(fake_hub.repo(REPO).resolve("main").files)

    assert bundle_files(hub.pull(REPO, revision=first)) == bundle_files(bundle)
    assert bundle_files(hub.pull(f"hf://datasets/{REPO}@{first}", tmp_path / "old")) == bundle_files(bundle)


def test_push_to_a_branch(fake_hub, bundle):
    from huggingface_hub import HfApi

    url = hub.push(bundle, REPO, token=WRITE_TOKEN, revision="v1")
    refs = HfApi().list_repo_refs(REPO, repo_type="dataset")
    assert {b.name: b.target_commit for b in refs.branches}["v1"] == COMMIT_URL.match(url).group(1)
    assert bundle_files(hub.pull(REPO, revision="v1")) == bundle_files(bundle)
    with pytest.raises(BundleNotFoundError, match="not a hellofmt bundle"):
        hub.pull(REPO)  # main still holds only the Hub's initial commit


def test_pull_a_tag(fake_hub, bundle):
    from huggingface_hub import HfApi

    hub.push(bundle, REPO, token=WRITE_TOKEN)
    HfApi(token=WRITE_TOKEN).create_tag(REPO, tag="v1.0", repo_type="dataset")
    hub.push(make_format_bundle(bundle.parent / "newer", seed=3), REPO, token=WRITE_TOKEN)
    assert bundle_files(hub.pull(f"{REPO}@v1.0")) == bundle_files(bundle)


def test_pushing_the_same_bundle_again_changes_nothing(fake_hub, bundle):
    url = hub.push(bundle, REPO, token=WRITE_TOKEN)
    assert hub.push(bundle, REPO, token=WRITE_TOKEN) == url
    assert len(fake_hub.repo(REPO).commits) == 2  # the initial commit and one push


def test_push_private_repo_needs_a_token_to_pull(fake_hub, bundle):
    hub.push(bundle, REPO, token=WRITE_TOKEN, private=True)
    assert fake_hub.repo(REPO).private
    with pytest.raises(AuthenticationError, match="needs a token") as err:
        hub.pull(REPO)
    assert "HF_TOKEN" in str(err.value) and err.value.file == f"hf://datasets/{REPO}"
    assert bundle_files(hub.pull(REPO, token=READ_TOKEN)) == bundle_files(bundle)


# --------------------------------------------------------------------------------------------------
# Dataset card
# --------------------------------------------------------------------------------------------------
def _with_metrics(path: Path, metrics: dict) -> Path:
    # The manifest is not itself hashed, so metrics can be added without touching file entries.
    man = Manifest.from_json((path / MANIFEST_NAME).read_bytes())
    man.metrics = metrics
    (path / MANIFEST_NAME).write_text(man.to_json())
    return path


def test_dataset_card(fake_hub, bundle):
    import yaml

    _with_metrics(bundle, {"top1_agreement": 0.9812, "kl_divergence": 0.0421})
    hub.push(bundle, REPO, token=WRITE_TOKEN, license="Apache-2.0")
    card = fake_hub.repo(REPO).resolve("main").files["README.md"].decode()
    opened = Bundle.open(bundle)
    assert card == hub.dataset_card(opened, REPO, license="apache-2.0", preview=preview_png(opened))

    _, front, body = card.split("---", 2)
    meta = yaml.safe_load(front)
    assert meta["task_categories"] == ["image-classification"]
    assert {"hellofmt", "dataset-distillation"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"

    s = summarize(Bundle.open(bundle))
    proj = s["label_payload"]["projector_bytes"]
    stored = 6 * 300 * 3 * 2
    assert s["label_payload"]["stored_label_bytes"] == stored
    assert "hf-test-tiny-vit:fake" in body  # the foundation model
    assert "| Classes | 3 |" in body and "| Images per class | 2 |" in body
    assert "codec `png`" in body
    assert f"{proj:,} bytes" in body and f"{stored:,} bytes" in body
    assert f"{stored / proj:,.1f}x" in body
    assert "| top1\\_agreement | 0.9812 |" in body and "| kl\\_divergence | 0.0421 |" in body
    assert "class 0, class 1, class 2" in body
    assert 'DistilledDataset("user/tiny"' in body


def test_dataset_card_without_license_or_metrics_and_with_odd_class_names(tmp_path):
    path = make_format_bundle(tmp_path / "b", classes=["a|b", "`x`", "c\nd"], per_class=1)
    card = hub.dataset_card(path)
    front = card.split("---", 2)[1]
    assert "license" not in front
    assert "no fidelity metrics" in card
    assert "a\\|b, \\`x\\`, c d" in card  # escaped: no broken table or code span
    assert 'DistilledDataset("USER/NAME"' in card


def test_bad_license_is_refused_before_any_request(fake_hub, bundle):
    with pytest.raises(InputError, match="license"):
        hub.push(bundle, REPO, token=WRITE_TOKEN, license="Apache 2.0\nevil: yes")
    assert fake_hub.requests == []


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_push_refuses_a_broken_bundle(fake_hub, bundle):
    shard = next(n for n in Bundle.open(bundle).manifest.files if n.startswith("images-"))
    data = bytearray((bundle / shard).read_bytes())
    data[-1] ^= 0xFF
    (bundle / shard).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="refusing to push"):
        hub.push(bundle, REPO, token=WRITE_TOKEN)
    assert fake_hub.requests == []  # nothing was sent


def test_repository_not_found(fake_hub):
    with pytest.raises(RepositoryNotFoundError, match="no such dataset repository") as err:
        hub.pull("user/missing", token=READ_TOKEN)
    assert err.value.file == "hf://datasets/user/missing"


def test_anonymous_pull_of_a_missing_repo_asks_for_the_name_or_a_token(fake_hub):
    # As on the real Hub, an anonymous caller cannot tell a missing repository from a private one.
    with pytest.raises(AuthenticationError, match="private, or does not exist"):
        hub.pull("user/missing")


def test_revision_not_found(fake_hub, bundle):
    hub.push(bundle, REPO, token=WRITE_TOKEN)
    with pytest.raises(RevisionNotFoundError, match="no revision 'nope'") as err:
        hub.pull(REPO, revision="nope")
    assert err.value.field == "revision"


def test_not_a_bundle_is_refused_before_downloading(fake_hub):
    fake_hub.create_repo("user/other")
    fake_hub.commit_files("user/other", {"data.csv": b"a,b\n1,2\n"})
    with pytest.raises(BundleNotFoundError, match="not a hellofmt bundle"):
        hub.pull("user/other")
    assert not any("/resolve/" in p for _, p in fake_hub.requests)


@pytest.mark.parametrize(
    "token, message",
    [(None, "needs a token"), (READ_TOKEN, "may not write"), ("hf_not_a_token", "refused the token")],
)
def test_push_authentication(fake_hub, bundle, token, message):
    with pytest.raises(AuthenticationError, match=message):
        hub.push(bundle, REPO, token=token)
    assert fake_hub.commit_requests() == 0


def test_push_to_another_namespace_is_forbidden(fake_hub, bundle):
    with pytest.raises(AuthenticationError, match="may not write"):
        hub.push(bundle, "someone-else/tiny", token=WRITE_TOKEN)


def test_hash_mismatch_after_download(fake_hub, bundle):
    hub.push(bundle, REPO, token=WRITE_TOKEN)
    # Someone replaces a shard on the Hub (same size) without updating the manifest.
    shard = next(n for n in Bundle.open(bundle).manifest.files if n.startswith("images-"))
    data = bytearray((bundle / shard).read_bytes())
    data[len(data) // 2] ^= 0x01
    fake_hub.commit_files(REPO, {shard: bytes(data)})
    with pytest.raises(IntegrityError, match="sha256") as err:
        hub.pull(REPO)
    assert "downloaded from hf://datasets/user/tiny" in str(err.value)
    assert "--force-download" in str(err.value)
    # verify=False leaves the hashing to a caller that does it next (DistilledDataset opens with verify=True).
    assert Path(hub.pull(REPO, verify=False)).is_dir()


def test_no_network_and_nothing_cached(fake_hub, bundle):
    hub.push(bundle, REPO, token=WRITE_TOKEN)
    fake_hub.stop()
    with pytest.raises(OfflineError, match="cannot reach the Hub") as err:
        hub.pull(REPO)
    assert "HF_HUB_OFFLINE" in str(err.value)
    with pytest.raises(OfflineError, match="cannot reach the Hub"):
        hub.push(bundle, REPO, token=WRITE_TOKEN)


def test_offline_mode_and_nothing_cached(fake_hub, monkeypatch):
    go_offline(monkeypatch)
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE=1 is set"):
        hub.pull(REPO)
    assert fake_hub.requests == []


def test_offline_push_says_why(fake_hub, bundle, monkeypatch):
    go_offline(monkeypatch)
    with pytest.raises(OfflineError, match="pushing needs the network"):
        hub.push(bundle, REPO, token=WRITE_TOKEN)


def test_every_hub_error_is_a_hellofmt_error():
    for cls in (RepositoryNotFoundError, RevisionNotFoundError, AuthenticationError, OfflineError):
        assert issubclass(cls, HubError)


# --------------------------------------------------------------------------------------------------
# Offline from the cache
# --------------------------------------------------------------------------------------------------
def test_offline_from_the_cache(fake_hub, bundle, monkeypatch):
    first = COMMIT_URL.match(hub.push(bundle, REPO, token=WRITE_TOKEN)).group(1)
    online = hub.pull(REPO)
    fake_hub.stop()  # nothing to talk to: any request would fail

    assert hub.pull(REPO) == online  # network down: the cache answers
    go_offline(monkeypatch)
    assert hub.pull(REPO) == online
    assert hub.pull(REPO, revision=first) == online
    assert bundle_files(online) == bundle_files(bundle)


def test_offline_env_var_in_a_fresh_process(fake_hub, bundle, tmp_path):
    """HF_HUB_OFFLINE=1 as users set it: read by huggingface_hub at import, in a new process."""
    hub.push(bundle, REPO, token=WRITE_TOKEN)
    online = hub.pull(REPO)
    fake_hub.stop()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "hellofmt.cli", "pull", REPO], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(online)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def test_cli_push_and_pull(fake_hub, bundle, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["push", str(bundle), REPO, "--token", WRITE_TOKEN, "--license", "mit",
                               "--message", "from the CLI"])
    assert res.exit_code == 0, res.output
    assert COMMIT_URL.match(res.stdout.strip())
    assert fake_hub.repo(REPO).resolve("main").message == "from the CLI"

    res = runner.invoke(main, ["pull", REPO, str(tmp_path / "dir")])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str((tmp_path / "dir").resolve())
    assert bundle_files(tmp_path / "dir") == bundle_files(bundle)


def test_cli_errors_are_one_line(fake_hub):
    res = CliRunner().invoke(main, ["pull", "user/missing", "--token", READ_TOKEN])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        "error: hf://datasets/user/missing: no such dataset repository on the Hub (check USER/NAME (it is a "
        "dataset repository); for a private one pass --token (token=...), set HF_TOKEN, or run `hf auth login`)"
    ]


# --------------------------------------------------------------------------------------------------
# DistilledDataset("user/name")
# --------------------------------------------------------------------------------------------------
def test_distilled_dataset_from_the_hub(fake_hub, tiny_bundle):
    from hellofmt import DistilledDataset

    hub.push(tiny_bundle, REPO, token=WRITE_TOKEN)
    ds = DistilledDataset(REPO, device="cpu")
    assert Path(ds.path).is_relative_to(Path(constants.HF_HUB_CACHE))
    assert len(ds) == Bundle.open(tiny_bundle).manifest.images.count
    assert ds.classes == Bundle.open(tiny_bundle).manifest.classes


# --------------------------------------------------------------------------------------------------
# The real Hub (opt-in)
# --------------------------------------------------------------------------------------------------
@pytest.mark.live
@pytest.mark.skipif(
    not (os.environ.get("HELLOFMT_LIVE_HUB") == "1" and os.environ.get("HF_TOKEN")),
    reason="talks to the real Hugging Face Hub: set HELLOFMT_LIVE_HUB=1 and HF_TOKEN (a write token) to run",
)
def test_live_push_and_pull(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    path = make_format_bundle(tmp_path / "bundle")
    api = HfApi()
    repo = f"{api.whoami()['name']}/hellofmt-live-test-{uuid.uuid4().hex[:8]}"
    try:
        url = hub.push(path, repo, private=True)
        assert "/commit/" in url
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert bundle_files(hub.pull(repo)) == bundle_files(path)
    finally:
        api.delete_repo(repo, repo_type="dataset", missing_ok=True)
