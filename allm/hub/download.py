"""Fetching one file of a repository so that it can be trusted: resumed, checked, then moved into place.

huggingface_hub does the HTTP: ``get_hf_file_metadata`` (the HEAD on ``resolve``, following
the Hub's own redirects) and ``http_get`` (the GET, which resumes with a Range request after
a dropped connection, five times). What it leaves out is done here: the bytes go to
``.partial/NAME`` and stay there when the pull stops, so the next pull resumes from them
(huggingface_hub 2.4 deletes its own partial file on failure); the whole file is then
checked against the digest the Hub lists (an LFS file's sha256, a small file's git blob id)
before it is moved to its name, and a file that fails is deleted and refused.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

from allm import __version__
from allm.hub.errors import PullError
from allm.hub.select import RemoteFile
from allm.hub.store import relative_path

CHUNK_BYTES = 8 * 1024 * 1024


class _Counted(io.FileIO):
    """The partial file, telling each write's size to ``on_bytes``."""

    def __init__(self, path: Path, on_bytes: Callable[[int], None]) -> None:
        super().__init__(path, "a")
        self.on_bytes = on_bytes

    def write(self, data: object) -> int:
        view = memoryview(cast(bytes, data))
        written = 0
        while written < len(view):
            written += super().write(view[written:]) or 0
        self.on_bytes(written)
        return written


def digests(path: Path) -> tuple[str, str]:
    """The file's sha256 and its git blob id (sha1 of ``blob SIZE\\0`` and the bytes)."""
    sha256 = hashlib.sha256()
    git = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            sha256.update(chunk)
            git.update(chunk)
    return sha256.hexdigest(), git.hexdigest()


def matches(path: Path, remote: RemoteFile) -> str | None:
    """The file's sha256 when it is the one the Hub lists (by its LFS sha256, else its blob id)."""
    if path.stat().st_size != remote.size:
        return None
    sha256, blob = digests(path)
    expected, got = (remote.sha256, sha256) if remote.sha256 else (remote.blob_id, blob)
    return sha256 if expected is None or expected == got else None


def headers(token: str | bool) -> dict[str, str]:
    """What every request to the Hub carries: allm's name, and the token when there is one."""
    sent = {"user-agent": f"allm/{__version__}"}
    if isinstance(token, str):
        sent["authorization"] = f"Bearer {token}"
    return sent


def fetch(
    remote: RemoteFile,
    url: str,
    *,
    model_dir: Path,
    partial_dir: Path,
    token: str | bool,
    on_bytes: Callable[[int], None],
) -> str:
    """Bring one file into ``model_dir``, checked; its sha256. Resumes from ``partial_dir``."""
    from huggingface_hub.file_download import get_hf_file_metadata, http_get

    destination = model_dir / relative_path(remote.name)
    if destination.is_file():
        sha256 = matches(destination, remote)
        if sha256 is not None:
            on_bytes(remote.size)
            return sha256
        destination.unlink()
    metadata = get_hf_file_metadata(url, token=False, headers=headers(token))
    expected = remote.sha256 or remote.blob_id
    if metadata.etag is not None and expected is not None and metadata.etag != expected:
        raise PullError(
            f"{remote.name}: the Hub's file (ETag {metadata.etag}) is not the one it lists "
            f"({expected}): the repository changed during the pull, or the mirror is inconsistent",
            status=502,
        )
    part = partial_dir / relative_path(remote.name)
    part.parent.mkdir(parents=True, exist_ok=True)
    resume = part.stat().st_size if part.is_file() else 0
    if resume > remote.size:
        part.unlink()
        resume = 0
    on_bytes(resume)
    with _Counted(part, on_bytes) as f:
        http_get(
            metadata.location,
            cast(BinaryIO, f),
            resume_size=resume,
            headers=headers(token),
            expected_size=remote.size,
            displayed_filename=remote.name,
        )
    return _checked_into_place(part, destination, remote)


def _checked_into_place(part: Path, destination: Path, remote: RemoteFile) -> str:
    sha256, blob = digests(part)
    expected, got, what = (
        (remote.sha256, sha256, "sha256") if remote.sha256 else (remote.blob_id, blob, "git blob id")
    )
    if expected is not None and got != expected:
        part.unlink()
        raise PullError(
            f"{remote.name} arrived damaged: its {what} is {got}, the Hub lists {expected}; "
            "the file was deleted and nothing was registered (pull again to fetch it anew)",
            status=502,
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, destination)
    return sha256
