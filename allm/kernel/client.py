"""What the gateway calls: request, stream and cancel over the managers' sockets.

One DEALER per manager instance carries every in-flight request to it,
multiplexed by request id (``instances.py`` keeps each instance and reads its
replies).  The client keeps the protocol's invariant for its callers: every
request ends with exactly one terminal (a result, or a typed ``AllmError``).
When the manager cannot send it, the client makes it up:

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

Which instance a request goes to is ``placement.py``'s pure choice; while none
is live, requests wait (within their deadline), and a failed one fails them at once.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Protocol, TypedDict, Unpack

from allm.kernel import curve, placement
from allm.kernel import protocol as p
from allm.kernel.codes import (
    REASON_MANAGER_FAILED,
    REASON_QUEUE_FULL,
    AllmError,
    CancelledError,
    DeadlineError,
    InternalError,
    UnsupportedError,
)
from allm.kernel.instances import Instance, InstanceView, Pending
from allm.kernel.transport import Dealer, client_context, new_routing_id

log = logging.getLogger("allm.client")

DEFAULT_TIMEOUT_S = 600.0
MAX_RESENDS = 3  # a request that was never started is sent again at most this often


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


class RequestOptions(TypedDict, total=False):
    """What a request may say besides its modality and operation."""

    model: str  # the catalog id ("" for none)
    params: p.Params
    blobs: tuple[bytes, ...]
    timeout_s: float | None  # DEFAULT_TIMEOUT_S when absent or None
    # To that instance only (a reload's new catalog goes to each); one that never started
    # may still be sent to another.
    endpoint: str | None
    # the instances to choose among equally loaded ones, best first (they hold the prefix)
    prefer: str | tuple[str, ...] | None
    # what the request continues (a conversation): the instance that took this key last
    # comes after ``prefer``, and the instance this request goes to becomes its home
    affinity: str | None


class Homes:
    """Each affinity key's instance: the one that took it last (the newest keys kept)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._homes: collections.OrderedDict[str, str] = collections.OrderedDict()

    def get(self, key: str | None) -> str | None:
        return None if key is None else self._homes.get(key)

    def put(self, key: str | None, instance: str | None) -> None:
        if key is None or instance is None:
            return
        self._homes[key] = instance
        self._homes.move_to_end(key)
        while len(self._homes) > self.size:
            self._homes.popitem(last=False)


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
        self._absence = (
            None if absent_after_s is None else placement.Absence(absent_after_s, since=time.monotonic())
        )
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.hello_interval_s = hello_interval_s
        self.max_buffered_chunks = max_buffered_chunks
        self._routes: dict[str, list[Instance]] = {
            modality: [
                Instance(
                    modality,
                    endpoint,
                    changed=self._notify,
                    orphaned=self._resend_or_fail,
                    max_buffered_chunks=max_buffered_chunks,
                )
                for endpoint in endpoints
            ]
            for modality, endpoints in routes.items()
        }
        self._by_endpoint = {i.endpoint: i for insts in self._routes.values() for i in insts}
        self._rids = itertools.count(1)
        self.homes = Homes()
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
                inst.on_message,
                # Unsupervised (or on another host), the closing connection is how a
                # manager's death is known at once.
                on_disconnect=inst.on_disconnect
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
        if inst is not None:
            inst.down(exc, failed=failed)

    def last_heard(self, endpoint: str) -> float | None:
        """time.monotonic() of the last message from this instance, if any."""
        inst = self._by_endpoint.get(endpoint)
        return None if inst is None else inst.last_heard

    def instances(self) -> list[InstanceView]:
        now = time.monotonic()
        return [i.view(now) for i in self._by_endpoint.values()]

    # -- requests --------------------------------------------------------------

    async def call(self, modality: str, op: str, **options: Unpack[RequestOptions]) -> p.Result:
        """One request; returns its result or raises its error."""
        async with self.stream(modality, op, stream=False, **options) as stream:
            async for _chunk in stream:
                pass
            assert stream.result is not None
            return stream.result

    def stream(
        self, modality: str, op: str, *, stream: bool = True, **options: Unpack[RequestOptions]
    ) -> Stream:
        """A streaming request: ``async with client.stream(...) as s: async for chunk in s``."""
        timeout_s = options.get("timeout_s")
        timeout = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        observer = self.observer
        req = p.Request(
            tag=observer.tag() if observer is not None else "",
            rid=next(self._rids),
            op=op,
            model=options.get("model", ""),
            params=options.get("params") or {},
            timeout_ms=max(1, int(timeout * 1000)),
            stream=stream,
            blobs=options.get("blobs", ()),
        )
        prefer = options.get("prefer") or ()
        prefer = (prefer,) if isinstance(prefer, str) else prefer
        affinity = options.get("affinity")
        home = self.homes.get(affinity)
        ask = placement.Ask(
            model=req.model,
            prefer=prefer if home is None else (*prefer, home),
            only=options.get("endpoint"),
            affinity=affinity,
        )
        return Stream(self, modality, req, time.monotonic() + timeout, ask)

    async def _submit(self, modality: str, req: p.Request, deadline: float, ask: placement.Ask) -> Pending:
        pending = await self._place(modality, req, deadline, None, ask)
        pending.deadline = deadline
        pending.timer = asyncio.get_running_loop().call_at(_loop_time(deadline), self._expire, pending)
        return pending

    async def _place(
        self, modality: str, req: p.Request, deadline: float, pending: Pending | None, ask: placement.Ask
    ) -> Pending:
        """Send a request to the instance placement chooses, waiting for one within the deadline."""
        insts = self._instances_of(modality)
        frames = p.encode(req)
        while True:
            choice = placement.place([i.candidate() for i in insts], ask, time.monotonic(), self._absence)
            if isinstance(choice, placement.NoPlace):
                if choice.why is not placement.Why.WAIT:
                    raise _refused(modality, ask, choice, self._absence)
                await self._wait_change(deadline, f"a {modality} manager to become available")
                continue
            inst = self._by_endpoint[choice.key]
            assert inst.dealer is not None
            if inst.dealer.send(frames):
                if pending is None:
                    pending = Pending(inst, req)
                pending.inst = inst
                pending.sent = next(self._sends)
                inst.pending[req.rid] = pending
                self.homes.put(ask.affinity, inst.endpoint)
                return pending
            inst.live = False  # not connected: wait for its next heartbeat

    def cancel_all(self, exc: AllmError) -> int:
        """End every request in flight with ``exc`` and tell its manager to stop it (a drain's
        deadline); returns how many there were."""
        insts = self._by_endpoint.values()
        pendings = [q for inst in insts for q in inst.pending.values() if q.terminal is None]
        for pending in pendings:
            pending.cancel(exc)
        return len(pendings)

    def _resend_or_fail(self, pending: Pending, exc: AllmError) -> None:
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

    async def _resend(self, pending: Pending) -> None:
        req = pending.req
        # It held a place in line already: no capacity check.  Neither a pinned endpoint nor a
        # preference follows it: the instance they named is the one that is gone.
        ask = placement.Ask(model=req.model, resend=True)
        try:
            await self._place(pending.inst.modality, req, pending.deadline, pending, ask)
        except AllmError as exc:
            pending.finish(exc)
            return
        if pending.terminal is not None:  # its deadline passed while it waited
            pending.inst.pending.pop(req.rid, None)

    def _expire(self, pending: Pending) -> None:
        timeout_s = pending.req.timeout_ms / 1000
        pending.cancel(DeadlineError(f"request passed its deadline of {timeout_s:g} s"))

    async def _tick(self) -> None:
        """Ping every instance; declare those that stopped answering."""
        while True:
            await asyncio.sleep(self.hello_interval_s)
            now = time.monotonic()
            for inst in self._by_endpoint.values():
                if inst.dealer is not None:
                    inst.dealer.send(self._hello)
                inst.check_silence(now, self.heartbeat_timeout_s)

    # -- helpers -----------------------------------------------------------------

    def _instances_of(self, modality: str) -> list[Instance]:
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


