"""A small in-memory Hugging Face Hub for tests, served on 127.0.0.1.

It speaks the part of the Hub HTTP API that huggingface_hub's ``create_repo``, ``create_branch``,
``create_tag``, ``create_commit`` (regular, non-LFS uploads), ``repo_info``, ``list_repo_tree``,
``list_repo_refs``, ``whoami``, ``hf_hub_download`` and ``snapshot_download`` use, closely enough
that the real client runs unmodified against it. Every commit is an immutable snapshot, so an old
revision stays downloadable after newer pushes.

What it deliberately simplifies:

- ``preupload`` answers ``uploadMode: "regular"`` for every file, so contents travel base64-encoded
  inside the commit and neither LFS nor Xet is ever involved; downloads carry no Xet headers, so the
  client uses a plain HTTP GET.
- Authentication is a fixed table of tokens: ``WRITE_TOKEN`` (may write to the ``user`` namespace),
  ``READ_TOKEN`` (read only). As on the real Hub, an anonymous request for a private *or missing*
  repository gets 401, an authenticated one for a missing repository gets 404, and an unknown token
  gets 401 "Invalid credentials in Authorization header".

Usage::

    with FakeHub() as hub:
        point_client_at(hub.url, monkeypatch)
        ...
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "user"
WRITE_TOKEN = "hf_fake_write_token"
READ_TOKEN = "hf_fake_read_token"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub uses as ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict  # path -> bytes; never mutated after creation
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict = field(default_factory=dict)  # oid -> Commit
    branches: dict = field(default_factory=dict)  # name -> oid
    tags: dict = field(default_factory=dict)  # name -> oid

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.tags:
            return self.commits[self.tags[revision]]
        for prefix, table in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if revision.startswith(prefix) and revision[len(prefix) :] in table:
                return self.commits[table[revision[len(prefix) :]]]
        return self.commits.get(revision)


class HubError(Exception):
    """An HTTP error answer: status, the ``X-Error-Code`` the client maps, and a message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body or {}


class FakeHub:
    """The server: repositories in memory, an HTTP server in a daemon thread on 127.0.0.1."""

    def __init__(self, tokens: dict[str, tuple[str, str]] | None = None) -> None:
        self.tokens = tokens if tokens is not None else {WRITE_TOKEN: (USER, "write"), READ_TOKEN: (USER, "read")}
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ---- direct access for tests ---------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def create_repo(self, repo_id: str, repo_type: str = "dataset", private: bool = False) -> Repo:
        """Create a repository with the Hub's usual initial commit (a ``.gitattributes``)."""
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                # The Hub's 409 carries the URL: create_repo(exist_ok=True) reads it.
                url = f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"
                raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
            repo = Repo(repo_id, repo_type, private)
            first = self._new_commit(None, "initial commit", {".gitattributes": GITATTRIBUTES})
            repo.commits[first.oid] = first
            repo.branches["main"] = first.oid
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def commit_files(self, repo_id: str, files: dict[str, bytes | None], *, repo_type="dataset", branch="main",
                     message="edit") -> str:
        """Commit directly (no HTTP): ``None`` deletes a path. Returns the new commit id."""
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            head = repo.commits[repo.branches[branch]]
            new = dict(head.files)
            for path, data in files.items():
                if data is None:
                    new.pop(path, None)
                else:
                    new[path] = bytes(data)
            commit = self._new_commit(head.oid, message, new)
            repo.commits[commit.oid] = commit
            repo.branches[branch] = commit.oid
            return commit.oid

    def _new_commit(self, parent: str | None, message: str, files: dict) -> Commit:
        h = hashlib.sha1()
        h.update(f"{next(self._counter)}\0{parent}\0{message}\0".encode())
        for path in sorted(files):
            h.update(f"{path}\0{git_blob_sha1(files[path])}\0".encode())
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return Commit(h.hexdigest(), parent, message, dict(files), date)

    def commit_requests(self) -> int:
        """How many commit calls the server has received (to check one push makes one commit)."""
        return sum(1 for m, p in self.requests if m == "POST" and "/commit/" in p)


