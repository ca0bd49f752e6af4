"""Pulls run by the server: each in a worker thread, its progress told to listeners, its model registered.

A pull (allm/hub: fetch, check, detect, record) blocks, so it runs in a thread; the
event loop only hears its progress. One ``Job`` per model id: a second request for a
model being pulled listens to the same job (one download), and a client that goes away
leaves the job running: the model is registered all the same. Once the record is
written, the model joins the running catalog as a reload would send it (the managers of
its modality are told), so it is served from the next request.

Detection imports the manager modules (their ``describe``, which reads the files and loads
nothing) in the worker thread: the same imports ``allm serve`` makes at start-up and on
every SIGHUP to check the catalog's engines; the gateway's own code never imports one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from sanic import Sanic

from allm.gateway import reload
from allm.gateway.config import Config, ModelConfig
from allm.gateway.errors import ApiError
from allm.hub import Progress, Pulled, PullError, checked, home, pull

log = logging.getLogger("allm.gateway")

#: the least time between two progress events of one file (its last one always goes)
PROGRESS_EVERY_S = 0.1
#: an OpenAI error code for each status a pull refuses with (allm/hub/errors.py says which is which)
CODES = {
    400: "invalid_value",
    401: "hub_token_required",
    403: "hub_access_denied",
    404: "not_found_on_hub",
    409: "model_id_taken",
    422: "not_a_model",
    502: "hub_failed",
    507: "insufficient_storage",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Registered:
    """A pull's outcome: the model, and what the server said of it."""

    pulled: Pulled
    served: bool  # in the running catalog (False: its modality has no manager here)
    warnings: tuple[str, ...]


class Job:
    """One model being pulled: its progress so far, its listeners, and the task that ends in its record."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.done_bytes = 0
        self.total_bytes = 0
        self.listeners: set[asyncio.Queue[Progress | None]] = set()
        self.task: asyncio.Task[Registered] | None = None

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 0.0

    def publish(self, step: Progress | None) -> None:
        """On the event loop: a step of the pull (None: it ended)."""
        if step is not None:
            self.done_bytes, self.total_bytes = step.model_done_bytes, step.model_total_bytes
        for queue in self.listeners:
            queue.put_nowait(step)

    async def steps(self) -> AsyncIterator[Progress]:
        """Each step from now on, until the pull ends (then ``await job.outcome()``)."""
        queue: asyncio.Queue[Progress | None] = asyncio.Queue()
        self.listeners.add(queue)
        try:
            assert self.task is not None
            if self.task.done():
                return
            while (step := await queue.get()) is not None:
                yield step
        finally:
            self.listeners.discard(queue)

    async def outcome(self) -> Registered:
        """The registered model, or the pull's refusal as an ApiError; a listener that is cancelled
        leaves the job running."""
        assert self.task is not None
        try:
            return await asyncio.shield(self.task)
        except PullError as exc:
            raise refusal(exc) from None


def refusal(exc: PullError) -> ApiError:
    """A pull's refusal as the HTTP error it maps to."""
    kind = "server_error" if exc.status >= 500 else "invalid_request_error"
    param = exc.param or ("source" if exc.status in (400, 404) else None)
    return ApiError(
        exc.status, exc.message, code=CODES.get(exc.status, "pull_failed"), param=param, type=kind
    )


def jobs(app: Sanic[Any, Any]) -> dict[str, Job]:
    """The pulls running now, by model id."""
    running: dict[str, Job] | None = getattr(app.ctx, "pulls", None)
    if running is None:
        running = app.ctx.pulls = {}
    return running


def start(
    app: Sanic[Any, Any],
    source: str | None,
    *,
    model_id: str | None = None,
    revision: str | None = None,
    modality: str | None = None,
    parts: dict[str, str] | None = None,
    options: dict[str, Any] | None = None,
) -> Job:
    """The job pulling ``source`` (or an image model's ``parts``) as ``model_id`` (default: the source
    as written): a new one, or the one already pulling it. Refuses (409) an id the configuration's
    catalog has."""
    if parts is not None or options is not None:
        checked(source, parts, options, modality)  # a bad description is refused before any stream
    model_id = model_id or home(source, parts)
    running = jobs(app)
    if model_id in running:
        return running[model_id]
    config: Config = app.ctx.config
    own = config.model(model_id)
    if own is not None and own.source is None:
        raise ApiError(
            409,
            f"model id {model_id!r} is the configuration's own ([[models]]): give the pull another id",
            code="model_id_taken",
            param="id",
        )
    job = running[model_id] = Job(model_id)
    loop = asyncio.get_running_loop()
    asked = Asked(source, revision, modality, parts, options)
    job.task = loop.create_task(_run(app, job, asked, progress=_progress(loop, job)))
    job.task.add_done_callback(lambda task: _ended(running, job, task))
    return job


def _ended(running: dict[str, Job], job: Job, task: asyncio.Task[Registered]) -> None:
    running.pop(job.model_id, None)
    job.publish(None)
    failure = None if task.cancelled() else task.exception()  # read, so none goes unretrieved
    if failure is not None:
        log.warning("pull of %s failed: %s", job.model_id, getattr(failure, "message", failure))


def _progress(loop: asyncio.AbstractEventLoop, job: Job) -> Callable[[Progress], None]:
    """The pull's progress callback (in its thread): each file's steps, at most every PROGRESS_EVERY_S."""
    sent_at, sent_file = 0.0, ""

    def progress(step: Progress) -> None:
        nonlocal sent_at, sent_file
        now = time.monotonic()
        if step.finished or step.file != sent_file or now - sent_at >= PROGRESS_EVERY_S:
            sent_at, sent_file = now, step.file
            loop.call_soon_threadsafe(job.publish, step)

    return progress


@dataclasses.dataclass(frozen=True, slots=True)
class Asked:
    """What a pull request asks for, beside the model's id."""

    source: str | None
    revision: str | None
    modality: str | None
    parts: dict[str, str] | None
    options: dict[str, Any] | None


async def _run(
    app: Sanic[Any, Any], job: Job, asked: Asked, *, progress: Callable[[Progress], None]
) -> Registered:
    config: Config = app.ctx.config
    pulled = await asyncio.to_thread(
        pull,
        asked.source,
        config.data_dir,
        config.hub,
        model_id=job.model_id,
        revision=asked.revision,
        modality=asked.modality,
        parts=asked.parts,
        options=asked.options,
        progress=progress,
    )
    model = pulled.model.model_config()
    warnings = list(pulled.warnings)

    def joined(models: tuple[ModelConfig, ...]) -> list[ModelConfig]:
        if any(m.id == model.id and m.source is None for m in models):  # a reload brought one meanwhile
            return list(models)
        return [*(m for m in models if m.id != model.id), model]

    await reload.change_models(app, joined)
    current: Config = app.ctx.config
    served = current.model(model.id) == model
    if not served:
        warnings.append(
            f"no {model.modality} manager runs here: a restart of the server serves it"
            if current.model(model.id) is None
            else "the configuration's entry of this id is served instead"
        )
    log.info("pulled %s as %s (%s)", pulled.model.source, model.id, "served" if served else "not served")
    return Registered(pulled, served, tuple(warnings))
