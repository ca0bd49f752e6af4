"""What the gateway calls: request, stream and cancel over the managers' sockets.

One DEALER per manager instance carries every in-flight request to it,
multiplexed by request id.  The client keeps the protocol's invariant for its
callers: every request ends with exactly one terminal (a result, or a typed
``AllmError``).  When the manager cannot send it, the client makes it up:

    deadline passed             TIMEOUT, and a cancel goes to the manager
    heartbeats stopped          TIMEOUT for everything in flight there
    supervisor saw it die       the code the supervisor classified (report_down)
    it restarted under us       INTERNAL
    frames lost or piling up    INTERNAL (lost_frames / slow_consumer), and a cancel
    a bad frame for a request   INTERNAL (bad_frame), at once
    it speaks another version   INTERNAL (manager_failed), at once, until it is replaced

Only requests a worker had started pay for a dead instance.  A request that
was still waiting in the manager's line is sent again, to the least-loaded
live instance, within its own deadline.  What had started is known from the
``start`` messages, and, because one may die with the process that sent it,
from the line's order: a manager runs requests first come, first served, so
when fewer than ``slots`` requests are known to run, the oldest others still
open there may have been running too, and pay as if they had.

Requests for a modality go to its least-loaded live instance; while none is
live they wait (within their deadline), and a failed one fails them at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol

from allm.kernel import curve
from allm.kernel import protocol as p
from allm.kernel.codes import (
    REASON_BAD_VERSION,
    REASON_DRAINING,
    REASON_LOST_FRAMES,
    REASON_MANAGER_FAILED,
    REASON_QUEUE_FULL,
    REASON_SLOW_CONSUMER,
    AllmError,
    CancelledError,
    DeadlineError,
    InternalError,
    UnsupportedError,
    error_for,
)
from allm.kernel.transport import Dealer, client_context, new_routing_id

log = logging.getLogger("allm.client")

DEFAULT_TIMEOUT_S = 600.0
EXIT_GRACE_S = 0.1
MAX_RESENDS = 3  # a request that was never started is sent again at most this often


@dataclasses.dataclass(frozen=True, slots=True)
class InstanceView:
    """One manager instance as the client sees it."""

    modality: str
    endpoint: str
    live: bool
    failed: str
    outstanding: int
    heard_s_ago: float | None
    heartbeat: p.Heartbeat | None
    restarts_seen: int = 0  # new incarnations this client heard


class _Pending:
    __slots__ = (
        "chunks",
        "deadline",
        "inst",
        "next_seq",
        "req",
        "resends",
        "sent",
        "started",
        "terminal",
        "timer",
        "waiter",
    )

    def __init__(self, inst: _Instance, req: p.Request) -> None:
        self.inst = inst
        self.req = req
        self.started = False  # a worker took it: from then on a crash costs it
        self.resends = 0
        self.sent = 0  # the order it was (last) sent in
        self.deadline = 0.0  # time.monotonic()
        self.chunks: collections.deque[p.Chunk] = collections.deque()
        self.terminal: p.Result | AllmError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.next_seq = 0

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finish(self, terminal: p.Result | AllmError) -> None:
        """Record the one terminal; later ones (a late frame after a synthesized error) are ignored."""
        if self.terminal is not None:
            return
        self.terminal = terminal
        self.inst.pending.pop(self.req.rid, None)
        if self.timer is not None:
            self.timer.cancel()
        self.wake()


class _Instance:
    def __init__(self, modality: str, endpoint: str) -> None:
        self.modality = modality
        self.endpoint = endpoint
        self.dealer: Dealer | None = None
        self.pending: dict[int, _Pending] = {}
        self.heartbeat: p.Heartbeat | None = None
        self.last_heard: float | None = None
        self.live = False
        self.dead_incarnation = ""  # heartbeats from it never make us live again
        self.failed: AllmError | None = None
        self.restarts_seen = 0  # new incarnations heard: restarts, where nobody else counts them

    def fail_all(self, exc: AllmError) -> None:
        for pending in list(self.pending.values()):
            pending.finish(exc)


class Observer(Protocol):
    """What the gateway learns of each request, called in the task that reads the reply."""

    def tag(self) -> str:
        """The tag for a new request: the HTTP request id the caller is serving."""
        ...

    def chunk(self, req: p.Request) -> None:
        """A chunk of ``req`` reached its reader."""
        ...

    def end(self, req: p.Request, terminal: p.Result | AllmError) -> None:
        """``req`` ended: its result, its error, or CANCELLED when the reader left first."""
        ...


class KernelClient:
    """Asyncio client for every manager instance, keyed by modality."""

    def __init__(
        self,
        routes: Mapping[str, Sequence[str]],
        *,
        heartbeat_timeout_s: float = 5.0,
        hello_interval_s: float = 0.5,
        max_buffered_chunks: int = 1_000_000,
        absent_after_s: float | None = None,
        observer: Observer | None = None,
        keys: curve.KeyPair | None = None,
        server_keys: Mapping[str, bytes] | None = None,
    ) -> None:
        """``absent_after_s``: with no supervisor of ours (``allm gateway``), a modality none of
        whose instances has been heard from for this long fails its requests at once, instead
        of holding them until their deadline for a manager that may never come.
        ``observer``: told of each request's tag, chunks and end, in the caller's task.
        ``keys``, ``server_keys``: our CURVE key pair and each tcp:// manager's public key."""
        self._keys = keys
        self._server_keys = dict(server_keys or {})
        self.absent_after_s = absent_after_s
        self.observer = observer
        self._started_at = time.monotonic()
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.hello_interval_s = hello_interval_s
        self.max_buffered_chunks = max_buffered_chunks
        self._routes: dict[str, list[_Instance]] = {
            modality: [_Instance(modality, endpoint) for endpoint in endpoints]
            for modality, endpoints in routes.items()
        }
        self._by_endpoint = {i.endpoint: i for insts in self._routes.values() for i in insts}
        self._rids = itertools.count(1)
        self._sends = itertools.count(1)
        self._routing_id = new_routing_id()
        self._hello = p.encode(p.Hello(client=self._routing_id.hex()))
        self._ctx = client_context()
        self._changed = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None
        self._resending: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        for inst in self._by_endpoint.values():
            inst.dealer = Dealer(
                self._ctx,
                inst.endpoint,
                self._routing_id,
                self._on_message_for(inst),
                # Unsupervised (or on another host), the closing connection is how a
                # manager's death is known at once.
                on_disconnect=self._on_disconnect_for(inst)
                if self.absent_after_s is not None or inst.endpoint.startswith("tcp://")
                else None,
                keys=self._keys,
                server_key=self._server_keys.get(inst.endpoint),
            )
            inst.dealer.send(self._hello)
        self._ticker = asyncio.create_task(self._tick(), name="kernel-client-ticker")

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        for task in list(self._resending):
            task.cancel()
        await asyncio.gather(*self._resending, return_exceptions=True)
        for inst in self._by_endpoint.values():
            inst.fail_all(CancelledError("the kernel client is closing"))
            if inst.dealer is not None:
                inst.dealer.close()
        self._ctx.term()

    async def __aenter__(self) -> KernelClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_live(self, modality: str | None = None, *, timeout_s: float = 30.0) -> None:
        """Wait until every instance (of one modality, or of all) has sent a heartbeat."""
        insts = self._instances_of(modality) if modality else list(self._by_endpoint.values())
        deadline = time.monotonic() + timeout_s
        while not all(i.live for i in insts):
            await self._wait_change(deadline, f"managers {[i.endpoint for i in insts]} to start")

    # -- supervisor hooks ------------------------------------------------------

    def report_down(self, endpoint: str, exc: AllmError, *, failed: bool = False) -> None:
        """The supervisor saw this instance die (failed: and it will not be restarted)."""
        inst = self._by_endpoint.get(endpoint)
        if inst is None:
            return
        inst.live = False
        if inst.heartbeat is not None:
            inst.dead_incarnation = inst.heartbeat.incarnation
        if failed:
            inst.failed = exc
        self._notify()
        if inst.dealer is not None:
            inst.dealer.drain()
        if inst.pending:
            # Replies the manager sent just before it exited may still be on their
            # way through ZeroMQ's I/O thread: let them land before failing the rest.
            in_flight = [(pending, pending.sent) for pending in inst.pending.values()]
            slots = _slots(inst)

            def fail_in_flight() -> None:
                # Not those sent again meanwhile (the successor's first heartbeat does that).
                self._after_death([q for q, sent in in_flight if q.sent == sent], exc, slots)

            asyncio.get_running_loop().call_later(EXIT_GRACE_S, fail_in_flight)

    def _on_disconnect_for(self, inst: _Instance) -> Callable[[], None]:
        def on_disconnect() -> None:
            hb = inst.heartbeat
            if not inst.live or hb is None or hb.incarnation == inst.dead_incarnation:
                return
            self.report_down(
                inst.endpoint,
                InternalError(
                    f"the {inst.modality} manager's process ended (pid {hb.pid}): its connection closed"
                ),
            )

        return on_disconnect

    def last_heard(self, endpoint: str) -> float | None:
        """time.monotonic() of the last message from this instance, if any."""
        inst = self._by_endpoint.get(endpoint)
        return None if inst is None else inst.last_heard

    def instances(self) -> list[InstanceView]:
        now = time.monotonic()
        return [
            InstanceView(
                modality=i.modality,
                endpoint=i.endpoint,
                live=i.live,
                failed=i.failed.message if i.failed else "",
                outstanding=len(i.pending),
                heard_s_ago=None if i.last_heard is None else now - i.last_heard,
                heartbeat=i.heartbeat,
                restarts_seen=i.restarts_seen,
            )
            for i in self._by_endpoint.values()
        ]

    # -- requests --------------------------------------------------------------

    async def call(
        self,
        modality: str,
        op: str,
        *,
        model: str = "",
        params: p.Params | None = None,
        blobs: tuple[bytes, ...] = (),
        timeout_s: float | None = None,
        endpoint: str | None = None,
        prefer: str | None = None,
    ) -> p.Result:
        """One request; returns its result or raises its error.  ``endpoint``: to that instance
        (a reload's new catalog goes to each); one that never started may be sent to another."""
        async with self.stream(
            modality,
            op,
            model=model,
            params=params,
            blobs=blobs,
            timeout_s=timeout_s,
            stream=False,
            endpoint=endpoint,
            prefer=prefer,
        ) as stream:
            async for _chunk in stream:
                pass
            assert stream.result is not None
            return stream.result

    def stream(
        self,
        modality: str,
        op: str,
        *,
        model: str = "",
        params: p.Params | None = None,
        blobs: tuple[bytes, ...] = (),
        timeout_s: float | None = None,
        stream: bool = True,
        endpoint: str | None = None,
        prefer: str | None = None,
    ) -> Stream:
        """A streaming request: ``async with client.stream(...) as s: async for chunk in s``.
        ``prefer``: the instance to choose among equally loaded ones (it holds the prefix)."""
        timeout = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        observer = self.observer
        req = p.Request(
            tag=observer.tag() if observer is not None else "",
            rid=next(self._rids),
            op=op,
            model=model,
            params=params or {},
            timeout_ms=max(1, int(timeout * 1000)),
            stream=stream,
            blobs=blobs,
        )
        return Stream(self, modality, req, time.monotonic() + timeout, endpoint=endpoint, prefer=prefer)

    async def _submit(
        self,
        modality: str,
        req: p.Request,
        deadline: float,
        endpoint: str | None = None,
        prefer: str | None = None,
    ) -> _Pending:
        pending = await self._place(modality, req, deadline, None, endpoint=endpoint, prefer=prefer)
        pending.deadline = deadline
        pending.timer = asyncio.get_running_loop().call_at(_loop_time(deadline), self._expire, pending)
        return pending

    async def _place(
        self,
        modality: str,
        req: p.Request,
        deadline: float,
        pending: _Pending | None,
        *,
        endpoint: str | None = None,
        prefer: str | None = None,
    ) -> _Pending:
        """Send a request to the least-loaded live instance (or to ``endpoint``'s), waiting for
        one within the deadline."""
        insts = self._instances_of(modality)
        if req.model:
            # Only instances whose catalog (from their heartbeats) has the model, or that
            # have not said yet; none at all is an answer now, not at the deadline.
            insts = [i for i in insts if _serves(i, req.model)]
            if not insts:
                raise UnsupportedError(
                    f"no {modality} manager has model {req.model!r} in its catalog",
                    reason="model_not_found",
                    param="model",
                )
        if endpoint is not None:
            insts = [i for i in insts if i.endpoint == endpoint]
            if not insts:
                raise UnsupportedError(f"no {modality} manager instance at {endpoint}")
        frames = p.encode(req)
        while True:
            live = [i for i in insts if i.live]
            if live:
                inst = min(live, key=lambda i: _cost(i, req.model, prefer))
                hb = inst.heartbeat
                # A request sent again already holds its place in line: no capacity check.
                if pending is None and hb is not None and len(inst.pending) >= hb.capacity:
                    raise DeadlineError(
                        f"every {modality} manager is at capacity ({hb.capacity} requests)",
                        reason=REASON_QUEUE_FULL,
                    )
                assert inst.dealer is not None
                if inst.dealer.send(frames):
                    if pending is None:
                        pending = _Pending(inst, req)
                    pending.inst = inst
                    pending.sent = next(self._sends)
                    inst.pending[req.rid] = pending
                    return pending
                inst.live = False  # not connected: wait for its next heartbeat
                continue
            if all(i.failed for i in insts):
                failure = insts[0].failed
                raise InternalError(
                    f"the {modality} manager has failed and is not restarted: "
                    f"{failure.message if failure else 'unknown cause'}",
                    reason=REASON_MANAGER_FAILED,
                )
            if self.absent_after_s is not None:
                now = time.monotonic()
                if all(now - (i.last_heard or self._started_at) > self.absent_after_s for i in insts):
                    where = ", ".join(i.endpoint for i in insts)
                    raise InternalError(
                        f"no {modality} manager has answered for more than {self.absent_after_s:g} s "
                        f"(at {where}): is `allm manager {modality}` running?",
                        reason=REASON_MANAGER_FAILED,
                    )
            await self._wait_change(deadline, f"a {modality} manager to become available")

    def _cancel(self, pending: _Pending, exc: AllmError) -> None:
        """Stop a request on our side and tell the manager to stop it too."""
        if pending.terminal is None:
            pending.finish(exc)
            dealer = pending.inst.dealer
            if dealer is not None:
                dealer.send(p.encode(p.Cancel(pending.req.rid)))

    def cancel_all(self, exc: AllmError) -> int:
        """End every request in flight with ``exc`` and tell its manager to stop it (a drain's
        deadline); returns how many there were."""
        insts = self._by_endpoint.values()
        pendings = [q for inst in insts for q in inst.pending.values() if q.terminal is None]
        for pending in pendings:
            self._cancel(pending, exc)
        return len(pendings)

    def _after_death(self, in_flight: Sequence[_Pending], exc: AllmError, slots: int) -> None:
        """An instance died with these requests open: fail what may have run, resend the rest."""
        unheard = slots - sum(1 for q in in_flight if q.started and q.terminal is None)
        for pending in sorted(in_flight, key=lambda q: q.sent):
            if not pending.started and unheard > 0:
                unheard -= 1
                pending.started = True  # among the oldest: it may have started unheard
            self._resend_or_fail(pending, exc)

    def _resend_or_fail(self, pending: _Pending, exc: AllmError) -> None:
        """The instance holding this request is gone: send it again if it never started."""
        if pending.terminal is not None:
            return
        if pending.started or pending.next_seq or pending.resends >= MAX_RESENDS:
            pending.finish(exc)
            return
        pending.inst.pending.pop(pending.req.rid, None)
        pending.resends += 1
        log.info("request %d had not started on %s: sending it again", pending.req.rid, pending.inst.endpoint)
        task = asyncio.get_running_loop().create_task(self._resend(pending))
        self._resending.add(task)
        task.add_done_callback(self._resending.discard)

    async def _resend(self, pending: _Pending) -> None:
        req = pending.req
        try:
            await self._place(pending.inst.modality, req, pending.deadline, pending)
        except AllmError as exc:
            pending.finish(exc)
            return
        if pending.terminal is not None:  # its deadline passed while it waited
            pending.inst.pending.pop(req.rid, None)

    def _expire(self, pending: _Pending) -> None:
        timeout_s = pending.req.timeout_ms / 1000
        self._cancel(pending, DeadlineError(f"request passed its deadline of {timeout_s:g} s"))

    # -- incoming --------------------------------------------------------------

    def _on_message_for(self, inst: _Instance) -> Any:
        def on_message(frames: list[bytes]) -> None:
            try:
                msg = p.decode(frames)
            except p.ProtocolError as exc:
                self._on_bad_frame(inst, exc)
                return
            # Only a frame we understood proves the manager alive.
            inst.last_heard = time.monotonic()
            match msg:
                case p.Chunk():
                    pending = inst.pending.get(msg.rid)
                    if pending is not None:
                        self._on_chunk(pending, msg)
                case p.Started():
                    pending = inst.pending.get(msg.rid)
                    if pending is not None:
                        pending.started = True
                case p.Result():
                    pending = inst.pending.get(msg.rid)
                    if pending is not None:
                        pending.finish(msg)
                case p.Error():
                    pending = inst.pending.get(msg.rid)
                    if pending is not None:
                        error = error_for(msg.code, msg.message, reason=msg.reason, param=msg.param)
                        if msg.reason == REASON_DRAINING:
                            # It is going away and never ran this: send it elsewhere, not back.
                            if inst.live:
                                inst.live = False
                                self._notify()
                            self._resend_or_fail(pending, error)
                        else:
                            pending.finish(error)
                    else:
                        log.debug("error for no request from %s: %s", inst.endpoint, msg.message)
                case p.Heartbeat():
                    self._on_heartbeat(inst, msg)
                case _:
                    log.warning("unexpected %s from %s", type(msg).__name__, inst.endpoint)

        return on_message

    def _on_bad_frame(self, inst: _Instance, exc: p.ProtocolError) -> None:
        log.warning("bad frame from %s: %s", inst.endpoint, exc.message)
        if exc.reason == REASON_BAD_VERSION:
            # It will never understand us: fail fast until a manager that does answers.
            failure = InternalError(
                f"the {inst.modality} manager at {inst.endpoint} does not speak this gateway's "
                f"protocol: {exc.message}",
                reason=REASON_MANAGER_FAILED,
            )
            inst.live = False
            inst.failed = failure
            inst.fail_all(failure)
            self._notify()
            return
        pending = inst.pending.get(exc.rid) if exc.rid else None
        if pending is not None:
            self._cancel(
                pending,
                InternalError(
                    f"the {inst.modality} manager sent a bad frame: {exc.message}", reason=exc.reason
                ),
            )

    def _on_chunk(self, pending: _Pending, chunk: p.Chunk) -> None:
        if chunk.seq != pending.next_seq:
            self._cancel(
                pending,
                InternalError(
                    f"stream lost frames: expected chunk {pending.next_seq}, got {chunk.seq}",
                    reason=REASON_LOST_FRAMES,
                ),
            )
            return
        pending.next_seq += 1
        pending.chunks.append(chunk)
        if len(pending.chunks) > self.max_buffered_chunks:
            pending.chunks.clear()
            self._cancel(
                pending,
                InternalError(
                    f"the reader fell more than {self.max_buffered_chunks} chunks behind the stream",
                    reason=REASON_SLOW_CONSUMER,
                ),
            )
            return
        pending.wake()

    def _on_heartbeat(self, inst: _Instance, hb: p.Heartbeat) -> None:
        old = inst.heartbeat
        if old is not None and old.incarnation != hb.incarnation:
            inst.restarts_seen += 1
            if inst.pending:
                restarted = InternalError(f"the {inst.modality} manager restarted (pid {old.pid} → {hb.pid})")
                self._after_death(list(inst.pending.values()), restarted, _slots(inst))
        inst.heartbeat = hb
        if hb.incarnation == inst.dead_incarnation:
            return
        live = not hb.draining
        if live != inst.live or inst.failed is not None:
            inst.live = live
            inst.failed = None
            self._notify()

    async def _tick(self) -> None:
        """Ping every instance; declare those that stopped answering."""
        while True:
            await asyncio.sleep(self.hello_interval_s)
            now = time.monotonic()
            for inst in self._by_endpoint.values():
                if inst.dealer is not None:
                    inst.dealer.send(self._hello)
                heard = inst.last_heard
                if inst.live and heard is not None and now - heard > self.heartbeat_timeout_s:
                    inst.live = False
                    silent = DeadlineError(
                        f"the {inst.modality} manager stopped answering "
                        f"(no heartbeat for {now - heard:.1f} s)"
                    )
                    self._after_death(list(inst.pending.values()), silent, _slots(inst))
                    self._notify()

    # -- helpers -----------------------------------------------------------------

    def _instances_of(self, modality: str) -> list[_Instance]:
        insts = self._routes.get(modality)
        if not insts:
            raise UnsupportedError(f"no manager serves the {modality!r} modality")
        return insts

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineError(f"timed out waiting for {what}")
        try:
            await asyncio.wait_for(self._changed.wait(), timeout=min(left, self.hello_interval_s))
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise DeadlineError(f"timed out waiting for {what}") from None


