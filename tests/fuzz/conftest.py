"""After each fuzz test, on its own: the server serves; and the run's size and time, printed at its end."""

from __future__ import annotations

import sys

import pytest

from .edge import serves, untouched


@pytest.fixture(autouse=True)
def still_serving(server):
    """Whatever a test sent (and whatever ran before it), the server serves after it and no
    manager ever restarted: each test shows it for itself, none relies on the order."""
    yield
    serves(server)
    untouched(server)


def pytest_terminal_summary(terminalreporter) -> None:
    fuzz = sys.modules.get("tests.fuzz.test_openapi_fuzz")
    if fuzz is not None and fuzz.CASES:
        terminalreporter.write_sep("=", "fuzz summary")
        terminalreporter.write_line(fuzz.summary())
