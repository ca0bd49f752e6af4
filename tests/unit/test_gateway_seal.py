"""Sealed tokens: what a client carries back opens only unchanged and only under the key that made it."""

from __future__ import annotations

import base64
import secrets
import stat

import pytest

from allm.gateway.errors import ApiError
from allm.gateway.seal import KEY_BYTES, PREFIX, Sealer, sealer


def refused(box: Sealer, token: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        box.unseal(token, "messages[1].content[0].signature")
    assert info.value.status == 400
    assert info.value.param == "messages[1].content[0].signature"
    return info.value


def test_a_payload_comes_back_as_it_went_and_cannot_be_read_on_the_way():
    box = Sealer(secrets.token_bytes(KEY_BYTES))
    payload = {"thinking": "the secret plan", "n": 3}
    token = box.seal(payload)
    assert token.startswith(PREFIX)
    assert "secret" not in token
    assert b"secret" not in base64.urlsafe_b64decode(token.removeprefix(PREFIX) + "==")
    assert box.unseal(token, "x") == payload
    assert box.seal(payload) != token  # a fresh nonce each time


def test_a_changed_foreign_or_malformed_token_is_a_400_naming_the_field():
    box = Sealer(secrets.token_bytes(KEY_BYTES))
    token = box.seal({"thinking": "x"})
    body = bytearray(base64.urlsafe_b64decode(token.removeprefix(PREFIX) + "=="))
    body[-1] ^= 1
    flipped = PREFIX + base64.urlsafe_b64encode(bytes(body)).decode().rstrip("=")
    refused(box, flipped)
    refused(Sealer(secrets.token_bytes(KEY_BYTES)), token)  # another server's key
    for junk in ("", "allm1.", "allm1.!!!", "allm2." + token[6:], token[:20], "plain text"):
        refused(box, junk)


def test_the_key_is_made_once_private_and_kept(tmp_path):
    sealer.cache_clear()
    token = sealer(tmp_path).seal({"a": 1})
    key = tmp_path / "seal.key"
    assert len(key.read_bytes()) == KEY_BYTES
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    sealer.cache_clear()  # a restarted gateway reads the same key
    assert sealer(tmp_path).unseal(token, "x") == {"a": 1}
    sealer.cache_clear()
