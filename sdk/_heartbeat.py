"""Background lease renewal for sandbox objects: an asyncio task (async) or a thread (sync).

While a sandbox object lives (inside its ``with`` block), its heartbeat renews the sandbox's
lease every third of the lease (``rock_serve.lifetime.renew_interval``), so a live trainer keeps
its sandboxes and a dead one (``kill -9``) loses them one lease later. The heartbeat holds the
sandbox object weakly: once the object is garbage, the beats stop. A failed beat is logged and
retried at the next one; a sandbox that is gone ends the heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from typing import TYPE_CHECKING

from rock_serve.errors import SandboxNotFound
from rock_serve.lifetime import MIN_RENEW_INTERVAL, renew_interval

if TYPE_CHECKING:
    from rock_serve.sdk._async_sandbox import AsyncSandbox
    from rock_serve.sdk._sync_sandbox import Sandbox

__all__ = ["AsyncHeartbeat", "Heartbeat", "interval_for"]

log = logging.getLogger("rock_serve.sdk")

#: Shortest time between two beats, whatever the lease (the rule lives in ``rock_serve.lifetime``).
MIN_INTERVAL = MIN_RENEW_INTERVAL


def interval_for(lease_seconds: float | None) -> float | None:
    """Seconds between beats for a lease (a third of it), or None when there is no lease."""
    return renew_interval(lease_seconds)


class AsyncHeartbeat:
    """Renews an :class:`AsyncSandbox`'s lease from an asyncio task."""

    def __init__(self, sandbox: AsyncSandbox, interval: float) -> None:
        self._ref = weakref.ref(sandbox)
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self.beats = 0

    def start(self) -> None:
        """Start beating (idempotent)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            sandbox = self._ref()
            if sandbox is None:
                return
            try:
                await sandbox.client.renew(sandbox.id)
                self.beats += 1
            except SandboxNotFound:
                return
            except Exception as exc:  # transient: the next beat tries again
                log.warning("lease renewal of %s failed: %r", sandbox.id, exc)
            del sandbox

    async def stop(self) -> None:
        """Stop beating and wait for the task to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Heartbeat:
    """Renews a :class:`Sandbox`'s lease from a daemon thread."""

    def __init__(self, sandbox: Sandbox, interval: float) -> None:
        self._ref = weakref.ref(sandbox)
        self.interval = interval
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0

    def start(self) -> None:
        """Start beating (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rock-heartbeat", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            sandbox = self._ref()
            if sandbox is None:
                return
            try:
                sandbox.client.renew(sandbox.id)
                self.beats += 1
            except SandboxNotFound:
                return
            except Exception as exc:  # transient: the next beat tries again
                log.warning("lease renewal of %s failed: %r", sandbox.id, exc)
            del sandbox

    def stop(self) -> None:
        """Stop beating and wait for the thread to end."""
        self._stopped.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