def _serves(inst: _Instance, model: str) -> bool:
    """Whether the instance's catalog holds the model (True until its heartbeat says)."""
    hb = inst.heartbeat
    catalog = hb.extra.get("catalog") if hb is not None else None
    return not isinstance(catalog, list) or model in catalog


def _cost(inst: _Instance, model: str, prefer: str | None) -> tuple[int, bool, bool]:
    """Which instance a request goes to: the least outstanding requests; among equals, the one
    the caller prefers (it holds the conversation's prefix cache), then one that has the model
    loaded (its heartbeat says so), then the earlier one."""
    hb = inst.heartbeat
    loaded = not model or (hb is not None and model in hb.models)
    return (len(inst.pending), inst.endpoint != prefer, not loaded)


def _slots(inst: _Instance) -> int:
    """How many requests the instance runs at once, from its heartbeat (1 when unknown)."""
    slots = inst.heartbeat.extra.get("slots", 1) if inst.heartbeat is not None else 1
    return slots if isinstance(slots, int) and slots > 0 else 1


def _loop_time(deadline: float) -> float:
    """Translate a time.monotonic() deadline into the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())


class Stream:
    """One request's replies: iterate for chunks; ``result`` is set at the end.

    Leaving the ``async with`` block before the terminal cancels the request,
    so a caller that goes away (an HTTP client disconnecting) stops the engine.
    """

    def __init__(
        self,
        client: KernelClient,
        modality: str,
        req: p.Request,
        deadline: float,
        *,
        endpoint: str | None = None,
        prefer: str | None = None,
    ) -> None:
        self._client = client
        self._modality = modality
        self._endpoint = endpoint
        self._prefer = prefer
        self.req = req
        self._deadline = deadline
        self._pending: _Pending | None = None
        self.result: p.Result | None = None
        self._told = False  # the observer heard of the end

    @property
    def rid(self) -> int:
        return self.req.rid

    @property
    def endpoint(self) -> str | None:
        """The instance the request went to (last, if it was sent again)."""
        return self._pending.inst.endpoint if self._pending is not None else None

    async def __aenter__(self) -> Stream:
        try:
            self._pending = await self._client._submit(
                self._modality, self.req, self._deadline, self._endpoint, self._prefer
            )
        except AllmError as exc:  # refused before it was sent: no instance, none in time
            self._ended(exc)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        pending = self._pending
        if pending is not None and pending.terminal is None:
            abandoned = CancelledError("the caller stopped reading")
            self._client._cancel(pending, abandoned)
            self._ended(abandoned)

    def _ended(self, terminal: p.Result | AllmError) -> None:
        observer = self._client.observer
        if observer is not None and not self._told:
            self._told = True
            observer.end(self.req, terminal)

    def __aiter__(self) -> AsyncIterator[p.Chunk]:
        return self

    async def __anext__(self) -> p.Chunk:
        pending = self._pending
        if pending is None:
            raise RuntimeError("use the stream inside 'async with'")
        while True:
            if pending.chunks:
                if self._client.observer is not None:
                    self._client.observer.chunk(self.req)
                return pending.chunks.popleft()
            terminal = pending.terminal
            if terminal is not None:
                self._ended(terminal)
                if isinstance(terminal, AllmError):
                    raise terminal
                self.result = terminal
                raise StopAsyncIteration
            pending.waiter = asyncio.get_running_loop().create_future()
            try:
                await pending.waiter
            finally:
                pending.waiter = None
