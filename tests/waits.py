"""Waits on facts: poll a state until it holds; the time bound only ever fails the test."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from allm.kernel.client import KernelClient

T = TypeVar("T")
POLL_S = 0.05


def wait_for(predicate: Callable[[], T], timeout_s: float = 60.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something true, and return that; fail after the time."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


async def until(
    predicate: Callable[[], T | Awaitable[T]], timeout_s: float = 60.0, what: str = "condition"
) -> T:
    """``wait_for`` inside an event loop, which runs between polls (``predicate`` may be async)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result: Any = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_S)


async def wait_idle(client: KernelClient) -> None:
    """Until the (only) manager's heartbeat says it runs nothing and has nothing in line."""

    def idle() -> bool:
        hb = client.instances()[0].heartbeat
        return hb is not None and hb.active == 0 and hb.queued == 0

    await until(idle, 10, "the manager to be idle")
