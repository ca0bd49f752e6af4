"""The loop every manager process runs: handshake, heartbeats, dispatch, cancel, drain.

Threads::

    I/O thread (main)                        worker threads (``slots`` of them)
    ROUTER ◄─► decode/encode, heartbeats,    manager.handle(ctx) → Reply
               admission, cancel, deadlines  ctx.emit(chunk) ──► outbox ──► I/O thread
               ◄── wake pipe ◄──────────────

Only the I/O thread touches the socket.  Workers hand frames over through a
bounded outbox and a wake-up pipe; a full outbox blocks the producing worker
(backpressure into the engine), so no frame is ever dropped.  A peer whose
ZeroMQ queue is full has its frames held back until it drains (outbox.py).

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

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable

from allm.kernel import logs
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
from allm.kernel.contract import Manager, RequestContext
from allm.kernel.farewell import FAREWELL_LIMIT_S, farewell
from allm.kernel.outbox import Outbox
from allm.kernel.process import EXIT_RESTART, EXIT_STUCK, memory_in_use_bytes
from allm.kernel.transport import Router, Sent

log = logging.getLogger("allm.runtime")

PEER_TTL_S = 30.0
DRAIN_GRACE_S = 2.0  # after the drain time: cancel everything, then exit even if a handler is deaf


class Runtime:
    """One manager process's server: the I/O thread's loop and the worker threads."""

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
        self._out = Outbox(router, self._forget_peer)
        self._draining_since: float | None = None
        self._drain_asked = False  # begin_drain was called; the I/O thread starts it (_start_drain)
        self._models_sent: tuple[str, ...] | None = None  # as the last heartbeat said (by identity)
        self._workers = [
            threading.Thread(target=self._work, name=f"{modality}-worker-{i}", daemon=True)
            for i in range(self.slots)
        ]
        if lifeline_fd is not None:
            os.set_blocking(lifeline_fd, False)
            router.watch_fd(lifeline_fd)

    @property
    def wake_fd(self) -> int:
        """A non-blocking fd that wakes the I/O loop when written (e.g. signal.set_wakeup_fd)."""
        return self._out.wake_w

    # -- worker side -------------------------------------------------------

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
            self._out.post(ctx.peer, p.encode(p.Started(ctx.rid)), None)
            token = logs.request_id.set(ctx.tag)
            started = time.monotonic()
            try:
                terminal = self.run_request(ctx)
                # Posted while still active: a drain must not end between the two.
                self._out.post(ctx.peer, p.encode(terminal), None)
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
                if self._out.held_count:
                    timeout_s = min(timeout_s, 0.001)
                ready = self.router.poll(max(0, int(timeout_s * 1000)))
                if self.lifeline_fd is not None and self.lifeline_fd in ready:
                    self._check_lifeline()
                if self._out.wake_r in ready:
                    self._out.woken()
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
        self._out.wake()

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
        return not busy and self._out.is_empty()

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

    def farewell(self, limit_s: float = FAREWELL_LIMIT_S) -> None:
        """Before the socket closes: wait until every client has read every frame sent to it."""
        self._draining_since = self._draining_since or time.monotonic()
        self._flush()
        farewell(
            self.router,
            self._out,
            self._peers,
            refuse=self._admit,  # draining: a request that arrives now is refused
            heartbeat=self._heartbeat_all,
            probe_s=min(self.heartbeat_interval_s, 0.1),
            limit_s=limit_s,
        )

    def close(self) -> None:
        self._out.close()

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
                self._out.send(peer, p.encode(p.Error(exc.rid, Code.UNSUPPORTED, exc.message, exc.reason)))
                continue
            match msg:
                case p.Request():
                    self._admit(peer, msg)
                case p.Cancel():
                    self._cancel(peer, msg.rid)
                case p.Hello() if not known:
                    # The handshake: a new peer hears our state at once; later hellos
                    # only keep it registered, the periodic heartbeat answers them.
                    self._out.send(peer, p.encode(self.heartbeat()))
                case p.Hello():
                    pass
                case _:
                    text = f"a manager does not accept {type(msg).__name__} messages"
                    self._out.send(peer, p.encode(p.Error(0, Code.UNSUPPORTED, text, "bad_kind")))

    def _admit(self, peer: bytes, req: p.Request) -> None:
        deadline = time.monotonic() + req.timeout_ms / 1000 if req.timeout_ms > 0 else None
        ctx = RequestContext(peer, req, deadline, self._out.post)
        if self._draining_since is not None:
            self._reply_error(ctx, InternalError("manager is shutting down", reason=REASON_DRAINING))
            return
        if req.op in self.manager.inline_ops:
            self._out.send(peer, p.encode(self.run_request(ctx)))
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
        self._out.send(ctx.peer, p.encode(p.Error(ctx.rid, exc.code, exc.message, exc.reason, exc.param)))

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
        if self._peers.pop(peer, None) is not None:
            log.debug("peer %s is gone: its requests are dropped", peer.hex())
        self._out.forget(peer)
        with self._lock:
            for ctx in self._active.values():
                if ctx.peer == peer:
                    ctx.cancel()
            for key in [k for k in self._waiting if k[0] == peer]:
                del self._waiting[key]

    def _flush(self) -> None:
        self._out.retry_held()
        # A model came or went: say so before the replies that follow from it (a load's result).
        if self.manager.models() is not self._models_sent:
            self._heartbeat_all()
        self._out.send_posted(self._peers)

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
            elif not self._out.holds(peer) and self.router.send(peer, frames) is Sent.GONE:
                self._forget_peer(peer)
