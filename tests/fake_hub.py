"""A fake Hugging Face Hub on loopback: the endpoints huggingface_hub 2.x calls to create a repo, a branch and
a commit of regular (non-LFS, non-Xet) files. Every request is recorded (method, path, headers, body) so
tests can assert what was sent, and failures can be injected per endpoint.

    with FakeHub(token="hf_test...") as hub:      # http.server in a thread on 127.0.0.1:<ephemeral port>
        hub.fail("commit", 503, times=2)           # the next two commits answer 503
        ...  HfApi(endpoint=hub.url) ...
        hub.commits                                # [Commit(repo, branch, summary, files={path: bytes})]

The server stops on leaving the `with` block, and on its own after `lifetime` seconds at the latest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    endpoint: str  # which fake endpoint answered it: whoami, create, preupload, commit, ...
    status: int = 0


@dataclass
class Commit:
    repo: str
    branch: str
    summary: str
    description: str
    files: dict[str, bytes]
    oid: str


@dataclass
class Repo:
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=dict)


@dataclass
class _Failure:
    endpoint: str
    status: int
    times: int
    body: dict
    headers: dict


_ROUTES = [  # (method, regex, endpoint name)
    ("GET", r"^/api/whoami-v2$", "whoami"),
    ("POST", r"^/api/repos/create$", "create"),
    ("POST", r"^/api/validate-yaml$", "validate-yaml"),
    ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)$", "preupload"),
    ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)$", "commit"),
    ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>.+)$", "branch"),
    ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)/refs$", "refs"),
    ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>.+)$", "info"),
    ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)$", "info"),
]


class FakeHub:
    def __init__(self, token: str, user: str = "alice", orgs: tuple[str, ...] = ("team",), role: str = "write",
                 lifetime: float = 120.0):
        self.token, self.user, self.orgs, self.role = token, user, orgs, role
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.commits: list[Commit] = []
        self.cards: list[str] = []  # README contents sent to validate-yaml
        self._failures: list[_Failure] = []
        self._lock = threading.Lock()
        self._lifetime = lifetime
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ control

    def fail(self, endpoint: str, status: int, times: int = 1, body: dict | None = None,
             headers: dict | None = None) -> None:
        """The next `times` requests to `endpoint` answer `status` (with a JSON `body` and `headers`)."""
        self._failures.append(_Failure(endpoint, status, times, body or {"error": f"injected {status}"},
                                       headers or {}))

    def add_repo(self, repo_id: str, private: bool = False) -> None:
        self.repos[repo_id] = Repo(private, {"main": [self._initial_commit(repo_id)]})

    def calls(self, endpoint: str) -> list[Request]:
        return [r for r in self.requests if r.endpoint == endpoint]

    @property
    def url(self) -> str:
        assert self._server is not None, "start the fake hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(self._lifetime, self.stop)  # stops itself even if a test forgets
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            self._timer.cancel()
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ the Hub

    def _initial_commit(self, repo_id: str) -> Commit:
        return Commit(repo_id, "main", "initial commit", "", {".gitattributes": b"*.safetensors filter=lfs\n"},
                      hashlib.sha1(repo_id.encode()).hexdigest())

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes, host: str):
        """(status, JSON body, extra headers)."""
        for route_method, pattern, name in _ROUTES:
            match = re.match(pattern, path)
            if route_method == method and match:
                break
        else:
            self.requests.append(Request(method, path, headers, body, "unknown"))
            return 404, {"error": f"fake hub: no route for {method} {path}"}, {}, "unknown"
        params = {k: unquote(v) for k, v in match.groupdict().items()}
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}, {}, name
        for failure in self._failures:
            if failure.endpoint == name and failure.times > 0:
                failure.times -= 1
                return failure.status, failure.body, failure.headers, name
        return (*getattr(self, f"_{name.replace('-', '_')}")(params, body, f"http://{host}"), name)

    def _whoami(self, params, body, base):
        return 200, {"type": "user", "name": self.user, "orgs": [{"name": o} for o in self.orgs],
                     "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": self.role}}}, {}

    def _create(self, params, body, base):
        payload = json.loads(body)
        namespace = payload.get("organization") or self.user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace not in (self.user, *self.orgs):
            return 403, {"error": f'You don\'t have the rights to create a model under the namespace "{namespace}"'}, {}
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{base}/{repo_id}"}, {}
        self.add_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return 200, {"url": f"{base}/{repo_id}", "name": repo_id, "id": repo_id}, {}

    def _validate_yaml(self, params, body, base):
        self.cards.append(json.loads(body)["content"])
        return 200, {"errors": [], "warnings": []}, {}

    def _missing(self, repo_id: str, branch: str | None):
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        if branch is not None and branch not in self.repos[repo_id].branches:
            return 404, {"error": f"Invalid rev id: {branch}"}, {"X-Error-Code": "RevisionNotFound"}
        return None

    def _preupload(self, params, body, base):
        if missing := self._missing(params["repo"], params["rev"]):
            return missing
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                               for f in files], "commitOid": "0" * 40}, {}

    def _commit(self, params, body, base):
        repo_id, branch = params["repo"], params["rev"]
        if missing := self._missing(repo_id, branch):
            return missing
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files = {}
        for item in lines:
            if item["key"] == "file":
                assert item["value"]["encoding"] == "base64"
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] != "header":
                return 400, {"error": f"fake hub: only regular files, got {item['key']}"}, {}
        oid = hashlib.sha1(body).hexdigest()
        commit = Commit(repo_id, branch, header["summary"], header.get("description", ""), files, oid)
        self.repos[repo_id].branches[branch].append(commit)
        self.commits.append(commit)
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{base}/{repo_id}/commit/{oid}"}, {}

    def _branch(self, params, body, base):
        repo_id, branch = params["repo"], params["rev"]
        if missing := self._missing(repo_id, None):
            return missing
        branches = self.repos[repo_id].branches
        if branch in branches:
            return 409, {"error": "Reference already exists"}, {}
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        branches[branch] = list(branches[start])
        return 200, {}, {}

    def _refs(self, params, body, base):
        if missing := self._missing(params["repo"], None):
            return missing
        branches = self.repos[params["repo"]].branches
        return 200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c[-1].oid}
                                  for b, c in branches.items()], "tags": [], "converts": []}, {}

    def _info(self, params, body, base):
        repo_id, branch = params["repo"], params.get("rev") or "main"
        if missing := self._missing(repo_id, branch):
            return missing
        repo = self.repos[repo_id]
        head = repo.branches[branch][-1]
        files = {p for c in repo.branches[branch] for p in c.files}
        return 200, {"id": repo_id, "modelId": repo_id, "sha": head.oid, "private": repo.private,
                     "siblings": [{"rfilename": p} for p in sorted(files)]}, {}

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _serve(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urlsplit(self.path).path
                headers = {k.lower(): v for k, v in self.headers.items()}
                with hub._lock:
                    status, payload, extra, name = hub._handle(self.command, path, headers, body,
                                                               self.headers.get("host", ""))
                    if name != "unknown":
                        hub.requests.append(Request(self.command, path, headers, body, name, status))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        return Handler
