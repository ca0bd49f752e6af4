"""The server the fuzz tests attack, and the invariants every answer of it must keep."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from allm.kernel.codes import Code
from tests.image_files import write_tiny_flux
from tests.integration.gateway_server import Server, running_server
from tests.model_files import smollm2_path
from tests.whisper_files import write_tiny_whisper

KEY = "sk-fuzz"
MODEL = "smollm2-135m-instruct"
AUDIO_MODEL = "whisper-fuzz"  # a tiny random whisper: what it hears is noise, fast
IMAGE_MODEL = "flux-fuzz"  # a tiny random Flux: what it draws is noise, fast
MAX_BODY_BYTES = 1024 * 1024
#: a 5xx may only carry an engine's condition, never "internal": no input may cause one
ENGINE_CODES = frozenset(c.name.lower() for c in Code if c not in (Code.OK, Code.INTERNAL)) | {
    "manager_failed",
    "draining",
}


@contextlib.contextmanager
def fuzz_server(tmp: Path) -> Iterator[Server]:
    """A real allm serve on SmolLM2 with a small context, and a tiny whisper: whatever a request asks,
    the work stays short."""
    whisper = write_tiny_whisper(tmp / "whisper-fuzz.ggml")
    flux = write_tiny_flux(tmp / "flux-fuzz")
    config = f"""
[server]
api_keys = ["{KEY}"]
max_body_bytes = {MAX_BODY_BYTES}
request_timeout_s = 60
data_dir = "{tmp / "data"}"

[[models]]
id = "{MODEL}"
path = "{smollm2_path()}"
options = {{ n_ctx = 256 }}

[[models]]
id = "{AUDIO_MODEL}"
modality = "audio"
path = "{whisper}"

[image]
max_width = 128
max_height = 128
default_size = "64x64"

[[models]]
id = "{IMAGE_MODEL}"
modality = "image"
path = "{flux["diffusion_model"]}"
options = {{ clip_l = "{flux["clip_l"]}", taesd = "{flux["taesd"]}", steps = 1 }}
"""
    with running_server(config, tmp, api_key=KEY) as server:
        yield server


def check_answer(status: int, body: bytes, content_type: str = "application/json", path: str = "") -> Any:
    """Raise unless the answer keeps the edge's promises; return the decoded body (None for a stream).

    ``path``: the request's, whose API's error shape the answer must have (OpenAI's, or
    Anthropic's on /v1/messages…, or Ollama's on /api/…).
    """
    assert 200 <= status < 600, status
    if content_type.startswith(("text/event-stream", "application/x-ndjson")):
        assert status == 200
        return None
    if content_type.startswith("text/plain"):  # a transcript as text, srt or vtt
        assert status == 200
        return body.decode("utf-8")
    if content_type.startswith("image/"):  # a stored image
        assert status == 200
        return body
    if content_type.startswith("text/html"):  # GET /, the status page
        assert status == 200
        assert body.startswith(b"<!doctype html>")
        return body.decode("utf-8")
    if content_type.startswith("text/plain; version=0.0.4"):  # /metrics
        assert status == 200
        return body.decode("utf-8")
    data = json.loads(body)
    if status < 400:
        return data
    if path.startswith("/api/"):  # Ollama's {"error": "..."}
        assert set(data) == {"error"}, data
        assert isinstance(data["error"], str)
        assert status < 500 or not data["error"].startswith("internal error:"), data  # an allm bug's mark
        return data
    if path == "/v1/messages" or path.startswith("/v1/messages/"):  # Anthropic's
        assert set(data) == {"type", "error"}, data
        assert data["type"] == "error"
        assert set(data["error"]) == {"type", "message"}, data
        assert isinstance(data["error"]["message"], str)
        if status >= 500:
            assert data["error"]["type"] in {"overloaded_error", "timeout_error", "api_error"}, data
            assert not data["error"]["message"].startswith("internal error:"), data
        return data
    assert set(data) == {"error"}, data
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str)
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert isinstance(error["code"], str)
    if status >= 500:
        assert error["code"] in ENGINE_CODES, f"a {status} that is no engine condition: {error}"
    return data


def untouched(server: Server) -> None:
    """Every manager is up and was never restarted: nothing reached one that could kill it."""
    managers = server.managers()
    assert [(m["state"], m["restarts"]) for m in managers] == [("running", 0)] * len(managers), managers


def serves(server: Server) -> None:
    status, body = server.json(
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2},
    )
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 2


def content_type(head: bytes) -> str:
    """The Content-Type of a raw answer's header block ("" where it has none)."""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-type":
            return value.strip().decode("latin-1")
    return ""


def raw_exchange(port: int, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes (or goes quiet): what came back."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and _complete(out):
                    break
    return out


def _complete(reply: bytes) -> bool:
    head, _, body = reply.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False