def point_client_at(url: str, monkeypatch) -> None:
    """Point huggingface_hub (already imported) at ``url`` for the duration of a test.

    huggingface_hub reads ``HF_ENDPOINT`` once, at import, into ``constants``; every call reads the
    constants again, so patching them is enough. ``HF_ENDPOINT`` is also set for subprocesses.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {"127.0.0.1"}))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def running_fake_hub(monkeypatch, tmp_path):
    """The body of the ``fake_hub`` fixtures: a running FakeHub, huggingface_hub pointed at it, its
    cache in the test's ``tmp_path``, no token from the environment. A generator: the fixtures
    ``yield from`` it."""
    from huggingface_hub import constants

    with FakeHub() as server:
        point_client_at(server.url, monkeypatch)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server

# --------------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    # One request per connection: a stopped server then really is unreachable (no pooled
    # keep-alive connection survives it), which the "no network" tests rely on.
    protocol_version = "HTTP/1.0"
    server_version = "fakehub/1.0"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # Every verb goes through one dispatcher so errors are answered uniformly.
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # ---- plumbing ------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        self.parts = [unquote(p) for p in split.path.split("/")[1:]]
        self.method = method
        self.body = self._read_body()
        with self.hub.lock:
            self.hub.requests.append((method, split.path))
        try:
            self._route()
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, json.dumps({"error": e.message, **e.body}).encode(), "application/json", headers)
        except Exception as e:  # a bug in the fake server: answer 500 so the test shows it
            self._send(500, json.dumps({"error": f"fakehub: {type(e).__name__}: {e}"}).encode(), "application/json")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.method != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, "body is not JSON") from None

    # ---- auth ----------------------------------------------------------------------------------
    def _user(self) -> tuple[str, str] | None:
        auth = self.headers.get("Authorization") or ""
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _repo_for_read(self, repo_type: str, repo_id: str) -> Repo:
        user = self._user()
        repo = self.hub.repos.get((repo_type, repo_id))
        visible = repo is not None and (not repo.private or (user is not None and user[0] == repo_id.split("/")[0]))
        if not visible:
            # The Hub does not tell an anonymous caller whether a private repository exists.
            status = 401 if user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def _repo_for_write(self, repo_type: str, repo_id: str) -> Repo:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write")
        repo = self._repo_for_read(repo_type, repo_id)
        self._check_write(user, repo_id.split("/")[0])
        return repo

    @staticmethod
    def _check_write(user: tuple[str, str], namespace: str) -> None:
        if user[1] != "write" or user[0] != namespace:
            raise HubError(403, f"You don't have the rights to write to {namespace}")

    @staticmethod
    def _commit_of(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ---- routes --------------------------------------------------------------------------------
    def _route(self) -> None:
        p, m = self.parts, self.method
        if p[:1] == ["api"]:
            if p[1:] == ["whoami-v2"] and m == "GET":
                return self._whoami()
            if p[1:] == ["repos", "create"] and m == "POST":
                return self._create_repo()
            if p[1:] == ["validate-yaml"] and m == "POST":
                return self._validate_yaml()
            if p[1:] == ["agent-harnesses"]:
                return self._json({"standardEnvVars": [], "harnesses": {}})
            if len(p) >= 4 and p[1] in _TYPES:
                repo_type, repo_id, rest = _TYPES[p[1]], f"{p[2]}/{p[3]}", p[4:]
                return self._repo_api(repo_type, repo_id, rest)
        else:
            # /{prefix}{ns}/{name}/resolve/{revision}/{path...}
            repo_type = "model"
            q = p
            if p[:1] and p[0] in ("datasets", "spaces"):
                repo_type, q = _TYPES[p[0]], p[1:]
            if len(q) >= 5 and q[2] == "resolve" and m in ("GET", "HEAD"):
                return self._resolve(repo_type, f"{q[0]}/{q[1]}", q[3], "/".join(q[4:]))
        raise HubError(404, f"fakehub: no route for {m} {self.path}")

    def _repo_api(self, repo_type: str, repo_id: str, rest: list[str]) -> None:
        m = self.method
        if not rest and m == "GET":
            return self._info(repo_type, repo_id, "main")
        action, args = rest[0], rest[1:]
        if action == "revision" and args and m == "GET":
            return self._info(repo_type, repo_id, "/".join(args))
        if action == "tree" and args and m == "GET":
            return self._tree(repo_type, repo_id, args[0], "/".join(args[1:]))
        if action == "refs" and m == "GET":
            return self._refs(repo_type, repo_id)
        if action == "preupload" and args and m == "POST":
            return self._preupload(repo_type, repo_id, "/".join(args))
        if action == "commit" and args and m == "POST":
            return self._commit(repo_type, repo_id, "/".join(args))
        if action == "branch" and args and m == "POST":
            return self._create_branch(repo_type, repo_id, "/".join(args))
        if action == "tag" and args and m == "POST":
            return self._create_tag(repo_type, repo_id, "/".join(args))
        raise HubError(404, f"fakehub: no route for {m} {self.path}")

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        name, role = user
        self._json({"type": "user", "name": name, "auth": {"type": "access_token",
                                                            "accessToken": {"displayName": "fake", "role": role}}})

    def _create_repo(self) -> None:
        payload = self._json_body()
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        namespace = payload.get("organization") or user[0]
        repo_id = f"{namespace}/{payload['name']}"
        self._check_write(user, namespace)
        repo_type = payload.get("type") or "model"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.hub.create_repo(repo_id, repo_type, private)
        self._json({"url": f"{self.hub.url}/{_URL_PREFIX[repo_type]}{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        import yaml

        content = self._json_body().get("content", "")
        errors = []
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content.split("---", 2)[1])
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
            except (yaml.YAMLError, IndexError) as e:
                errors.append({"message": f"invalid YAML: {e}"})
        if errors:
            return self._json({"errors": errors, "warnings": []}, 400)
        self._json({"errors": [], "warnings": []})

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        commit = self._commit_of(repo, revision)
        self._json({
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        })

    def _tree(self, repo_type: str, repo_id: str, revision: str, prefix: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        commit = self._commit_of(repo, revision)
        recursive = (self.query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for path in sorted(commit.files):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            rel = path[len(prefix.rstrip("/")) + 1 :] if prefix else path
            if "/" in rel and not recursive:
                folders.add((prefix.rstrip("/") + "/" if prefix else "") + rel.split("/")[0])
                continue
            data = commit.files[path]
            entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)})
        entries += [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)]
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
        self._json(entries)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        self._json({
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo.branches.items()],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in repo.tags.items()],
            "converts": [],
            "pullRequests": [],
        })

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo_for_write(repo_type, repo_id)
        head = repo.resolve(revision)
        files = []
        for f in self._json_body().get("files", []):
            entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
            if head is not None and f["path"] in head.files:
                entry["oid"] = git_blob_sha1(head.files[f["path"]])
            files.append(entry)
        self._json({"files": files, "commitOid": head.oid if head else None})

    def _commit(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._repo_for_write(repo_type, repo_id)
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first line of a commit must be its header")
        header = lines[0]["value"]
        with self.hub.lock:
            head = repo.commits[repo.branches[branch]]
            if header.get("parentCommit") not in (None, head.oid):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, "fakehub only takes base64 file contents")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(folder)}
                else:
                    raise HubError(400, f"fakehub does not take {key!r} operations (preupload said 'regular')")
            commit = self.hub._new_commit(head.oid, header.get("summary") or "", files)
            repo.commits[commit.oid] = commit
            repo.branches[branch] = commit.oid
        url = f"{self.hub.url}/{_URL_PREFIX[repo_type]}{repo_id}/commit/{commit.oid}"
        self._json({"success": True, "commitOid": commit.oid, "commitUrl": url, "commitMessage": commit.message,
                    "hookOutput": "", "pullRequestUrl": None})

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._repo_for_write(repo_type, repo_id)
        start = self._json_body().get("startingPoint") or "main"
        with self.hub.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            repo.branches[branch] = self._commit_of(repo, start).oid
        self._json({})

    def _create_tag(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo_for_write(repo_type, repo_id)
        tag = self._json_body()["tag"]
        with self.hub.lock:
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self._commit_of(repo, revision).oid
        self._json({})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        commit = self._commit_of(repo, revision)
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = commit.files[path]
        headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        status, body = 200, data
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and self.method == "GET":
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(data) - 1
            body, status = data[start : end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        self._send(status, body, "application/octet-stream", headers)
