"""The shared stream pump: the bytes it sends, where errors go, and another framing through it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
from sanic import Request, Sanic

from allm.gateway import errors
from allm.gateway.errors import describe
from allm.gateway.streaming import DONE, SSE, Framing, pump, relay, sse
from allm.kernel.codes import AllmError, OomRamError, UnsupportedError
from allm.kernel.protocol import Chunk, Result


class Stream:
    """A stand-in for a kernel request: its chunks, then ``error`` (after ``fail_at`` chunks) or a result."""

    def __init__(
        self, chunks: list[dict[str, Any]], error: AllmError | None = None, fail_at: int = 0
    ) -> None:
        self.chunks = chunks
        self.error = error
        self.fail_at = fail_at
        self.result: Result | None = None
        self.entered = self.left = False

    async def __aenter__(self) -> Stream:
        self.entered = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.left = True

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        for seq, data in enumerate(self.chunks):
            if self.error is not None and seq == self.fail_at:
                raise self.error
            yield Chunk(1, seq, data)
        if self.error is not None:
            raise self.error
        self.result = Result(rid=1, data={"said": len(self.chunks)})


def ndjson(payload: dict[str, Any]) -> str:
    return json.dumps(payload) + "\n"


#: Ollama's framing, as a later room would write it: JSON lines, the error as one line of its own
NDJSON = Framing(
    "application/x-ndjson", {}, lambda exc: ndjson({"error": describe(exc)[1]["error"]["message"]})
)
_apps = itertools.count()


@contextlib.asynccontextmanager
async def served(stream: Stream, framing: Framing = SSE) -> AsyncIterator[httpx2.AsyncClient]:
    """One route that pumps ``stream``: a text chunk is a line, any other chunk says nothing."""
    app = Sanic(f"allm-streaming-{next(_apps)}", configure_logging=False, request_class=errors.EdgeRequest)
    app.config.TOUCHUP = False  # Sanic rewrites its own methods once per process: a second app breaks
    app.error_handler.add(Exception, errors.handle)
    line = sse if framing is SSE else ndjson

    @app.post("/s")
    async def route(request: Request) -> None:
        await pump(
            request,
            stream,  # type: ignore[arg-type]
            first=line({"first": True}),
            feed=lambda data: line(data) if "text" in data else "",
            finish=lambda result: line(result.data) + (DONE if framing is SSE else ""),
            framing=framing,
        )

    inbox: asyncio.Queue[dict] = asyncio.Queue()
    outbox: asyncio.Queue[dict] = asyncio.Queue()
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://allm.test")
    try:
        yield http
    finally:
        await http.aclose()
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await lifespan


async def test_an_event_stream_sends_first_with_the_first_chunk_skips_silent_chunks_and_ends():
    stream = Stream([{"text": "a"}, {"progress": 1}, {"text": "b"}])
    async with served(stream) as http:
        answer = await http.post("/s")
    assert (answer.status_code, answer.headers["content-type"]) == (200, "text/event-stream")
    assert answer.headers["cache-control"] == "no-cache"
    assert answer.text == (
        'data: {"first":true}\n\ndata: {"text":"a"}\n\ndata: {"text":"b"}\n\n'
        'data: {"said":3}\n\ndata: [DONE]\n\n'
    )
    assert (stream.entered, stream.left) == (True, True)


def test_an_event_is_named_only_where_the_api_names_it():
    assert sse({"type": "x", "n": 1}) == 'data: {"type":"x","n":1}\n\n'
    assert sse({"type": "x"}, event="x") == 'event: x\ndata: {"type":"x"}\n\n'


async def test_an_error_before_the_first_chunk_is_a_plain_http_error():
    async with served(Stream([{"text": "a"}], UnsupportedError("no such thing"))) as http:
        answer = await http.post("/s")
    assert answer.headers["content-type"] == "application/json"
    assert (answer.status_code, answer.json()["error"]["message"]) == (400, "no such thing")


async def test_an_error_after_the_stream_began_is_its_last_event():
    async with served(Stream([{"text": "a"}, {"text": "b"}], OomRamError("out of memory"), 1)) as http:
        answer = await http.post("/s")
    assert answer.status_code == 200
    *events, error, done = answer.text.split("\n\n")[:-1]
    assert events == ['data: {"first":true}', 'data: {"text":"a"}']
    assert json.loads(error.removeprefix("data: ")) == describe(OomRamError("out of memory"))[1]
    assert done + "\n\n" == DONE


async def test_another_framing_runs_through_the_same_pump():
    async with served(Stream([{"text": "a"}]), NDJSON) as http:
        answer = await http.post("/s")
    assert answer.headers["content-type"] == "application/x-ndjson"
    assert answer.text == '{"first": true}\n{"text": "a"}\n{"said": 1}\n'
    async with served(
        Stream([{"text": "a"}, {"text": "b"}], OomRamError("out of memory"), 1), NDJSON
    ) as http:
        answer = await http.post("/s")
    assert answer.text == '{"first": true}\n{"text": "a"}\n{"error": "out of memory"}\n'


class Sent:
    """A response that keeps what is sent on it."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.ended = False

    async def send(self, data: str) -> None:
        self.parts.append(data)

    async def eof(self) -> None:
        self.ended = True


async def test_a_finish_that_awaits_or_fails_with_a_kernel_error_ends_the_stream_its_way():
    async def stored(result: Result) -> str:  # as Responses stores the response before its last event
        return f"done {result.data['said']}"

    def broken(result: Result) -> str:
        raise OomRamError("the result broke its contract")

    for finish, last in ((stored, "done 1"), (broken, "failed: the result broke its contract")):
        stream, response = Stream([{"text": "a"}]), Sent()
        await relay(
            response,
            stream,  # type: ignore[arg-type]
            aiter(stream),
            feed=lambda data: data["text"],
            finish=finish,
            failed=lambda exc: f"failed: {exc.message}",
            first="opened",
        )
        assert (response.parts, response.ended) == (["opened", "a", last], True)
