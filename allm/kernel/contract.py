"""The manager contract: what a manager module implements, what it is given, what it returns.

A manager module (allm/kernel/registry.py names one per modality) exports
``create(info: ManagerInfo) -> Manager``; the runtime (allm/kernel/loop.py) calls its
``handle`` on a worker thread with a ``RequestContext`` per request and sends the ``Reply``
it returns, or the code of the ``AllmError`` it raises (docs/modality.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from allm.kernel import protocol as p
from allm.kernel.codes import CancelledError, DeadlineError


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """What ``handle`` returns: the result's fields, and big payloads as frames of their own."""

    data: p.Params
    blobs: tuple[bytes, ...] = ()


class Manager(Protocol):
    """What a modality manager implements.  ``handle`` runs on a worker thread.

    A manager may also define ``status() -> Params``: extras for its heartbeats
    (the text manager's models loading), under the same rules as ``models()``.
    """

    inline_ops: frozenset[str]  # cheap ops run on the I/O thread, skipping the queue

    def handle(self, ctx: RequestContext) -> Reply: ...

    # Called on the I/O thread: cheap, thread-safe, never blocks; a new tuple only when it changed.
    def models(self) -> tuple[str, ...]: ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ManagerInfo:
    """What a manager module's ``create`` is given."""

    modality: str
    instance: int
    slots: int
    settings: Mapping[str, Any]


class RequestContext:
    """One request as a handler sees it: its fields, cancel, deadline, chunk output."""

    __slots__ = (
        "_cancelled",
        "_post",
        "activity",
        "blobs",
        "deadline",
        "fraction",
        "last_progress",
        "model",
        "op",
        "params",
        "peer",
        "rid",
        "seq",
        "stall_limit_s",
        "stream",
        "tag",
    )

    def __init__(
        self,
        peer: bytes,
        req: p.Request,
        deadline: float | None,
        post: Callable[[bytes, list[bytes], RequestContext | None], None],
    ) -> None:
        self.peer = peer
        self.rid = req.rid
        self.op = req.op
        self.model = req.model
        self.params = req.params
        self.blobs = req.blobs
        self.stream = req.stream
        self.tag = req.tag  # the HTTP request id: in every log line while this request runs
        self.deadline = deadline
        self.seq = 0
        self._cancelled = threading.Event()
        self._post = post
        # What the watchdog reads (plain attribute writes: atomic under the GIL).
        self.activity = f"operation {req.op!r}"
        self.stall_limit_s: float | None = None  # set by the runtime when a worker takes it
        self.last_progress = time.monotonic()
        self.fraction: float | None = None

    @property
    def key(self) -> tuple[bytes, int]:
        return (self.peer, self.rid)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def time_left_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def progress(self, fraction: float | None = None) -> None:
        """Tell the watchdog this request is moving (a load's fraction done, if known)."""
        self.last_progress = time.monotonic()
        if fraction is not None:
            self.fraction = fraction

    @contextlib.contextmanager
    def phase(self, activity: str, stall_limit_s: float | None) -> Iterator[None]:
        """Run a long activity (a model load) under its own name and stall limit."""
        saved = (self.activity, self.stall_limit_s, self.fraction)
        self.activity, self.stall_limit_s, self.fraction = activity, stall_limit_s, None
        self.last_progress = time.monotonic()
        try:
            yield
        finally:
            self.activity, self.stall_limit_s, self.fraction = saved
            self.last_progress = time.monotonic()

    def check(self) -> None:
        """Raise CANCELLED or TIMEOUT if the request should stop now; counts as progress."""
        self.last_progress = time.monotonic()
        if self._cancelled.is_set():
            raise CancelledError("request cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineError("request passed its deadline")

    def emit(self, data: p.Params, blobs: tuple[bytes, ...] = ()) -> None:
        """Send one chunk of a streaming reply; raises if the request should stop."""
        self.check()  # also the watchdog's progress mark
        frames = (
            p.encode(p.Chunk(self.rid, self.seq, data, blobs))
            if blobs
            else p.encode_chunk(self.rid, self.seq, data)
        )
        self.seq += 1
        self._post(self.peer, frames, self)
