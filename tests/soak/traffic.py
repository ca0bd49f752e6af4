"""The soak's clients: OpenAI requests of every shape, each recorded with how it ended.

Every request is one ``Record``: when it started and ended (seconds since the
soak began), its outcome, HTTP status, error code, the terminal event of its
stream and whether content arrived before an error.  Outcomes:

    success        a complete answer (a stream: its terminal event, then the end)
    error          a coded OpenAI-shaped error: an HTTP status with its body, or in a
                   stream response.failed / a chat ``data: {"error": …}`` then [DONE]
    cancelled      the client closed the stream after a few events (orderly close)
    disconnected   the client reset its connection mid-stream
    hung           no end within the client's timeout                      (a violation)
    cut            the connection or stream ended without a terminal event  (a violation)
    malformed      an answer or error not shaped as the API says            (a violation)

Non-streaming requests and the cancelling clients use the official SDK;
complete streams are read raw (httpx2) so the wire itself is checked: the
terminal event is the last, ``[DONE]`` ends a chat stream, nothing follows.
Disconnecting clients speak HTTP/1.1 over a bare socket and reset it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import openai

from allm.gateway.errors import REASONS, STATUS
from allm.kernel.codes import Code

MODEL = "smollm2-135m-instruct"
SUCCESS, ERROR, CANCELLED, DISCONNECTED = "success", "error", "cancelled", "disconnected"
HUNG, CUT, MALFORMED = "hung", "cut", "malformed"
VIOLATIONS = (HUNG, CUT, MALFORMED)
RESPONSES_TERMINALS = ("response.completed", "response.incomplete", "response.failed")
PROMPTS = (
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "Explain what a CPU does.",
    "Count from one to ten.",
    "Tell me a fact about cats.",
    "Why is the sky blue?",
    "Say hello in Spanish.",
)
BRIEF = "Answer in one short sentence."


@dataclasses.dataclass
class Record:
    client: str
    kind: str
    start_s: float
    end_s: float | None = None
    outcome: str = ""
    status: int | None = None
    code: str | None = None
    terminal: str | None = None
    content_before_error: bool = False
    detail: str = ""

    def in_flight_at(self, t: float) -> bool:
        return self.start_s <= t and (self.end_s is None or self.end_s > t)


def expected_status(code: str) -> int | None:
    """The HTTP status allm/gateway/errors.py gives an error code; None for codes of the HTTP edge."""
    if code in REASONS:
        return REASONS[code][0]
    try:
        return STATUS[Code[code.upper()]][0]
    except KeyError:
        return None


def error_problem(payload: Any, status: int | None) -> str | None:
    """What is wrong with an error body ``{"error": {message, type, param, code}}``, or None."""
    if not isinstance(payload, dict) or set(payload) != {"error"}:
        return f"error body is not {{'error': …}}: {str(payload)[:200]}"
    err = payload["error"]
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return f"error object lacks message/type/param/code: {str(err)[:200]}"
    if not (isinstance(err["message"], str) and err["message"]):
        return "error message is empty"
    if not (isinstance(err["type"], str) and err["type"]):
        return "error type is empty"
    if not (isinstance(err["code"], str) and err["code"]):
        return f"error code is not a string: {err['code']!r}"
    if err["param"] is not None and not isinstance(err["param"], str):
        return f"error param is {err['param']!r}"
    expected = expected_status(err["code"])
    if status is not None and expected is not None and status != expected:
        return f"code {err['code']} came with HTTP {status}, allm/gateway/errors.py says {expected}"
    return None


def _record_status_error(rec: Record, exc: openai.APIStatusError) -> None:
    rec.status = exc.status_code
    try:
        payload = exc.response.json()
    except ValueError:
        payload = exc.response.text
    _set_error(rec, payload, exc.status_code)


def _set_error(rec: Record, payload: Any, status: int | None) -> None:
    problem = error_problem(payload, status)
    if problem is not None:
        rec.outcome, rec.detail = MALFORMED, problem
        return
    rec.outcome = ERROR
    rec.code = payload["error"]["code"]
    rec.detail = payload["error"]["message"][:200]


class ChatStreamCheck:
    """A chat stream on the wire: chunks, a finish_reason (or one error line), then [DONE], then nothing."""

    def __init__(self, rec: Record) -> None:
        self.rec = rec
        self.events = 0
        self.content = False
        self.finished = False
        self.error: Any = None
        self.done = False
        self.problem = ""

    def feed(self, data: str) -> None:
        self.events += 1
        if self.done:
            self.problem = self.problem or "data after [DONE]"
        elif data == "[DONE]":
            self.done = True
        elif self.error is not None:
            self.problem = self.problem or "data after the error line other than [DONE]"
        else:
            try:
                obj = json.loads(data)
            except ValueError:
                self.problem = self.problem or f"not JSON: {data[:100]}"
                return
            if isinstance(obj, dict) and "error" in obj:
                self.error = obj
                return
            for choice in obj.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    self.content = True
                if choice.get("finish_reason"):
                    self.finished = True

    @property
    def ended(self) -> bool:
        return self.done

    def conclude(self) -> None:
        rec = self.rec
        if self.problem:
            rec.outcome, rec.detail = MALFORMED, self.problem
        elif not self.done:
            rec.outcome, rec.detail = CUT, f"stream ended without [DONE] after {self.events} events"
        elif self.error is not None:
            rec.terminal = "error+[DONE]"
            rec.content_before_error = self.content
            _set_error(rec, self.error, None)
        elif not self.finished:
            rec.outcome, rec.detail = MALFORMED, "[DONE] without a finish_reason"
        else:
            rec.outcome, rec.terminal = SUCCESS, "[DONE]"


class ResponsesStreamCheck:
    """A Responses stream: rising sequence numbers, one terminal event, then nothing."""

    def __init__(self, rec: Record) -> None:
        self.rec = rec
        self.events = 0
        self.content = False
        self.terminal: dict[str, Any] | None = None
        self.problem = ""

    def feed(self, data: str) -> None:
        try:
            obj = json.loads(data)
        except ValueError:
            self.problem = self.problem or f"not JSON: {data[:100]}"
            return
        if self.terminal is not None:
            self.problem = self.problem or f"{obj.get('type')} after {self.terminal['type']}"
        if obj.get("sequence_number") != self.events:
            self.problem = self.problem or f"sequence_number {obj.get('sequence_number')} at {self.events}"
        self.events += 1
        kind = obj.get("type")
        if kind == "response.output_text.delta" and obj.get("delta"):
            self.content = True
        if kind in RESPONSES_TERMINALS:
            self.terminal = obj

    @property
    def ended(self) -> bool:
        return self.terminal is not None

    def conclude(self) -> None:
        rec = self.rec
        if self.problem:
            rec.outcome, rec.detail = MALFORMED, self.problem
            return
        if self.terminal is None:
            rec.outcome, rec.detail = CUT, f"stream ended without a terminal event after {self.events}"
            return
        rec.terminal = self.terminal["type"]
        response = self.terminal.get("response") or {}
        if rec.terminal != "response.failed":
            rec.outcome = SUCCESS
            return
        error = response.get("error") or {}
        rec.content_before_error = self.content
        if response.get("status") != "failed" or not (
            isinstance(error.get("code"), str) and error["code"] and isinstance(error.get("message"), str)
        ):
            rec.outcome, rec.detail = MALFORMED, f"response.failed without a coded error: {str(error)[:200]}"
            return
        rec.outcome, rec.code, rec.detail = ERROR, error["code"], error["message"][:200]


def _check_for(api: str, rec: Record) -> ChatStreamCheck | ResponsesStreamCheck:
    return ChatStreamCheck(rec) if api == "chat" else ResponsesStreamCheck(rec)


def request_body(api: str, rng: random.Random, *, stream: bool, model: str = MODEL) -> dict[str, Any]:
    """A small request of either API: 8 to 48 tokens, so each is quick."""
    prompt = rng.choice(PROMPTS)
    limit = rng.randint(8, 48)
    if api == "chat":
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "system", "content": BRIEF}, {"role": "user", "content": prompt}],
            "max_tokens": limit,
        }
    else:
        body = {"model": model, "instructions": BRIEF, "input": prompt, "max_output_tokens": limit}
        body["store"] = rng.random() < 0.5
    if rng.random() < 0.5:
        body["temperature"] = 0
    if stream:
        body["stream"] = True
    return body


PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}


class Traffic:
    """The clients' shared connections and the list every request is recorded in."""

    def __init__(self, base_url: str, started: float, client_timeout_s: float) -> None:
        self.base_url = base_url
        self.port = int(base_url.rsplit(":", 1)[1])
        self.started = started
        self.client_timeout_s = client_timeout_s
        self.records: list[Record] = []
        limits = httpx2.Limits(max_connections=256, max_keepalive_connections=64)
        timeout = httpx2.Timeout(client_timeout_s, connect=10.0)
        self.http = httpx2.AsyncClient(base_url=base_url, timeout=timeout, limits=limits)
        self.sdk = openai.AsyncOpenAI(
            base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=client_timeout_s
        )

    def now(self) -> float:
        return time.monotonic() - self.started

    async def close(self) -> None:
        await self.sdk.close()
        await self.http.aclose()

    def in_flight_at(self, t: float) -> int:
        return sum(1 for r in self.records if r.in_flight_at(t))

    async def run(self, client: str, kind: str, act: Callable[[Record], Awaitable[None]]) -> Record:
        """Run one request under the client timeout; it always ends with an outcome."""
        rec = Record(client, kind, self.now())
        self.records.append(rec)
        try:
            async with asyncio.timeout(self.client_timeout_s):
                await act(rec)
        except TimeoutError:
            rec.outcome, rec.detail = HUNG, f"no end within {self.client_timeout_s:g} s"
        except openai.APITimeoutError:
            rec.outcome, rec.detail = HUNG, "the SDK timed out"
        except openai.APIConnectionError as exc:
            rec.outcome, rec.detail = CUT, f"connection error: {exc.__cause__!r}"
        except httpx2.TimeoutException:
            rec.outcome, rec.detail = HUNG, "httpx2 timed out"
        except (httpx2.HTTPError, OSError, asyncio.IncompleteReadError) as exc:
            rec.outcome, rec.detail = CUT, f"{type(exc).__name__}: {exc}"[:200]
        rec.end_s = self.now()
        if not rec.outcome:
            rec.outcome, rec.detail = MALFORMED, "the client recorded no outcome"
        return rec

    # -- the request shapes ----------------------------------------------------------

    async def plain(self, rec: Record, api: str, body: dict[str, Any]) -> None:
        """A non-streaming request through the SDK."""
        try:
            if api == "chat":
                reply = await self.sdk.chat.completions.create(**body)
                rec.status = 200
                choice = reply.choices[0] if reply.choices else None
                finish = choice.finish_reason if choice else None
                ok = choice is not None and isinstance(choice.message.content, str)
                ok = ok and finish in ("stop", "length")
            else:
                response = await self.sdk.responses.create(**body)
                rec.status = 200
                ok = response.status in ("completed", "incomplete") and isinstance(response.output_text, str)
                finish = response.status
        except openai.APIStatusError as exc:
            _record_status_error(rec, exc)
            return
        rec.outcome = SUCCESS if ok else MALFORMED
        rec.terminal = finish
        if not ok:
            rec.detail = f"unexpected answer: {finish}"

    async def full_stream(self, rec: Record, api: str, body: dict[str, Any]) -> None:
        """A stream read to its end, raw, with the wire checked."""
        async with self.http.stream("POST", PATHS[api], json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                data = await resp.aread()
                try:
                    payload = json.loads(data)
                except ValueError:
                    payload = data[:200]
                _set_error(rec, payload, resp.status_code)
                return
            if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                rec.outcome, rec.detail = MALFORMED, f"content-type {resp.headers.get('content-type')}"
                return
            check = _check_for(api, rec)
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    check.feed(line.removeprefix("data: "))
            check.conclude()

    async def cancelling_stream(self, rec: Record, api: str, body: dict[str, Any], after: int) -> None:
        """An SDK stream closed after a few events, unless it ended first."""
        seen = 0
        content = False
        try:
            if api == "chat":
                stream: Any = await self.sdk.chat.completions.create(**body)
            else:
                stream = await self.sdk.responses.create(**body)
            rec.status = 200
            async with stream:
                async for event in stream:
                    seen += 1
                    if api == "chat":
                        choice = event.choices[0] if event.choices else None
                        content |= bool(choice and choice.delta.content)
                        if choice and choice.finish_reason:
                            rec.terminal = "finish_reason"
                    else:
                        content |= event.type == "response.output_text.delta"
                        if event.type in RESPONSES_TERMINALS:
                            rec.terminal = event.type
                            failed = event.type == "response.failed"
                            error = event.response.error if failed else None
                            if failed:
                                rec.content_before_error = content
                                if error is None or not error.code:
                                    rec.outcome, rec.detail = MALFORMED, "response.failed without a code"
                                else:
                                    rec.outcome, rec.code = ERROR, error.code
                                    rec.detail = error.message[:200]
                                return
                    if seen >= after and rec.terminal is None:
                        rec.outcome = CANCELLED
                        return
        except openai.APIStatusError as exc:
            _record_status_error(rec, exc)
            return
        except openai.APIConnectionError:
            raise
        except openai.APIError as exc:  # the chat error line inside a stream
            rec.content_before_error = content
            rec.terminal = "error"
            _set_error(rec, {"error": exc.body}, None)
            return
        if rec.terminal is None:
            rec.outcome, rec.detail = CUT, f"the SDK stream ended after {seen} events with no terminal"
        else:
            rec.outcome = SUCCESS

    async def disconnecting_stream(self, rec: Record, api: str, body: dict[str, Any], after: int) -> None:
        """HTTP/1.1 over a bare socket: read a few events, then reset the connection."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        try:
            payload = json.dumps(body).encode()
            head = (
                f"POST {PATHS[api]} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            )
            writer.write(head.encode() + payload)
            await writer.drain()
            status_line = await reader.readline()
            rec.status = int(status_line.split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            if rec.status != 200:
                data = await reader.readexactly(int(headers.get("content-length", "0")))
                try:
                    error = json.loads(data)
                except ValueError:
                    error = data[:200]
                _set_error(rec, error, rec.status)
                return
            check = _check_for(api, rec)
            pending = b""
            while not check.ended and check.events < after:
                size = int((await reader.readline()).strip() or b"0", 16)  # chunked: size, data, CRLF
                if size == 0:  # the last chunk, or the server closed the connection: did it end?
                    check.conclude()
                    return
                pending += (await reader.readexactly(size + 2))[:-2]
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    if raw.startswith(b"data: "):
                        check.feed(raw.decode().removeprefix("data: "))
            if check.ended:
                check.conclude()
            else:
                rec.outcome = DISCONNECTED
                rec.content_before_error = check.content
        finally:
            writer.transport.abort()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


#: request kind → weight; each client picks one per request with its own seeded random
KINDS: dict[str, int] = {
    "chat": 3,
    "responses": 3,
    "chat-stream": 3,
    "responses-stream": 3,
    "chat-cancel": 1,
    "responses-cancel": 1,
    "chat-disconnect": 1,
    "responses-disconnect": 1,
}


async def one_request(traffic: Traffic, client: str, rng: random.Random) -> Record:
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    api, _, shape = kind.partition("-")
    body = request_body(api, rng, stream=bool(shape))
    after = rng.randint(2, 5)

    async def act(rec: Record) -> None:
        if not shape:
            await traffic.plain(rec, api, body)
        elif shape == "stream":
            await traffic.full_stream(rec, api, body)
        elif shape == "cancel":
            await traffic.cancelling_stream(rec, api, body, after)
        else:
            await traffic.disconnecting_stream(rec, api, body, after)

    return await traffic.run(client, kind, act)


async def client_loop(traffic: Traffic, index: int, seed: int, stop_s: float) -> None:
    """One client: request after request until the soak's time is up."""
    rng = random.Random(seed * 1000 + index)
    name = f"c{index:02d}"
    while traffic.now() < stop_s:
        await one_request(traffic, name, rng)


async def probe(traffic: Traffic, client: str, model: str = MODEL, max_tokens: int = 8) -> Record:
    """A short non-streaming chat request: does the service answer?"""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": max_tokens}

    async def act(rec: Record) -> None:
        await traffic.plain(rec, "chat", body)

    return await traffic.run(client, "chat", act)
