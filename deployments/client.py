"""The SDK's Ray transport: :class:`AsyncRayClient` calls the platform's actors directly.

Inside a Ray job or actor on the cluster that runs the platform (same Ray version), a client
made by ``AsyncClient.from_ray(namespace=...)`` skips HTTP: control-plane calls go to the
Scheduler actor and data-plane calls straight to the Worker actor named in the sandbox id (one
actor call, no Serve proxy, no Admin). It has the methods of
:class:`~rock_serve.sdk.AsyncClient` and raises the same typed errors; requests are built by the
SDK's sans-IO core and retried by its :class:`~rock_serve.sdk.RetryPolicy` (429/503 only).
Sandbox operations (exec, sessions, files, archives, stats) use the SDK's own methods: their
REST call is mapped to its typed operation (:mod:`~rock_serve.deployments._ray_ops`) and sent to
``Worker.op``; a large file rides in its model, which Ray puts in its object store by itself.

Auth and audit: a client made by ``from_ray`` carries the caller's platform token
(``ROCK_TOKEN``, else the credentials file, as the HTTP SDK finds it) and calls the actors'
Ray-transport entry points (``Scheduler.ray_call``, ``Worker.ray_op``/``ray_op_stream`` and
``Worker.ray_call``), which check it as the Admin does (namespaces, admin) and audit the calls
as HTTP's are audited (see ``_raygate``); no or a wrong token while auth is required is a
typed ``unauthorized``. The platform's own routes (compat, GEM) build the client with
``gate=False``: they authenticated and audit their caller themselves and call the actors'
methods directly.

Sandboxes created through it are owned by the calling Ray job (``ray_job_id``), so the
platform reaps them when that job's driver dies. :class:`RayClient` is the synchronous twin
(``Client.from_ray()``): the same method bodies with blocking ``ray.get`` I/O, no event loop.

This module lives in ``deployments/`` because only ``deployments/`` imports Ray; the SDK finds
it through the ``rock_serve.sdk.transports`` entry point (``ray``), so the SDK imports nothing of
the server and the HTTP client never needs Ray.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar, cast

import httpx
import ray

from rock_serve.deployments._processes_ray import RayProcessClient
from rock_serve.deployments._ray import (
    _RAY_ERRORS,
    ActorHandle,
    WorkerHandles,
    _translate,
    call,
    current_job_id,
    get_scheduler,
    stream,
    worker_actor_name,
)
from rock_serve.deployments._ray_ops import operation_of, reply, stream_reply
from rock_serve.deployments._trace import TRACE_ID, new_trace_id, traced
from rock_serve.errors import InvalidRequest, RockError, SandboxNotFound, http_status
from rock_serve.protocol import (
    CreateSandboxRequest,
    Health,
    SandboxList,
    SandboxRecord,
    SandboxState,
)
from rock_serve.protocol.api import SANDBOX_ID
from rock_serve.protocol.fork import ForkRequest, ForkResult
from rock_serve.protocol.ops import (
    Op,
    Streams,
)
from rock_serve.protocol.processes import ProcessStream
from rock_serve.protocol.snapshot import SnapshotRecord, SnapshotRequest
from rock_serve.sdk import _base
from rock_serve.sdk._async import AsyncClient
from rock_serve.sdk._processes import ProcessItem
from rock_serve.sdk._sync import Client

__all__ = [
    "DEFAULT_NAMESPACE",
    "AsyncRayClient",
    "RayClient",
    "ray_client",
]

#: The Ray namespace of the platform's actors when ``ServerArgs.namespace`` is not set.
DEFAULT_NAMESPACE = "rock-serve"

_ID = re.compile(SANDBOX_ID)
C = TypeVar("C")
R = TypeVar("R")
ItemT = TypeVar("ItemT")


def _gated(method: str, token: str | None, args: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    """The gated entry point and arguments of an actor call (token checked, call audited)."""
    if method == "op":
        return "ray_op", (token, *args)
    return "ray_call", (token, method, *args)


def _gated_stream(
    method: str, token: str | None, args: tuple[Any, ...]
) -> tuple[str, tuple[Any, ...]]:
    """The gated entry point and arguments of a streaming actor call."""
    if method == "op_stream":
        return "ray_op_stream", (token, *args)
    return "ray_stream", (token, method, *args)


def _worker_of(sandbox_id: str) -> str:
    if not _ID.match(sandbox_id):
        raise SandboxNotFound(f"no sandbox {sandbox_id!r} (malformed id)")
    return sandbox_id.split("-")[1]


def ray_client(
    cls: type[C],
    namespace: str = DEFAULT_NAMESPACE,
    *,
    retry: _base.RetryPolicy | None = None,
    token: str | None = None,
) -> C:
    """A Ray-transport client for ``cls`` (what ``AsyncClient.from_ray`` / ``Client.from_ray``
    return), carrying ``token`` (default: ``ROCK_TOKEN`` or the credentials file).

    Raises:
        InvalidRequest: ``cls`` is neither SDK client.
    """
    if issubclass(cls, AsyncClient):
        return cast(C, AsyncRayClient(namespace, retry=retry, token=token, gate=True))
    if issubclass(cls, Client):
        return cast(C, RayClient(namespace, retry=retry, token=token))
    raise InvalidRequest(f"no Ray transport for {cls.__name__}")


class AsyncRayClient(RayProcessClient, AsyncClient):
    """An :class:`~rock_serve.sdk.AsyncClient` that talks to the actors over Ray, not HTTP.

    Ray must be initialized (inside a Ray job or actor it is).
    """

    def __init__(
        self,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        retry: _base.RetryPolicy | None = None,
        tenant: str = "default",
        token: str | None = None,
        gate: bool = False,
    ) -> None:
        """Connect to the platform whose actors live in Ray namespace ``namespace``.

        Args:
            namespace: The platform's Ray namespace.
            retry: Retry policy.
            tenant: The platform namespace its sandboxes are created in when auth is disabled
                (with auth on, the token's namespace).
            token: The platform token (default: ``ROCK_TOKEN`` or the credentials file);
                used with ``gate``.
            gate: Go through the actors' Ray-transport entry points, which check ``token``
                and audit (what ``from_ray`` does). False only for the platform's own code,
                which checked and audits its caller itself.

        Raises:
            RuntimeUnavailable: Ray is not initialized or no platform runs in ``namespace``.
        """
        self.namespace = namespace
        self.tenant = tenant
        self.gate = gate
        self.settings = (
            _base.ClientSettings.from_env(token=token) if gate else _base.ClientSettings()
        )
        self.retry = retry if retry is not None else _base.RetryPolicy()
        self._scheduler: ActorHandle = get_scheduler(namespace)
        self._workers = WorkerHandles(namespace)

    async def aclose(self) -> None:
        """Nothing to close: actor handles need no connections of their own."""

    async def _send(self, call: _base.Call, *, stream: bool = False) -> httpx.Response:
        """A data-plane call as its operation on the sandbox's Worker (``_ray_ops``), replied
        as the Admin would; the SDK's own method builds the call and parses the reply.

        Raises:
            InvalidRequest: a REST call the Ray transport does not map (it needs HTTP).
            RockError: the operation's typed error (retried by the SDK's policy on the way).
        """
        mapped = operation_of(call)
        if mapped is None:
            raise InvalidRequest(f"{call.method} {call.path} needs HTTP: use AsyncClient(base_url)")
        sandbox_id, operation, streamed = mapped
        if streamed:
            return stream_reply(call, self._op_stream(sandbox_id, cast(Any, operation)))
        return reply(call, await self._op(sandbox_id, operation))

    # -----------------------------------------------------------------------------------------
    # I/O

    async def _call(self, actor: ActorHandle | None, method: str, *args: Any) -> Any:
        """Call ``method`` on ``actor`` (the Scheduler if None) with the SDK's retry policy."""
        state = _base.RetryState(self.retry)
        target = self._scheduler if actor is None else actor
        if self.gate:  # the entry point that checks the token and audits
            method, args = _gated(method, self.settings.token, args)
        # One trace id for the call and its retries (a caller's own trace is kept).
        token = TRACE_ID.set(new_trace_id()) if traced() is None else None
        try:
            while True:
                try:
                    return await call(target, method, *args)
                except RockError as error:
                    delay = state.after_error(http_status(error.code), error)
                    if delay is None:
                        raise
                    await _base.asleep(delay)
        finally:
            if token is not None:
                TRACE_ID.reset(token)

    async def _data(self, sandbox_id: str, method: str, *args: Any) -> Any:
        worker = await self._workers.get(_worker_of(sandbox_id))
        return await self._call(worker, method, sandbox_id, *args)

    async def _op(self, sandbox_id: str, operation: Op[R]) -> R:
        """Run one sandbox operation on its Worker (``Worker.op``, or ``ray_op`` gated)."""
        return cast(R, await self._data(sandbox_id, "op", operation))

    async def _op_stream(self, sandbox_id: str, operation: Streams[ItemT]) -> AsyncIterator[ItemT]:
        """Stream one operation's items (``Worker.op_stream``, or ``ray_op_stream`` gated)."""
        async for item in self._ray_stream(sandbox_id, "op_stream", operation):
            yield item

    async def _ray_stream(self, sandbox_id: str, method: str, request: Any) -> AsyncIterator[Any]:
        worker = await self._workers.get(_worker_of(sandbox_id))
        args: tuple[Any, ...] = (sandbox_id, request)
        if self.gate:
            method, args = _gated_stream(method, self.settings.token, args)
        async for item in stream(worker, method, *args):
            yield item

    # -----------------------------------------------------------------------------------------
    # Platform and sandboxes

    async def health(self) -> Health:
        """Ask the platform whether it is up."""
        result: Health = await self._call(None, "health")
        return result

    async def create_sandbox(
        self, request: CreateSandboxRequest | None = None, /, **spec: Any
    ) -> SandboxRecord:
        """Create a sandbox (see :meth:`AsyncClient.create_sandbox`)."""
        if request is None:
            request = _base.build(CreateSandboxRequest, **spec)
        elif spec:
            request = request.model_copy(update=spec)
        if request.ray_job_id is None:
            request = request.model_copy(update={"ray_job_id": current_job_id()})
        record: SandboxRecord = await self._call(None, "create", request, self.tenant)
        return record

    async def delete_by_token(self, client_token: str) -> None:
        """Delete the sandbox a create with ``client_token`` made (see ``AsyncClient``)."""
        await self._call(None, "delete_by_token", client_token, self.tenant)

    async def fork_sandbox(self, sandbox_id: str, request: ForkRequest) -> ForkResult:
        """Fork a running sandbox (see :meth:`AsyncClient.fork_sandbox`)."""
        result: ForkResult = await self._call(None, "fork", sandbox_id, request, self.tenant)
        return result

    async def pause_sandbox(self, sandbox_id: str) -> SandboxRecord:
        """Pause a sandbox (see :meth:`AsyncClient.pause_sandbox`)."""
        record: SandboxRecord = await self._call(None, "pause", sandbox_id, self.tenant)
        return record

    async def resume_sandbox(self, sandbox_id: str) -> SandboxRecord:
        """Resume a paused sandbox (see :meth:`AsyncClient.resume_sandbox`)."""
        record: SandboxRecord = await self._call(None, "resume", sandbox_id, self.tenant)
        return record

    async def snapshot_sandbox(
        self, sandbox_id: str, request: SnapshotRequest | None = None
    ) -> SnapshotRecord:
        """Snapshot a sandbox (see :meth:`AsyncClient.snapshot_sandbox`)."""
        snap: SnapshotRecord = await self._call(
            None, "snapshot", sandbox_id, request or SnapshotRequest(), self.tenant
        )
        return snap

    async def list_snapshots(self) -> list[SnapshotRecord]:
        """The namespace's snapshots (see :meth:`AsyncClient.list_snapshots`)."""
        items: list[SnapshotRecord] = await self._call(None, "snapshots", self.tenant)
        return items

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        """One snapshot (see :meth:`AsyncClient.get_snapshot`)."""
        snap: SnapshotRecord = await self._call(None, "get_snapshot", snapshot_id, self.tenant)
        return snap

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot (see :meth:`AsyncClient.delete_snapshot`)."""
        await self._call(None, "delete_snapshot", snapshot_id, self.tenant)

    async def renew(self, sandbox_id: str) -> SandboxRecord:
        """Renew a sandbox's lease."""
        record: SandboxRecord = await self._data(sandbox_id, "renew")
        return record

    async def get_sandbox(self, sandbox_id: str) -> SandboxRecord:
        """Look up one sandbox."""
        _worker_of(sandbox_id)
        record: SandboxRecord = await self._call(None, "get", sandbox_id)
        return record

    async def list_sandboxes(
        self,
        *,
        owner: str | None = None,
        state: SandboxState | str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[SandboxRecord]:
        """List sandboxes, newest first."""
        wanted = SandboxState(state) if state is not None else None
        result: SandboxList = await self._call(None, "list", owner, wanted, dict(labels or {}))
        return result.items

    async def delete_sandbox(self, sandbox_id: str) -> None:
        """Delete a sandbox and everything in it."""
        _worker_of(sandbox_id)
        await self._call(None, "delete", sandbox_id)


# ---------------------------------------------------------------------------------------------
# The synchronous twin: the same methods, each call a plain ``ray.get`` (no loop, no thread)


def _get(ref: Any, method: str) -> Any:
    try:
        return ray.get(ref)
    except _RAY_ERRORS as exc:
        raise _translate(exc, method) from None


class _BlockingRayClient(AsyncRayClient):
    """:class:`AsyncRayClient` whose I/O blocks in ``ray.get`` and never suspends, so each of
    its coroutines runs to the end on its first step (:func:`_drive`): the sync client reuses
    every method body without an event loop.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._actors: dict[str, ActorHandle] = {}

    def _worker(self, sandbox_id: str) -> ActorHandle:
        short = _worker_of(sandbox_id)
        actor = self._actors.get(short)
        if actor is None:
            try:
                actor = ray.get_actor(worker_actor_name(short), namespace=self.namespace)
            except ValueError:
                raise SandboxNotFound(f"no Worker {short!r} (so no such sandbox)") from None
            self._actors[short] = actor
        return actor

    async def _call(self, actor: ActorHandle | None, method: str, *args: Any) -> Any:
        state = _base.RetryState(self.retry)
        target = self._scheduler if actor is None else actor
        if self.gate:
            method, args = _gated(method, self.settings.token, args)
        while True:
            try:
                return _get(getattr(target, method).remote(*args), method)
            except RockError as error:
                delay = state.after_error(http_status(error.code), error)
                if delay is None:
                    raise
                _base.sleep(delay)

    async def _data(self, sandbox_id: str, method: str, *args: Any) -> Any:
        return await self._call(self._worker(sandbox_id), method, sandbox_id, *args)

    async def _ray_stream(self, sandbox_id: str, method: str, request: Any) -> AsyncIterator[Any]:
        for item in self._blocking_stream(sandbox_id, method, request):
            yield item

    async def process_output(
        self,
        sandbox_id: str,
        pid: int,
        *,
        stream: ProcessStream = "stdout",
        offset: int = 0,
        follow: bool = False,
    ) -> AsyncIterator[ProcessItem]:
        """One stream's output from ``offset`` (see ``AsyncClient.process_output``)."""
        rest = (pid, stream, offset, follow)
        for item in self._blocking_stream(sandbox_id, "stream_process_output", *rest):
            yield item

    def _blocking_stream(self, sandbox_id: str, method: str, *rest: Any) -> Iterator[Any]:
        worker = self._worker(sandbox_id)
        args: tuple[Any, ...] = (sandbox_id, *rest)
        target = method
        if self.gate:
            target, args = _gated_stream(method, self.settings.token, args)
        gen = getattr(worker, target).options(num_returns="streaming").remote(*args)
        finished = False
        try:
            for ref in gen:
                try:
                    item = _get(ref, method)
                except RockError:
                    finished = True
                    raise
                yield item
            finished = True
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    ray.cancel(gen)


def _drive(coro: Coroutine[Any, Any, Any] | Any) -> Any:
    """Run a coroutine of :class:`_BlockingRayClient` to its end (it never suspends)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a blocking Ray-transport call suspended")  # pragma: no cover


def _drive_iter(items: AsyncIterator[Any]) -> Iterator[Any]:
    try:
        while True:
            try:
                yield _drive(items.__anext__())
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(StopAsyncIteration, StopIteration):
                _drive(aclose())


def _bridge(name: str) -> Callable[..., Any]:
    """A sync method that runs ``AsyncRayClient.<name>`` with blocking I/O."""
    target = getattr(AsyncRayClient, name)

    def method(self: RayClient, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self._async, name)(*args, **kwargs)
        if inspect.isawaitable(result):
            return _drive(result)
        if isinstance(result, AsyncIterator):
            return _drive_iter(result)
        return result

    method.__name__ = method.__qualname__ = name
    method.__doc__ = target.__doc__
    return method


class RayClient(Client):
    """A :class:`~rock_serve.sdk.Client` over the Ray transport (see :class:`AsyncRayClient`).

    Each method blocks in ``ray.get`` on the calling thread (no event loop, no thread of its
    own), as a Ray task or a rollout worker calls actors. Thread-safe.
    """

    def __init__(
        self,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        retry: _base.RetryPolicy | None = None,
        token: str | None = None,
    ) -> None:
        """Connect to the platform whose actors live in Ray namespace ``namespace``, carrying
        ``token`` (default: ``ROCK_TOKEN`` or the credentials file).

        Raises:
            RuntimeUnavailable: Ray is not initialized or no platform runs in ``namespace``.
        """
        self._async = _BlockingRayClient(namespace, retry=retry, token=token, gate=True)
        self.namespace = namespace
        self.settings = self._async.settings
        self.retry = self._async.retry

    def close(self) -> None:
        """Nothing to close: actor handles need no connections of their own."""

    def _data(self, sandbox_id: str, method: str, *args: Any) -> Any:
        """A Worker data-plane call (through the gate), blocking in ``ray.get``."""
        return _drive(self._async._data(sandbox_id, method, *args))

    def _send(self, call: _base.Call, *, stream: bool = False) -> httpx.Response:
        """REST calls of methods the Ray transport does not map (yet) need HTTP.

        Raises:
            InvalidRequest: always, naming the call.
        """
        raise InvalidRequest(f"{call.method} {call.path} needs HTTP: use Client(base_url)")


_SKIP = {"aclose", "sandbox", "from_ray"}
for _name, _member in inspect.getmembers(AsyncRayClient):
    if _name.startswith("_") or _name in _SKIP or not callable(_member):
        continue
    if hasattr(Client, _name) and (
        inspect.iscoroutinefunction(_member)
        or inspect.isasyncgenfunction(_member)
        or _name.startswith("stream")
    ):
        setattr(RayClient, _name, _bridge(_name))
