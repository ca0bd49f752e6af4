"""Who may change the server (pull, load, unload, pin, delete models): the admin keys, or loopback.

A request that changes what the server holds needs one of ``[server] admin_keys`` (sent as
an API key is: ``Authorization: Bearer <key>`` or ``x-api-key``); a server with no keys at
all takes it from anyone, as long as it listens on loopback only, where only this host's
users reach it. Anything else is a 403 that says which of these is missing.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from sanic import Request

from allm.gateway.config import Config
from allm.gateway.errors import ApiError


def supplied_key(request: Request) -> bytes:
    """The key a request sends: a bearer token (OpenAI's clients) or an x-api-key (Anthropic's)."""
    supplied = request.headers.get("authorization", "").removeprefix("Bearer ")
    supplied = supplied or request.headers.get("x-api-key", "")
    # Sanic decodes header bytes that are not UTF-8 as surrogates: back to those bytes, never a 500.
    return supplied.strip().encode("utf-8", "surrogateescape")


def matches(token: bytes, keys: Iterable[bytes]) -> bool:
    """Whether ``token`` is one of ``keys``, compared with each in constant time (no early exit)."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key)
    return matched


def loopback(host: str) -> bool:
    """Whether an address to listen on is reachable from this host only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_admin(request: Request) -> None:
    """Refuse (403, saying why) a request that may not change the server."""
    config: Config = request.app.ctx.config
    if config.admin_keys:
        if matches(supplied_key(request), (k.encode() for k in config.admin_keys)):
            return
        why = "it needs one of the server's admin keys ([server] admin_keys), sent as the API key"
    elif config.api_keys:
        why = (
            "the server has api_keys but no admin_keys: set [server] admin_keys (ALLM_ADMIN_KEYS) "
            "and send one of them"
        )
    elif loopback(config.host):
        return
    else:
        why = (
            f"the server has no keys and listens on {config.host}, beyond this host: set [server] "
            "admin_keys (ALLM_ADMIN_KEYS) and send one of them"
        )
    raise ApiError(
        403,
        f"this request changes the server's models: {why}",
        code="admin_key_required",
        type="permission_error",
    )
