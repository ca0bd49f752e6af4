"""Hosts made on this machine: network namespaces joined to this one by veth links.

Each host is a namespace with its own loopback and one veth link to the test's namespace
(10.177.N.1 here, 10.177.N.2 there): a manager in it is reached over a real network
interface, and the link can be cut (``ip link set … down``) and restored. Where namespaces
cannot be made (no CAP_NET_ADMIN) and CI is not set, each host is a loopback address of its
own (127.77.0.N), ``Hosts.real`` is false and ``Hosts.mode`` says why; there is no link to
cut then, and ``cut`` refuses (a stopped process is another fault). Under CI (``CI`` set),
a machine that cannot make namespaces fails the test instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.integration.gateway_server import free_port

ALLM = Path(sys.executable).parent / "allm"
#: the kinds of hosts this run made, for the end of its report (tests/multihost/conftest.py)
MODES: set[str] = set()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Host:
    def __init__(self, index: int, namespace: str | None, address: str, link: str | None) -> None:
        self.index = index
        self.namespace = namespace
        self.address = address  # where the gateway reaches it
        self.link = link  # the veth end in the test's namespace
        self.manager: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None
        self.endpoint = ""
        self.started_with: tuple[Path, Path, Path, Path] | None = None

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace] if self.namespace else []

    def start_manager(
        self, config: Path, secret: Path, allow: Path, log: Path, port: int | None = None
    ) -> str:
        """``allm manager text --bind tcp://ADDRESS:PORT`` on this host; returns its endpoint."""
        if not self.endpoint:  # a restart binds the same endpoint again
            self.endpoint = f"tcp://{self.address}:{port or free_port()}"
        self.started_with = (config, secret, allow, log)
        self.log = log
        out = open(log, "ab")  # noqa: SIM115 - the child holds it; closed in stop_manager
        self.manager = subprocess.Popen(
            [
                *self.prefix(),
                str(ALLM),
                "manager",
                "text",
                "--config",
                str(config),
                "--bind",
                self.endpoint,
                "--secret-key",
                str(secret),
                "--allow",
                str(allow),
            ],
            stdout=out,
            stderr=out,
            env={**os.environ, "ALLM_LOG_LEVEL": "DEBUG"},  # a line per request (tests count them)
            start_new_session=True,
        )
        out.close()
        return self.endpoint

    def stop_manager(self, signum: int = signal.SIGTERM) -> None:
        proc = self.manager
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.manager = None


class NoNamespaces(RuntimeError):
    """Network namespaces cannot be made here, and CI asks for them."""


class Hosts:
    """``with Hosts(2) as hosts:`` two hosts, removed (and their managers stopped) after."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.tag = uuid.uuid4().hex[:6]
        self.hosts: list[Host] = []
        self.real = False  # namespaces and veth links, not loopback stand-ins
        self.mode = ""  # which, in words: for the test report

    def __enter__(self) -> Hosts:
        try:
            self._make_namespaces()
        except (OSError, subprocess.CalledProcessError) as exc:
            self._remove_namespaces()
            why = _why(exc)
            if os.environ.get("CI"):
                raise NoNamespaces(
                    f"CI runs the multi-host tests in network namespaces, and this machine cannot make "
                    f"them ({why}): run them as root (CAP_NET_ADMIN) with iproute2 installed"
                ) from exc
            self.hosts = [Host(i, None, f"127.77.0.{i + 2}", None) for i in range(self.count)]
            self.mode = f"loopback addresses: no network namespaces here ({why})"
        else:
            self.real = True
            self.mode = "network namespaces joined by veth links"
        MODES.add(self.mode)
        return self

    def _make_namespaces(self) -> None:
        for i in range(self.count):
            ns = f"allm-{self.tag}-{i}"
            here, there = f"av{self.tag}{i}", f"ah{self.tag}{i}"
            subnet = f"10.177.{(int(self.tag, 16) + i) % 250}"
            self.hosts.append(Host(i, ns, f"{subnet}.2", here))
            _ip("netns", "add", ns)
            _ip("link", "add", here, "type", "veth", "peer", "name", there)
            _ip("link", "set", there, "netns", ns)
            _ip("addr", "add", f"{subnet}.1/24", "dev", here)
            _ip("link", "set", here, "up")
            _ip("-n", ns, "addr", "add", f"{subnet}.2/24", "dev", there)
            _ip("-n", ns, "link", "set", there, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def _remove_namespaces(self) -> None:
        for host in self.hosts:
            if host.link:
                with contextlib.suppress(subprocess.CalledProcessError, OSError):
                    _ip("link", "delete", host.link)
            if host.namespace:
                with contextlib.suppress(subprocess.CalledProcessError, OSError):
                    _ip("netns", "delete", host.namespace)

    def __exit__(self, *exc: object) -> None:
        for host in self.hosts:
            host.stop_manager()
        self._remove_namespaces()

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def cut(self, host: Host) -> None:
        """The host drops off the network: its veth link goes down."""
        if not host.link:
            raise NoNamespaces(f"there is no link to cut on {self.mode}")
        _ip("link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        if not host.link:
            raise NoNamespaces(f"there is no link to restore on {self.mode}")
        _ip("link", "set", host.link, "up")


def _why(exc: BaseException) -> str:
    """What ``ip`` said, or the OS error: why namespaces could not be made."""
    if isinstance(exc, subprocess.CalledProcessError):
        said = (exc.stderr or b"").decode(errors="replace").strip()
        return f"`{' '.join(exc.cmd)}`: {said or f'exit status {exc.returncode}'}"
    return str(exc)
