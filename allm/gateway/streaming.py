"""The pump every streaming endpoint runs: kernel chunks in, framed events out, errors in the stream.

An API renders; the pump moves. Each room gives ``pump`` (or ``relay``) two functions, ``feed``
(one chunk's data → the text to send, "" for nothing) and ``finish`` (the final result → the
closing text), and the pump does the rest: it waits for the first chunk, answers, sends what
each chunk makes, and ends the stream. A request the engine refuses at once (context too long,
model broken) is still a plain HTTP error; once the stream has begun, an error travels inside
it, as the API's own error event, and the stream is closed.

A ``Framing`` is how a stream looks on the wire: its content type and headers, and the last
words of a stream that fails. OpenAI's APIs stream server-sent events (``SSE``); a stream of
JSON lines (Ollama's application/x-ndjson) is another ``Framing`` handed to the same pump.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from sanic import Request

from allm.gateway.errors import describe
from allm.kernel.client import Stream
from allm.kernel.codes import AllmError
from allm.kernel.protocol import Chunk, Result

#: the line that ends an OpenAI event stream, after its last event or its error
DONE = "data: [DONE]\n\n"


def sse(payload: Mapping[str, Any], event: str | None = None) -> str:
    """One server-sent event: compact JSON data, named by ``event`` where the API names its events."""
    data = f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
    return data if event is None else f"event: {event}\n{data}"


def _sse_failed(exc: AllmError) -> str:
    """After the stream began, an error is one data line, then [DONE]."""
    _status, payload, _headers = describe(exc)
    return sse(payload) + DONE


@dataclasses.dataclass(frozen=True, slots=True)
class Framing:
    """How a stream is written on the wire: its content type, its headers, its last words on an error."""

    content_type: str
    headers: Mapping[str, str]
    failed: Callable[[AllmError], str]


SSE = Framing("text/event-stream", {"Cache-Control": "no-cache"}, _sse_failed)


async def begin(request: Request, framing: Framing = SSE) -> Any:
    """Answer with a stream now: the response to send on (its headers go out with the first send)."""
    return await request.respond(content_type=framing.content_type, headers=dict(framing.headers))


async def open_stream(
    request: Request, stream: Stream, framing: Framing = SSE
) -> tuple[Any, Chunk | None, AsyncIterator[Chunk]]:
    """Wait for the first chunk, then answer with a stream.

    Returns the response, the first chunk (None if the reply has none) and the rest.
    """
    pieces = aiter(stream)
    opening = await anext(pieces, None)
    return await begin(request, framing), opening, pieces


async def relay(
    response: Any,
    stream: Stream,
    pieces: AsyncIterator[Chunk],
    *,
    feed: Callable[[dict[str, Any]], str],
    finish: Callable[[Result], str | Awaitable[str]],
    failed: Callable[[AllmError], str],
    first: str = "",
) -> None:
    """Send ``first``, each chunk as ``feed`` renders it, then ``finish``'s text, and end the stream.

    ``finish`` may be a coroutine (a response stored before its last event). A kernel error,
    from the stream or from ``finish``, sends ``failed``'s text instead of what was left.
    """
    if first:
        await response.send(first)
    try:
        async for piece in pieces:
            if out := feed(piece.data):
                await response.send(out)
        assert stream.result is not None
        tail = finish(stream.result)
        if not isinstance(tail, str):
            tail = await tail
    except AllmError as exc:
        await response.send(failed(exc))
    else:
        await response.send(tail)
    await response.eof()


async def pump(
    request: Request,
    stream: Stream,
    *,
    feed: Callable[[dict[str, Any]], str],
    finish: Callable[[Result], str | Awaitable[str]],
    first: str = "",
    framing: Framing = SSE,
) -> None:
    """Run a kernel request (``client.stream(...)``, not yet entered) as the client's stream.

    ``first`` and the first chunk go out together; a client that goes away cancels the request.
    """
    async with stream:
        response, opening, pieces = await open_stream(request, stream, framing)
        if opening is not None:
            first += feed(opening.data)
        await relay(response, stream, pieces, feed=feed, finish=finish, failed=framing.failed, first=first)
