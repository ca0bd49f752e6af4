"""Run a program with no way off this machine: a network namespace of its own, with only loopback.

conftest.py's `loopback_only` guards this Python process; the agent CLIs are native programs, so
they run under `unshare --net` instead, where no route leads anywhere. Inside, 127.0.0.1:PORT is
relayed through a Unix socket (a file, which crosses namespaces) to the allm server outside, and
HTTP(S)_PROXY points at a local door that writes down every host a program tried to reach through
it and refuses it (a program that ignores the proxy variables still finds no route).

    with relay_to(server_port, tmp / "allm.sock") as sock:
        subprocess.run(isolated(sock, port=server_port, attempts=tmp / "attempts", argv=[...]))

Run as a script, it is the inside half: `netns.py PORT SOCKET ATTEMPTS -- ARGV...`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

#: the proxy door inside the namespace: any port will do, nothing else listens there
PROXY_PORT = 3128


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until each side has finished sending; then close both."""

    def one_way(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    back = threading.Thread(target=one_way, args=(b, a), daemon=True)
    back.start()
    one_way(a, b)
    back.join()
    a.close()
    b.close()


def serve(listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
    """Accept until the listener closes; join each connection to a new one from `connect`."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            upstream = connect()
        except OSError:
            conn.close()
            continue
        threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()


@contextlib.contextmanager
def relay_to(port: int, sock_path: Path) -> Iterator[Path]:
    """The outside half: a Unix socket at `sock_path` whose connections reach 127.0.0.1:port."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(64)
    thread = threading.Thread(
        target=serve,
        args=(listener, lambda: socket.create_connection(("127.0.0.1", port))),
        daemon=True,
    )
    thread.start()
    try:
        yield sock_path
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join()


def isolated(sock_path: Path, *, port: int, attempts: Path, argv: list[str]) -> list[str]:
    """The command line that runs `argv` in a namespace of its own, 127.0.0.1:port reaching outside.

    `--map-root-user` lets a user who is not root make the namespace (and bring its loopback up).
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RuntimeError("unshare (util-linux) is missing: the agent CLIs run in a network namespace")
    return [
        unshare,
        "--net",
        "--map-root-user",
        sys.executable,
        __file__,
        str(port),
        str(sock_path),
        str(attempts),
        "--",
        *argv,
    ]


def refuse_and_record(listener: socket.socket, attempts: Path) -> None:
    """The proxy door: write each request line (`CONNECT host:443 HTTP/1.1`) down, answer 403."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            line = conn.makefile("rb").readline(4096).decode("latin-1").strip()
            with attempts.open("a") as f:
                f.write(line + "\n")
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def inside(port: int, sock_path: str, attempts: Path, argv: list[str]) -> int:
    """The inside half: loopback up, the relay and the proxy door listening, then `argv`'s status."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    relay = socket.create_server(("127.0.0.1", port))
    door = socket.create_server(("127.0.0.1", PROXY_PORT))

    def to_outside() -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(sock_path)
        return conn

    threading.Thread(target=serve, args=(relay, to_outside), daemon=True).start()
    threading.Thread(target=refuse_and_record, args=(door, attempts), daemon=True).start()
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    env = {
        **os.environ,
        **{name: proxy for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY")},
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    return subprocess.run(argv, env=env, check=False).returncode


if __name__ == "__main__":
    port, sock, attempts, sep, *command = sys.argv[1:]
    if sep != "--" or not command:
        sys.exit("usage: netns.py PORT SOCKET ATTEMPTS -- ARGV...")
    sys.exit(inside(int(port), sock, Path(attempts), command))
