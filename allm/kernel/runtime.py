"""The loop every manager process runs: handshake, heartbeats, dispatch, cancel, drain.

Threads::

    I/O thread (main)                        worker threads (``slots`` of them)
    ROUTER ◄─► decode/encode, heartbeats,    manager.handle(ctx) → Reply
               admission, cancel, deadlines  ctx.emit(chunk) ──► outbox ──► I/O thread
               ◄── wake pipe ◄──────────────

Only the I/O thread touches the socket.  Workers hand frames over through a
bounded outbox and a wake-up pipe; a full outbox blocks the producing worker
(backpressure into the engine), so no frame is ever dropped.  A peer whose
ZeroMQ queue is full has its frames held back here until it drains.

``run_request`` is the one place that turns exceptions into codes.

Liveness (docs/reliability.md): nothing a worker does can hold up the I/O
thread, so heartbeats leave on time even while a model loads for minutes.
Instead of a total time, each running request is judged by its progress: a
token, a ``check()``, or a load's ``progress()``.  The I/O thread's watchdog
answers a request whose activity made no progress within its limit with
TIMEOUT naming the activity, then exits (``EXIT_STUCK``) so the supervisor
starts a fresh process: a thread stuck in C cannot be stopped any other way.
An error raised with ``restart=True`` (the engine may be damaged) ends the
process the same way once it is idle (``EXIT_RESTART``).  The manager also
exits by itself when its parent dies (``prctl`` on Linux, and everywhere the
lifeline pipe's EOF) and when a drain outlives its time plus a grace.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import importlib
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from allm.kernel import curve, logs
from allm.kernel import protocol as p
from allm.kernel.codes import (
    REASON_DRAINING,
    REASON_QUEUE_FULL,
    AllmError,
    CancelledError,
    Code,
    DeadlineError,
    InternalError,
    UnsupportedError,
)
from allm.kernel.transport import Router, Sent

log = logging.getLogger("allm.runtime")

SETTINGS_ENV = "ALLM_MANAGER_SETTINGS"
PARENT_ENV = "ALLM_PARENT_PID"
LIFELINE_ENV = "ALLM_LIFELINE_FD"
OUTBOX_MESSAGES = 4096
STALLED_MESSAGES = 65_536
PEER_TTL_S = 30.0
DRAIN_GRACE_S = 2.0  # after the drain time: cancel everything, then exit even if a handler is deaf
#: how long a manager stays connected after its last reply before it exits. A client's DEALER
#: (ZMQ_IMMEDIATE) drops what it has received but not yet read when the connection closes, so
#: a manager that exits at once after answering loses the answer now and then.
EXIT_LINGER_S = 0.5
# Exit statuses the supervisor reads (allm/kernel/supervisor.py classify_exit).
EXIT_STUCK = 70  # the watchdog found a worker stuck; its request was answered TIMEOUT
EXIT_RESTART = 71  # an engine error left the process suspect; it stopped once idle


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
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


def anonymous_memory_bytes(pid: int | str = "self") -> int | None:
    """Memory the process really allocated: resident anonymous pages (Linux ``RssAnon``).

    Pages of a memory-mapped model file are left out: the kernel can drop and
    re-read them, so they never make a process run out of memory.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                found.extend(int(c) for c in f.read().split())
    except (OSError, ValueError):
        pass
    return found


def tree_memory_bytes(pid: int) -> int | None:
    """Allocated memory of a process and every process it started (a manager's engine worker).

    A manager is one unit under its memory cap, however many processes it runs its engine in.
    """
    total = anonymous_memory_bytes(pid)
    if total is None:
        return None
    todo, seen = _children(pid), {pid}
    while todo:
        child = todo.pop()
        if child in seen:
            continue
        seen.add(child)
        total += anonymous_memory_bytes(child) or 0
        todo.extend(_children(child))
    return total


