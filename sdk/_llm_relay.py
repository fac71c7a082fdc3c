"""Relayed model calls of many sandboxes over one trainer connection.

::

    relay = AsyncLLMRelay(client, [sb.id for sb in sandboxes])
    async for call in relay.calls():          # LLM calls of every sandbox, as they come
        await call.respond(policy(call.request))

Over HTTP one long poll (``POST /v1/llm/poll``) serves every sandbox; over the Ray transport
one poll per sandbox runs on the client's Ray connection, merged here. Sandboxes that are
removed drop out; :meth:`AsyncLLMRelay.calls` ends when none is left. :class:`LLMRelay` is the
synchronous twin (HTTP, or the Ray client's own loop thread).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from rock_serve.errors import NotFound, SandboxNotFound
from rock_serve.protocol.llm import LLMCall, LLMCallList
from rock_serve.sdk import _base, _llm_base
from rock_serve.sdk._async_llm import AsyncLLMCallHandle, poll_calls, release_calls
from rock_serve.sdk._sync_llm import LLMCallHandle
from rock_serve.sdk._sync_llm import poll_calls as poll_calls_sync
from rock_serve.sdk._sync_llm import release_calls as release_calls_sync

if TYPE_CHECKING:
    from rock_serve.sdk._async import AsyncClient
    from rock_serve.sdk._sync import Client

__all__ = ["AsyncLLMRelay", "LLMRelay"]


class AsyncLLMRelay:
    """Relayed calls of a set of sandboxes, multiplexed (see the module doc)."""

    def __init__(self, client: AsyncClient, sandbox_ids: Iterable[str], *, wait: float = 20.0):
        """Relay for ``sandbox_ids`` (more may be added with :meth:`add`)."""
        self._client = client
        self.sandbox_ids: list[str] = list(dict.fromkeys(sandbox_ids))
        self.wait = wait

    def add(self, sandbox_id: str) -> None:
        """Also relay this sandbox's calls (from the next poll on)."""
        if sandbox_id not in self.sandbox_ids:
            self.sandbox_ids.append(sandbox_id)

    async def calls(self) -> AsyncIterator[AsyncLLMCallHandle]:
        """Every relayed call of the sandboxes; ends when all of them are gone."""
        if _llm_base.is_ray(self._client):
            async for call in self._ray_calls():
                yield call
            return
        batch: list[LLMCall] = []
        try:
            while self.sandbox_ids:
                request = _llm_base.poll_many(self.sandbox_ids, self.wait, 4096)
                try:
                    response = await self._client._send(request)
                except SandboxNotFound:
                    return
                batch = _base.parse(response, LLMCallList).calls
                while batch:
                    yield AsyncLLMCallHandle(self._client, batch.pop(0))
        finally:
            for sandbox_id, ids in _by_sandbox(batch).items():
                await release_calls(self._client, sandbox_id, ids)

    async def _ray_calls(self) -> AsyncIterator[AsyncLLMCallHandle]:
        queue: asyncio.Queue[LLMCall | str] = asyncio.Queue()
        stopping = asyncio.Event()

        async def poller(sandbox_id: str) -> None:
            # Never cancelled mid-poll: a poll the Worker answers after its taker left would
            # lose its calls. On stop, the poll in flight ends (within ``wait``) and its calls
            # go back to the queue.
            try:
                while not stopping.is_set():
                    calls = await poll_calls(self._client, sandbox_id, self.wait, 4096)
                    if stopping.is_set():
                        await release_calls(self._client, sandbox_id, [c.call_id for c in calls])
                        return
                    for c in calls:
                        queue.put_nowait(c)
            except (SandboxNotFound, NotFound):
                queue.put_nowait(sandbox_id)  # gone: it drops out

        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                for sid in self.sandbox_ids:
                    if sid not in tasks:
                        tasks[sid] = asyncio.ensure_future(poller(sid))
                if not self.sandbox_ids:
                    return
                item = await queue.get()
                if isinstance(item, str):
                    with contextlib.suppress(ValueError):
                        self.sandbox_ids.remove(item)
                    continue
                yield AsyncLLMCallHandle(self._client, item)
        finally:
            stopping.set()
            if tasks:
                await asyncio.wait(list(tasks.values()), timeout=self.wait + 30)
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            left = [item for item in _drain(queue) if not isinstance(item, str)]
            for sandbox_id, ids in _by_sandbox(left).items():
                await release_calls(self._client, sandbox_id, ids)


class LLMRelay:
    """The synchronous twin of :class:`AsyncLLMRelay`."""

    def __init__(self, client: Client, sandbox_ids: Iterable[str], *, wait: float = 20.0):
        """Relay for ``sandbox_ids`` (more may be added with :meth:`add`)."""
        self._client = client
        self.sandbox_ids: list[str] = list(dict.fromkeys(sandbox_ids))
        self.wait = wait

    def add(self, sandbox_id: str) -> None:
        """Also relay this sandbox's calls (from the next poll on)."""
        if sandbox_id not in self.sandbox_ids:
            self.sandbox_ids.append(sandbox_id)

    def calls(self) -> Iterator[Any]:
        """Every relayed call of the sandboxes; ends when all of them are gone."""
        client: Any = self._client
        if _llm_base.is_ray(client):
            # The sync Ray client blocks in ray.get, one call at a time: poll the sandboxes in
            # turn (each poll waits at most ``wait``, shorter when there are several to visit).
            yield from self._ray_calls(client)
            return
        batch: list[LLMCall] = []
        try:
            while self.sandbox_ids:
                try:
                    request = _llm_base.poll_many(self.sandbox_ids, self.wait, 4096)
                    response = client._send(request)
                except SandboxNotFound:
                    return
                batch = _base.parse(response, LLMCallList).calls
                while batch:
                    yield LLMCallHandle(client, batch.pop(0))
        finally:
            for sandbox_id, ids in _by_sandbox(batch).items():
                release_calls_sync(client, sandbox_id, ids)

    def _ray_calls(self, client: Any) -> Iterator[LLMCallHandle]:
        while self.sandbox_ids:
            wait = self.wait if len(self.sandbox_ids) == 1 else min(self.wait, 1.0)
            for sandbox_id in list(self.sandbox_ids):
                try:
                    calls = poll_calls_sync(client, sandbox_id, wait, 4096)
                except (SandboxNotFound, NotFound):
                    self.sandbox_ids.remove(sandbox_id)
                    continue
                while calls:
                    call = calls.pop(0)
                    try:
                        yield LLMCallHandle(client, call)
                    except GeneratorExit:
                        release_calls_sync(client, sandbox_id, [c.call_id for c in calls])
                        raise


def _by_sandbox(calls: list[LLMCall]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in calls:
        out.setdefault(c.sandbox_id, []).append(c.call_id)
    return out


def _drain(queue: asyncio.Queue[Any]) -> list[Any]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
