"""Shared fixtures: no test module may leave a process behind."""

from __future__ import annotations

import os

import psutil
import pytest
from hypothesis import settings

# The property and fuzz tests draw the same examples on every run of the test command, so
# CI is repeatable; scripts/fuzz explores new ones (ALLM_FUZZ_PROFILE=explore).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("ALLM_FUZZ_PROFILE", "repeatable"))


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())}"
    except psutil.Error:
        return str(proc.pid)


@pytest.fixture(autouse=True, scope="module")
def no_leaked_processes():
    """Fail a module whose tests and fixtures leave a child process running."""
    yield
    me = psutil.Process(os.getpid())
    left = []
    for child in me.children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                left.append(child)
        except psutil.NoSuchProcess:
            continue
    described = [_describe(c) for c in left]
    for child in left:
        child.kill()
    assert not left, f"tests leaked processes: {described}"
