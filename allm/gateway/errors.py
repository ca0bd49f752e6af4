"""The one table from protocol code to HTTP status, and the one error handler.

An error is described once, in OpenAI's shape::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

and leaves in the shape of the API its path belongs to (``api_of``): OpenAI's, Anthropic's
``{"type": "error", "error": {"type", "message"}}`` (with its own statuses: 529 for a full
queue) or Ollama's ``{"error": "..."}``.  ``shaped`` does the translation, for an answer and
for an error inside a stream alike.

``code`` is the protocol code's name in lower case (``oom_ram``,
``model_corrupt``, …).  A few reasons refine a code into OpenAI's own status
and code string (``context_length_exceeded``, ``queue_full``, …); conditions
that exist only at the HTTP edge are ``ApiError``s with their own codes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Final

from sanic import HTTPResponse, Request, json
from sanic.exceptions import BadRequest, SanicException
from sanic.http import Http

from allm.kernel.codes import AllmError, Code

log = logging.getLogger("allm.gateway")

#: protocol code → (HTTP status, OpenAI error type)
STATUS: Final[Mapping[Code, tuple[int, str]]] = {
    Code.OOM_VRAM: (503, "server_error"),
    Code.OOM_RAM: (503, "server_error"),
    Code.MODEL_CORRUPT: (500, "server_error"),
    Code.TIMEOUT: (504, "server_error"),
    Code.CANCELLED: (499, "invalid_request_error"),
    Code.UNSUPPORTED: (400, "invalid_request_error"),
    Code.INTERNAL: (500, "server_error"),
    Code.FORMAT_MISMATCH: (500, "server_error"),
    Code.LOAD_FAILED: (503, "server_error"),
}

#: reason → (HTTP status, OpenAI error type); the reason becomes the body's code
REASONS: Final[Mapping[str, tuple[int, str]]] = {
    "queue_full": (429, "rate_limit_error"),
    "context_length_exceeded": (400, "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error"),
    "model_not_found": (404, "invalid_request_error"),
    "manager_failed": (503, "server_error"),
    "draining": (503, "server_error"),
    # the catalog names a model whose engine this install lacks: the server's fault, not the request's
    "engine_not_installed": (500, "server_error"),
}

RETRY_AFTER_S = 1


class ApiError(Exception):
    """An error of the HTTP edge: bad JSON, a bad field, an unknown model, auth, size."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.headers = dict(headers or {})


def bad_field(param: str, message: str) -> ApiError:
    return ApiError(400, message, code="invalid_value", param=param)