def memory_in_use_bytes() -> int:
    """This process's allocated memory (anonymous RSS; peak RSS where /proc is missing)."""
    anon = anonymous_memory_bytes()
    if anon is not None:
        return anon
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Runtime:
    def __init__(
        self,
        manager: Manager,
        router: Router,
        *,
        modality: str,
        instance: int,
        slots: int = 1,
        queue_size: int = 16,
        heartbeat_interval_s: float = 0.5,
        drain_timeout_s: float = 10.0,
        step_limit_s: float | None = None,
        lifeline_fd: int | None = None,
    ) -> None:
        self.manager = manager
        self.router = router
        self.modality = modality
        self.instance = instance
        self.slots = max(1, slots)
        self.queue_size = max(0, queue_size)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.drain_timeout_s = drain_timeout_s
        self.step_limit_s = step_limit_s
        self.lifeline_fd = lifeline_fd
        self.exit_status = 0  # what main() exits with: EXIT_STUCK / EXIT_RESTART when not 0
        self.incarnation = uuid.uuid4().hex[:12]
        self._peers: dict[bytes, float] = {}
        # Waiting requests by key (for cancel, expiry, accounting) and, in arrival
        # order, in a C-level queue the workers block on: a cheap wake-up per job.
        # A cancelled or expired request leaves _waiting; workers skip its queue entry.
        self._waiting: dict[tuple[bytes, int], RequestContext] = {}
        self._jobs: queue.SimpleQueue[RequestContext | None] = queue.SimpleQueue()
        self._active: dict[tuple[bytes, int], RequestContext] = {}
        self._lock = threading.RLock()  # re-entered: a send under it may forget a gone peer
        self._outbox: queue.SimpleQueue[tuple[bytes, list[bytes], RequestContext | None]] = (
            queue.SimpleQueue()
        )
        self._stalled: dict[bytes, collections.deque[list[bytes]]] = {}
        self._stalled_count = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self._draining_since: float | None = None
        self._drain_asked = False  # begin_drain was called; the I/O thread starts it (_start_drain)
        self._replied_at = 0.0  # time.monotonic() of the last reply or chunk sent
        self._models_sent: tuple[str, ...] | None = None  # as the last heartbeat said (by identity)
        self._workers = [
            threading.Thread(target=self._work, name=f"{modality}-worker-{i}", daemon=True)
            for i in range(self.slots)
        ]
        router.watch_fd(self._wake_r)
        if lifeline_fd is not None:
            os.set_blocking(lifeline_fd, False)
            router.watch_fd(lifeline_fd)

    @property
    def wake_fd(self) -> int:
        """A non-blocking fd that wakes the I/O loop when written (e.g. signal.set_wakeup_fd)."""
        return self._wake_w

    # -- worker side -------------------------------------------------------

    def _post(self, peer: bytes, frames: list[bytes], ctx: RequestContext | None) -> None:
        """Hand frames to the I/O thread.  Chunks wait for room but give up on cancel."""
        if ctx is not None:
            # Backpressure: while the I/O thread is this far behind, the engine waits.
            while self._outbox.qsize() >= OUTBOX_MESSAGES:
                ctx.check()
                time.sleep(0.001)
        self._outbox.put((peer, frames, ctx))
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")

    def _work(self) -> None:
        while True:
            ctx = self._jobs.get()
            if ctx is None:
                return
            with self._lock:
                if self._waiting.get(ctx.key) is not ctx:
                    continue  # cancelled or expired while waiting: already answered
                if self._drain_asked:
                    continue  # left in line: the drain hands it back to the client
                del self._waiting[ctx.key]
                ctx.stall_limit_s = self.step_limit_s
                ctx.last_progress = time.monotonic()
                self._active[ctx.key] = ctx
            # From here a crash costs this request; until here the client may send it elsewhere.
            self._post(ctx.peer, p.encode(p.Started(ctx.rid)), None)
            token = logs.request_id.set(ctx.tag)
            started = time.monotonic()
            try:
                terminal = self.run_request(ctx)
                # Posted while still active: a drain must not end between the two.
                self._post(ctx.peer, p.encode(terminal), None)
                outcome = "ok" if isinstance(terminal, p.Result) else terminal.code.name
                # A failure always shows; a success only at DEBUG: a line a request costs about
                # 100 µs here (formatting, then the supervisor relaying the pipe), the gateway's
                # access line already says it, and bench/kernel.py measures the difference.
                log.log(
                    logging.INFO if outcome != "ok" else logging.DEBUG,
                    "finished",
                    extra={
                        "fields": {
                            "op": ctx.op,
                            "model": ctx.model or None,
                            "outcome": outcome,
                            "chunks": ctx.seq,
                            "duration_ms": round((time.monotonic() - started) * 1000, 1),
                        }
                    },
                )
            finally:
                logs.request_id.reset(token)
                with self._lock:
                    self._active.pop(ctx.key, None)

    def run_request(self, ctx: RequestContext) -> p.Result | p.Error:
        """Run one request and return its terminal message: the one blind except."""
        try:
            ctx.check()
            reply = self.manager.handle(ctx)
            if ctx.cancelled:
                raise CancelledError("request cancelled")
            return p.Result(ctx.rid, reply.data, reply.blobs)
        except AllmError as exc:
            if exc.restart:
                log.error("restarting once idle: %s", exc.message)
                self.begin_drain(exit_status=EXIT_RESTART)
            return p.Error(ctx.rid, exc.code, exc.message, exc.reason, exc.param)
        except MemoryError as exc:
            detail = f": {exc}" if str(exc) else ""
            return p.Error(ctx.rid, Code.OOM_RAM, f"out of host memory in {ctx.op!r}{detail}")
        except Exception as exc:
            log.exception("request %s op %r failed", ctx.rid, ctx.op)
            return p.Error(ctx.rid, Code.INTERNAL, f"internal error in {ctx.op!r}: {exc!r}")

    # -- I/O thread ----------------------------------------------------------

    def serve(self) -> None:
        """Serve until asked to stop (SIGTERM), then drain and return."""
        for worker in self._workers:
            worker.start()
        next_heartbeat = 0.0
        try:
            while True:
                if self._drain_asked and self._draining_since is None:
                    self._start_drain()
                now = time.monotonic()
                if self._draining_since is not None and self._drained(now, self._draining_since):
                    break
                if now >= next_heartbeat:
                    self._heartbeat_all()
                    next_heartbeat = now + self.heartbeat_interval_s
                    if self._watchdog(now):
                        break
                timeout_s = next_heartbeat - now
                if self._stalled_count:
                    timeout_s = min(timeout_s, 0.001)
                ready = self.router.poll(max(0, int(timeout_s * 1000)))
                if self.lifeline_fd is not None and self.lifeline_fd in ready:
                    self._check_lifeline()
                if self._wake_r in ready:
                    # Empty the pipe before clearing the flag: a worker that saw the flag
                    # set and wrote nothing has its frames drained by the flush below.
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    self._wake_pending = False
                if self.router.socket in ready:
                    self._receive_all()
                self._flush()
                self._expire_queued()
        finally:
            self._stop()

    def begin_drain(self, exit_status: int = 0) -> None:
        """Drain, then stop: callable from any thread and from a signal handler.

        Only the I/O thread may touch the socket, and a drain answers the requests still in
        line, so this only asks and wakes it; it starts the drain at its next turn.
        """
        self.exit_status = self.exit_status or exit_status
        self._drain_asked = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _start_drain(self) -> None:
        """The I/O thread's half of ``begin_drain``."""
        if self._draining_since is None:
            self._draining_since = time.monotonic()
            log.info("draining: %d active, %d queued", len(self._active), len(self._waiting))
            # Nothing queued has started: hand it back at once, so the client sends it
            # to another instance (or this one's successor) instead of waiting for us.
            with self._lock:
                self._drop_waiting_locked(
                    lambda _ctx: True, "the manager is shutting down", InternalError, REASON_DRAINING
                )

    def _drained(self, now: float, since: float) -> bool:
        with self._lock:
            busy = bool(self._active or self._waiting)
            if busy and now - since > self.drain_timeout_s:
                for ctx in self._active.values():
                    ctx.cancel()
                self._drop_waiting_locked(lambda _ctx: True, "manager is shutting down")
        if busy and now - since > self.drain_timeout_s + DRAIN_GRACE_S:
            # A handler deaf to cancel (stuck in C) would hold the drain forever.
            log.error("drain did not end %.0f s after its limit: exiting anyway", DRAIN_GRACE_S)
            return True
        return not busy and self._outbox.empty() and not self._stalled_count

    def _check_lifeline(self) -> None:
        """EOF on the lifeline pipe: the parent died (every OS, unlike prctl)."""
        assert self.lifeline_fd is not None
        try:
            data = os.read(self.lifeline_fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            log.warning("the supervisor is gone: draining and exiting")
            self.router.unwatch_fd(self.lifeline_fd)
            self.lifeline_fd = None
            self.begin_drain()

    def _watchdog(self, now: float) -> bool:
        """Answer requests whose activity stopped moving; True: exit now for a restart."""
        with self._lock:
            stuck = [
                c
                for c in self._active.values()
                if c.stall_limit_s is not None and now - c.last_progress > c.stall_limit_s
            ]
            if not stuck:
                return False
            first = stuck[0]
            what = (
                f"the {self.modality} manager's {first.activity} made no progress for "
                f"{now - first.last_progress:.0f} s (limit {first.stall_limit_s:g} s); "
                "the manager restarts"
            )
            log.error("%s", what)
            self._draining_since = now  # the last heartbeat says so: send nothing more here
            for ctx in list(self._active.values()):
                text = what if ctx in stuck else f"the {self.modality} manager restarts: {what}"
                self._reply_error(ctx, DeadlineError(text))
            self._active.clear()
            # What waits has not started: the client sends it to the next process.
            self._drop_waiting_locked(
                lambda _ctx: True, f"the {self.modality} manager restarts", InternalError, REASON_DRAINING
            )
        self.exit_status = EXIT_STUCK
        self._flush()
        return True

    def _stop(self) -> None:
        for _ in self._workers:
            self._jobs.put(None)
        self._heartbeat_all()

    def linger(self) -> None:
        """Stay connected until EXIT_LINGER_S after the last reply, so its client reads it."""
        left = self._replied_at + EXIT_LINGER_S - time.monotonic()
        if left > 0:
            time.sleep(left)

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

    def busy_workers(self, wait_s: float = 1.0) -> bool:
        """After serve(): is a worker still inside a handler (stuck, or deaf to cancel)?"""
        deadline = time.monotonic() + wait_s
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return any(w.is_alive() for w in self._workers)

    def _receive_all(self) -> None:
        router = self.router
        while (got := router.recv()) is not None:
            peer, frames = got
            known = peer in self._peers
            self._peers[peer] = time.monotonic()
            try:
                msg = p.decode(frames)
            except p.ProtocolError as exc:
                log.warning("bad frame from peer %s: %s", peer.hex(), exc.message)
                self._send(peer, p.encode(p.Error(exc.rid, Code.UNSUPPORTED, exc.message, exc.reason)))
                continue
            match msg:
                case p.Request():
                    self._admit(peer, msg)
                case p.Cancel():
                    self._cancel(peer, msg.rid)
                case p.Hello() if not known:
                    # The handshake: a new peer hears our state at once; later hellos
                    # only keep it registered, the periodic heartbeat answers them.
                    self._send(peer, p.encode(self.heartbeat()))
                case p.Hello():
                    pass
                case _:
                    text = f"a manager does not accept {type(msg).__name__} messages"
                    self._send(peer, p.encode(p.Error(0, Code.UNSUPPORTED, text, "bad_kind")))

    def _admit(self, peer: bytes, req: p.Request) -> None:
        deadline = time.monotonic() + req.timeout_ms / 1000 if req.timeout_ms > 0 else None
        ctx = RequestContext(peer, req, deadline, self._post)
        if self._draining_since is not None:
            self._reply_error(ctx, InternalError("manager is shutting down", reason=REASON_DRAINING))
            return
        if req.op in self.manager.inline_ops:
            self._send(peer, p.encode(self.run_request(ctx)))
            return
        error: AllmError
        with self._lock:
            if ctx.key in self._active or ctx.key in self._waiting:
                error = UnsupportedError(f"request id {req.rid} is already in flight")
            elif len(self._active) + len(self._waiting) >= self.slots + self.queue_size:
                error = DeadlineError(
                    f"the {self.modality} manager's queue is full "
                    f"({self.slots} running, {self.queue_size} waiting)",
                    reason=REASON_QUEUE_FULL,
                )
            else:
                self._waiting[ctx.key] = ctx
                self._jobs.put(ctx)
                return
        self._reply_error(ctx, error)

    def _reply_error(self, ctx: RequestContext, exc: AllmError) -> None:
        self._send(ctx.peer, p.encode(p.Error(ctx.rid, exc.code, exc.message, exc.reason, exc.param)))

    def _cancel(self, peer: bytes, rid: int) -> None:
        with self._lock:
            active = self._active.get((peer, rid))
            if active is not None:
                active.cancel()  # the worker sends the terminal when the handler stops
                return
            self._drop_waiting_locked(lambda ctx: ctx.key == (peer, rid), "request cancelled")

    def _drop_waiting_locked(
        self,
        match: Callable[[RequestContext], bool],
        text: str,
        error: type[AllmError] = CancelledError,
        reason: str = "",
    ) -> None:
        """Answer waiting requests and take them out of line.

        All of them leave the line before any answer goes out: a send that finds
        its peer gone forgets that peer's waiting requests under this loop.
        """
        dropped = [self._waiting.pop(c.key) for c in list(self._waiting.values()) if match(c)]
        for ctx in dropped:
            self._reply_error(ctx, error(text, reason=reason))

    def _expire_queued(self) -> None:
        if not self._waiting:
            return
        now = time.monotonic()
        with self._lock:
            expired = [c for c in self._waiting.values() if c.deadline is not None and now > c.deadline]
            for ctx in expired:
                self._waiting.pop(ctx.key, None)
            for ctx in expired:
                self._reply_error(ctx, DeadlineError("request passed its deadline while queued"))

    def _forget_peer(self, peer: bytes) -> None:
        """The peer disconnected: stop its work, nobody is listening."""
        self._peers.pop(peer, None)
        dropped = self._stalled.pop(peer, None)
        if dropped:
            self._stalled_count -= len(dropped)
        with self._lock:
            for ctx in self._active.values():
                if ctx.peer == peer:
                    ctx.cancel()
            for key in [k for k in self._waiting if k[0] == peer]:
                del self._waiting[key]

    def _send(self, peer: bytes, frames: list[bytes]) -> None:
        """Send now, or hold back behind frames already waiting for this peer."""
        held = self._stalled.get(peer)
        if held is not None:
            held.append(frames)
            self._stalled_count += 1
            return
        result = self.router.send(peer, frames)
        self._replied_at = time.monotonic()
        if result is Sent.FULL:
            self._stalled[peer] = collections.deque([frames])
            self._stalled_count += 1
        elif result is Sent.GONE:
            self._forget_peer(peer)

    def _flush(self) -> None:
        for peer in list(self._stalled):
            held = self._stalled[peer]
            while held:
                result = self.router.send(peer, held[0])
                self._replied_at = time.monotonic()
                if result is Sent.FULL:
                    break
                held.popleft()
                self._stalled_count -= 1
                if result is Sent.GONE:
                    self._forget_peer(peer)
                    break
            else:
                del self._stalled[peer]
        # A model came or went: say so before the replies that follow from it (a load's result).
        if self.manager.models() is not self._models_sent:
            self._heartbeat_all()
        # Stop taking from workers while too much is held back: they then block.
        while self._stalled_count < STALLED_MESSAGES:
            try:
                peer, frames, _ctx = self._outbox.get_nowait()
            except queue.Empty:
                return
            if peer in self._peers:
                self._send(peer, frames)

    def heartbeat(self) -> p.Heartbeat:
        with self._lock:
            active, queued = len(self._active), len(self._waiting)
        self._models_sent = models = self.manager.models()
        return p.Heartbeat(
            pid=os.getpid(),
            incarnation=self.incarnation,
            modality=self.modality,
            instance=self.instance,
            models=models,
            active=active,
            queued=queued,
            capacity=self.slots + self.queue_size,
            memory_bytes=memory_in_use_bytes(),
            draining=self._draining_since is not None,
            extra=self._extra(),
        )

    def _extra(self) -> p.Params:
        status = getattr(self.manager, "status", None)  # optional: a manager with nothing to add
        extra: p.Params = dict(status()) if status is not None else {}
        extra["slots"] = self.slots
        now = time.monotonic()
        with self._lock:
            extra["running"] = [
                {
                    "activity": c.activity,
                    "model": c.model,
                    "fraction": c.fraction,
                    "since_progress_s": round(now - c.last_progress, 3),
                }
                for c in self._active.values()
            ]
        return extra

    def _heartbeat_all(self) -> None:
        now = time.monotonic()
        frames = p.encode(self.heartbeat())
        for peer, seen in list(self._peers.items()):
            if now - seen > PEER_TTL_S:
                del self._peers[peer]
            # A heartbeat is never worth holding back: skip a full peer.
            elif peer not in self._stalled and self.router.send(peer, frames) is Sent.GONE:
                self._forget_peer(peer)


# -- process entry point -------------------------------------------------------


def linux_prctl(option: int, arg: int | bytes) -> None:
    """prctl(2) where there is one (Linux); elsewhere nothing."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, arg, 0, 0, 0)


def _bind_to_parent() -> None:
    """Die with the supervisor, so no manager outlives it (Linux: PR_SET_PDEATHSIG).

    Elsewhere (macOS) the lifeline pipe's EOF tells the same (Runtime._check_lifeline).
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    linux_prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if str(os.getppid()) != parent:  # it died before the line above took effect
        sys.exit(0)


def _lifeline_fd() -> int | None:
    raw = os.environ.get(LIFELINE_ENV, "")
    return int(raw) if raw.isdigit() else None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="allm-manager", description=__doc__)
    parser.add_argument("modality", help="the modality this manager serves (shows in ps)")
    parser.add_argument("--module", required=True, help="the manager module, from the registry")
    parser.add_argument("--endpoint", required=True, help="ipc://path or tcp://host:port to bind")
    parser.add_argument("--instance", type=int, default=0)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--heartbeat-interval-s", type=float, default=0.5)
    parser.add_argument("--drain-timeout-s", type=float, default=10.0)
    parser.add_argument(
        "--step-limit-s", type=float, default=0.0, help="longest a running request may go without progress"
    )
    parser.add_argument("--max-message-bytes", type=int, help="a peer's bigger message closes its connection")
    parser.add_argument("--curve-secret", help="tcp://: this manager's CURVE .key_secret file")
    parser.add_argument(
        "--curve-allow",
        action="append",
        default=[],
        help="tcp://: a client public key (Z85 or .key file) to let in",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    name = f"{args.modality}#{args.instance}"
    logs.setup(name)
    _bind_to_parent()
    linux_prctl(15, f"allm-{args.modality}-{args.instance}".encode()[:15])  # PR_SET_NAME
    settings: dict[str, Any] = json.loads(os.environ.get(SETTINGS_ENV) or "{}")
    module = importlib.import_module(args.module)
    info = ManagerInfo(args.modality, args.instance, args.slots, settings)
    manager: Manager = module.create(info)
    keys = curve.load_pair(args.curve_secret) if args.curve_secret else None
    allowed = [curve.load_public(key) for key in args.curve_allow]
    router = Router(args.endpoint, keys=keys, allowed=allowed, max_message_bytes=args.max_message_bytes)
    runtime = Runtime(
        manager,
        router,
        modality=args.modality,
        instance=args.instance,
        slots=args.slots,
        queue_size=args.queue_size,
        heartbeat_interval_s=args.heartbeat_interval_s,
        drain_timeout_s=args.drain_timeout_s,
        step_limit_s=args.step_limit_s or None,
        lifeline_fd=_lifeline_fd(),
    )

    def on_signal(signum: int, _frame: object) -> None:
        runtime.begin_drain()

    signal.signal(signal.SIGTERM, on_signal)
    # A reload is the gateway's: it sends the new catalog over the protocol (the configure op).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Under our supervisor, Ctrl-C reaches the whole process group: the
    # supervisor decides when we stop, not the terminal.
    if os.environ.get(PARENT_ENV):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, on_signal)
    # Wake the poll at once on a signal instead of at the next heartbeat.
    signal.set_wakeup_fd(runtime.wake_fd)
    log.info("serving %s on %s (pid %d)", args.module, args.endpoint, os.getpid())
    try:
        runtime.serve()
    finally:
        signal.set_wakeup_fd(-1)
        if runtime.busy_workers():
            # A worker still runs (stuck in C, or deaf to cancel): closing the engine
            # under it could crash or block.  Send what is queued, then leave at once.
            runtime.linger()
            router.close()
            log.error("exiting with a worker still busy")
            os._exit(runtime.exit_status or 1)
        runtime.linger()
        runtime.close()
        manager.close()
        router.close()
    log.info("stopped")
    return runtime.exit_status


if __name__ == "__main__":
    sys.exit(main())
