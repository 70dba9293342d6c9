"""A fake Hugging Face Hub for tests: the HTTP calls the real ``huggingface_hub`` client makes, nothing more.

Stdlib only: a ``ThreadingHTTPServer`` on 127.0.0.1 (ephemeral port) holding repos in memory. It speaks
(reference/peft_hub.md §3.4) ``POST /api/repos/create``, ``preupload`` (always ``uploadMode: "regular"``, so
file bytes arrive base64 inside the commit and neither LFS nor xet is ever needed), the NDJSON ``commit``,
``validate-yaml``, ``discussions`` (pull requests), ``branch``, ``whoami-v2``, and for downloads
``/api/models/{repo}[/revision/{rev}]``, ``/tree/{rev}`` and ``HEAD|GET /{repo}/resolve/{rev}/{path}``.
Bounded: request bodies up to ``max_body`` bytes, sockets time out, and the server shuts itself down after
``lifetime`` seconds even if a test forgets to stop it.

Tests get a running one from the ``fake_hub`` fixture (conftest.py) and its token as ``helpers.TOKEN``; only
conftest.py and helpers.py import this module.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

TOKEN = "hf_fakeHubTestToken0123456789abcdef"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 the Hub reports for a regular file (the client compares it to skip unchanged files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    parent: str | None
    summary: str
    description: str = ""
    operations: list[tuple[str, str]] = field(default_factory=list)  # (kind, path) as sent by the client


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main", branches, "refs/pr/N" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: dict[int, dict] = field(default_factory=dict)

    def head(self, revision: str) -> Commit | None:
        oid = self.refs.get(revision, revision)
        return self.commits.get(oid)

    def add_commit(self, revision: str, files: dict[str, bytes], summary: str, description: str = "",
                   operations=()) -> Commit:
        parent = self.refs.get(revision)
        digest = hashlib.sha1(json.dumps([parent, summary, sorted((p, git_blob_oid(d)) for p, d in files.items()),
                                          len(self.commits)]).encode())
        commit = Commit(digest.hexdigest(), dict(files), parent, summary, description, list(operations))
        self.commits[commit.oid] = commit
        self.refs[revision] = commit.oid
        return commit


class FakeHub:
    """The server and its state. ``hub.url`` is the endpoint to give ``HfApi(endpoint=...)`` or ``HF_ENDPOINT``."""

    def __init__(self, tokens=(TOKEN,), *, max_body: int = 64 << 20, lifetime: float = 300.0):
        self.tokens = set(tokens)
        self.max_body = max_body
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def start(self) -> "FakeHub":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- test helpers ------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, revision: str = "main") -> str:
        """Seed a repo (or a new branch/commit of one) with files; returns the commit oid."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private))
            base = repo.head("main")
            return repo.add_commit(revision, {**(base.files if base and revision not in repo.refs else {}), **files},
                                   "seed").oid

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].head(revision).files)

    def calls(self, prefix: str = "") -> list[str]:
        return [f"{m} {p}" for m, p in self.requests if p.startswith(prefix)]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30

        def log_message(self, *args):  # keep test output clean
            pass

        # -- plumbing ------------------------------------------------------------------------------
        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def _dispatch(self, method: str):
            url = urlsplit(self.path)
            path, query = url.path, parse_qs(url.query)  # matched still quoted: a revision's "/" arrives as %2F
            hub.requests.append((method, self.path))
            length = int(self.headers.get("Content-Length") or 0)
            if length > hub.max_body:
                return self._json(413, {"error": "request body too large for the fake hub"})
            self.body = self.rfile.read(length) if length else b""
            auth = self.headers.get("Authorization", "")
            self.token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
            if self.token is not None and self.token not in hub.tokens:
                return self._json(401, {"error": "Invalid credentials in Authorization header"})
            for verb, pattern, handler in ROUTES:
                m = re.fullmatch(pattern, path)
                if m and (verb == method or (verb == "GET" and method == "HEAD")):
                    args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                    with hub.lock:
                        return handler(self, query=query, **args)
            self._json(404, {"error": f"fake hub: no route for {method} {path}"})

        def _send(self, status: int, body: bytes, headers: dict[str, str]):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload, headers: dict[str, str] | None = None):
            headers = {"Content-Type": "application/json", **(headers or {})}
            if status >= 400 and "error" in payload:
                headers.setdefault("X-Error-Message", payload["error"])
            self._send(status, json.dumps(payload).encode(), headers)

        def _payload(self):
            return json.loads(self.body or b"{}")

        def _repo(self, repo: str, *, write: bool = False) -> Repo | None:
            """The repo, or None after answering 401/404 as the Hub does (private repos look missing)."""
            if write and self.token is None:
                self._json(401, {"error": "You must be authenticated to write"})
                return None
            r = hub.repos.get(repo)
            if r is None or (r.private and self.token is None):
                self._json(404 if r is None else 401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return None
            return r

        def _commit(self, repo: Repo, rev: str) -> Commit | None:
            commit = repo.head(rev)
            if commit is None:
                self._json(404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
            return commit

        # -- repos ---------------------------------------------------------------------------------
        def create_repo(self, query):
            if self.token is None:
                return self._json(401, {"error": "You must be authenticated to create a repo"})
            p = self._payload()
            repo_id = f"{p['organization']}/{p['name']}" if p.get("organization") else f"tester/{p['name']}"
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            private = p.get("visibility", "private" if p.get("private") else "public") == "private"
            repo = hub.repos[repo_id] = Repo(repo_id, private)
            repo.add_commit("main", {}, "initial commit")
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def whoami(self, query):
            if self.token is None:
                return self._json(401, {"error": "Invalid credentials in Authorization header"})
            self._json(200, {"type": "user", "name": "tester", "orgs": [], "auth": {"accessToken": {"role": "write"}}})

        def model_info(self, query, repo, rev="main"):
            r = self._repo(repo)
            commit = r and self._commit(r, rev or "main")
            if commit:
                self._json(200, {"id": repo, "modelId": repo, "sha": commit.oid, "private": r.private,
                                 "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

        def tree(self, query, repo, rev, sub=""):
            r = self._repo(repo)
            commit = r and self._commit(r, rev)
            if commit:
                self._json(200, [{"type": "file", "oid": git_blob_oid(d), "size": len(d), "path": p}
                                 for p, d in sorted(commit.files.items()) if p.startswith(sub or "")])

        def resolve(self, query, repo, rev, file):
            r = self._repo(repo)
            commit = r and self._commit(r, rev)
            if not commit:
                return
            if file not in commit.files:
                return self._json(404, {"error": f"Entry not found: {file}"},
                                  {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.oid})
            data = commit.files[file]
            self._send(200, data, {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit.oid,
                                   "ETag": f'"{git_blob_oid(data)}"'})

        def branch(self, query, repo, branch):
            r = self._repo(repo, write=True)
            if r is None:
                return
            if branch in r.refs:
                return self._json(409, {"error": f"Branch {branch} already exists"})
            start = self._payload().get("startingPoint") or "main"
            commit = self._commit(r, start)
            if commit:
                r.refs[branch] = commit.oid
                self._json(200, {})

        # -- uploads -------------------------------------------------------------------------------
        def validate_yaml(self, query):
            import yaml

            content = self._payload().get("content", "")
            try:
                meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                errors = [] if isinstance(meta, dict) or meta is None else [{"message": "metadata must be a mapping"}]
            except (yaml.YAMLError, IndexError) as e:
                errors = [{"message": str(e)}]
            self._json(200, {"errors": errors, "warnings": []})

        def preupload(self, query, repo, rev):
            r = self._repo(repo, write=True)
            if r is None:
                return
            head = r.head(rev) or r.head("main")
            answers = []
            for f in self._payload().get("files", []):
                old = head.files.get(f["path"]) if head else None
                answers.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                "oid": git_blob_oid(old) if old is not None else None})
            self._json(200, {"files": answers, "commitOid": head.oid if head else None})

        def commit(self, query, repo, rev):
            r = self._repo(repo, write=True)
            if r is None:
                return
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            pr = None
            if query.get("create_pr") == ["1"]:
                pr = self._open_pr(r, header.get("summary", ""), header.get("description", ""))
                rev = f"refs/pr/{pr}"
            base = self._commit(r, rev)
            if base is None:
                return
            files, ops = dict(base.files), []
            for op in lines:
                kind, value = op["key"], op["value"]
                if kind == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif kind == "deletedFile":
                    files.pop(value["path"], None)
                elif kind == "deletedFolder":
                    files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                elif kind != "header":
                    return self._json(400, {"error": f"fake hub: unsupported commit operation {kind!r}"})
                if kind != "header":
                    ops.append((kind, value["path"]))
            commit = r.add_commit(rev, files, header.get("summary", ""), header.get("description", ""), ops)
            reply = {"commitOid": commit.oid, "commitUrl": f"{hub.url}/{repo}/commit/{commit.oid}"}
            if pr is not None:
                reply["pullRequestUrl"] = f"{hub.url}/{repo}/discussions/{pr}"
            self._json(200, reply)

        def _open_pr(self, r: Repo, title: str, description: str) -> int:
            num = len(r.pull_requests) + 1
            r.pull_requests[num] = {"title": title, "description": description}
            r.refs[f"refs/pr/{num}"] = r.refs["main"]
            return num

        def create_discussion(self, query, repo):
            r = self._repo(repo, write=True)
            if r is None:
                return
            p = self._payload()
            if not p.get("pullRequest"):
                return self._json(400, {"error": "fake hub: only pull requests are supported"})
            num = self._open_pr(r, p.get("title", ""), p.get("description", ""))
            self._json(200, {"num": num, "url": f"{hub.url}/{repo}/discussions/{num}"})

        def get_discussion(self, query, repo, num):
            r = self._repo(repo)
            if r is None:
                return
            pr = r.pull_requests.get(int(num))
            if pr is None:
                return self._json(404, {"error": "Discussion not found"})
            self._json(200, {"title": pr["title"], "num": int(num), "author": {"name": "tester"},
                             "createdAt": "2026-01-01T00:00:00.000Z", "status": "open", "isPullRequest": True,
                             "repo": {"name": repo, "type": "model"}, "events": [], "changes": {"base": "refs/heads/main"},
                             "filesWithConflicts": [], "pinned": False, "locked": False, "diff": ""})

    return Handler


ROUTES = [
    ("POST", r"/api/repos/create", "create_repo"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", "model_info"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", "tree"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", "branch"),
    ("POST", rf"/api/models/{REPO}/discussions", "create_discussion"),
    ("GET", rf"/api/models/{REPO}/discussions/(?P<num>\d+)", "get_discussion"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", "resolve"),
]
ROUTES = [(verb, pattern, (lambda name: lambda h, **kw: getattr(h, name)(**kw))(name)) for verb, pattern, name in ROUTES]


def isolate_hf_home(home, monkeypatch) -> None:
    """Point huggingface_hub's cache and token paths (read at import) into ``home``: no real cache or token is touched."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    paths = {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HUGGINGFACE_HUB_CACHE": home / "hub",
             "HF_ASSETS_CACHE": home / "assets", "HF_TOKEN_PATH": home / "token",
             "HF_STORED_TOKENS_PATH": home / "stored_tokens", "HF_XET_CACHE": home / "xet"}
    for name, path in paths.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, str(path))

