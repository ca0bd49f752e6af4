"""Images answered as URLs: kept as files under ``<data_dir>/images/`` with random names, expiring, capped."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from allm.gateway.config import Config

log = logging.getLogger("allm.gateway")

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
#: a stored image's name: 24 random bytes in URL-safe base64, then its format; nothing else is looked up
FILE_NAME = re.compile(r"[A-Za-z0-9_-]{32}\.(?:png|jpeg|webp)")
SWEEP_INTERVAL_S = 60.0


class ImageFiles:
    """Images answered as URLs: one file each under ``directory``, kept ``ttl_s``, within the caps.

    The index (name → when stored, bytes) lives in memory, oldest first, and is rebuilt
    from the directory at start, so files of an earlier run still expire. Expiry runs on
    wall-clock time: the files outlive the process. A sweep runs on every store and read
    and on a timer (``sweep_every``); it deletes what has expired, then the oldest while
    the count or the bytes are over their caps, but never the images of the store that
    runs it. A name is looked up only if it is one this class makes (``FILE_NAME``), so
    no request reaches a path outside the directory. Calls run in a thread.
    """

    def __init__(
        self,
        directory: Path,
        *,
        ttl_s: float,
        max_files: int,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.ttl_s = ttl_s
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._clock = clock
        self._kept: dict[str, tuple[float, int]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        with self._lock:
            self._scan()
            self._sweep()

    def _scan(self) -> None:
        """The files of an earlier run, oldest first; its unfinished writes are deleted."""
        if not self.directory.is_dir():
            return
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if FILE_NAME.fullmatch(entry.name):
                    stat = entry.stat(follow_symlinks=False)
                    found.append((stat.st_mtime, entry.name, stat.st_size))
                elif entry.name.startswith(".") and entry.name.endswith(".part"):
                    Path(entry.path).unlink(missing_ok=True)
        for stored_at, name, size in sorted(found):
            self._kept[name] = (stored_at, size)
            self._bytes += size

    def _drop(self, name: str) -> None:
        _stored_at, size = self._kept.pop(name)
        self._bytes -= size
        (self.directory / name).unlink(missing_ok=True)

    def _sweep(self, keep: frozenset[str] = frozenset()) -> None:
        """Delete the expired, then the oldest past the caps (the caller holds the lock)."""
        oldest = self._clock() - self.ttl_s
        for name, (stored_at, _size) in list(self._kept.items()):
            over = len(self._kept) > self.max_files or self._bytes > self.max_bytes
            if name not in keep and (over or stored_at < oldest):
                self._drop(name)

    def _store(self, images: Sequence[bytes], fmt: str) -> list[str]:
        names = [f"{secrets.token_urlsafe(24)}.{fmt}" for _ in images]
        with self._lock:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            now = self._clock()
            for name, image in zip(names, images, strict=True):
                part = self.directory / f".{name}.part"  # never a FILE_NAME: unseen until whole
                part.write_bytes(image)
                part.replace(self.directory / name)
                self._kept[name] = (now, len(image))
                self._bytes += len(image)
            self._sweep(keep=frozenset(names))
        return names

    def _read(self, name: str) -> tuple[bytes, str, int] | None:
        if not FILE_NAME.fullmatch(name):
            return None
        with self._lock:
            self._sweep()
            kept = self._kept.get(name)
        if kept is None:
            return None
        try:
            data = (self.directory / name).read_bytes()
        except FileNotFoundError:  # swept since, or deleted by hand
            return None
        left_s = max(0, int(kept[0] + self.ttl_s - self._clock()))
        return data, CONTENT_TYPES[name.rpartition(".")[2]], left_s

    def sweep(self) -> None:
        with self._lock:
            self._sweep()

    def names(self) -> list[str]:
        """The names kept, oldest first."""
        with self._lock:
            return list(self._kept)

    async def store(self, images: Sequence[bytes], fmt: str) -> list[str]:
        """Keep these images (encoded as ``fmt``); their names, in order."""
        return await asyncio.to_thread(self._store, images, fmt)

    async def read(self, name: str) -> tuple[bytes, str, int] | None:
        """An image's bytes, content type and seconds left; None when unknown, expired or dropped."""
        return await asyncio.to_thread(self._read, name)

    async def sweep_every(self, interval_s: float) -> None:
        """Sweep on a timer, so expired files go even when no request comes; runs until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.sweep)
            except OSError as exc:  # a file it may not delete: said, and tried again next time
                log.warning("sweeping %s: %s", self.directory, exc)


def image_files(config: Config) -> ImageFiles:
    """The store of images answered as URLs, as the config bounds it."""
    limits = config.images
    return ImageFiles(
        config.data_dir.expanduser() / "images",
        ttl_s=limits.url_ttl_s,
        max_files=limits.url_max_files,
        max_bytes=limits.url_max_bytes,
    )
