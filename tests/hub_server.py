"""A Hugging Face Hub the tests run in a thread: the endpoints huggingface_hub 2.4 calls, on real files.

- ``GET /api/models/OWNER/NAME[/revision/REV]`` (``?blobs=True``): the model's info, its commit
  (``sha``), ``gated``, and ``siblings`` with ``size``, ``blobId`` and, for LFS files, ``lfs``
  (``size``, ``sha256``, ``pointerSize``);
- ``HEAD`` and ``GET /OWNER/NAME/resolve/REV/PATH``: ``X-Repo-Commit``, ``ETag`` (an LFS file's
  sha256, else its git blob id), ``X-Linked-Etag`` and ``X-Linked-Size`` for LFS files,
  ``Accept-Ranges``, and ``Range: bytes=N-`` answered with 206 and ``Content-Range``;
- the Hub's errors, by ``X-Error-Code``: ``RepoNotFound`` (401, as the Hub answers an unknown
  repository), ``RevisionNotFound`` and ``EntryNotFound`` (404), ``GatedRepo`` (401 without the
  token, 403 with another).

``add_tiny_flux`` serves the tiny Flux of tests/image_files.py as a real one is found: its
diffusion model in one repository, its text encoder and its VAE (TAESD) in two others, and
the same model as a single-file checkpoint in a fourth.

Knobs: ``cut_once[(repo, name)] = fraction`` drops the connection once after that share of the
file; ``flip[(repo, name)] = offset`` serves the file with that byte inverted (the listed
digests stay the true ones); a repository added with ``gated=True`` wants ``TOKEN``;
``sent[(repo, name)]`` counts the file's bytes sent, ``gets`` its GET requests.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import http.server
import json
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

TOKEN = "hf_allm_test_token"
LFS_MIN_BYTES = 1024 * 1024  # the Hub keeps larger files (and every weight file) in LFS
CHUNK = 1024 * 1024
_DIGESTS: dict[tuple[Path, int, int], tuple[str, str]] = {}


@dataclasses.dataclass
class HubFile:
    source: Path | bytes

    @property
    def size(self) -> int:
        return self.source.stat().st_size if isinstance(self.source, Path) else len(self.source)

    @property
    def lfs(self) -> bool:
        return self.size >= LFS_MIN_BYTES or (isinstance(self.source, Path) and self.source.suffix != ".json")

    def digests(self) -> tuple[str, str]:
        """sha256 and git blob id (sha1 of the blob header and bytes), cached per file."""
        key = (
            (self.source, self.size, self.source.stat().st_mtime_ns)
            if isinstance(self.source, Path)
            else None
        )
        if key is not None and key in _DIGESTS:
            return _DIGESTS[key]
        sha256, git = hashlib.sha256(), hashlib.sha1(f"blob {self.size}\0".encode())
        for chunk in self.chunks(0):
            sha256.update(chunk)
            git.update(chunk)
        found = sha256.hexdigest(), git.hexdigest()
        if key is not None:
            _DIGESTS[key] = found
        return found

    def chunks(self, start: int) -> Iterator[bytes]:
        if isinstance(self.source, bytes):
            yield self.source[start:]
            return
        with self.source.open("rb") as f:
            f.seek(start)
            while chunk := f.read(CHUNK):
                yield chunk

    def etag(self) -> str:
        sha256, git = self.digests()
        return sha256 if self.lfs else git


@dataclasses.dataclass
class Repo:
    files: dict[str, HubFile]
    gated: bool
    commit: str


class HubServer:
    """The server and its knobs; ``with HubServer() as hub:`` serves on ``hub.url`` until the block ends."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.cut_once: dict[tuple[str, str], float] = {}
        self.flip: dict[tuple[str, str], int] = {}
        self.sent: collections.Counter[tuple[str, str]] = collections.Counter()
        self.gets: collections.Counter[tuple[str, str]] = collections.Counter()
        self.lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)

    def add(self, repo_id: str, files: Mapping[str, Path | bytes], *, gated: bool = False) -> Repo:
        commit = hashlib.sha1(f"{repo_id}:{sorted(files)}".encode()).hexdigest()
        repo = Repo({name: HubFile(source) for name, source in files.items()}, gated, commit)
        self.repos[repo_id] = repo
        return repo

    def sent_bytes(self, repo_id: str) -> int:
        return sum(n for (repo, _), n in self.sent.items() if repo == repo_id)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