def body(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, OpenAI body and headers for any exception a route lets out."""
    if isinstance(exc, ApiError):
        return exc.status, body(exc.message, exc.type, exc.code, exc.param), exc.headers
    if isinstance(exc, AllmError):
        headers: dict[str, str] = {}
        if exc.reason in REASONS:
            status, type_ = REASONS[exc.reason]
            code = exc.reason
        else:
            status, type_ = STATUS[exc.code]
            code = exc.code.name.lower()
        if status == 429:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        return status, body(exc.message, type_, code, exc.param or None), headers
    if isinstance(exc, SanicException):
        status = int(exc.status_code)
        codes = {
            404: "not_found",
            405: "method_not_allowed",
            413: "request_too_large",
            408: "request_timeout",
        }
        code = codes.get(status, "invalid_request" if status < 500 else "server_error")
        type_ = "invalid_request_error" if status < 500 else "server_error"
        return status, body(str(exc), type_, code), {}
    log.error("unhandled error", exc_info=exc)
    return 500, body(f"internal error: {type(exc).__name__}", "server_error", "internal"), {}


OPENAI, ANTHROPIC, OLLAMA = "openai", "anthropic", "ollama"

#: HTTP status → Anthropic's error type (its documented table; 529 is its "overloaded")
ANTHROPIC_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def api_of(path: str) -> str:
    """The API a request path belongs to, whose error shape its answers take."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return ANTHROPIC
    if path.startswith("/api/"):
        return OLLAMA
    return OPENAI


def shaped(api: str, status: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """An error described in OpenAI's shape (``describe``), in ``api``'s shape and status."""
    error = payload["error"]
    if api == ANTHROPIC:
        if error.get("code") == "queue_full":
            status = 529  # Anthropic's "overloaded": its SDKs retry it
        kind = ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
        return status, {"type": "error", "error": {"type": kind, "message": error["message"]}}
    if api == OLLAMA:
        # Ollama's shape has no param: the message names the field, where it does not already
        param, message = error.get("param"), error["message"]
        return status, {"error": message if not param or param in message else f"{param}: {message}"}
    return status, payload


async def handle(request: Request, exc: Exception) -> HTTPResponse:
    """The one exception handler of the app: the error in the shape of the request's API."""
    status, payload, headers = describe(exc)
    status, payload = shaped(api_of(request.path), status, payload)
    return json(payload, status=status, headers=headers)


#: the method Sanic gives the stand-in request it builds to answer a request it could not read
UNREAD = "NONE"


def _escaped(url: bytes) -> bytes:
    return b"".join(b"%%%02X" % byte if byte <= 0x20 or byte >= 0x7F else bytes([byte]) for byte in url)


class EdgeRequest(Request[Any, Any]):
    """Sanic's request, able to stand in for one whose URL does not parse, and to stop waiting for a
    body that stops arriving (``receive_body``).

    For a request line httptools' URL parser refuses (a raw NUL or other
    control byte in the path or query, a target that is not a path such as
    ``GET abc HTTP/1.1``), Sanic raises BadURL, then builds a stand-in request
    with the same URL to answer it; that raises again inside its error path
    and Sanic drops the connection unanswered (sanic 25.12,
    ``Http.create_empty_request``). The stand-in gets the URL percent-escaped
    instead, or ``/`` when even that does not parse, so the client gets the
    400 in OpenAI's shape.
    """

    def __init__(self, url_bytes: bytes, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(url_bytes, *args, **kwargs)
        except BadRequest:
            if kwargs.get("method") != UNREAD:
                raise
            try:
                super().__init__(_escaped(url_bytes), *args, **kwargs)
            except BadRequest:  # not even a path ("GET abc HTTP/1.1"): the stand-in needs none
                super().__init__(b"/", *args, **kwargs)

    async def receive_body(self) -> None:
        """Sanic's body read, but a body that stops arriving for REQUEST_TIMEOUT (``body_timeout_s``)
        gets 408 and its connection closed.

        Sanic applies REQUEST_TIMEOUT to the headers only: it reads the body in its handler stage,
        under RESPONSE_TIMEOUT (sanic 25.12, ``Http.http1``, ``HttpProtocol.check_timeouts``): a
        Content-Length larger than what is sent got a 503 after the whole response time, and then
        its connection stayed open, Sanic waiting for the rest with no timer running. The limit is
        on each wait for more, as nginx's client_body_timeout: a large upload on a slow link still
        arrives.
        """
        stream = self.stream
        if self.body or not isinstance(stream, Http):  # read already, or not HTTP/1.1: Sanic's own
            await super().receive_body()  # type: ignore[no-untyped-call]  # sanic leaves it unannotated
            return
        timeout_s = float(self.app.config.REQUEST_TIMEOUT)
        chunks = []
        while stream.request_body:
            try:
                async with asyncio.timeout(timeout_s):
                    data = await stream.read()
            except TimeoutError:
                # The rest will not come: close once answered, rather than wait to drain it.
                stream.keep_alive = False
                stream.request_body = None
                raise ApiError(
                    408,
                    f"the request body stopped arriving: nothing more came for {timeout_s:g} s",
                    code="request_timeout",
                ) from None
            if data:
                chunks.append(data)
        self.body = b"".join(chunks)
