"""The one code → HTTP table: every protocol code has a row; bodies have OpenAI's shape."""

from __future__ import annotations

import pytest
from sanic.compat import Header
from sanic.exceptions import BadRequest

from allm.gateway import errors
from allm.gateway.errors import REASONS, STATUS, UNREAD, ApiError, EdgeRequest, describe
from allm.kernel.codes import Code, error_for


def test_every_error_code_has_a_row():
    assert set(STATUS) == set(Code) - {Code.OK}


@pytest.mark.parametrize("code", [c for c in Code if c is not Code.OK])
def test_a_coded_error_renders_its_name_in_lower_case(code):
    status, body, _headers = describe(error_for(code, "it broke", param="model"))
    assert status == STATUS[code][0]
    assert body == {
        "error": {"message": "it broke", "type": STATUS[code][1], "param": "model", "code": code.name.lower()}
    }


def test_documented_statuses():
    expected = {
        Code.OOM_VRAM: 503,
        Code.OOM_RAM: 503,
        Code.MODEL_CORRUPT: 500,
        Code.TIMEOUT: 504,
        Code.CANCELLED: 499,
        Code.UNSUPPORTED: 400,
        Code.INTERNAL: 500,
        Code.FORMAT_MISMATCH: 500,
        Code.LOAD_FAILED: 503,
    }
    assert {code: row[0] for code, row in STATUS.items()} == expected


def test_queue_full_is_429_with_retry_after():
    status, body, headers = describe(error_for(Code.TIMEOUT, "full", reason="queue_full"))
    assert (status, body["error"]["code"], headers) == (429, "queue_full", {"Retry-After": "1"})


@pytest.mark.parametrize(("reason", "status"), [(r, row[0]) for r, row in REASONS.items()])
def test_reasons_refine_the_status(reason, status):
    got, body, _headers = describe(error_for(Code.UNSUPPORTED, "x", reason=reason))
    assert got == status
    assert body["error"]["code"] == reason


def test_gateway_errors_and_unknown_exceptions():
    status, body, _ = describe(ApiError(404, "no such model", code="model_not_found", param="model"))
    assert (status, body["error"]["code"], body["error"]["param"]) == (404, "model_not_found", "model")
    status, body, _ = describe(RuntimeError("secret detail"))
    assert status == 500
    assert "secret detail" not in body["error"]["message"]


def test_the_stand_in_for_an_unreadable_request_keeps_its_url_escaped():
    # Sanic builds this stand-in to answer a URL httptools refused; with the raw URL it raised
    # again and the connection was dropped unanswered.
    kwargs = {"headers": Header({}), "version": "1.1", "transport": None, "app": None}
    stand_in = EdgeRequest(url_bytes=b"/v1/responses/\x00 x\x7f", method=UNREAD, **kwargs)
    assert stand_in.path == "/v1/responses/%00%20x%7F"
    with pytest.raises(BadRequest, match="Bad URL"):
        EdgeRequest(url_bytes=b"/v1/responses/\x00", method="GET", **kwargs)


def test_the_stand_in_for_a_request_target_that_is_no_path_gets_one():
    kwargs = {"headers": Header({}), "version": "1.1", "transport": None, "app": None}
    assert EdgeRequest(url_bytes=b"HTTP/1.1", method=UNREAD, **kwargs).path == "/"


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/messages", errors.ANTHROPIC),
        ("/v1/messages/count_tokens", errors.ANTHROPIC),
        ("/v1/messagesx", errors.OPENAI),
        ("/api/chat", errors.OLLAMA),
        ("/api/tags", errors.OLLAMA),
        ("/v1/chat/completions", errors.OPENAI),
        ("/v1/responses", errors.OPENAI),
        ("/status", errors.OPENAI),
    ],
)
def test_a_path_belongs_to_one_api(path, api):
    assert errors.api_of(path) == api


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (error_for(Code.UNSUPPORTED, "x", reason="context_length_exceeded"), 400, "invalid_request_error"),
        (error_for(Code.UNSUPPORTED, "x", reason="model_not_found"), 404, "not_found_error"),
        (error_for(Code.UNSUPPORTED, "x", reason="queue_full"), 529, "overloaded_error"),
        (error_for(Code.OOM_RAM, "x"), 503, "overloaded_error"),
        (error_for(Code.TIMEOUT, "x"), 504, "timeout_error"),
        (error_for(Code.INTERNAL, "x"), 500, "api_error"),
        (error_for(Code.CANCELLED, "x"), 499, "invalid_request_error"),
        (
            errors.ApiError(401, "x", code="invalid_api_key", type="authentication_error"),
            401,
            "authentication_error",
        ),
        (ApiError(413, "x", code="request_too_large"), 413, "request_too_large"),
    ],
)
def test_an_error_in_anthropics_shape_and_status(exc, status, kind):
    described, payload, _headers = errors.describe(exc)
    shaped_status, body = errors.shaped(errors.ANTHROPIC, described, payload)
    assert shaped_status == status
    assert body == {"type": "error", "error": {"type": kind, "message": "x"}}


def test_an_error_in_ollamas_shape_keeps_its_status():
    described, payload, _ = errors.describe(error_for(Code.UNSUPPORTED, "gone", reason="model_not_found"))
    assert errors.shaped(errors.OLLAMA, described, payload) == (404, {"error": "gone"})
    assert errors.shaped(errors.OPENAI, described, payload) == (404, payload)
