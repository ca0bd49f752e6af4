"""The pulled models on this host: their files and one JSON record each, under ``<data_dir>/models/``.

Layout::

    <data_dir>/models/<safe-name>/                 one pulled model's files, as the repository names them
                                                   (an image model pulled by parts: PART/NAME, each)
    <data_dir>/models/<safe-name>/allm-pull.json   its record: written last, atomically (rename)
    <data_dir>/models/<safe-name>/.partial/        files being downloaded (kept to resume a pull)
    <data_dir>/models/.locks/<safe-name>.lock      held while a pull or a removal works on it

A model is registered exactly when its record exists, so a pull that fails or is cut off
registers nothing; ``remove`` deletes the record first, then the files. The managers keep
their converted copies beside these (``onnx/``, ``*.ggml``): every name here ends in a hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from allm.gateway.config import ModelConfig
from allm.hub.errors import PullError
from allm.hub.source import safe_name

RECORD = "allm-pull.json"
PARTIAL = ".partial"
RECORD_VERSION = 1


@dataclasses.dataclass(frozen=True, slots=True)
class StoredFile:
    name: str  # the path in the repository, and under the model's directory
    size_bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True, slots=True)
class PulledModel:
    """One pulled model's record."""

    id: str
    source: str  # OWNER/REPO or OWNER/REPO:TAG
    revision: str  # as asked (main by default)
    commit: str  # the commit it resolved to
    modality: str
    format: str | None
    path: str  # what the catalog entry's path is: the model's file, or its directory
    files: tuple[StoredFile, ...]
    pulled_at: str  # ISO 8601, UTC
    defaults: Mapping[str, float] = dataclasses.field(default_factory=dict)
    #: the catalog entry's options: an image model's other parts (absolute paths) and its defaults
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: an image model pulled by parts: each part's {source: OWNER/REPO, file, commit}
    parts: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def model_config(self) -> ModelConfig:
        """The catalog entry that serves this model."""
        return ModelConfig(
            self.id,
            self.path,
            self.modality,
            self.format,
            options=dict(self.options),
            defaults=dict(self.defaults),
            source=f"hf.co/{self.source}",
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            **dataclasses.asdict(self),
            "defaults": dict(self.defaults),
            "options": dict(self.options),
            "parts": {part: dict(where) for part, where in self.parts.items()},
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> PulledModel:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields}
        values["files"] = tuple(StoredFile(**f) for f in raw["files"])
        return cls(**values)


def relative_path(name: str) -> Path:
    """A Hub file name as a path inside a model's directory; PullError when it would leave it."""
    pure = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or "\0" in name
        or pure.is_absolute()
        or any(part in ("", ".", "..") for part in name.split("/"))
        or pure.parts[0] in (RECORD, PARTIAL)
        or ":" in pure.parts[0]
    ):
        raise PullError(
            f"the Hub lists a file named {name!r}, which would be written outside the model's directory "
            "or over allm's own files: refused",
            status=502,
        )
    return Path(*pure.parts)


class Store:
    """The pulled models under one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir.expanduser() / "models"

    def directory(self, model_id: str) -> Path:
        return self.root / safe_name(model_id)

    def partial_dir(self, model_id: str) -> Path:
        return self.directory(model_id) / PARTIAL

    def get(self, model_id: str) -> PulledModel | None:
        return self._read(self.directory(model_id) / RECORD)

    def list(self) -> list[PulledModel]:
        """Every pulled model, by id; a record that cannot be read is skipped."""
        if not self.root.is_dir():
            return []
        found = (self._read(d / RECORD) for d in self.root.iterdir() if d.is_dir())
        return sorted((m for m in found if m is not None), key=lambda m: m.id)

    def _read(self, path: Path) -> PulledModel | None:
        try:
            return PulledModel.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record(self, model: PulledModel) -> None:
        """Register ``model``: its record, written to a temporary file and renamed into place."""
        directory = self.directory(model.id)
        fd, temporary = tempfile.mkstemp(prefix=".record-", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(model.to_json(), f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, directory / RECORD)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def remove(self, model_id: str) -> PulledModel:
        """Unregister a pulled model and delete its files; PullError (404) when there is none."""
        with self.lock(model_id):
            model = self.get(model_id)
            if model is None:
                raise PullError(f"no pulled model {model_id!r}: `allm models` lists them", status=404)
            (self.directory(model_id) / RECORD).unlink()
            shutil.rmtree(self.directory(model_id), ignore_errors=True)
            return model

    def disk_bytes(self, model_id: str) -> int:
        """What a model's directory takes on disk, partial downloads included."""
        directory = self.directory(model_id)
        return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0

    @contextlib.contextmanager
    def lock(self, model_id: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the model's lock; a second pull of it waits here, calling ``on_wait`` once first."""
        from filelock import FileLock, Timeout  # huggingface_hub's dependency, as pulls are

        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"{safe_name(model_id)}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()
