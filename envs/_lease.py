"""An env's hold on the platform: its client, and its sandbox or its share of a shared one.

A :class:`Lease` performs the effects a :class:`~rock_serve.envs._machine.Machine` yields, with
a sync :class:`~rock_serve.sdk.Client` or an :class:`~rock_serve.sdk.AsyncClient`, and gives
everything back exactly once: on ``close()``, or from the env's ``weakref.finalize`` when the
env is garbage collected without one. It never references its env, so the finalizer can run.

Shared sandboxes are counted per (client, create request): envs made with the same client and
a spec with ``shared_sandbox`` share one sandbox, each with its own session and directory; the
last one to go deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from rock_serve.errors import InvalidRequest, RockError, SandboxNotFound
from rock_serve.protocol import CreateSandboxRequest, SandboxRecord
from rock_serve.sdk import AsyncClient, Client, _async_llm, _sync_llm

__all__ = [
    "AcquireSandbox",
    "Call",
    "CallLLM",
    "DropSandbox",
    "Effect",
    "Lease",
    "pending_releases",
]

log = logging.getLogger("rock_serve.envs")


@dataclass(frozen=True)
class Call:
    """One method call on the SDK client (``Client`` and ``AsyncClient`` share the names)."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AcquireSandbox:
    """Create the env's sandbox (or join the shared one); the result is its id."""


@dataclass(frozen=True)
class DropSandbox:
    """Give the sandbox back now (it died); the next reset acquires a new one."""


@dataclass(frozen=True)
class CallLLM:
    """One model-service call of the SDK (``poll_calls`` or ``answer_call`` of ``sb.llm``'s
    module) with the client and these arguments.
    """

    function: Literal["poll_calls", "answer_call"]
    args: tuple[Any, ...] = ()


Effect = Call | CallLLM | AcquireSandbox | DropSandbox

#: Work started by garbage collection or cancellation, kept referenced until it is done.
_PENDING: set[asyncio.Task[Any]] = set()
_THREADS: set[threading.Thread] = set()


def pending_releases() -> int:
    """How many releases started by garbage collection or cancellation are still running."""
    return sum(1 for t in _PENDING if not t.done()) + sum(1 for t in _THREADS if t.is_alive())


def _track(task: asyncio.Task[Any]) -> None:
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)


# ---------------------------------------------------------------------------------------------
# Shared sandboxes


class _SharedEntry:
    def __init__(self, client: Any) -> None:
        self.client = client  # keeps id(client) in the key from being reused
        self.sandbox_id: str | None = None
        self.future: asyncio.Future[str] | None = None
        self.refs = 0


