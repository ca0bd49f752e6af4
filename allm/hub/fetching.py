"""The trusted path every pulled file takes, whatever the model: listed, sized, fetched and checked.

``Access`` is where the Hub is and the token sent to it; ``listing`` asks the Hub for a
revision's files (their sizes and digests); a ``Job`` holds the files one model needs, each
from its own repository and commit (an image model's parts may come from several), checks
the disk has room for them and fetches them in order, resumed and checked (``download``),
telling its ``Progress``; ``hub_errors`` turns huggingface_hub's and the network's errors
into PullErrors that say what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from allm.gateway.config import HubConfig
from allm.hub.download import fetch
from allm.hub.errors import PullError
from allm.hub.select import RemoteFile
from allm.hub.source import Source
from allm.hub.store import Store, StoredFile, relative_path

DEFAULT_ENDPOINT = "https://huggingface.co"
GIB = 1024**3


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """One step of a pull, for a progress bar or an event stream."""

    file: str
    index: int  # 1-based, of ``count``
    count: int
    done_bytes: int
    total_bytes: int
    finished: bool  # the file is complete and checked
    digest: str = ""  # the Hub's sha256 of an LFS file, else its git blob id
    model_done_bytes: int = 0  # of every file of the model
    model_total_bytes: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Access:
    endpoint: str
    token: str | bool  # False: send none

    @classmethod
    def of(cls, hub: HubConfig, environ: Mapping[str, str]) -> Access:
        endpoint = (environ.get("HF_ENDPOINT") or hub.endpoint or DEFAULT_ENDPOINT).rstrip("/")
        token: str | bool = environ.get("HF_TOKEN") or False
        if not token and hub.token_file is not None:
            try:
                token = hub.token_file.expanduser().read_text().strip() or False
            except OSError as exc:
                raise PullError(
                    f"setting hub.token_file: cannot read {hub.token_file}: {exc.strerror}", status=400
                ) from None
        return cls(endpoint, token)


def online() -> None:
    """Let huggingface_hub reach the endpoint: a pull is a request to fetch.

    Its offline mode is read once, when it is imported, from ``HF_HUB_OFFLINE``, which allm's
    text manager sets for itself (transformers must never fetch a model on its own); in a
    process that imported the manager first, every pull would otherwise be refused.
    """
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = False


def listing(repo_id: str, revision: str, access: Access) -> tuple[str, list[RemoteFile]]:
    """The commit ``revision`` resolves to, and its files with their sizes and digests."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=access.endpoint, token=access.token).model_info(
        repo_id, revision=revision, files_metadata=True
    )
    files = [
        RemoteFile(s.rfilename, s.lfs.size, s.lfs.sha256, s.blob_id)
        if s.lfs
        else RemoteFile(s.rfilename, s.size or 0, None, s.blob_id)
        for s in info.siblings or ()
    ]
    if not info.sha:
        raise PullError(f"{access.endpoint} gave no commit for {repo_id}@{revision}", status=502)
    return info.sha, files


