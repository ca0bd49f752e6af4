"""Shared fixtures: no test may leave a process behind."""

from __future__ import annotations

import os

import psutil
import pytest


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Fail a test that leaves a child process running."""
    yield
    me = psutil.Process(os.getpid())
    left = [c for c in me.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
    for child in left:
        child.kill()
    assert not left, f"test leaked processes: {[(c.pid, c.cmdline()) for c in left]}"
