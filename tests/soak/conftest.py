"""Print each soak's summary at the end of the pytest run, passed or failed."""

from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter) -> None:
    harness = sys.modules.get("tests.soak.harness")
    for text in getattr(harness, "SUMMARIES", ()):
        terminalreporter.write_sep("=", "soak summary")
        terminalreporter.write_line(text)
