"""A real PostgreSQL server of a test's own: Debian's binaries, a private directory, a free port.

PostgreSQL refuses to run as root, so as root (the tests here) initdb and postgres run as
the ``postgres`` system user the Debian package creates, in a directory given to it. Missing
binaries fail the test that needs them: ``apt-get install postgresql`` (scripts/setup does).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from tests.integration.gateway_server import free_port

SYSTEM_USER = "postgres"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def binaries() -> Path:
    """The newest installed PostgreSQL's bin directory; fails the test when there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    pytest.fail("PostgreSQL is not installed: apt-get install -y postgresql (scripts/setup installs it)")


class PostgresServer:
    """initdb once; start and stop as often as a test likes, on the same directory and port."""

    def __init__(self, root: Path) -> None:
        self.bin = binaries()
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # as root, become the postgres user; otherwise run as whoever runs the tests
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            self._as = {"user": SYSTEM_USER, "group": SYSTEM_USER, "extra_groups": []}
            shutil.chown(root, SYSTEM_USER, SYSTEM_USER)
        subprocess.run(
            [
                self.bin / "initdb",
                "-D",
                self.data,
                "-U",
                "allm",
                "--auth=trust",
                "--no-locale",
                "-E",
                "UTF8",
                "-N",
            ],
            cwd=root,
            check=True,
            stdout=subprocess.DEVNULL,
            **self._as,
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://allm@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        assert self.proc is None
        with open(self.root / "postgres.log", "ab") as log:  # the server keeps its own copy
            self.proc = subprocess.Popen(
                [
                    self.bin / "postgres",
                    "-D", self.data,
                    "-p", str(self.port),
                    "-h", "127.0.0.1",
                    "-k", self.root,  # its Unix socket here, not in /var/run/postgresql
                    "-c", "fsync=off",
                    "-c", "full_page_writes=off",
                ],
                cwd=self.root,
                stdout=log,
                stderr=log,
                **self._as,
            )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                pytest.fail(f"postgres exited at start: {(self.root / 'postgres.log').read_text()[-2000:]}")
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"postgres was not ready in {READY_TIMEOUT_S:g} s")
                time.sleep(0.1)

    def _processes(self) -> list[psutil.Process]:
        assert self.proc is not None
        main = psutil.Process(self.proc.pid)
        return [main, *main.children(recursive=True)]

    def freeze(self) -> None:
        """SIGSTOP the server and every backend: connections stay open and nothing answers."""
        for process in self._processes():
            process.suspend()

    def thaw(self) -> None:
        for process in self._processes():
            process.resume()

    def stop(self) -> None:
        """A fast shutdown (SIGINT): clients are disconnected, as when an operator restarts it."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A started server in a private temporary directory; stopped and removed after."""
    # not under pytest's tmp_path: as root that is closed to the postgres user
    root = Path(tempfile.mkdtemp(prefix="allm-pg-"))
    server = None
    try:
        server = PostgresServer(root)
        server.start()
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
