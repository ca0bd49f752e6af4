"""CURVE for tcp:// endpoints: key pairs, and which clients a manager lets in.

Between hosts every connection is encrypted and authenticated with ZeroMQ's CURVE (the
CurveZMQ handshake): a manager has a key pair and accepts only the client public keys it
is given (checked by a ZAP handler on its context); a gateway has a key pair and connects
only to managers whose public key it knows, so neither side can be impersonated and no
one else can read a frame. Key files are ZeroMQ's certificate files, as ``allm keys``
writes them: ``NAME.key`` (the public key, to hand out) and ``NAME.key_secret`` (both
keys, mode 0600, never leaves its host). ipc:// needs none of this: its socket lies in a
directory only the server's user may open. See docs/design.md, "Managers on other hosts".
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("allm.curve")

#: the ZAP domain allm's managers authenticate in
DOMAIN = b"allm"
#: a Z85 key is 40 characters
KEY_LENGTH = 40


class BadKey(ValueError):
    """A key or key file that cannot be used, saying why."""


@dataclasses.dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes  # Z85
    secret: bytes  # Z85


def make_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret (mode 0600) in ``directory``; refuses to overwrite."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise BadKey(f"{path} exists: remove it first, or choose another name")
    public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret_file, 0o600)
    return Path(public_file), Path(secret_file)


def load_pair(path: Path | str) -> KeyPair:
    """A key pair from a ``.key_secret`` file."""
    path = Path(path).expanduser()
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise BadKey(f"{path}: not a key file ({exc})") from None
    if not secret:
        raise BadKey(f"{path} holds only a public key: give the .key_secret file")
    return KeyPair(public, secret)


def load_public(value: str) -> bytes:
    """A public key: its 40 Z85 characters, or a ``.key`` (or ``.key_secret``) file holding it."""
    if len(value) == KEY_LENGTH and not Path(value).exists():
        try:
            zmq.utils.z85.decode(value.encode())
        except (ValueError, KeyError):
            raise BadKey(f"{value!r} is not a Z85 key") from None
        return value.encode()
    path = Path(value).expanduser()
    try:
        public, _secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise BadKey(f"{value!r} is neither a 40-character Z85 key nor a key file ({exc})") from None
    return public


class Gate:
    """The ZAP handler of a manager's context: lets in only the allowed client keys."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], allowed: Iterable[bytes]) -> None:
        self.allowed = frozenset(allowed)
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("allm.curve.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(DOMAIN.decode(), credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """Asked for each CURVE handshake: the client's public key, Z85."""
        ok = key in self.allowed
        if not ok:
            log.warning("refused a client whose public key %s is not allowed", key.decode(errors="replace"))
        return ok

    def stop(self) -> None:
        self._auth.stop()


def serve_with(sock: zmq.Socket[bytes], pair: KeyPair) -> None:
    """Make ``sock`` a CURVE server with this key pair (before it binds)."""
    sock.curve_secretkey = pair.secret
    sock.curve_publickey = pair.public
    sock.curve_server = True
    sock.zap_domain = DOMAIN


def connect_with(sock: zmq.Socket[bytes], pair: KeyPair, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client of the server with that public key (before it connects)."""
    sock.curve_secretkey = pair.secret
    sock.curve_publickey = pair.public
    sock.curve_serverkey = server_public
