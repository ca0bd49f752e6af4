"""Print the fuzz run's size and time at the end of the pytest run, passed or failed."""

from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter) -> None:
    fuzz = sys.modules.get("tests.fuzz.test_openapi_fuzz")
    if fuzz is not None and fuzz.CASES:
        terminalreporter.write_sep("=", "fuzz summary")
        terminalreporter.write_line(fuzz.summary())
