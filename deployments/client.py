"""The SDK's Ray transport: :class:`AsyncRayClient` calls the platform's actors directly.

Inside a Ray job or actor on the cluster that runs the platform (same Ray version), a client
made by ``AsyncClient.from_ray(namespace=...)`` skips HTTP: control-plane calls go to the
Scheduler actor and data-plane calls straight to the Worker actor named in the sandbox id (one
actor call, no Serve proxy, no Admin). It has the methods of
:class:`~rock_serve.sdk.AsyncClient` and raises the same typed errors; requests are built by the
SDK's sans-IO core and retried by its :class:`~rock_serve.sdk.RetryPolicy` (429/503 only). File
contents over :data:`OBJECT_REF_THRESHOLD` bytes travel as one object in Ray's object store.

Auth and audit: a client made by ``from_ray`` carries the caller's platform token
(``ROCK_TOKEN``, else the credentials file, as the HTTP SDK finds it) and calls the actors'
Ray-transport entry points (``Scheduler.ray_call``, ``Worker.ray_call``/``ray_stream``), which
check it as the Admin does (namespaces, admin) and audit the calls as HTTP's are audited (see
``_raygate``); no or a wrong token while auth is required is a typed ``unauthorized``. The
platform's own routes (compat, GEM) build the client with ``gate=False``: they authenticated
and audit their caller themselves and call the actors' methods directly.

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
    put,
    stream,
    worker_actor_name,
)
from rock_serve.deployments._trace import TRACE_ID, new_trace_id, traced
from rock_serve.errors import InvalidRequest, RockError, SandboxNotFound, http_status
from rock_serve.protocol import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    CreateSandboxRequest,
    ExecRequest,
    ExecResult,
    FileInfo,
    FileWritten,
    Health,
    ListDirResult,
    MkdirRequest,
    OutputChunk,
    RemoveRequest,
    SandboxList,
    SandboxRecord,
    SandboxState,
    SandboxStats,
    SessionCreateRequest,
    SessionCreateResponse,
    SessionRunRequest,
    SessionRunResult,
)
from rock_serve.protocol.api import SANDBOX_ID
from rock_serve.protocol.fork import ForkRequest, ForkResult
from rock_serve.protocol.processes import ProcessStream
from rock_serve.protocol.snapshot import SnapshotRecord, SnapshotRequest
from rock_serve.sdk import _base
from rock_serve.sdk._async import AsyncClient
from rock_serve.sdk._processes import ProcessItem
from rock_serve.sdk._sync import Client

__all__ = [
    "DEFAULT_NAMESPACE",
    "OBJECT_REF_THRESHOLD",
    "AsyncRayClient",
    "RayClient",
    "ray_client",
]

#: The Ray namespace of the platform's actors when ``ServerArgs.namespace`` is not set.
DEFAULT_NAMESPACE = "rock-serve"
#: File contents larger than this many bytes are put in the object store once, by reference.
OBJECT_REF_THRESHOLD = 1 << 20

_ID = re.compile(SANDBOX_ID)
C = TypeVar("C")


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
        """REST calls of methods the Ray transport does not map (yet) need HTTP.

        Raises:
            InvalidRequest: always, naming the call.
        """
        raise InvalidRequest(f"{call.method} {call.path} needs HTTP: use AsyncClient(base_url)")

    # -----------------------------------------------------------------------------------------
    # I/O

    async def _call(self, actor: ActorHandle | None, method: str, *args: Any) -> Any:
        """Call ``method`` on ``actor`` (the Scheduler if None) with the SDK's retry policy."""
        state = _base.RetryState(self.retry)
        target = self._scheduler if actor is None else actor
        if self.gate:  # the entry point that checks the token and audits
            method, args = "ray_call", (self.settings.token, method, *args)
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

    async def _ray_stream(self, sandbox_id: str, method: str, request: Any) -> AsyncIterator[Any]:
        worker = await self._workers.get(_worker_of(sandbox_id))
        if self.gate:
            items = stream(worker, "ray_stream", self.settings.token, method, sandbox_id, request)
        else:
            items = stream(worker, method, sandbox_id, request)
        async for item in items:
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

    async def stats(self, sandbox_id: str) -> SandboxStats:
        """Resource usage and limits of a sandbox."""
        result: SandboxStats = await self._data(sandbox_id, "stats")
        return result

    # -----------------------------------------------------------------------------------------
    # One-shot commands

    async def exec(
        self,
        sandbox_id: str,
        command: str | list[str] | ExecRequest,
        *,
        shell: bool | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run one command to completion in a fresh process."""
        request = _base.exec_request(
            command,
            shell=shell,
            env=env,
            cwd=cwd,
            stdin=stdin,
            timeout=timeout,
            max_output_bytes=max_output_bytes,
        )
        result: ExecResult = await self._data(sandbox_id, "exec", request)
        return result

    async def stream_exec(
        self,
        sandbox_id: str,
        command: str | list[str] | ExecRequest,
        *,
        shell: bool | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> AsyncIterator[OutputChunk | ExecResult]:
        """Run one command and stream its output as it comes."""
        request = _base.exec_request(
            command,
            shell=shell,
            env=env,
            cwd=cwd,
            stdin=stdin,
            timeout=timeout,
            max_output_bytes=max_output_bytes,
        )
        async for item in self._ray_stream(sandbox_id, "stream_exec", request):
            yield item

    # -----------------------------------------------------------------------------------------
    # Sessions

    async def create_session(
        self,
        sandbox_id: str,
        session: str = "default",
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        startup_commands: list[str] | None = None,
    ) -> SessionCreateResponse:
        """Start a persistent bash session."""
        request = SessionCreateRequest(
            session=session,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            startup_commands=list(startup_commands or []),
        )
        result: SessionCreateResponse = await self._data(sandbox_id, "create_session", request)
        return result

    async def run(
        self,
        sandbox_id: str,
        command: str,
        *,
        session: str = "default",
        timeout: float | None = DEFAULT_TIMEOUT,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> SessionRunResult:
        """Run a command in an existing session."""
        request = SessionRunRequest(
            session=session, command=command, timeout=timeout, max_output_bytes=max_output_bytes
        )
        result: SessionRunResult = await self._data(sandbox_id, "run_in_session", request)
        return result

    async def stream_run(
        self,
        sandbox_id: str,
        command: str,
        *,
        session: str = "default",
        timeout: float | None = DEFAULT_TIMEOUT,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> AsyncIterator[OutputChunk | SessionRunResult]:
        """Run a command in a session and stream its output as it comes."""
        request = SessionRunRequest(
            session=session, command=command, timeout=timeout, max_output_bytes=max_output_bytes
        )
        async for item in self._ray_stream(sandbox_id, "stream_in_session", request):
            yield item

    async def session_stdin(
        self, sandbox_id: str, data: str, *, session: str = "default", eof: bool = False
    ) -> None:
        """Write to the stdin of the command running in a session."""
        await self._data(sandbox_id, "session_stdin", session, data.encode(), eof)

    async def interrupt(self, sandbox_id: str, *, session: str = "default") -> None:
        """Interrupt the command running in a session (like Ctrl-C)."""
        await self._data(sandbox_id, "interrupt_session", session)

    async def close_session(self, sandbox_id: str, *, session: str = "default") -> None:
        """Close a session and kill its processes."""
        await self._data(sandbox_id, "close_session", session)

    # -----------------------------------------------------------------------------------------
    # Files

    async def read_file(self, sandbox_id: str, path: str) -> bytes:
        """Read a whole file (up to the platform's ``max_file_bytes``)."""
        data: bytes = await self._data(sandbox_id, "read_file", path)
        return data

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes, *, mode: int | None = None
    ) -> FileWritten:
        """Write a whole file; contents over the threshold go through the object store."""
        payload: Any = put(bytes(data)) if len(data) > OBJECT_REF_THRESHOLD else bytes(data)
        size: int = await self._data(sandbox_id, "write_file", path, payload, mode)
        return FileWritten(path=path, size=size)

    async def stat(self, sandbox_id: str, path: str) -> FileInfo:
        """Describe one file or directory."""
        result: FileInfo = await self._data(sandbox_id, "stat", path)
        return result

    async def list_dir(self, sandbox_id: str, path: str) -> ListDirResult:
        """List a directory."""
        result: ListDirResult = await self._data(sandbox_id, "list_dir", path)
        return result

    async def mkdir(
        self, sandbox_id: str, path: str, *, parents: bool = True, exist_ok: bool = True
    ) -> None:
        """Create a directory."""
        await self._data(
            sandbox_id, "mkdir", MkdirRequest(path=path, parents=parents, exist_ok=exist_ok)
        )

    async def remove(
        self, sandbox_id: str, path: str, *, recursive: bool = False, missing_ok: bool = False
    ) -> None:
        """Remove a file or directory."""
        request = RemoveRequest(path=path, recursive=recursive, missing_ok=missing_ok)
        await self._data(sandbox_id, "remove_path", request)

    async def download_archive(self, sandbox_id: str, path: str) -> bytes:
        """An uncompressed tar of a file or directory (up to ``max_file_bytes``)."""
        data: bytes = await self._data(sandbox_id, "download_archive", path)
        return data

    async def upload_archive(self, sandbox_id: str, path: str, data: bytes) -> None:
        """Extract a tar (plain or compressed) into directory ``path``."""
        payload: Any = put(bytes(data)) if len(data) > OBJECT_REF_THRESHOLD else bytes(data)
        await self._data(sandbox_id, "upload_archive", path, payload)


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
            method, args = "ray_call", (self.settings.token, method, *args)
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
            target, args = "ray_stream", (self.settings.token, method, *args)
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
