"""Commands done once per idempotency key: a resend awaits (or gets) the first one's result.

The cache is bounded in size and in time: finished entries older than ``seconds`` or beyond
``size`` are forgotten, oldest first; an entry still running is never dropped (its resends
must share its future).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

__all__ = ["KEY_SECONDS", "KEYS", "KeyCache"]

T = TypeVar("T")

#: Idempotency keys a Worker remembers, and for how long (seconds).
KEYS = 10_000
KEY_SECONDS = 600.0


class KeyCache:
    """Results (as shared futures) of keyed work, bounded by ``size`` and ``seconds``."""

    def __init__(
        self, clock: Callable[[], float], size: int = KEYS, seconds: float = KEY_SECONDS
    ) -> None:
        self.clock = clock
        self.size = size
        self.seconds = seconds
        self._done: OrderedDict[str, tuple[float, asyncio.Future[Any]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._done)

    def __contains__(self, key: object) -> bool:
        return key in self._done

    async def once(self, key: str | None, work: Awaitable[T]) -> T:
        """Do ``work`` once per ``key`` (every time when ``key`` is None).

        A resend of a known key does not start its ``work`` (a coroutine is closed unrun) and
        gets the first call's result or error; cancelling one caller does not cancel the work
        the others wait for.
        """
        if key is None:
            return await work
        known = self._done.get(key)
        if known is not None:
            if asyncio.iscoroutine(work):
                work.close()
            return cast("T", await asyncio.shield(known[1]))
        future: asyncio.Future[T] = asyncio.ensure_future(work)
        now = self.clock()
        self._done[key] = (now, future)
        self._forget(now)
        return await asyncio.shield(future)

    def _forget(self, now: float) -> None:
        horizon = now - self.seconds
        while self._done:  # forget the oldest finished keys past the bounds
            oldest_at, oldest = next(iter(self._done.values()))
            if not oldest.done() or (len(self._done) <= self.size and oldest_at >= horizon):
                break
            self._done.popitem(last=False)