def _refused(
    modality: str, ask: placement.Ask, no: placement.NoPlace, absence: placement.Absence | None
) -> AllmError:
    """The typed error for a request that placement found no instance for, and that may not wait."""
    match no.why:
        case placement.Why.MODEL_NOT_FOUND:
            # None at all is an answer now, not at the deadline.
            return UnsupportedError(
                f"no {modality} manager has model {ask.model!r} in its catalog",
                reason="model_not_found",
                param="model",
            )
        case placement.Why.NO_SUCH_INSTANCE:
            return UnsupportedError(f"no {modality} manager instance at {ask.only}")
        case placement.Why.AT_CAPACITY:
            return DeadlineError(
                f"every {modality} manager is at capacity ({no.among[0].capacity} requests)",
                reason=REASON_QUEUE_FULL,
            )
        case placement.Why.FAILED:
            return InternalError(
                f"the {modality} manager has failed and is not restarted: {no.among[0].failed}",
                reason=REASON_MANAGER_FAILED,
            )
        case placement.Why.ABSENT if absence is not None:
            where = ", ".join(c.key for c in no.among)
            return InternalError(
                f"no {modality} manager has answered for more than {absence.after_s:g} s "
                f"(at {where}): is `allm manager {modality}` running?",
                reason=REASON_MANAGER_FAILED,
            )
    raise ValueError(f"{no.why} is not a refusal: the request waits")


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
        self, client: KernelClient, modality: str, req: p.Request, deadline: float, ask: placement.Ask
    ) -> None:
        self._client = client
        self._modality = modality
        self._ask = ask
        self.req = req
        self._deadline = deadline
        self._pending: Pending | None = None
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
            self._pending = await self._client._submit(self._modality, self.req, self._deadline, self._ask)
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
            pending.cancel(abandoned)
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