@dataclasses.dataclass(frozen=True, slots=True)
class Wanted:
    """One file a model needs: where the Hub has it, and the path it takes under the model's directory."""

    repo_id: str
    commit: str
    remote: RemoteFile  # as its repository lists it
    name: str  # under the model's directory (checked: it stays inside)

    def __post_init__(self) -> None:
        relative_path(self.remote.name)
        relative_path(self.name)


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """The files of one model, once chosen: where they go, and from where."""

    store: Store
    model_id: str
    files: tuple[Wanted, ...]
    access: Access

    @property
    def size_bytes(self) -> int:
        return sum(w.remote.size for w in self.files)

    def check_limit(self, hub: HubConfig, what: object) -> None:
        """Refuse (507) a model over the ``[hub] max_model_gib`` limit."""
        limit = hub.max_model_bytes
        if limit is not None and self.size_bytes > limit:
            raise PullError(
                f"{what} is {self.size_bytes / GIB:.2f} GiB, over the [hub] max_model_gib limit of "
                f"{limit / GIB:.2f} GiB",
                status=507,
            )

    def check_room(self, free_bytes: Callable[[Path], int]) -> None:
        """Refuse (507) a pull whose files, less what is already here, do not fit on the disk."""
        have = 0
        for w in self.files:
            for where in (self.store.directory(self.model_id), self.store.partial_dir(self.model_id)):
                path = where / relative_path(w.name)
                if path.is_file():
                    have += min(path.stat().st_size, w.remote.size)
                    break
        needed = self.size_bytes - have
        self.store.root.mkdir(parents=True, exist_ok=True)
        free = free_bytes(self.store.root)
        if needed > free:
            raise PullError(
                f"not enough disk space for {self.model_id}: it needs {needed / GIB:.2f} GiB more, "
                f"{self.store.root} has {free / GIB:.2f} GiB free",
                status=507,
            )

    def fetch_all(self, progress: Callable[[Progress], None] | None) -> list[StoredFile]:
        """Every file, fetched and checked, in order; the partial downloads' folder removed."""
        from huggingface_hub.file_download import hf_hub_url
        from huggingface_hub.utils.tqdm import disable_progress_bars

        disable_progress_bars()  # allm draws its own
        directory = self.store.directory(self.model_id)
        directory.mkdir(parents=True, exist_ok=True)
        stored = []
        count = len(self.files)
        before = 0  # the bytes of the files already done
        whole = self.size_bytes

        def step(wanted: Wanted, index: int, done: int, finished: bool) -> Progress:
            remote = wanted.remote
            digest = remote.sha256 or remote.blob_id or ""
            return Progress(
                wanted.name, index, count, done, remote.size, finished, digest, before + done, whole
            )

        for index, wanted in enumerate(self.files, 1):
            done = 0

            def on_bytes(n: int, wanted: Wanted = wanted, index: int = index) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(step(wanted, index, done, False))

            url = hf_hub_url(
                wanted.repo_id, wanted.remote.name, revision=wanted.commit, endpoint=self.access.endpoint
            )
            with hub_errors(Source(wanted.repo_id, None), self.access):
                sha256 = fetch(
                    dataclasses.replace(wanted.remote, name=wanted.name),
                    url,
                    model_dir=directory,
                    partial_dir=self.store.partial_dir(self.model_id),
                    token=self.access.token,
                    on_bytes=on_bytes,
                )
            stored.append(StoredFile(wanted.name, wanted.remote.size, sha256))
            if progress is not None:
                progress(step(wanted, index, wanted.remote.size, True))
            before += wanted.remote.size
        shutil.rmtree(self.store.partial_dir(self.model_id), ignore_errors=True)
        return stored


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


@contextlib.contextmanager
def hub_errors(source: Source, access: Access) -> Iterator[None]:
    """huggingface_hub's and the network's errors, as PullErrors that say what to do."""
    import httpx2
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError as exc:
        raise PullError(_gated(source, access, exc), status=403 if access.token else 401) from None
    except errors.RevisionNotFoundError:
        raise PullError(f"{source.repo_id} has no such revision on {access.endpoint}", status=404) from None
    except errors.RemoteEntryNotFoundError as exc:
        raise PullError(
            f"{source.repo_id}: a file it lists is missing: {_first_line(exc)}", status=502
        ) from None
    except errors.RepositoryNotFoundError:
        hint = "" if access.token else " (a private repository needs a token: HF_TOKEN or [hub] token_file)"
        raise PullError(f"no repository {source.repo_id} on {access.endpoint}{hint}", status=404) from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 502
        if status in (401, 403):
            raise PullError(_gated(source, access, exc), status=status) from None
        raise PullError(f"{access.endpoint} refused {source}: {_first_line(exc)}", status=502) from None
    except (httpx2.HTTPError, OSError) as exc:  # the network, or the disk
        message = f"pulling {source} from {access.endpoint} failed: {_first_line(exc)}"
        raise PullError(message, status=502) from exc


def _gated(source: Source, access: Access, exc: Any) -> str:
    if access.token:
        return (
            f"{source.repo_id} is gated and the token given has no access to it: accept its conditions "
            f"on its page ({access.endpoint}/{source.repo_id}) with the account the token belongs to"
        )
    return (
        f"{source.repo_id} is gated or private: accept its conditions on {access.endpoint}/"
        f"{source.repo_id}, then give a token: HF_TOKEN=hf_… or [hub] token_file = PATH"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
