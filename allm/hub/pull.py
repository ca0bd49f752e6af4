"""``pull``: a model by name from the Hugging Face Hub (or a mirror), fetched, checked and registered.

The steps, each of which may refuse with a PullError saying why, before anything is
registered: parse the source, and an image model's parts description where there is one
(``parts``); ask the Hub for the revision's files (with their sizes and digests), and for
those of each other repository a part comes from; choose the files (``select``, or the
parts named); check their names, the ``[hub] max_model_gib`` limit and the free disk space;
take the model's lock (a second pull of it waits, then finds it done); fetch each file,
resumed and checked (``fetching``, ``download``); tell what the files are (``detect``);
write the record (``store``). The endpoint is ``HF_ENDPOINT``, else ``[hub] endpoint``, else
huggingface.co; the token ``HF_TOKEN``, else ``[hub] token_file``, else none (the token
huggingface_hub keeps in its own cache is never sent).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from allm.gateway.config import HubConfig
from allm.hub import fetching
from allm.hub.detect import detect, detect_image, generation_defaults
from allm.hub.errors import PullError
from allm.hub.fetching import Access, Job, Progress, Wanted, hub_errors, listing, online
from allm.hub.parts import Parts, checked, home, planned_parts
from allm.hub.select import RemoteFile, Selection, select
from allm.hub.source import Source, check_model_id, parse_source
from allm.hub.store import PulledModel, Store, StoredFile


@dataclasses.dataclass(frozen=True, slots=True)
class Pulled:
    model: PulledModel
    fetched: bool  # False: it was pulled before, and nothing was fetched now
    warnings: tuple[str, ...] = ()  # what it still needs to be served (an engine to install)


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """What a pull fetches: a repository's chosen files (``selection``), or an image model's parts."""

    source: Source
    revision: str
    commit: str  # the commit the revision resolved to
    files: tuple[Wanted, ...]
    chosen: Selection | Parts  # what chose them
    parts: Mapping[str, Wanted]  # a pull by parts: its files by part, the main one first


def pull(
    source: str | None,
    data_dir: Path,
    hub: HubConfig | None = None,
    *,
    model_id: str | None = None,
    revision: str | None = None,
    modality: str | None = None,
    parts: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    on_wait: Callable[[], None] | None = None,
    environ: Mapping[str, str] | None = None,
    free_bytes: Callable[[Path], int] | None = None,
) -> Pulled:
    """Pull ``source`` (OWNER/REPO[:TAG], after hf.co/ or hf:// too) into ``data_dir`` and register it.

    ``parts`` (part name → file) and ``options`` describe an image model made of parts
    (allm/hub/parts.py); ``source`` may then be None where the main part names its
    repository. ``model_id`` defaults to the source as written. A model already pulled under
    that id from the same source (and parts) is returned as it is (``fetched`` False).
    ``on_wait`` is called once when another pull of the same model holds it;
    ``free_bytes`` measures the room on the data directory's disk (tests make it small).
    """
    described = None
    if parts is not None or options is not None:
        parsed, described = checked(source, parts, options, modality)
    else:
        parsed = parse_source(source or "")
    model_id = check_model_id(model_id or home(source, parts))
    store = Store(data_dir)
    done = _already(store, model_id, parsed, revision, described)
    if done is not None:
        return Pulled(done, fetched=False)
    hub = hub or HubConfig()
    access = Access.of(hub, os.environ if environ is None else environ)
    online()
    plan = _planned(parsed, revision or "main", access, described)
    job = Job(store, model_id, plan.files, access)
    job.check_limit(hub, parsed)
    with store.lock(model_id, on_wait):
        done = _already(store, model_id, parsed, revision, described)
        if done is not None:  # the pull we waited for brought it
            return Pulled(done, fetched=False)
        job.check_room(free_bytes or fetching.free_bytes)
        stored = job.fetch_all(progress)
        return _register(job, plan, stored, modality)


def _already(
    store: Store, model_id: str, source: Source, revision: str | None, described: Parts | None
) -> PulledModel | None:
    """The model already pulled under ``model_id`` as asked; PullError when the id is another's."""
    model = store.get(model_id)
    if model is None:
        return None
    same = parse_source(model.source) == source and (revision is None or revision == model.revision)
    if not same:
        raise PullError(
            f"model id {model_id!r} is taken by {model.source} (revision {model.revision}): "
            "give another --id, or `allm rm` it first",
            status=409,
        )
    same = not model.parts if described is None else described.same_as(source, model.parts, model.options)
    if not same:
        raise PullError(
            f"model id {model_id!r} is taken by {model.source} pulled with other parts or options: "
            "give another --id, or `allm rm` it first",
            status=409,
        )
    return model


def _planned(source: Source, revision: str, access: Access, described: Parts | None) -> _Plan:
    """The files to fetch: those ``select`` chooses from SOURCE, or the parts described."""
    with hub_errors(source, access):
        commit, files = listing(source.repo_id, revision, access)
    if described is None:
        selection = select(files, source.tag, source.repo_id)
        chosen = tuple(Wanted(source.repo_id, commit, f, f.name) for f in selection.files)
        return _Plan(source, revision, commit, chosen, selection, {})

    def list_repo(repo_id: str) -> tuple[str, list[RemoteFile]]:
        with hub_errors(Source(repo_id, None), access):
            return listing(repo_id, "main", access)

    wanted = planned_parts(described, source, (commit, files), list_repo)
    return _Plan(source, revision, commit, tuple(wanted.values()), described, wanted)


def _register(job: Job, plan: _Plan, stored: list[StoredFile], modality: str | None) -> Pulled:
    """Tell what the files are and write the record; on a refusal the files are deleted."""
    directory = job.store.directory(job.model_id).absolute()
    options: dict[str, Any] = {}
    defaults: dict[str, float] = {}
    try:
        if isinstance(plan.chosen, Selection):
            found = detect(directory, plan.chosen, job.model_id, modality)
            if plan.chosen.kind == "safetensors":
                defaults = generation_defaults(directory)
        else:
            main = plan.chosen.main
            options = {part: str(directory / w.name) for part, w in plan.parts.items() if part != main}
            options |= plan.chosen.options
            found = detect_image(directory / plan.parts[main].name, options, job.model_id)
    except PullError:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    model = PulledModel(
        id=job.model_id,
        source=str(plan.source),
        revision=plan.revision,
        commit=plan.commit,
        modality=found.modality,
        format=found.format,
        path=str(found.path),
        files=tuple(stored),
        pulled_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        defaults=defaults,
        options=options,
        parts={
            part: {"source": w.repo_id, "file": w.remote.name, "commit": w.commit}
            for part, w in plan.parts.items()
        },
    )
    job.store.record(model)
    return Pulled(model, fetched=True, warnings=found.warnings)
