"""A loopback stand-in for the Hugging Face Hub's HTTP API, for offline tests of pushing and downloading adapters.

`FakeHub` serves, on 127.0.0.1 and a free port, the part of the Hub API that `huggingface_hub` uses for
`create_repo`, `upload_folder` / `create_commit` (YAML validation, preupload, regular and Git LFS uploads, the ndjson
commit), repo info and tree listings, and `hf_hub_download` / `snapshot_download` (HEAD and GET on ``resolve`` with
the ``X-Repo-Commit``, ``ETag`` and ``X-Linked-*`` headers). Point a process at it with its `env()`::

    with FakeHub() as hub:
        subprocess.run([...], env={**os.environ, **hub.env(hf_home=tmp_path / "hf")})
        assert "pytorch_lora_weights.safetensors" in hub.files("user/my-adapter")

Files that the real Hub stores in LFS (weights, images, anything binary or of 10 MB and more) go through the LFS
batch API and a PUT, the rest are committed inline, as on the Hub. Xet storage is not spoken: `env()` disables it
(``HF_HUB_DISABLE_XET=1``), and `huggingface_hub` then uses the LFS path. The server is bounded: it only listens on
the loopback interface, refuses bodies over `max_body_bytes` and requests after `max_requests`, and shuts itself down
after `lifetime_s` seconds if nobody stopped it. For tests only: there is no persistence and no real access control
(any non-empty token may write).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


# What the Hub's default .gitattributes tracks with LFS, in short.
LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".onnx",
    ".msgpack",
    ".npy",
    ".npz",
    ".pkl",
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".gif",
    ".zip",
    ".tar",
    ".gz",
    ".parquet",
    ".arrow",
)
LFS_SIZE_THRESHOLD = 10 * 1000 * 1000
_GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob, which the Hub reports as the ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    """One file of a commit: its bytes and whether the Hub would keep it in LFS."""

    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def etag(self) -> str:
        # The Hub's ETag is the LFS sha256 for LFS files and the git blob id otherwise.
        return self.sha256 if self.lfs else git_blob_sha1(self.content)

    @property
    def blob_id(self) -> str:
        # The git blob of an LFS file is its pointer file.
        return git_blob_sha1(_lfs_pointer(self.sha256, len(self.content)) if self.lfs else self.content)

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": path, "size": len(self.content), "oid": self.blob_id}
        if self.lfs:
            pointer = _lfs_pointer(self.sha256, len(self.content))
            entry["lfs"] = {"oid": self.sha256, "size": len(self.content), "pointerSize": len(pointer)}
        return entry


@dataclass
class Commit:
    """A commit: its id, message and the full tree of files after it."""

    oid: str
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    """A repository with a linear history on ``main``."""

    repo_id: str
    repo_type: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def commit_at(self, revision: str) -> Commit | None:
        """The commit a revision names: ``main`` (or ``HEAD``) or a full commit id."""
        if revision in ("main", "HEAD"):
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


@dataclass
class RecordedRequest:
    """One request the server answered (for assertions in tests)."""

    method: str
    path: str
    status: int
    authorization: str | None


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """A loopback Hub server in a background thread; use as a context manager (or `start` / `stop`).

    Args:
        user: the namespace of repos created without one, and the name `whoami` reports.
        max_requests: requests served before every further one is refused with 503.
        max_body_bytes: largest request body accepted (413 beyond).
        lifetime_s: seconds after which the server shuts itself down if still running.

    Attributes:
        repos: ``(repo_type, repo_id) -> Repo``.
        requests: every request answered, in order.
    """

    def __init__(
        self,
        user: str = "user",
        max_requests: int = 10_000,
        max_body_bytes: int = 512 * 1024 * 1024,
        lifetime_s: float = 900.0,
    ) -> None:
        self.user = user
        self.max_requests = max_requests
        self.max_body_bytes = max_body_bytes
        self.lifetime_s = lifetime_s
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[RecordedRequest] = []
        self._lfs_objects: dict[str, bytes] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._commit_counter = 0

    # ------------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> FakeHub:
        """Bind 127.0.0.1 on a free port and serve from a daemon thread."""
        if self._server is not None:
            return self
        handler = type("FakeHubHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # A short poll interval so that `stop` returns promptly.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port (idempotent)."""
        server, self._server = self._server, None
        if self._timer is not None and threading.current_thread() is not self._timer:
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def is_running(self) -> bool:
        """Whether the server is serving (False once stopped, by `stop` or at the end of its lifetime)."""
        return self._server is not None

    @property
    def url(self) -> str:
        """The endpoint, e.g. ``http://127.0.0.1:54321``; set it as ``HF_ENDPOINT``."""
        if self._server is None:
            raise RuntimeError("FakeHub is not running; use it as a context manager or call start().")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def env(self, hf_home: str | Path, token: str | None = "hf_fake_token") -> dict[str, str]:
        """Environment variables that point `huggingface_hub` (and diffusers / transformers) at this server, with
        an isolated cache in `hf_home`, online mode, no Xet, no telemetry, and `token` as ``HF_TOKEN`` if given."""
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(hf_home),
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_ETAG_TIMEOUT": "30",
            "HF_HUB_DOWNLOAD_TIMEOUT": "30",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        if token:
            env["HF_TOKEN"] = token
        return env

    # ------------------------------------------------------------------------------------------------ inspection

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repo (KeyError if it was never created)."""
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """``path -> content`` of the repo at `revision`."""
        commit = self.repo(repo_id, repo_type).commit_at(revision)
        if commit is None:
            raise KeyError(f"No revision {revision!r} in {repo_id}.")
        return {path: stored.content for path, stored in commit.files.items()}

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo with the Hub's initial commit (a ``.gitattributes``); also used by the API route."""
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise _HubError(409, f"You already created this {repo_type} repo", "RepoAlreadyExists")
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
            files = {".gitattributes": StoredFile(_GITATTRIBUTES.encode(), lfs=False)}
            repo.commits.append(Commit(self._new_oid(repo_id, "initial commit"), "initial commit", files))
            self.repos[(repo_type, repo_id)] = repo
            return repo

    # ------------------------------------------------------------------------------------------------ helpers

    def _new_oid(self, *parts: str) -> str:
        self._commit_counter += 1
        seed = "\0".join([*parts, str(self._commit_counter), str(time.time_ns())])
        return hashlib.sha1(seed.encode()).hexdigest()

    @staticmethod
    def _uses_lfs(path: str, size: int, sample: bytes = b"") -> bool:
        return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD or b"\0" in sample

    def _get_repo(self, repo_type: str, repo_id: str, authorization: str | None) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorization):
            raise _HubError(404, f"Repository Not Found for url: {repo_type} {repo_id}.", "RepoNotFound")
        return repo

    def _get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.commit_at(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ------------------------------------------------------------------------------------------------ API

    def api_create_repo(self, body: dict[str, Any]) -> dict[str, Any]:
        name, organization = body.get("name"), body.get("organization")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise _HubError(400, f"Invalid repo name {name!r}.")
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HubError(400, f"Invalid repo type {repo_type!r}.")
        repo_id = f"{organization or self.user}/{name}"
        private = bool(body.get("private")) or body.get("visibility") == "private"
        try:
            repo = self.create_repo(repo_id, repo_type, private)
        except _HubError as err:
            err.message = json.dumps({"error": err.message, "url": f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"})
            raise
        return {"url": self._repo_url(repo), "name": repo_id, "id": repo_id}

    def api_repo_info(self, repo: Repo, revision: str) -> dict[str, Any]:
        commit = self._get_commit(repo, revision)
        siblings = []
        for path, stored in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path, "size": len(stored.content), "blobId": stored.blob_id}
            if stored.lfs:
                pointer = _lfs_pointer(stored.sha256, len(stored.content))
                sibling["lfs"] = {"size": len(stored.content), "sha256": stored.sha256, "pointerSize": len(pointer)}
            siblings.append(sibling)
        return {
            "id": repo.repo_id,
            "_id": repo.head.oid[:24],
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": siblings,
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }

    def api_tree(self, repo: Repo, revision: str, folder: str, recursive: bool) -> list[dict[str, Any]]:
        commit = self._get_commit(repo, revision)
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, stored in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :].split("/")
            # Every folder on the way is listed once; without `recursive`, only the first level.
            for depth in range(1, len(rest)):
                if not recursive and depth > 1:
                    break
                folder_path = prefix + "/".join(rest[:depth])
                entries.setdefault(
                    folder_path,
                    {"type": "directory", "path": folder_path, "size": 0, "oid": git_blob_sha1(folder_path.encode())},
                )
            if recursive or len(rest) == 1:
                entries[path] = stored.tree_entry(path)
        if prefix and not entries:
            raise _HubError(404, f"Entry not found: {folder}", "EntryNotFound")
        return list(entries.values())

    def api_preupload(self, repo: Repo, revision: str, body: dict[str, Any]) -> dict[str, Any]:
        commit = self._get_commit(repo, revision)
        files = []
        for item in body.get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", "") or "")
            mode = "lfs" if self._uses_lfs(path, size, sample) else "regular"
            existing = commit.files.get(path)
            # The remote oid lets the client skip files that did not change, comparing like with like.
            oid = None
            if existing is not None:
                oid = existing.sha256 if mode == "lfs" else git_blob_sha1(existing.content)
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": files, "commitOid": commit.oid}

    def api_lfs_batch(self, repo: Repo, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("operation") != "upload":
            raise _HubError(400, "The fake Hub only supports LFS uploads through the batch API.")
        objects = []
        for item in body.get("objects", []):
            oid, size = str(item["oid"]), int(item["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self._lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/__lfs/{oid}", "header": {}},
                    "verify": {"href": f"{self.url}/__lfs/{oid}/verify", "header": {}},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, oid: str, content: bytes) -> None:
        if hashlib.sha256(content).hexdigest() != oid:
            raise _HubError(400, f"LFS object does not match its oid {oid}.")
        with self._lock:
            self._lfs_objects[oid] = content

    def lfs_verify(self, oid: str, body: dict[str, Any]) -> dict[str, Any]:
        content = self._lfs_objects.get(oid)
        if content is None or int(body.get("size", -1)) != len(content):
            raise _HubError(404, f"LFS object {oid} was not uploaded.")
        return {"oid": oid, "size": len(content)}

    def api_commit(self, repo: Repo, revision: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
        if revision != "main":
            raise _HubError(400, "The fake Hub only commits to the main branch.")
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "A commit starts with a header line.")
        header = lines[0]["value"]
        with self._lock:
            parent = header.get("parentCommit")
            if parent and parent != repo.head.oid:
                raise _HubError(412, f"A commit has happened since {parent}.")
            files = dict(repo.head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _HubError(400, "Regular files must be base64-encoded.")
                    content = base64.b64decode(value["content"])
                    files[path] = StoredFile(content, lfs=self._uses_lfs(path, len(content), content[:512]))
                elif key == "lfsFile":
                    content = self._lfs_objects.get(value.get("oid", ""))
                    if content is None or len(content) != int(value.get("size", -1)):
                        raise _HubError(400, f"LFS object of {path} was not uploaded before the commit.")
                    files[path] = StoredFile(content, lfs=True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                else:
                    raise _HubError(400, f"The fake Hub does not support {key!r} commit operations.")
            oid = self._new_oid(repo.repo_id, header.get("summary", ""))
            repo.commits.append(Commit(oid, header.get("summary", ""), files))
        return {"commitUrl": f"{self._repo_url(repo)}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def validate_yaml(self, body: dict[str, Any]) -> dict[str, Any]:
        import yaml

        content = body.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                raise _HubError(400, json.dumps({"errors": [{"message": f"Invalid YAML: {err}"}]})) from err
            if metadata is not None and not isinstance(metadata, dict):
                raise _HubError(400, json.dumps({"errors": [{"message": "The metadata must be a YAML mapping."}]}))
        return {"errors": [], "warnings": []}


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the `FakeHub` bound as the class attribute `hub`."""

    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the httpx client expects
    timeout = 60  # seconds an idle keep-alive connection is kept
    server_version = "FakeHub/1.0"

    _REPO = r"(?P<ns>[\w.-]+)/(?P<name>[\w.-]+)"
    _ROUTES = (
        ("POST", re.compile(r"^/api/repos/create$"), "_create"),
        ("POST", re.compile(r"^/api/validate-yaml$"), "_validate_yaml"),
        ("GET", re.compile(r"^/api/whoami(-v2)?$"), "_whoami"),
        ("GET", re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}(/revision/(?P<rev>[^/]+))?$"), "_info"),
        (
            "GET",
            re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}/tree/(?P<rev>[^/]+)(?P<path>/.*)?$"),
            "_tree",
        ),
        ("POST", re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}/preupload/(?P<rev>[^/]+)$"), "_pre"),
        ("POST", re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}/commit/(?P<rev>[^/]+)$"), "_commit"),
        ("POST", re.compile(rf"^/(?P<prefix>datasets/|spaces/)?{_REPO}\.git/info/lfs/objects/batch$"), "_batch"),
        ("PUT", re.compile(r"^/__lfs/(?P<oid>[0-9a-f]{64})$"), "_lfs_put"),
        ("POST", re.compile(r"^/__lfs/(?P<oid>[0-9a-f]{64})/verify$"), "_lfs_verify"),
        ("GET", re.compile(rf"^/(?P<prefix>datasets/|spaces/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "_file"),
    )

    # ------------------------------------------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args: Any) -> None:
        # Requests are recorded in `hub.requests`; stderr stays quiet.
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _read_body(self) -> bytes:
        limit = self.hub.max_body_bytes
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > limit:
                    raise _HubError(413, "Request body too large for the fake Hub.")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            raise _HubError(413, "Request body too large for the fake Hub.")
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        body = self._read_body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as err:
            raise _HubError(400, f"Invalid JSON body: {err}") from err

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self._status = status

    def _send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self, method: str) -> None:
        self._status = 0
        hub = self.hub
        path = urlsplit(self.path).path
        authorization = self.headers.get("Authorization")
        try:
            with hub._lock:
                if len(hub.requests) >= hub.max_requests:
                    raise _HubError(503, "The fake Hub has served its maximum number of requests.")
            for route_method, pattern, handler_name in self._ROUTES:
                match = pattern.match(path)
                if match and (route_method == method or (route_method == "GET" and method == "HEAD")):
                    getattr(self, handler_name)(match, authorization)
                    break
            else:
                raise _HubError(404, f"The fake Hub does not serve {method} {path}.")
        except _HubError as err:
            headers = {"X-Error-Message": err.message.splitlines()[0][:200]}
            if err.code:
                headers["X-Error-Code"] = err.code
            body = err.message if err.message.startswith("{") else json.dumps({"error": err.message})
            self._send(err.status, body.encode(), headers)
        except Exception as err:  # a test server must answer, not leave the client hanging
            self._send(500, json.dumps({"error": f"fake Hub error: {err!r}"}).encode())
        with hub._lock:
            hub.requests.append(RecordedRequest(method, self.path, self._status, authorization))

    def _require_auth(self, authorization: str | None) -> None:
        if not authorization or not authorization.startswith("Bearer ") or len(authorization) <= len("Bearer "):
            raise _HubError(401, "Invalid credentials in Authorization header.")

    def _repo_from(self, match: re.Match, authorization: str | None) -> Repo:
        groups = match.groupdict()
        if "type" in groups and groups["type"]:
            repo_type = _REPO_TYPES[groups["type"]]
        else:
            repo_type = {"datasets/": "dataset", "spaces/": "space"}.get(groups.get("prefix") or "", "model")
        return self.hub._get_repo(repo_type, f"{unquote(groups['ns'])}/{unquote(groups['name'])}", authorization)

    # ------------------------------------------------------------------------------------------------ routes

    def _create(self, match: re.Match, authorization: str | None) -> None:
        self._require_auth(authorization)
        self._send_json(self.hub.api_create_repo(self._json_body()))

    def _validate_yaml(self, match: re.Match, authorization: str | None) -> None:
        self._send_json(self.hub.validate_yaml(self._json_body()))

    def _whoami(self, match: re.Match, authorization: str | None) -> None:
        self._require_auth(authorization)
        user = self.hub.user
        self._send_json(
            {
                "type": "user",
                "name": user,
                "fullname": user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake-hub", "role": "write"}},
            }
        )

    def _info(self, match: re.Match, authorization: str | None) -> None:
        repo = self._repo_from(match, authorization)
        self._send_json(self.hub.api_repo_info(repo, unquote(match.group("rev") or "main")))

    def _tree(self, match: re.Match, authorization: str | None) -> None:
        repo = self._repo_from(match, authorization)
        query = parse_qs(urlsplit(self.path).query)
        recursive = (query.get("recursive", ["false"])[0]).lower() in ("1", "true")
        folder = unquote(match.group("path") or "")
        self._send_json(self.hub.api_tree(repo, unquote(match.group("rev")), folder, recursive))

    def _pre(self, match: re.Match, authorization: str | None) -> None:
        self._require_auth(authorization)
        repo = self._repo_from(match, authorization)
        self._send_json(self.hub.api_preupload(repo, unquote(match.group("rev")), self._json_body()))

    def _commit(self, match: re.Match, authorization: str | None) -> None:
        self._require_auth(authorization)
        repo = self._repo_from(match, authorization)
        if parse_qs(urlsplit(self.path).query).get("create_pr"):
            raise _HubError(400, "The fake Hub does not support pull requests.")
        try:
            lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise _HubError(400, f"Invalid ndjson commit payload: {err}") from err
        self._send_json(self.hub.api_commit(repo, unquote(match.group("rev")), lines))

    def _batch(self, match: re.Match, authorization: str | None) -> None:
        self._require_auth(authorization)
        repo = self._repo_from(match, authorization)
        payload = self.hub.api_lfs_batch(repo, self._json_body())
        self._send_json(payload, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, match: re.Match, authorization: str | None) -> None:
        # Like a presigned storage URL: no Hub token is needed (nor sent) here.
        self.hub.lfs_put(match.group("oid"), self._read_body())
        self._send(200, b"", {"ETag": f'"{match.group("oid")}"'})

    def _lfs_verify(self, match: re.Match, authorization: str | None) -> None:
        self._send_json(self.hub.lfs_verify(match.group("oid"), self._json_body()))

    def _file(self, match: re.Match, authorization: str | None) -> None:
        repo = self._repo_from(match, authorization)
        commit = self.hub._get_commit(repo, unquote(match.group("rev")))
        path = unquote(match.group("path"))
        stored = commit.files.get(path)
        if stored is None:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound")
        content = stored.content
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{stored.etag}"',
            "Accept-Ranges": "bytes",
        }
        if stored.lfs:
            headers["X-Linked-Etag"] = f'"{stored.sha256}"'
            headers["X-Linked-Size"] = str(len(content))
        status = 200
        byte_range = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if byte_range and self.command == "GET":
            start = int(byte_range.group(1))
            end = int(byte_range.group(2)) if byte_range.group(2) else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        self._send(status, content, headers)
