"""The wire protocol: one frozen dataclass per message, and their msgpack encoding.

A message travels as a ZeroMQ multipart message::

    DEALER (client)                          ROUTER (manager)
    [header, blob0, blob1, ...]   ──────►    [peer id, header, blob0, ...]
                                  ◄──────    [peer id, header, blob0, ...]

``header`` is a msgpack map with string keys: ``v`` (protocol version), ``k``
(message kind) and the kind's own fields, in a fixed order so the bytes are
stable (tests pin them).  Big payloads (audio, PNG bytes) never go inside the
map: they are the frames after it, and ``n`` in the header counts them.

Kinds:

    hello   client → manager   register for heartbeats; also a liveness ping
    req     client → manager   one operation: rid, op, model, params, timeout_ms, stream
                               (and tag, the HTTP request id for the manager's logs, if any)
    cancel  client → manager   stop request rid
    start   manager → client   a worker began running request rid (until then it
                               only waited in line, and may be sent elsewhere)
    chunk   manager → client   one piece of a streaming reply, seq 0, 1, 2, …
    result  manager → client   terminal: success
    error   manager → client   terminal: code, message, reason, param
    hb      manager → client   heartbeat with the manager's state
    bye     both ways          a manager about to close sends ``bye`` after its last frame to
                               a client; the client answers with the same ``seq`` once it
                               has read it, so the manager knows every earlier frame was read
                               before it disconnects (a ZMQ_IMMEDIATE DEALER drops what it
                               has received but not read when its connection closes)

Every request gets exactly one terminal frame (result or error).  This is the
only module that touches msgpack; ``decode`` validates everything and raises
``ProtocolError`` instead of trusting a peer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Final

import msgpack

from allm.kernel.codes import REASON_BAD_FRAME, REASON_BAD_VERSION, Code

VERSION: Final = 3  # 2: the start message; 3: bye

Params = dict[str, Any]


class ProtocolError(Exception):
    """A frame that cannot be accepted; ``rid`` is set when the frame named one."""

    def __init__(self, message: str, *, reason: str = REASON_BAD_FRAME, rid: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.rid = rid


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    client: str


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    rid: int
    op: str
    model: str = ""
    params: Params = dataclasses.field(default_factory=dict)
    timeout_ms: int = 0  # relative, so it survives clocks that differ between hosts; 0 = none
    stream: bool = False
    blobs: tuple[bytes, ...] = ()
    tag: str = ""  # the caller's request id, for the manager's log lines; sent only when set


#: the longest tag a manager accepts
MAX_TAG = 128


@dataclasses.dataclass(frozen=True, slots=True)
class Cancel:
    rid: int


@dataclasses.dataclass(frozen=True, slots=True)
class Started:
    rid: int


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    rid: int
    seq: int
    data: Params
    blobs: tuple[bytes, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    rid: int
    data: Params
    blobs: tuple[bytes, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Error:
    rid: int
    code: Code
    message: str
    reason: str = ""
    param: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    pid: int
    incarnation: str  # random per process start: a change means the manager restarted
    modality: str
    instance: int
    models: tuple[str, ...]  # models loaded now
    active: int  # requests being served
    queued: int  # requests waiting for a slot
    capacity: int  # most requests it accepts at once (slots + queue)
    memory_bytes: int  # resident set size
    draining: bool = False
    extra: Params = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class Bye:
    seq: int  # the manager's count of byes to this peer: only the answer to the last one counts


Message = Hello | Request | Cancel | Started | Chunk | Result | Error | Heartbeat | Bye

_KIND: Final[dict[type, str]] = {
    Hello: "hello",
    Request: "req",
    Cancel: "cancel",
    Started: "start",
    Chunk: "chunk",
    Result: "result",
    Error: "error",
    Heartbeat: "hb",
    Bye: "bye",
}


def encode_chunk(rid: int, seq: int, data: Params) -> list[bytes]:
    """``encode(Chunk(rid, seq, data))`` without building the message: the token hot path."""
    return [
        msgpack.packb({"v": VERSION, "k": "chunk", "rid": rid, "seq": seq, "data": data}, use_bin_type=True)
    ]


def encode(msg: Message) -> list[bytes]:
    """The frames of one message: the header, then its blobs."""
    blobs: Sequence[bytes] = ()
    head: dict[str, Any] = {"v": VERSION, "k": _KIND[type(msg)]}
    match msg:
        case Request():
            head.update(
                rid=msg.rid,
                op=msg.op,
                model=msg.model,
                params=msg.params,
                timeout_ms=msg.timeout_ms,
                stream=msg.stream,
            )
            if msg.tag:
                head["tag"] = msg.tag
            blobs = msg.blobs
        case Chunk():
            head.update(rid=msg.rid, seq=msg.seq, data=msg.data)
            blobs = msg.blobs
        case Result():
            head.update(rid=msg.rid, data=msg.data)
            blobs = msg.blobs
        case Error():
            head.update(
                rid=msg.rid,
                code=int(msg.code),
                message=msg.message,
                reason=msg.reason,
                param=msg.param,
            )
        case Cancel() | Started():
            head["rid"] = msg.rid
        case Hello():
            head["client"] = msg.client
        case Bye():
            head["seq"] = msg.seq
        case Heartbeat():
            head.update(
                pid=msg.pid,
                incarnation=msg.incarnation,
                modality=msg.modality,
                instance=msg.instance,
                models=list(msg.models),
                active=msg.active,
                queued=msg.queued,
                capacity=msg.capacity,
                memory_bytes=msg.memory_bytes,
                draining=msg.draining,
                extra=msg.extra,
            )
    if blobs:
        head["n"] = len(blobs)
    return [msgpack.packb(head, use_bin_type=True), *blobs]


def decode(frames: Sequence[bytes]) -> Message:
    """Parse and validate one message; raises ProtocolError on anything unexpected."""
    if not frames:
        raise ProtocolError("empty message")
    try:
        head = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not msgpack: {exc}") from exc
    if not isinstance(head, dict):
        raise ProtocolError(f"header is a {type(head).__name__}, not a map")
    # Fast path for the hottest message, a token chunk: the same checks, inlined.
    if (
        len(frames) == 1
        and head.get("k") == "chunk"
        and head.get("v") == VERSION
        and len(head) == 5
        and type(head.get("rid")) is int
        and type(head.get("seq")) is int
        and type(head.get("data")) is dict
    ):
        return Chunk(head["rid"], head["seq"], head["data"])
    rid = head.get("rid", 0)
    if not isinstance(rid, int) or isinstance(rid, bool):
        rid = 0
    version = head.get("v")
    if version != VERSION:
        raise ProtocolError(
            f"protocol version {version!r} is not supported (this peer speaks {VERSION})",
            reason=REASON_BAD_VERSION,
            rid=rid,
        )
    blobs = tuple(bytes(f) for f in frames[1:])
    if head.get("n", 0) != len(blobs):
        raise ProtocolError(f"header announces {head.get('n', 0)!r} blobs, {len(blobs)} arrived", rid=rid)
    kind = head.get("k")
    f = _Fields(head, rid)
    match kind:
        case "req":
            return Request(
                rid=f.get_int("rid"),
                op=f.get_str("op"),
                model=f.get_str("model"),
                params=f.get_map("params"),
                timeout_ms=f.get_int("timeout_ms"),
                stream=f.get_bool("stream"),
                blobs=blobs,
                tag=f.get_tag(),
            )
        case "chunk":
            return Chunk(rid=f.get_int("rid"), seq=f.get_int("seq"), data=f.get_map("data"), blobs=blobs)
        case "result":
            return Result(rid=f.get_int("rid"), data=f.get_map("data"), blobs=blobs)
        case "error":
            number = f.get_int("code")
            try:
                code = Code(number)
            except ValueError:
                raise ProtocolError(f"unknown error code {number}", rid=rid) from None
            if code is Code.OK:  # an error frame must carry an error
                raise ProtocolError("an error frame carries code 0 (OK)", rid=rid)
            return Error(
                rid=f.get_int("rid"),
                code=code,
                message=f.get_str("message"),
                reason=f.get_str("reason"),
                param=f.get_str("param"),
            )
        case "cancel":
            return Cancel(rid=f.get_int("rid"))
        case "start":
            return Started(rid=f.get_int("rid"))
        case "hello":
            return Hello(client=f.get_str("client"))
        case "bye":
            return Bye(seq=f.get_int("seq"))
        case "hb":
            return Heartbeat(
                pid=f.get_int("pid"),
                incarnation=f.get_str("incarnation"),
                modality=f.get_str("modality"),
                instance=f.get_int("instance"),
                models=tuple(f.get_str_list("models")),
                active=f.get_int("active"),
                queued=f.get_int("queued"),
                capacity=f.get_int("capacity"),
                memory_bytes=f.get_int("memory_bytes"),
                draining=f.get_bool("draining"),
                extra=f.get_map("extra"),
            )
        case _:
            raise ProtocolError(f"unknown message kind {kind!r}", rid=rid)


class _Fields:
    """Typed access to a header's fields; every miss is a ProtocolError naming the field."""

    __slots__ = ("head", "rid")

    def __init__(self, head: dict[str, Any], rid: int) -> None:
        self.head = head
        self.rid = rid

    def _get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self.head:
            raise ProtocolError(f"{self.head.get('k')!r} message lacks field {key!r}", rid=self.rid)
        value = self.head[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError(
                f"field {key!r} is {type(value).__name__}, expected {_name(kind)}", rid=self.rid
            )
        return value

    def get_int(self, key: str) -> int:
        value: int = self._get(key, int)
        return value

    def get_str(self, key: str) -> str:
        value: str = self._get(key, str)
        return value

    def get_bool(self, key: str) -> bool:
        value: bool = self._get(key, bool)
        return value

    def get_map(self, key: str) -> Params:
        value: Params = self._get(key, dict)
        return value

    def get_tag(self) -> str:
        if "tag" not in self.head:
            return ""
        tag = self.get_str("tag")
        if len(tag) > MAX_TAG or not tag.isprintable():
            raise ProtocolError(
                f"field 'tag' must be printable and at most {MAX_TAG} characters", rid=self.rid
            )
        return tag

    def get_str_list(self, key: str) -> list[str]:
        value: list[Any] = self._get(key, list)
        if not all(isinstance(item, str) for item in value):
            raise ProtocolError(f"field {key!r} must hold strings only", rid=self.rid)
        return value


def _name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__