FLUX_REPO = "test/flux-tiny-gguf"  # the diffusion model
FLUX_ENCODERS = "test/flux-text-encoders"  # clip_l, in a folder as Comfy-Org's repositories keep it
FLUX_VAES = "test/flux-vaes"  # the TAESD
FLUX_CHECKPOINT = "test/flux-tiny-checkpoint"  # the single file


def add_tiny_flux(hub: HubServer, parts: Mapping[str, Path], checkpoint: Path) -> dict[str, str]:
    """Serve the tiny Flux (``write_tiny_flux``'s parts, ``write_tiny_flux_checkpoint``'s file) in
    four repositories; the parts description that pulls it from ``FLUX_REPO``."""
    encoder = f"text_encoders/{parts['clip_l'].name}"
    hub.add(FLUX_REPO, {parts["diffusion_model"].name: parts["diffusion_model"], "README.md": b"# tiny\n"})
    hub.add(FLUX_ENCODERS, {encoder: parts["clip_l"], "README.md": b"# encoders\n"})
    hub.add(FLUX_VAES, {parts["taesd"].name: parts["taesd"]})
    hub.add(FLUX_CHECKPOINT, {checkpoint.name: checkpoint})
    return {
        "diffusion_model": parts["diffusion_model"].name,
        "clip_l": f"{FLUX_ENCODERS}:{encoder}",
        "taesd": f"{FLUX_VAES}:{parts['taesd'].name}",
    }


_INFO = re.compile(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?/?")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


def _handler(hub: HubServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet: pytest shows failures
            pass

        def do_GET(self) -> None:
            self._route(body=True)

        def do_HEAD(self) -> None:
            self._route(body=False)

        def _route(self, *, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            if (m := _INFO.fullmatch(path)) and body:
                self._info(m.group(1), unquote(m.group(2) or "main"))
            elif m := _RESOLVE.fullmatch(path):
                self._resolve(m.group(1), m.group(2), m.group(3), body=body)
            else:
                self._error(404, "", "no such endpoint", body=body)

        def _error(self, status: int, code: str, message: str, *, body: bool, commit: str = "") -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _repo(self, repo_id: str, revision: str, *, body: bool) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found", body=body)
                return None
            if revision not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, body=body)
                return None
            return repo

        def _info(self, repo_id: str, revision: str) -> None:
            repo = self._repo(repo_id, revision, body=True)
            if repo is None:
                return
            siblings = []
            for name, f in repo.files.items():
                sha256, git = f.digests()
                sibling: dict[str, object] = {"rfilename": name, "size": f.size, "blobId": git}
                if f.lfs:
                    sibling["lfs"] = {"size": f.size, "sha256": sha256, "pointerSize": 134}
                siblings.append(sibling)
            info = {
                "_id": repo.commit[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "siblings": siblings,
            }
            data = json.dumps(info).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _resolve(self, repo_id: str, revision: str, name: str, *, body: bool) -> None:
            repo = self._repo(repo_id, revision, body=body)
            if repo is None:
                return
            if repo.gated and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                status = 403 if self.headers.get("Authorization") else 401
                message = f"Access to model {repo_id} is restricted. You must have access to it."
                self._error(status, "GatedRepo", message, body=body)
                return
            f = repo.files.get(name)
            if f is None:
                self._error(404, "EntryNotFound", f"{name} does not exist", body=body, commit=repo.commit)
                return
            start = 0
            if (wanted := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))) is not None:
                start = int(wanted.group(1))
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{f.etag()}"')
            if f.lfs:
                self.send_header("X-Linked-Etag", f'"{f.etag()}"')
                self.send_header("X-Linked-Size", str(f.size))
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{f.size - 1}/{f.size}")
            self.send_header("Content-Length", str(f.size - start))
            self.end_headers()
            if body:
                self._send(repo_id, name, f, start)

        def _send(self, repo_id: str, name: str, f: HubFile, start: int) -> None:
            key = (repo_id, name)
            with hub.lock:
                hub.gets[key] += 1
                cut = hub.cut_once.pop(key, None)
                flip = hub.flip.get(key)
            stop = int(f.size * cut) if cut is not None else None
            at = start
            for chunk in f.chunks(start):
                if flip is not None and at <= flip < at + len(chunk):
                    chunk = chunk[: flip - at] + bytes([chunk[flip - at] ^ 0xFF]) + chunk[flip - at + 1 :]
                if stop is not None and at + len(chunk) >= stop:
                    chunk = chunk[: max(stop - at, 0)]
                self.wfile.write(chunk)
                with hub.lock:
                    hub.sent[key] += len(chunk)
                at += len(chunk)
                if stop is not None and at >= stop:
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return

    return Handler
