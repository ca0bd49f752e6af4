"""Sealed tokens: state allm hands a client and takes back, which the client can neither read nor forge.

An earlier turn's reasoning travels through the client: Anthropic's thinking ``signature`` and
``redacted_thinking`` ``data``, Responses' ``encrypted_content``. Each is a payload (a JSON
object) sealed with AES-256-GCM, so it is encrypted (the client cannot read it) and
authenticated (a token changed by one bit, or made by anyone else, does not open).

The key is 32 random bytes in the data directory (``seal.key``, mode 0600), made on first use;
gateways that share conversations (behind one load balancer) need the same file. A token is
``allm1.`` and the URL-safe base64 of the 12-byte nonce and the ciphertext with its tag.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from allm.gateway.errors import ApiError, bad_field

KEY_FILE = "seal.key"
KEY_BYTES = 32
NONCE_BYTES = 12
PREFIX = "allm1."
#: bound to every token: a ciphertext made for something else under the same key does not open
ASSOCIATED = b"allm seal v1"


class Sealer:
    """Seals payloads into tokens and opens them again, under one key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, payload: dict[str, Any]) -> str:
        """``payload`` as a token only this key opens."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        plain = json.dumps(payload, separators=(",", ":")).encode()
        sealed = nonce + self._aead.encrypt(nonce, plain, ASSOCIATED)
        return PREFIX + base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def unseal(self, token: str, param: str) -> dict[str, Any]:
        """The payload of a token this key sealed; a 400 naming ``param`` for any other text."""
        refused = bad_field(
            param, f"'{param}' was not made by this server or was changed: send it back exactly as it came"
        )
        if not token.startswith(PREFIX):
            raise refused
        body = token.removeprefix(PREFIX)
        try:
            sealed = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise refused from None
        if len(sealed) <= NONCE_BYTES:
            raise refused
        try:
            plain = self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], ASSOCIATED)
        except InvalidTag:
            raise refused from None
        payload = json.loads(plain)  # we sealed it: it is our JSON
        assert isinstance(payload, dict)
        return payload


@functools.cache
def sealer(data_dir: Path) -> Sealer:
    """The sealer of a data directory, its key read (or made, on first use) once."""
    return Sealer(_key(data_dir.expanduser() / KEY_FILE))


def _key(path: Path) -> bytes:
    if not path.exists():
        _make_key(path)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ApiError(
            500,
            f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte key: remove it and a new one is made "
            "(what was sealed with the old one no longer opens)",
            code="internal",
            type="server_error",
        )
    return key


def _make_key(path: Path) -> None:
    """Write a new key, whole or not at all: two gateways starting at once agree on one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    draft = path.with_name(f"{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(KEY_BYTES))
        with contextlib.suppress(FileExistsError):  # another made it first: theirs stands
            os.link(draft, path)
    finally:
        draft.unlink()
