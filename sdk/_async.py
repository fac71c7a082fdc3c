"""The asynchronous HTTP client of REST v1.

The sync module is generated from the async one by ``scripts/unasync.py``. Every method builds its
request with :mod:`rock_serve.sdk._base`, sends it through one retrying ``_send`` and parses
the reply there too; this file holds only the I/O.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, cast

import httpx

from rock_serve.errors import RockError, http_status
from rock_serve.protocol import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    CommitResult,
    CreateSandboxRequest,
    ExecRequest,
    ExecResult,
    FileInfo,
    FileWritten,
    Health,
    ImageList,
    ImagePullEvent,
    ImagePullRequest,
    ImagePushRequest,
    ImagePushResult,
    ListDirResult,
    OutputChunk,
    RegistryAuth,
    SandboxList,
    SandboxRecord,
    SandboxState,
    SandboxStats,
    SessionCreateResponse,
    SessionRunResult,
)
from rock_serve.protocol.dataplane import BatchRunItem
from rock_serve.protocol.fork import ForkRequest, ForkResult
from rock_serve.protocol.ops import (
    OPS,
    ExecOp,
    FileListOp,
    FileReadOp,
    FileStatOp,
    FileWriteOp,
    MkdirOp,
    Op,
    RemoveOp,
    SessionCloseOp,
    SessionCreateOp,
    SessionInterruptOp,
    SessionRunOp,
    SessionStdinOp,
    StatsOp,
    Streams,
    TarDownloadOp,
    TarUploadOp,
)
from rock_serve.protocol.snapshot import SnapshotList, SnapshotRecord, SnapshotRequest
from rock_serve.sdk import _base, _fork
from rock_serve.sdk._async_process import AsyncProcessClient
from rock_serve.sdk._async_sandbox import AsyncSandbox
from rock_serve.sdk._async_transport import (
    AsyncAdminTransport,
    AsyncDirectTransport,
    AsyncTransport,
    DataPlaneMode,
)

__all__ = ["AsyncClient", "AsyncSnapshots"]


def _dataplane_mode(default: DataPlaneMode) -> DataPlaneMode:
    """The data-plane mode ``ROCK_DATAPLANE`` asks for (``auto``, ``direct``, ``admin``)."""
    value = os.environ.get("ROCK_DATAPLANE", "").strip().lower()
    if value in ("auto", "direct", "admin"):
        return cast(DataPlaneMode, value)
    return default


class AsyncClient(AsyncProcessClient):
    """Asynchronous client of the rock-serve REST v1 API.

    Settings not given fall back to ``ROCK_BASE_URL``, ``ROCK_TOKEN`` and ``ROCK_TIMEOUT``.
    Calls answered 429 or 503 are retried with backoff (honouring ``Retry-After``), and GETs
    also after connection failures; see :class:`~rock_serve.sdk.RetryPolicy`. Error replies
    raise the typed exceptions of :mod:`rock_serve.errors`; transport failures that are not
    retried (or no longer) raise ``httpx.TransportError``.

    Example::

        async with AsyncClient() as client:
            async with client.sandbox(image="python:3.12") as sb:
                result = await sb.run("echo hi")
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        token: str | None = None,
        timeout: float | None = None,
        retry: _base.RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | AsyncTransport | None = None,
        headers: Mapping[str, str] | None = None,
        dataplane: DataPlaneMode | None = None,
    ) -> None:
        """Create a client; it owns its transport's connections until :meth:`aclose`.

        Args:
            base_url: Root URL of the platform (default ``ROCK_BASE_URL`` or
                ``http://127.0.0.1:8000``).
            token: Bearer token (default ``ROCK_TOKEN``).
            timeout: Seconds per HTTP call (default ``ROCK_TIMEOUT`` or 60); commands get their
                own timeout plus a margin.
            retry: Retry policy (default :class:`~rock_serve.sdk.RetryPolicy`).
            transport: What to send through: an SDK transport (see ``_async_transport``), or an
                httpx transport under the Admin path (tests, proxies, ASGI apps).
            headers: Extra headers sent with every request.
            dataplane: ``auto`` (default): a sandbox's data-plane calls go straight to its
                node when it answers, else through the Admin; ``direct``: only straight;
                ``admin``: always through the Admin (``ROCK_DATAPLANE`` sets the default;
                with an httpx ``transport`` the default is ``admin``).
        """
        self.settings = _base.ClientSettings.from_env(
            base_url=base_url, token=token, timeout=timeout
        )
        self.retry = retry if retry is not None else _base.RetryPolicy()
        if isinstance(transport, AsyncTransport):
            self._transport = transport
            admin = getattr(transport, "admin", transport)
        else:
            admin = AsyncAdminTransport(self.settings, headers=headers, transport=transport)
            mode = dataplane or _dataplane_mode(default="admin" if transport else "auto")
            self._transport = admin if mode == "admin" else AsyncDirectTransport(admin, mode=mode)
        self._http = cast(httpx.AsyncClient, getattr(admin, "http", None))  # the Admin's

    @classmethod
    def from_ray(
        cls,
        namespace: str = "rock-serve",
        *,
        retry: _base.RetryPolicy | None = None,
        token: str | None = None,
    ) -> AsyncClient:
        """A client that talks to the platform's actors over Ray instead of HTTP.

        For code running on the platform's own Ray cluster (a Ray job or actor, same Ray
        version, ``ray.init`` done): this class over the Ray transport, whose control-plane
        calls go to the Scheduler actor and whose operations go as models straight to the
        sandbox's Worker actor, with no HTTP hop. The methods, typed errors and retry policy are
        this class's own; images and ports need HTTP. Sandboxes it creates belong to the
        calling Ray job and are reaped when its driver dies. The sync client's transport blocks
        in ``ray.get`` on the caller's thread.

        Every call carries the platform token and is checked (namespaces, admin) and audited
        on the actors as over HTTP; no or a wrong token while auth is on: ``Unauthorized``.

        Args:
            namespace: The Ray namespace the platform runs in (``ServerArgs.namespace``).
            retry: Retry policy (default :class:`~rock_serve.sdk.RetryPolicy`).
            token: The platform token (default: ``ROCK_TOKEN``, else the credentials file, as
                for HTTP).

        Returns:
            The Ray-transport client.

        Raises:
            RuntimeUnavailable: Ray is not initialized or no platform runs in ``namespace``.
        """
        client: AsyncClient = _base.ray_transport()(cls, namespace, retry=retry, token=token)
        return client

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the underlying connections."""
        await self._transport.aclose()

    # -----------------------------------------------------------------------------------------
    # I/O: the only places that touch the network

    async def _send(self, call: _base.Call, *, stream: bool = False) -> httpx.Response:
        """Send ``call`` with retries; return a successful reply or raise the typed error."""
        state = _base.RetryState(self.retry)
        while True:
            try:
                response = await self._transport.send(call, stream=stream)
            except httpx.TransportError as exc:
                delay = state.after_transport_error(call, exc)
                if delay is None:
                    raise
                await _base.asleep(delay)
                continue
            except RockError as held:  # a transport that holds typed errors (Ray)
                delay = state.after_error(http_status(held.code), held, call)
                if delay is None:
                    raise
                await _base.asleep(delay)
                continue
            if response.is_success:
                return response
            try:
                await response.aread()
            finally:
                await response.aclose()
            error = _base.error_from_response(response)
            delay = state.after_error(response.status_code, error, call)
            if delay is None:
                raise error
            await _base.asleep(delay)

    async def _op(self, sandbox_id: str, op: Op[_base.R_]) -> _base.R_:
        """Run operation ``op`` on ``sandbox_id``: the one entry of every operation's method.

        The transport gets the call with the model (:func:`_base.op_call`): over HTTP the
        request is built from its ``OPS`` row; over Ray the model itself is sent.
        """
        return _base.op_result(await self._send(_base.op_call(sandbox_id, op)), op)

    def _op_stream(self, sandbox_id: str, op: Streams[_base.I_]) -> AsyncIterator[_base.I_]:
        """Stream a command operation's items: output chunks, then its result (NDJSON)."""
        final: type[Any] = OPS[op.op].result  # type: ignore[attr-defined]
        items = self._stream(_base.op_call(sandbox_id, cast(Op[Any], op), stream=True), final)
        return cast(AsyncIterator[_base.I_], items)

    async def _stream(
        self, call: _base.Call, final: type[_base.R]
    ) -> AsyncIterator[OutputChunk | _base.R]:
        """Yield the NDJSON items of a streamed call, ending with its final result."""
        response = await self._send(call, stream=True)
        try:
            async for line in response.aiter_lines():
                item = _base.parse_stream_line(line, final)
                if item is None:
                    continue
                yield item
                if isinstance(item, final):
                    return
        finally:
            await response.aclose()
        raise _base.stream_ended_early()

    # -----------------------------------------------------------------------------------------
    # Platform and sandboxes

    async def health(self) -> Health:
        """Ask the platform whether it is up.

        Returns:
            The platform's status and its Workers.
        """
        return _base.parse(await self._send(_base.health()), Health)

    async def create_sandbox(
        self, request: CreateSandboxRequest | None = None, /, **spec: Any
    ) -> SandboxRecord:
        """Create a sandbox.

        Args:
            request: The whole request; or give its fields as keyword arguments.
            **spec: Fields of :class:`~rock_serve.protocol.CreateSandboxRequest` (``image``,
                ``resources``, ``network``, ``env``, ``ttl_seconds``, ``owner``, ``labels``,
                ``client_token``, ...).

        Returns:
            The new sandbox's record.
        """
        if request is None:
            request = _base.build(CreateSandboxRequest, **spec)
        elif spec:
            request = request.model_copy(update=spec)
        return _base.parse(await self._send(_base.create_sandbox(request)), SandboxRecord)

    def sandbox(self, request: CreateSandboxRequest | None = None, /, **spec: Any) -> AsyncSandbox:
        """A sandbox to be created on entering ``async with`` and deleted on leaving it.

        Args:
            request: The whole create request; or give its fields as keyword arguments.
            **spec: Fields of :class:`~rock_serve.protocol.CreateSandboxRequest`.

        Returns:
            The (not yet created) sandbox object.
        """
        if request is None:
            request = _base.build(CreateSandboxRequest, **spec)
        elif spec:
            request = request.model_copy(update=spec)
        return AsyncSandbox(self, request=request)

    async def get_sandbox(self, sandbox_id: str) -> SandboxRecord:
        """Look up one sandbox.

        Args:
            sandbox_id: The sandbox id.

        Returns:
            Its record.

        Raises:
            SandboxNotFound: No sandbox has that id.
        """
        return _base.parse(await self._send(_base.get_sandbox(sandbox_id)), SandboxRecord)

    async def list_sandboxes(
        self,
        *,
        owner: str | None = None,
        state: SandboxState | str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[SandboxRecord]:
        """List sandboxes, newest first.

        Args:
            owner: Only those of this owner.
            state: Only those in this state.
            labels: Only those carrying all these labels.

        Returns:
            The matching sandboxes.
        """
        call = _base.list_sandboxes(owner=owner, state=state, labels=labels)
        return _base.parse(await self._send(call), SandboxList).items

    async def delete_sandbox(self, sandbox_id: str) -> None:
        """Delete a sandbox and everything in it.

        Args:
            sandbox_id: The sandbox id.

        Raises:
            SandboxNotFound: No sandbox has that id.
        """
        await self._send(_base.delete_sandbox(sandbox_id))

    async def delete_by_token(self, client_token: str) -> None:
        """Delete the sandbox a create with ``client_token`` made, even one still being made.

        Use it when a create's answer was lost (a timeout, an interrupt): the platform waits
        for that create and removes its sandbox, so nothing is left behind.

        Args:
            client_token: The create request's ``client_token``.

        Raises:
            SandboxNotFound: No create with that token is known.
        """
        await self._send(_base.delete_by_token(client_token))

    async def fork_sandbox(self, sandbox_id: str, request: ForkRequest) -> ForkResult:
        """Fork a running sandbox into ``request.count`` copy-on-write children (issue 16).

        Args:
            sandbox_id: The parent.
            request: How many children, and what they override (env, labels, owner, ttl).

        Returns:
            The parent's id and the children's records.

        Raises:
            SandboxNotRunning: The parent is not running.
            RateLimited: The children would pass the namespace's quota.
            NotSupported: The parent's runtime cannot fork.
        """
        return _base.parse(await self._send(_fork.fork_sandbox(sandbox_id, request)), ForkResult)

    async def pause_sandbox(self, sandbox_id: str) -> SandboxRecord:
        """Freeze a sandbox's processes (its files and memory stay) until :meth:`resume_sandbox`.

        Args:
            sandbox_id: The sandbox id.

        Returns:
            Its record (state ``paused``).
        """
        return _base.parse(await self._send(_fork.pause_sandbox(sandbox_id)), SandboxRecord)

    async def resume_sandbox(self, sandbox_id: str) -> SandboxRecord:
        """Thaw a paused sandbox.

        Args:
            sandbox_id: The sandbox id.

        Returns:
            Its record (state ``running``).
        """
        return _base.parse(await self._send(_fork.resume_sandbox(sandbox_id)), SandboxRecord)

    async def snapshot_sandbox(
        self, sandbox_id: str, request: SnapshotRequest | None = None
    ) -> SnapshotRecord:
        """Snapshot a running sandbox's files into an immutable record (issue 16).

        Args:
            sandbox_id: The sandbox id.
            request: Labels of the snapshot (default: the sandbox's).

        Returns:
            The snapshot; ``create_sandbox(snapshot=its id)`` restores it on any node.

        Raises:
            SandboxNotRunning: The sandbox is not running.
            NotSupported: Its runtime cannot snapshot.
        """
        call = _fork.snapshot_sandbox(sandbox_id, request or SnapshotRequest())
        return _base.parse(await self._send(call), SnapshotRecord)

    async def list_snapshots(self) -> list[SnapshotRecord]:
        """The caller's namespace's snapshots, newest first."""
        return _base.parse(await self._send(_fork.list_snapshots()), SnapshotList).items

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        """One snapshot.

        Raises:
            NotFound: No such snapshot in the caller's namespace.
        """
        return _base.parse(await self._send(_fork.get_snapshot(snapshot_id)), SnapshotRecord)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot (its archive goes once no other snapshot uses it).

        Raises:
            NotFound: No such snapshot in the caller's namespace.
        """
        await self._send(_fork.delete_snapshot(snapshot_id))

    @property
    def snapshots(self) -> AsyncSnapshots:
        """``client.snapshots.list()``, ``.get(id)``, ``.delete(id)``."""
        return AsyncSnapshots(self)

    async def renew(self, sandbox_id: str) -> SandboxRecord:
        """Renew a sandbox's lease (a heartbeat; every call naming the sandbox also renews).

        Args:
            sandbox_id: The sandbox id.

        Returns:
            Its record, with the new ``lease_expires_at``.

        Raises:
            SandboxNotFound: No sandbox has that id (the message says if it was reaped).
        """
        return _base.parse(await self._send(_base.renew(sandbox_id)), SandboxRecord)

    async def stats(self, sandbox_id: str) -> SandboxStats:
        """Resource usage and limits of a sandbox.

        Args:
            sandbox_id: The sandbox id.

        Returns:
            Its usage and limits, as seen from its cgroup.
        """
        return await self._op(sandbox_id, StatsOp())

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
        """Run one command to completion in a fresh process.

        Args:
            sandbox_id: The sandbox id.
            command: A shell string (run with ``bash -c``), an argv list, or a whole request.
            shell: Force (or refuse) shell interpretation.
            env: Extra environment variables.
            cwd: Working directory.
            stdin: Data written to the command's stdin.
            timeout: Seconds before the command is killed (None: no limit).
            max_output_bytes: Cap per stream.

        Returns:
            Exit code, output and timing. A non-zero exit or a timeout is a result, not an error.
        """
        request = _base.exec_request(
            command,
            shell=shell,
            env=env,
            cwd=cwd,
            stdin=stdin,
            timeout=timeout,
            max_output_bytes=max_output_bytes,
        )
        return await self._op(sandbox_id, ExecOp.of(request, _base.new_key()))

    def stream_exec(
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
        """Run one command and stream its output as it comes.

        Args are those of :meth:`exec`. Leaving the loop early closes the connection once the
        iterator is closed (wrap it in ``contextlib.aclosing`` to close it at once).

        Returns:
            An iterator of :class:`~rock_serve.protocol.OutputChunk` items, ending with the
            :class:`~rock_serve.protocol.ExecResult`.
        """
        request = _base.exec_request(
            command,
            shell=shell,
            env=env,
            cwd=cwd,
            stdin=stdin,
            timeout=timeout,
            max_output_bytes=max_output_bytes,
        )
        return self._op_stream(sandbox_id, ExecOp.of(request))

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
        """Start a persistent bash session.

        Args:
            sandbox_id: The sandbox id.
            session: Session name.
            env: Extra environment variables.
            cwd: Initial directory.
            startup_commands: Commands run once in the new session.

        Returns:
            The session name and the output of the startup commands.

        Raises:
            SessionExists: A session with that name exists.
        """
        op = SessionCreateOp(
            session=session,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            startup_commands=list(startup_commands or []),
        )
        return await self._op(sandbox_id, op)

    async def run(
        self,
        sandbox_id: str,
        command: str,
        *,
        session: str = "default",
        timeout: float | None = DEFAULT_TIMEOUT,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> SessionRunResult:
        """Run a command in an existing session (cwd, env and functions persist).

        Args:
            sandbox_id: The sandbox id.
            command: Bash source; may span lines.
            session: Session name.
            timeout: Seconds before the command is interrupted (None: no limit).
            max_output_bytes: Output cap.

        Returns:
            Merged output and exit code.

        Raises:
            SessionNotFound: The session does not exist.
        """
        op = SessionRunOp(
            session=session,
            command=command,
            timeout=timeout,
            max_output_bytes=max_output_bytes,
            idempotency_key=_base.new_key(),
        )
        return await self._op(sandbox_id, op)

    def stream_run(
        self,
        sandbox_id: str,
        command: str,
        *,
        session: str = "default",
        timeout: float | None = DEFAULT_TIMEOUT,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> AsyncIterator[OutputChunk | SessionRunResult]:
        """Run a command in a session and stream its output as it comes.

        Args are those of :meth:`run`.

        Returns:
            An iterator of :class:`~rock_serve.protocol.OutputChunk` items, ending with the
            :class:`~rock_serve.protocol.SessionRunResult`.
        """
        op = SessionRunOp(
            session=session, command=command, timeout=timeout, max_output_bytes=max_output_bytes
        )
        return self._op_stream(sandbox_id, op)

    async def run_many(
        self,
        commands: Sequence[tuple[str, str]],
        *,
        session: str = "default",
        timeout: float | None = DEFAULT_TIMEOUT,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> list[SessionRunResult | RockError]:
        """Run one command in each of many sandboxes (a GRPO group's step) at once.

        Over the direct data plane this is one request per node, over Ray one actor call per
        node; through the Admin one call each.
        The sessions must exist (``create_session``, or a first ``sandbox.run``).

        Args:
            commands: ``(sandbox_id, command)`` pairs.
            session: Session name (the same in every sandbox).
            timeout: Seconds before each command is interrupted (None: no limit).
            max_output_bytes: Output cap per command.

        Returns:
            Per pair, in order: its result, or the typed error it met (not raised).
        """
        items = [
            BatchRunItem(
                sandbox_id=sandbox_id,
                token="",
                session=session,
                command=command,
                timeout=timeout,
                max_output_bytes=max_output_bytes,
            )
            for sandbox_id, command in commands
        ]
        if items:
            done = await self._transport.run_many(items, timeout)
            if done is not None:
                return done
        results: list[SessionRunResult | RockError] = []
        for item in items:
            try:
                results.append(
                    await self.run(
                        item.sandbox_id,
                        item.command,
                        session=session,
                        timeout=timeout,
                        max_output_bytes=max_output_bytes,
                    )
                )
            except RockError as exc:
                results.append(exc)
        return results

    async def session_stdin(
        self, sandbox_id: str, data: str, *, session: str = "default", eof: bool = False
    ) -> None:
        """Write to the stdin of the command running in a session.

        Args:
            sandbox_id: The sandbox id.
            data: Text to write (add a newline to end a line).
            session: Session name.
            eof: Close stdin after writing.
        """
        await self._op(sandbox_id, SessionStdinOp(session=session, data=data, eof=eof))

    async def interrupt(self, sandbox_id: str, *, session: str = "default") -> None:
        """Interrupt the command running in a session (like Ctrl-C).

        Args:
            sandbox_id: The sandbox id.
            session: Session name.
        """
        await self._op(sandbox_id, SessionInterruptOp(session=session))

    async def close_session(self, sandbox_id: str, *, session: str = "default") -> None:
        """Close a session and kill its processes.

        Args:
            sandbox_id: The sandbox id.
            session: Session name.
        """
        await self._op(sandbox_id, SessionCloseOp(session=session))

    # -----------------------------------------------------------------------------------------
    # Files

    async def read_file(self, sandbox_id: str, path: str) -> bytes:
        """Read a whole file.

        Args:
            sandbox_id: The sandbox id.
            path: Path inside the sandbox.

        Returns:
            Its bytes.

        Raises:
            FileNotFound: Nothing is at that path.
        """
        return await self._op(sandbox_id, FileReadOp(path=path))

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes, *, mode: int | None = None
    ) -> FileWritten:
        """Write a whole file, creating missing parent directories.

        Args:
            sandbox_id: The sandbox id.
            path: Path inside the sandbox.
            data: The content.
            mode: Permission bits (e.g. ``0o755``).

        Returns:
            The path and the number of bytes written.
        """
        return await self._op(sandbox_id, FileWriteOp(path=path, data=bytes(data), mode=mode))

    async def stat(self, sandbox_id: str, path: str) -> FileInfo:
        """Describe one file or directory.

        Args:
            sandbox_id: The sandbox id.
            path: Path inside the sandbox.

        Returns:
            Its type, size, mode and mtime.
        """
        return await self._op(sandbox_id, FileStatOp(path=path))

    async def list_dir(self, sandbox_id: str, path: str) -> ListDirResult:
        """List a directory.

        Args:
            sandbox_id: The sandbox id.
            path: Path inside the sandbox.

        Returns:
            Its entries, sorted by name.
        """
        return await self._op(sandbox_id, FileListOp(path=path))

    async def mkdir(
        self, sandbox_id: str, path: str, *, parents: bool = True, exist_ok: bool = True
    ) -> None:
        """Create a directory.

        Args:
            sandbox_id: The sandbox id.
            path: Path inside the sandbox.
            parents: Create missing parents.
            exist_ok: No error if it exists.
        """
        await self._op(sandbox_id, MkdirOp(path=path, parents=parents, exist_ok=exist_ok))

    async def remove(
        self, sandbox_id: str, path: str, *, recursive: bool = False, missing_ok: bool = False
    ) -> None:
        """Remove a file or directory.

        Args:
            sandbox_id: The sandbox id.
            path: Path inside the sandbox.
            recursive: Remove directories and their contents.
            missing_ok: No error if it does not exist.
        """
        op = RemoveOp(path=path, recursive=recursive, missing_ok=missing_ok)
        await self._op(sandbox_id, op)

    async def download_archive(self, sandbox_id: str, path: str) -> bytes:
        """Download a file or directory tree as a tar archive.

        Args:
            sandbox_id: The sandbox id.
            path: Path inside the sandbox.

        Returns:
            The tar archive's bytes.
        """
        return await self._op(sandbox_id, TarDownloadOp(path=path))

    async def upload_archive(self, sandbox_id: str, path: str, data: bytes) -> None:
        """Unpack a tar archive (plain or compressed) into a directory.

        Args:
            sandbox_id: The sandbox id.
            path: Directory inside the sandbox to unpack into.
            data: The archive's bytes.
        """
        await self._op(sandbox_id, TarUploadOp(path=path, data=bytes(data)))

    # -----------------------------------------------------------------------------------------
    # Images

    async def pull_images(
        self,
        images: list[str],
        *,
        nodes: list[str] | None = None,
        auth: RegistryAuth | None = None,
    ) -> AsyncIterator[ImagePullEvent]:
        """Prepull images into the nodes' stores, yielding progress as it comes.

        Args:
            images: References to pull.
            nodes: Worker names to pull on; None = every Worker.
            auth: Registry credentials (sent once, never stored).

        Yields:
            Progress events; each node and image ends with ``done`` or ``error``.
        """
        request = _base.build(ImagePullRequest, images=images, nodes=nodes, auth=auth)
        response = await self._send(_base.pull_images(request), stream=True)
        try:
            async for line in response.aiter_lines():
                if line.strip():
                    yield ImagePullEvent.model_validate_json(line)
        finally:
            await response.aclose()

    async def commit_sandbox(self, sandbox_id: str, image: str) -> CommitResult:
        """Save a sandbox's files as a new image on its node (usable at once there).

        Args:
            sandbox_id: The sandbox id.
            image: The new image's reference (``repo:tag``).

        Returns:
            The image's reference and node.
        """
        return _base.parse(await self._send(_base.commit_sandbox(sandbox_id, image)), CommitResult)

    async def push_image(
        self,
        image: str,
        destination: str,
        *,
        node: str | None = None,
        auth: RegistryAuth | None = None,
    ) -> ImagePushResult:
        """Push a stored image (a committed one, say) to a registry (admin).

        Args:
            image: The image in a node's store (reference or id).
            destination: Registry reference (``host[:port]/repo:tag``).
            node: Worker whose store has it; None = the first that does.
            auth: Credentials for the destination (sent once, never stored).

        Returns:
            The destination, the pushed manifest's digest and the node.
        """
        request = _base.build(
            ImagePushRequest, image=image, destination=destination, node=node, auth=auth
        )
        return _base.parse(await self._send(_base.push_image(request)), ImagePushResult)

    async def list_images(self) -> ImageList:
        """The images each node's store holds (refs, digest, size, last use, in use)."""
        return _base.parse(await self._send(_base.list_images()), ImageList)

    async def remove_image(self, ref: str) -> None:
        """Remove an image from every node's store (admin; 409 while a sandbox uses it).

        Args:
            ref: The reference or image id.
        """
        await self._send(_base.remove_image(ref))


class AsyncSnapshots:
    """The snapshots of the client's namespace (``client.snapshots``)."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def list(self) -> builtins.list[SnapshotRecord]:
        """Newest first."""
        return await self.client.list_snapshots()

    async def get(self, snapshot_id: str) -> SnapshotRecord:
        """One snapshot (NotFound for an unknown one or another namespace's)."""
        return await self.client.get_snapshot(snapshot_id)

    async def delete(self, snapshot_id: str) -> None:
        """Delete one."""
        await self.client.delete_snapshot(snapshot_id)
