"""``pull``: a model by name from the Hugging Face Hub (or a mirror), fetched, checked and registered.

The steps, each of which may refuse with a PullError saying why, before anything is
registered: parse the source; ask the Hub for the revision's files (with their sizes and
digests); choose the files (``select``); check their names, the ``[hub] max_model_gib``
limit and the free disk space; take the model's lock (a second pull of it waits, then finds
it done); fetch each file, resumed and checked (``download``); tell what the files are
(``detect``); write the record (``store``). The endpoint is ``HF_ENDPOINT``, else ``[hub]
endpoint``, else huggingface.co; the token ``HF_TOKEN``, else ``[hub] token_file``, else none
(the token huggingface_hub keeps in its own cache is never sent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from allm.gateway.config import HubConfig
from allm.hub.detect import detect, generation_defaults
from allm.hub.download import fetch
from allm.hub.errors import PullError
from allm.hub.select import RemoteFile, Selection, select
from allm.hub.source import Source, check_model_id, parse_source
from allm.hub.store import PulledModel, Store, StoredFile, relative_path

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
class Pulled:
    model: PulledModel
    fetched: bool  # False: it was pulled before, and nothing was fetched now
    warnings: tuple[str, ...] = ()  # what it still needs to be served (an engine to install)


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


def pull(
    source: str,
    data_dir: Path,
    hub: HubConfig | None = None,
    *,
    model_id: str | None = None,
    revision: str | None = None,
    modality: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    on_wait: Callable[[], None] | None = None,
    environ: Mapping[str, str] | None = None,
    free_bytes: Callable[[Path], int] | None = None,
) -> Pulled:
    """Pull ``source`` (OWNER/REPO[:TAG], after hf.co/ or hf:// too) into ``data_dir`` and register it.

    ``model_id`` defaults to the source as written. A model already pulled under that id from
    the same source is returned as it is (``fetched`` False). ``on_wait`` is called once when
    another pull of the same model holds it; ``free_bytes`` measures the room on the data
    directory's disk (tests make it small).
    """
    parsed = parse_source(source)
    model_id = check_model_id(model_id or source.strip())
    store = Store(data_dir)
    done = _already(store, model_id, parsed, revision)
    if done is not None:
        return Pulled(done, fetched=False)
    access = Access.of(hub or HubConfig(), os.environ if environ is None else environ)
    _online()
    with _hub_errors(parsed, access):
        commit, files = _files(parsed, revision or "main", access)
    selection = select(files, parsed.tag, parsed.repo_id)
    for f in selection.files:
        relative_path(f.name)
    limit = (hub or HubConfig()).max_model_bytes
    if limit is not None and selection.size_bytes > limit:
        raise PullError(
            f"{parsed} is {selection.size_bytes / GIB:.2f} GiB, over the [hub] max_model_gib limit of "
            f"{limit / GIB:.2f} GiB",
            status=507,
        )
    job = _Job(store, model_id, parsed, revision or "main", commit, selection, access)
    with store.lock(model_id, on_wait):
        done = _already(store, model_id, parsed, revision)
        if done is not None:  # the pull we waited for brought it
            return Pulled(done, fetched=False)
        job.check_room(free_bytes or _free_bytes)
        with _hub_errors(parsed, access):
            stored = job.fetch_all(progress)
        return job.register(stored, modality)


def _already(store: Store, model_id: str, source: Source, revision: str | None) -> PulledModel | None:
    """The model already pulled under ``model_id`` from ``source``; PullError when the id is another's."""
    model = store.get(model_id)
    if model is None:
        return None
    if parse_source(model.source) != source or (revision is not None and revision != model.revision):
        raise PullError(
            f"model id {model_id!r} is taken by {model.source} (revision {model.revision}): "
            "give another --id, or `allm rm` it first",
            status=409,
        )
    return model


def _online() -> None:
    """Let huggingface_hub reach the endpoint: a pull is a request to fetch.

    Its offline mode is read once, when it is imported, from ``HF_HUB_OFFLINE``, which allm's
    text manager sets for itself (transformers must never fetch a model on its own); in a
    process that imported the manager first, every pull would otherwise be refused.
    """
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = False


def _files(source: Source, revision: str, access: Access) -> tuple[str, list[RemoteFile]]:
    """The commit ``revision`` resolves to, and its files with their sizes and digests."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=access.endpoint, token=access.token).model_info(
        source.repo_id, revision=revision, files_metadata=True
    )
    files = [
        RemoteFile(s.rfilename, s.lfs.size, s.lfs.sha256, s.blob_id)
        if s.lfs
        else RemoteFile(s.rfilename, s.size or 0, None, s.blob_id)
        for s in info.siblings or ()
    ]
    if not info.sha:
        raise PullError(f"{access.endpoint} gave no commit for {source.repo_id}@{revision}", status=502)
    return info.sha, files


@dataclasses.dataclass(frozen=True, slots=True)
class _Job:
    """One pull, once the files are chosen: where they go, and from where."""

    store: Store
    model_id: str
    source: Source
    revision: str
    commit: str
    selection: Selection
    access: Access

    def check_room(self, free_bytes: Callable[[Path], int]) -> None:
        """Refuse (507) a pull whose files, less what is already here, do not fit on the disk."""
        have = 0
        for f in self.selection.files:
            for where in (self.store.directory(self.model_id), self.store.partial_dir(self.model_id)):
                path = where / relative_path(f.name)
                if path.is_file():
                    have += min(path.stat().st_size, f.size)
                    break
        needed = self.selection.size_bytes - have
        self.store.root.mkdir(parents=True, exist_ok=True)
        free = free_bytes(self.store.root)
        if needed > free:
            raise PullError(
                f"not enough disk space for {self.model_id}: it needs {needed / GIB:.2f} GiB more, "
                f"{self.store.root} has {free / GIB:.2f} GiB free",
                status=507,
            )

    def fetch_all(self, progress: Callable[[Progress], None] | None) -> list[StoredFile]:
        """Every chosen file, fetched and checked, in order; the partial downloads' folder removed."""
        from huggingface_hub.file_download import hf_hub_url
        from huggingface_hub.utils.tqdm import disable_progress_bars

        disable_progress_bars()  # allm draws its own
        directory = self.store.directory(self.model_id)
        directory.mkdir(parents=True, exist_ok=True)
        stored = []
        count = len(self.selection.files)
        before = 0  # the bytes of the files already done
        whole = self.selection.size_bytes

        def step(remote: RemoteFile, index: int, done: int, finished: bool) -> Progress:
            digest = remote.sha256 or remote.blob_id or ""
            return Progress(
                remote.name, index, count, done, remote.size, finished, digest, before + done, whole
            )

        for index, remote in enumerate(self.selection.files, 1):
            done = 0

            def on_bytes(n: int, remote: RemoteFile = remote, index: int = index) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(step(remote, index, done, False))

            url = hf_hub_url(
                self.source.repo_id, remote.name, revision=self.commit, endpoint=self.access.endpoint
            )
            sha256 = fetch(
                remote,
                url,
                model_dir=directory,
                partial_dir=self.store.partial_dir(self.model_id),
                token=self.access.token,
                on_bytes=on_bytes,
            )
            stored.append(StoredFile(remote.name, remote.size, sha256))
            if progress is not None:
                progress(step(remote, index, remote.size, True))
            before += remote.size
        shutil.rmtree(self.store.partial_dir(self.model_id), ignore_errors=True)
        return stored

    def register(self, stored: list[StoredFile], modality: str | None) -> Pulled:
        """Tell what the files are and write the record; on a refusal the files are deleted."""
        directory = self.store.directory(self.model_id).absolute()
        try:
            found = detect(directory, self.selection, self.model_id, modality)
        except PullError:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        model = PulledModel(
            id=self.model_id,
            source=str(self.source),
            revision=self.revision,
            commit=self.commit,
            modality=found.modality,
            format=found.format,
            path=str(found.path),
            files=tuple(stored),
            pulled_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            defaults=generation_defaults(directory) if self.selection.kind == "safetensors" else {},
        )
        self.store.record(model)
        return Pulled(model, fetched=True, warnings=found.warnings)


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


@contextlib.contextmanager
def _hub_errors(source: Source, access: Access) -> Iterator[None]:
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
