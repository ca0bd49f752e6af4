"""Say at the end of the run which hosts the multi-host tests had: namespaces, or loopback."""

from __future__ import annotations

from tests.multihost import hosts


def pytest_terminal_summary(terminalreporter) -> None:
    if hosts.MODES:
        terminalreporter.write_sep("=", "multihost")
        for mode in sorted(hosts.MODES):
            terminalreporter.write_line(f"hosts: {mode}")
