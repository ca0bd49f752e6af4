"""The server this configuration runs, as a command-line tool reaches it: is a model loaded there?

``allm rm`` removes a pulled model's files. Where a server serves from the same data
directory, the model may be loaded there: the removal then goes through the server
(``DELETE /v1/models/{id}``), which refuses a loaded model unless forced and, forced,
unloads it first, so that no manager keeps reading files that are gone. Where no server
answers, the files are removed directly.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from allm.gateway.config import Config

#: how long a server that does not answer is waited for: a local one answers in milliseconds
PROBE_S = 3.0


def server_url(config: Config, given: str | None) -> str:
    """``--server``, else the configuration's address (a wildcard one reached on loopback)."""
    if given:
        if not given.startswith(("http://", "https://")):
            raise ValueError(f"--server must be an http:// or https:// URL, got {given!r}")
        return given.rstrip("/")
    wildcard = config.host in ("0.0.0.0", "::", "")  # noqa: S104 - an address listened on, read
    host = "127.0.0.1" if wildcard else config.host
    return f"http://{'[' + host + ']' if ':' in host else host}:{config.port}"


def ask(config: Config, url: str, method: str, path: str) -> tuple[int, Any] | None:
    """The server's status and JSON answer; None when no server answers there."""
    request = urllib.request.Request(url + path, method=method)  # noqa: S310 - server_url's http(s)
    keys = config.admin_keys or config.api_keys
    if keys:
        request.add_header("Authorization", f"Bearer {keys[0]}")
    try:
        with urllib.request.urlopen(request, timeout=PROBE_S) as answer:  # noqa: S310 - our own server
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, {"error": {"message": body.decode("utf-8", "replace")}}
    except (OSError, ValueError):
        return None


def model_path(model_id: str) -> str:
    return "/v1/models/" + urllib.parse.quote(model_id, safe="/:")
