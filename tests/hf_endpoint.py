"""A minimal model-hub endpoint on 127.0.0.1 for huggingface_hub's hf_hub_download (plain HTTP, no Xet).

    with HubEndpoint({("org/repo", "x.gguf"): data}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        ...
        hub.log  # [Request(method, path, range), ...]

Serves HEAD/GET /{repo_id}/resolve/{revision}/{filename} with X-Repo-Commit, ETag (the sha256 of the
content, as the hub does for LFS files), Content-Length, Accept-Ranges and 206 Range replies. Faults
for tests: `drop_after` closes the connection after that many body bytes on the next full GET;
`fail_gets` answers the next N other GETs with 500. Only /resolve/ requests are logged.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None


class HubEndpoint:
    def __init__(self, files: dict[tuple[str, str], bytes]):
        self.files = dict(files)
        self.log: list[Request] = []  # /resolve/ requests, in arrival order
        self.drop_after: int | None = None  # close the next full GET after this many bytes
        self.fail_gets = 0  # answer this many next GETs (other than the one dropped) with HTTP 500
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def gets(self) -> list[Request]:
        return [r for r in self.log if r.method == "GET"]

    def start(self) -> HubEndpoint:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                owner._serve(self, body=False)

            def do_GET(self):
                owner._serve(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> HubEndpoint:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling ------------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler, *, body: bool) -> None:
        rng = h.headers.get("Range")
        m = _RESOLVE.match(h.path.split("?", 1)[0])
        if m is not None:  # huggingface_hub also asks for /api/... resources; those answer 404, unlogged
            with self._lock:
                self.log.append(Request(h.command, h.path, rng))
        repos = {repo for repo, _ in self.files}
        if m is None or m["repo"] not in repos:
            return self._error(h, 404, "RepoNotFound", "Repository not found", body=body)
        data = self.files.get((m["repo"], m["file"]))
        if data is None:
            return self._error(h, 404, "EntryNotFound", "Entry not found", body=body, commit=True)
        dropping = body and self.drop_after is not None and rng is None
        if body and not dropping and self.fail_gets > 0:
            self.fail_gets -= 1
            return self._error(h, 500, None, "Internal error (injected)", body=body, commit=True)

        start, status = 0, 200
        if rng is not None:
            rm = _RANGE.match(rng)
            if rm is None or int(rm[1]) >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            start, status = int(rm[1]), 206
            end = int(rm[2]) + 1 if rm[2] else len(data)
            payload = data[start:end]
        else:
            payload = data
        h.send_response(status)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(payload)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{start + len(payload) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        if dropping:
            cut, self.drop_after = self.drop_after, None
            h.wfile.write(payload[:cut])
            h.wfile.flush()
            h.close_connection = True  # the client sees the body end early
            return
        h.wfile.write(payload)

    @staticmethod
    def _error(h, status: int, code: str | None, message: str, *, body: bool, commit: bool = False) -> None:
        raw = json.dumps({"error": message}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        if commit:
            h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        if body:
            h.wfile.write(raw)
