"""Waiting on conditions, never on the clock: the one helper the tests share for it.

A condition is polled until it holds or a generous deadline passes; the deadline only bounds a
broken run (it is not a latency assertion), so a loaded machine slows a test down but never
fails it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: Deadline for conditions that should hold "soon": generous on a loaded 2-core machine.
DEFAULT_TIMEOUT = 30.0


def wait_until(
    check: Callable[[], T], timeout: float = DEFAULT_TIMEOUT, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something truthy; return it (AssertionError on time-out)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


async def async_wait_until(
    check: Callable[[], T | Awaitable[T]],
    timeout: float = DEFAULT_TIMEOUT,
    what: str = "condition",
) -> T:
    """The asyncio twin of :func:`wait_until`; ``check`` may be sync or async."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        result = check()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie or a vanished pid is not alive)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"
