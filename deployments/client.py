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
platform reaps them when that job's driver dies. :class:`RayClient` is the synchronous twin: it
runs an :class:`AsyncRayClient` on a private event loop thread (``Client.from_ray()``).

This module lives in ``deployments/`` because only ``deployments/`` imports Ray; the SDK
imports it lazily, so the HTTP client never needs Ray.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar, cast

from rock_serve.deployments._processes_ray import RayProcessClient
from rock_serve.deployments._ray import (
    ActorHandle,
    WorkerHandles,
    call,
    current_job_id,
    get_scheduler,
    put,
    stream,
)
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
from rock_serve.sdk import _base
from rock_serve.sdk._async import AsyncClient
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

    # -----------------------------------------------------------------------------------------
    # I/O

    async def _call(self, actor: ActorHandle | None, method: str, *args: Any) -> Any:
        """Call ``method`` on ``actor`` (the Scheduler if None) with the SDK's retry policy."""
        state = _base.RetryState(self.retry)
        target = self._scheduler if actor is None else actor
        if self.gate:  # the entry point that checks the token and audits
            method, args = "ray_call", (self.settings.token, method, *args)
        while True:
            try:
                return await call(target, method, *args)
            except RockError as error:
                delay = state.after_error(http_status(error.code), error)
                if delay is None:
                    raise
                await _base.asleep(delay)

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
            request = CreateSandboxRequest(**spec)
        elif spec:
            request = request.model_copy(update=spec)
        if request.ray_job_id is None:
            request = request.model_copy(update={"ray_job_id": current_job_id()})
        record: SandboxRecord = await self._call(None, "create", request, self.tenant)
        return record

    async def delete_by_token(self, client_token: str) -> None:
        """Delete the sandbox a create with ``client_token`` made (see ``AsyncClient``)."""
        await self._call(None, "delete_by_token", client_token, self.tenant)

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
# The synchronous twin


def _bridge(name: str) -> Callable[..., Any]:
    """A sync method that runs ``AsyncRayClient.<name>`` on the client's loop thread."""
    target = getattr(AsyncRayClient, name)

    if inspect.isasyncgenfunction(target):

        def iterate(self: RayClient, *args: Any, **kwargs: Any) -> Iterator[Any]:
            agen = getattr(self._async, name)(*args, **kwargs)
            try:
                while True:
                    try:
                        yield self._run(agen.__anext__())
                    except StopAsyncIteration:
                        return
            finally:
                self._run(agen.aclose())

        iterate.__name__ = iterate.__qualname__ = name
        iterate.__doc__ = target.__doc__
        return iterate

    def method(self: RayClient, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self._async, name)(*args, **kwargs)
        if inspect.isawaitable(result):
            return self._run(result)
        if isinstance(result, AsyncIterator):
            return self._iterate(result)
        return result

    method.__name__ = method.__qualname__ = name
    method.__doc__ = target.__doc__
    return method


class RayClient(Client):
    """A :class:`~rock_serve.sdk.Client` over the Ray transport (see :class:`AsyncRayClient`).

    The async client runs on a private event-loop thread; each method blocks until its call
    is done. Thread-safe; :meth:`close` stops the thread.
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
        self._async = AsyncRayClient(namespace, retry=retry, token=token, gate=True)
        self.namespace = namespace
        self.settings = self._async.settings
        self.retry = self._async.retry
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="rock-ray-client", daemon=True
        )
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, Any] | Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, items: AsyncIterator[Any]) -> Iterator[Any]:
        try:
            while True:
                try:
                    yield self._run(items.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                self._run(aclose())

    def close(self) -> None:
        """Stop the loop thread (idempotent)."""
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        if not self._loop.is_closed():
            self._loop.close()


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