class _SharedPool:
    """Reference-counted shared sandboxes, keyed by client identity and create request."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str], _SharedEntry] = {}
        self._lock = threading.Lock()

    def acquire_sync(
        self, client: Client, key: tuple[int, str], request: CreateSandboxRequest
    ) -> str:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.sandbox_id is None:
                record = client.create_sandbox(request)
                entry = self._entries[key] = _SharedEntry(client)
                entry.sandbox_id = record.id
            entry.refs += 1
            return entry.sandbox_id

    async def acquire_async(
        self, client: AsyncClient, key: tuple[int, str], request: CreateSandboxRequest
    ) -> str:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _SharedEntry(client)

            async def create() -> str:
                record: SandboxRecord = await client.create_sandbox(request)
                entry.sandbox_id = record.id
                if entry.refs == 0:  # every waiter was cancelled: nobody will release it
                    self._entries.pop(key, None)
                    await client.delete_sandbox(record.id)
                return record.id

            entry.future = asyncio.ensure_future(create())
        assert entry.future is not None
        entry.refs += 1
        try:
            return await asyncio.shield(entry.future)
        except BaseException:
            entry.refs -= 1
            future = entry.future
            failed = future.done() and (future.cancelled() or future.exception() is not None)
            if failed and self._entries.get(key) is entry:
                del self._entries[key]  # a failed create is not cached: the next one retries
            raise

    def release(self, key: tuple[int, str], sandbox_id: str) -> bool:
        """Drop one reference; True when the caller must delete the sandbox."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.sandbox_id != sandbox_id:
                return True  # discarded after a crash: whoever gets here deletes (idempotent)
            entry.refs -= 1
            if entry.refs > 0:
                return False
            del self._entries[key]
            return True

    def discard(self, key: tuple[int, str], sandbox_id: str) -> None:
        """Forget a dead shared sandbox so that the next acquire creates a new one."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.sandbox_id == sandbox_id:
                del self._entries[key]


SHARED = _SharedPool()


# ---------------------------------------------------------------------------------------------
# The lease


class Lease:
    """The client and sandbox of one env (see the module docstring)."""

    def __init__(
        self,
        client: Client | AsyncClient,
        *,
        owns_client: bool,
        request: CreateSandboxRequest,
        shared: bool,
        session: str,
        workdir: str,
    ) -> None:
        self.client = client
        self.owns_client = owns_client
        self.request = request
        self.key = (id(client), request.model_dump_json()) if shared else None
        self.session = session
        self.workdir = workdir
        self.sandbox_id: str | None = None
        self.released = False

    # -- sync

    def perform_sync(self, effect: Effect) -> Any:
        """Perform one effect with the sync client."""
        client = self.client
        assert isinstance(client, Client)
        if isinstance(effect, Call):
            return getattr(client, effect.method)(*effect.args, **effect.kwargs)
        if isinstance(effect, CallLLM):
            return getattr(_sync_llm, effect.function)(client, *effect.args)
        if isinstance(effect, AcquireSandbox):
            if self.key is not None:
                self.sandbox_id = SHARED.acquire_sync(client, self.key, self.request)
                return self.sandbox_id
            request, token = _with_token(self.request)
            try:
                self.sandbox_id = client.create_sandbox(request).id
            except httpx.TransportError:
                # The answer was lost, not necessarily the create: remove what it may have made.
                _delete_quietly(client, "delete_by_token", token)
                raise
            return self.sandbox_id
        try:
            self._drop_sync(dead=True)
        except Exception:  # the error that killed the sandbox matters more
            log.warning("could not delete a dead sandbox (its TTL will)", exc_info=True)
        return None

    def _drop_sync(self, *, dead: bool = False) -> None:
        sid, self.sandbox_id = self.sandbox_id, None
        if sid is None:
            return
        client = self.client
        assert isinstance(client, Client)
        if self.key is not None:
            if dead:
                SHARED.discard(self.key, sid)
            else:
                with contextlib.suppress(RockError, httpx.HTTPError):
                    client.close_session(sid, session=self.session)
                with contextlib.suppress(RockError, httpx.HTTPError):
                    client.remove(sid, self.workdir, recursive=True, missing_ok=True)
            if not SHARED.release(self.key, sid):
                return
        with contextlib.suppress(SandboxNotFound):
            client.delete_sandbox(sid)

    def release_sync(self) -> None:
        """Give everything back (idempotent; logs instead of raising)."""
        if self.released:
            return
        self.released = True
        try:
            self._drop_sync()
        except Exception:
            log.warning("could not release sandbox of an env (its TTL will)", exc_info=True)
        finally:
            if self.owns_client:
                assert isinstance(self.client, Client)
                self.client.close()

    # -- async

    async def perform_async(self, effect: Effect) -> Any:
        """Perform one effect with the async client."""
        client = self.client
        assert isinstance(client, AsyncClient)
        if isinstance(effect, Call):
            return await getattr(client, effect.method)(*effect.args, **effect.kwargs)
        if isinstance(effect, CallLLM):
            return await getattr(_async_llm, effect.function)(client, *effect.args)
        if isinstance(effect, AcquireSandbox):
            if self.key is not None:
                self.sandbox_id = await SHARED.acquire_async(client, self.key, self.request)
            else:
                self.sandbox_id = await self._create_async(client)
            return self.sandbox_id
        try:
            await self._drop_async(dead=True)
        except Exception:  # the error that killed the sandbox matters more
            log.warning("could not delete a dead sandbox (its TTL will)", exc_info=True)
        return None

    async def _create_async(self, client: AsyncClient) -> str:
        request, token = _with_token(self.request)
        task = asyncio.ensure_future(client.create_sandbox(request))
        try:
            record: SandboxRecord = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The create goes on; delete what it makes, or it would leak until its TTL.
            task.add_done_callback(lambda t: _delete_orphan(client, t, token))
            raise
        except httpx.TransportError:
            _release_in_thread(client, "delete_by_token", token)
            raise
        return record.id

    async def _drop_async(self, *, dead: bool = False) -> None:
        sid, self.sandbox_id = self.sandbox_id, None
        if sid is None:
            return
        client = self.client
        assert isinstance(client, AsyncClient)
        if self.key is not None:
            if dead:
                SHARED.discard(self.key, sid)
            else:
                with contextlib.suppress(RockError, httpx.HTTPError):
                    await client.close_session(sid, session=self.session)
                with contextlib.suppress(RockError, httpx.HTTPError):
                    await client.remove(sid, self.workdir, recursive=True, missing_ok=True)
            if not SHARED.release(self.key, sid):
                return
        with contextlib.suppress(SandboxNotFound):
            await client.delete_sandbox(sid)

    async def adopt_async(self, sandbox_id: str) -> None:
        """Use ``sandbox_id`` (a fork made for this env) instead of the sandbox held now."""
        if self.key is not None:
            raise InvalidRequest("an env on a shared sandbox cannot take a fork")
        await self._drop_async()
        self.sandbox_id = sandbox_id

    async def arelease(self) -> None:
        """Give everything back (idempotent; logs instead of raising)."""
        if self.released:
            return
        self.released = True
        try:
            await self._drop_async()
        except Exception:
            log.warning("could not release sandbox of an env (its TTL will)", exc_info=True)
        finally:
            if self.owns_client:
                assert isinstance(self.client, AsyncClient)
                with contextlib.suppress(Exception):
                    await self.client.aclose()

    def release_from_gc(self) -> None:
        """The finalizer of an async env: delete the sandbox from a thread of its own.

        Not a task on the env's loop: ``asyncio.run`` cancels the tasks left when its main
        coroutine ends, which is often just when envs are dropped. The thread is not a daemon,
        so the interpreter waits for it at exit.
        """
        if self.released:
            return
        self.released = True
        sid, self.sandbox_id = self.sandbox_id, None
        if sid is not None and (self.key is None or SHARED.release(self.key, sid)):
            _release_in_thread(self.client, "delete_sandbox", sid)
        if self.owns_client:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop to close its connections on: they go with the process
            assert isinstance(self.client, AsyncClient)
            _track(loop.create_task(self.client.aclose()))


def _with_token(request: CreateSandboxRequest) -> tuple[CreateSandboxRequest, str]:
    """The request with an idempotency token (the caller's, else a new one), and the token."""
    if request.client_token is not None:
        return request, request.client_token
    token = f"rock-env-{uuid.uuid4().hex}"
    return request.model_copy(update={"client_token": token}), token


def _delete_orphan(client: AsyncClient, task: asyncio.Future[SandboxRecord], token: str) -> None:
    """After a cancelled create: delete its sandbox, by id if it answered, else by token."""
    if not task.cancelled() and task.exception() is None:
        _release_in_thread(client, "delete_sandbox", task.result().id)
    else:
        _release_in_thread(client, "delete_by_token", token)


def _release_in_thread(client: Client | AsyncClient, method: str, target: str) -> None:
    thread = threading.Thread(
        target=_delete_quietly, args=(client, method, target), name=f"rock-env-release-{target}"
    )
    _THREADS.add(thread)
    thread.start()


def _delete_quietly(client: Client | AsyncClient, method: str, target: str) -> None:
    """``client.<method>(target)`` with no event loop running here; never raises."""
    try:
        _delete_without_loop(client, method, target)
    except Exception:
        log.warning("could not release sandbox %s of an env (its TTL will)", target, exc_info=True)
    finally:
        _THREADS.discard(threading.current_thread())


def _delete_without_loop(client: Client | AsyncClient, method: str, target: str) -> None:
    """``delete_sandbox``/``delete_by_token`` from a thread with no running event loop."""
    if isinstance(client, Client):
        with contextlib.suppress(SandboxNotFound):
            getattr(client, method)(target)
        return
    if getattr(client, "_http", None) is not None:
        # An HTTP client: its connections belong to its own loop; this thread uses a sync one.
        settings = client.settings
        with Client(settings.base_url, token=settings.token, timeout=settings.timeout) as sync:
            with contextlib.suppress(SandboxNotFound):
                getattr(sync, method)(target)
        return
    # The Ray transport: actor calls work from a fresh loop.
    with contextlib.suppress(SandboxNotFound):
        asyncio.run(getattr(client, method)(target))
