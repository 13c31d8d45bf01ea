"""A small local HTTP server that speaks the Hugging Face Hub's file protocol, for hf_hub_download.

``HEAD`` / ``GET /{owner}/{repo}/resolve/{revision}/{filename}``: 200 with ``ETag``,
``X-Repo-Commit`` and ``Content-Length`` (and the bytes for GET); 404 with the hub's error headers
(``X-Error-Code: RepoNotFound`` or ``EntryNotFound``) otherwise. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")


class FakeHub:
    """repos: repo id -> {filename: bytes}; requests: (method, path) in arrival order."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        self.url = ""

    def requested(self, method: str = "GET") -> list[str]:
        """The file names requested with ``method``, in order."""
        names = []
        for seen, path in self.requests:
            match = _RESOLVE.match(path)
            if seen == method and match:
                names.append(match["filename"])
        return names

    def handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(with_body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(with_body=True)

            def _answer(self, with_body: bool) -> None:
                hub.requests.append((self.command, self.path))
                match = _RESOLVE.match(self.path.split("?")[0])
                if not match or match["repo"] not in hub.repos:
                    return self._error("RepoNotFound", "Repository not found")
                files = hub.repos[match["repo"]]
                commit = hub.commits[match["repo"]]
                if match["filename"] not in files:
                    return self._error("EntryNotFound", "Entry not found", commit)
                body = files[match["filename"]]
                self.send_response(200)
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def _error(self, code: str, message: str, commit: str | None = None) -> None:
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler


@contextmanager
def serve_hub(repos: dict[str, dict[str, bytes]]):
    """Run a FakeHub on 127.0.0.1 (a free port) for the duration of the block."""
    hub = FakeHub(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), hub.handler())
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
