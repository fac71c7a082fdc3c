"""Sandbox objects of the asynchronous client (the sync module is generated from this one).

A sandbox object binds a client to one sandbox id, so its methods drop the id argument. Used
as a context manager it creates the sandbox on entry (unless it wraps an existing one) and
deletes it on exit, also when the block raises. Inside the block a heartbeat renews the
sandbox's lease in the background, so the platform reaps it one lease after this process dies.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING

from rock_serve.errors import SandboxNotFound, SessionExists
from rock_serve.protocol import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    CreateSandboxRequest,
    ExecRequest,
    ExecResult,
    FileInfo,
    FileWritten,
    ListDirResult,
    OutputChunk,
    SandboxRecord,
    SandboxStats,
    SessionCreateResponse,
    SessionRunResult,
)
from rock_serve.protocol.fork import ForkRequest
from rock_serve.protocol.snapshot import SnapshotRecord, SnapshotRequest
from rock_serve.sdk._async_llm import AsyncSandboxLLM
from rock_serve.sdk._async_ports import AsyncSandboxPorts
from rock_serve.sdk._async_process import AsyncSandboxProcesses
from rock_serve.sdk._heartbeat import AsyncHeartbeat, interval_for

if TYPE_CHECKING:
    from rock_serve.sdk._async import AsyncClient

__all__ = ["AsyncSandbox", "AsyncSandboxFiles"]

log = logging.getLogger("rock_serve.sdk")


class AsyncSandbox:
    """One sandbox, seen through an :class:`~rock_serve.sdk.AsyncClient`.

    Get one from :meth:`AsyncClient.sandbox` (created on ``async with``), or wrap an existing
    record with ``AsyncSandbox(client, record)``. The session named ``"default"`` (or any name
    passed to :meth:`run`) is created on its first use.
    """

    def __init__(
        self,
        client: AsyncClient,
        record: SandboxRecord | None = None,
        *,
        request: CreateSandboxRequest | None = None,
        delete_on_exit: bool = True,
        heartbeat: bool = True,
    ) -> None:
        """Bind a client to a sandbox.

        Args:
            client: The client to send through.
            record: An existing sandbox; None to create one from ``request`` on entry.
            request: What to create on entry when ``record`` is None.
            delete_on_exit: Delete the sandbox when the ``async with`` block ends.
            heartbeat: Renew the sandbox's lease in the background inside the block.
        """
        if record is None and request is None:
            request = CreateSandboxRequest()
        self.client = client
        self._record = record
        self._request = request
        self.delete_on_exit = delete_on_exit
        self._sessions: set[str] = set()
        self.files = AsyncSandboxFiles(self)
        #: Its ports: proxy URLs and TCP streams (:class:`AsyncSandboxPorts`).
        self.ports = AsyncSandboxPorts(self)
        self.heartbeat_enabled = heartbeat
        self._heartbeat: AsyncHeartbeat | None = None

    @property
    def llm(self) -> AsyncSandboxLLM:
        """The sandbox's model service (``model_service`` on create): relayed calls, trajectory."""
        return AsyncSandboxLLM(self)

    @property
    def record(self) -> SandboxRecord:
        """The sandbox's record as last fetched (see :meth:`refresh`)."""
        if self._record is None:
            raise RuntimeError("the sandbox is not created yet: use it as a context manager")
        return self._record

    @property
    def id(self) -> str:
        """The sandbox id."""
        return self.record.id

    @property
    def process(self) -> AsyncSandboxProcesses:
        """Background processes in this sandbox: ``p = await sb.process.start(...)``."""
        return AsyncSandboxProcesses(self)

    async def __aenter__(self) -> AsyncSandbox:
        if self._record is None:
            assert self._request is not None
            self._record = await self.client.create_sandbox(self._request)
        interval = interval_for(self._record.lease_seconds)
        if self.heartbeat_enabled and interval is not None:
            self._heartbeat = AsyncHeartbeat(self, interval)
            self._heartbeat.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._heartbeat is not None:
            await self._heartbeat.stop()
            self._heartbeat = None
        if not self.delete_on_exit or self._record is None:
            return
        if exc is None:
            await self.delete()
            return
        try:
            await self.delete()
        except Exception:
            # The block's own error matters more; the TTL reaps what is left.
            log.warning("could not delete sandbox %s", self._record.id, exc_info=True)

    async def delete(self) -> None:
        """Delete the sandbox; one that is already gone counts as deleted."""
        try:
            await self.client.delete_sandbox(self.id)
        except SandboxNotFound:
            pass
        self._sessions.clear()

    async def fork(
        self,
        count: int = 1,
        *,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        ttl_seconds: float | None = None,
        lease_seconds: float | None = None,
    ) -> list[AsyncSandbox]:
        """Fork this running sandbox into ``count`` copy-on-write children (issue 16).

        Each child has this sandbox's files as they were at the fork point and starts in the
        cwd and exported env of its ``default`` session. The children are not deleted with
        this one: delete them, or use each as a context manager.

        Returns:
            The children, in creation order.
        """
        request = ForkRequest(
            count=count,
            env=dict(env) if env is not None else None,
            labels=dict(labels) if labels is not None else None,
            ttl_seconds=ttl_seconds,
            lease_seconds=lease_seconds,
        )
        result = await self.client.fork_sandbox(self.id, request)
        return [AsyncSandbox(self.client, record) for record in result.items]

    async def snapshot(self, *, labels: Mapping[str, str] | None = None) -> SnapshotRecord:
        """Snapshot this sandbox's files at one atomic point (issue 16); restore it with
        ``client.sandbox(snapshot=snap.id)`` on any node.
        """
        request = SnapshotRequest(labels=dict(labels) if labels is not None else None)
        return await self.client.snapshot_sandbox(self.id, request)

    async def pause(self) -> SandboxRecord:
        """Freeze the sandbox's processes until :meth:`resume` (files and memory stay)."""
        self._record = await self.client.pause_sandbox(self.id)
        return self._record

    async def resume(self) -> SandboxRecord:
        """Thaw a paused sandbox."""
        self._record = await self.client.resume_sandbox(self.id)
        return self._record

    async def renew(self) -> SandboxRecord:
        """Renew the sandbox's lease now (the heartbeat does this in the background).

        Returns:
            The record with its new ``lease_expires_at`` (also kept as :attr:`record`).
        """
        self._record = await self.client.renew(self.id)
        return self._record

    async def refresh(self) -> SandboxRecord:
        """Fetch the sandbox's record again.

        Returns:
            The current record (also kept as :attr:`record`).
        """
        self._record = await self.client.get_sandbox(self.id)
        return self._record

    async def stats(self) -> SandboxStats:
        """Resource usage and limits of the sandbox.

        Returns:
            Its usage and limits, as seen from its cgroup.
        """
        return await self.client.stats(self.id)

    async def exec(
        self,
        command: str | list[str] | ExecRequest,
        *,
        shell: bool | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run one command to completion in a fresh process (see ``AsyncClient.exec``).

        Returns:
            Exit code, output and timing.
        """
        return await self.client.exec(
            self.id,
            command,
            shell=shell,
            env=env,
            cwd=cwd,
            stdin=stdin,
            timeout=timeout,
            max_output_bytes=max_output_bytes,
        )

    def stream_exec(
        self,
        command: str | list[str] | ExecRequest,
        *,
        shell: bool | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> AsyncIterator[OutputChunk | ExecResult]:
        """Run one command and stream its output (see ``AsyncClient.stream_exec``).

        Returns:
            Output chunks, ending with the :class:`~rock_serve.protocol.ExecResult`.
        """
        return self.client.stream_exec(
            self.id,
            command,
            shell=shell,
            env=env,
            cwd=cwd,
            stdin=stdin,
            timeout=timeout,
            max_output_bytes=max_output_bytes,
        )

    async def create_session(
        self,
        session: str = "default",
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        startup_commands: list[str] | None = None,
    ) -> SessionCreateResponse:
        """Start a persistent bash session (see ``AsyncClient.create_session``).

        Returns:
            The session name and the output of the startup commands.
        """
        created = await self.client.create_session(
            self.id, session, env=env, cwd=cwd, startup_commands=startup_commands
        )
        self._sessions.add(session)
        return created

    async def _ensure_session(self, session: str) -> None:
        if session in self._sessions:
            return
        try:
            await self.client.create_session(self.id, session)
        except SessionExists:
            pass
        self._sessions.add(session)

    async def run(
        self,
        command: str,
        *,
        session: str = "default",
        timeout: float | None = DEFAULT_TIMEOUT,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> SessionRunResult:
        """Run a command in a session, creating the session on first use.

        Args:
            command: Bash source; may span lines.
            session: Session name.
            timeout: Seconds before the command is interrupted (None: no limit).
            max_output_bytes: Output cap.

        Returns:
            Merged output and exit code.
        """
        await self._ensure_session(session)
        result = await self.client.run(
            self.id, command, session=session, timeout=timeout, max_output_bytes=max_output_bytes
        )
        if result.session_ended:
            self._sessions.discard(session)
        return result

    async def stream_run(
        self,
        command: str,
        *,
        session: str = "default",
        timeout: float | None = DEFAULT_TIMEOUT,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> AsyncIterator[OutputChunk | SessionRunResult]:
        """Run a command in a session and stream its output, creating the session on first use.

        Args are those of :meth:`run`.

        Yields:
            Output chunks, ending with the :class:`~rock_serve.protocol.SessionRunResult`.
        """
        await self._ensure_session(session)
        stream = self.client.stream_run(
            self.id, command, session=session, timeout=timeout, max_output_bytes=max_output_bytes
        )
        async for item in stream:
            if isinstance(item, SessionRunResult) and item.session_ended:
                self._sessions.discard(session)
            yield item

    async def session_stdin(
        self, data: str, *, session: str = "default", eof: bool = False
    ) -> None:
        """Write to the stdin of the command running in a session.

        Args:
            data: Text to write (add a newline to end a line).
            session: Session name.
            eof: Close stdin after writing.
        """
        await self.client.session_stdin(self.id, data, session=session, eof=eof)

    async def interrupt(self, *, session: str = "default") -> None:
        """Interrupt the command running in a session (like Ctrl-C).

        Args:
            session: Session name.
        """
        await self.client.interrupt(self.id, session=session)

    async def close_session(self, *, session: str = "default") -> None:
        """Close a session and kill its processes.

        Args:
            session: Session name.
        """
        self._sessions.discard(session)
        await self.client.close_session(self.id, session=session)


class AsyncSandboxFiles:
    """File operations of one sandbox (``sandbox.files``)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        """Bind to a sandbox.

        Args:
            sandbox: The sandbox whose files these are.
        """
        self._sandbox = sandbox

    async def read(self, path: str) -> bytes:
        """Read a whole file.

        Args:
            path: Path inside the sandbox.

        Returns:
            Its bytes.
        """
        return await self._sandbox.client.read_file(self._sandbox.id, path)

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """Read a whole text file.

        Args:
            path: Path inside the sandbox.
            encoding: Text encoding.

        Returns:
            Its text.
        """
        return (await self.read(path)).decode(encoding)

    async def write(self, path: str, data: bytes | str, *, mode: int | None = None) -> FileWritten:
        """Write a whole file (text is encoded as UTF-8).

        Args:
            path: Path inside the sandbox.
            data: The content.
            mode: Permission bits (e.g. ``0o755``).

        Returns:
            The path and the number of bytes written.
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        return await self._sandbox.client.write_file(self._sandbox.id, path, data, mode=mode)

    async def stat(self, path: str) -> FileInfo:
        """Describe one file or directory.

        Args:
            path: Path inside the sandbox.

        Returns:
            Its type, size, mode and mtime.
        """
        return await self._sandbox.client.stat(self._sandbox.id, path)

    async def list(self, path: str) -> ListDirResult:
        """List a directory.

        Args:
            path: Path inside the sandbox.

        Returns:
            Its entries, sorted by name.
        """
        return await self._sandbox.client.list_dir(self._sandbox.id, path)

    async def mkdir(self, path: str, *, parents: bool = True, exist_ok: bool = True) -> None:
        """Create a directory.

        Args:
            path: Path inside the sandbox.
            parents: Create missing parents.
            exist_ok: No error if it exists.
        """
        await self._sandbox.client.mkdir(self._sandbox.id, path, parents=parents, exist_ok=exist_ok)

    async def remove(self, path: str, *, recursive: bool = False, missing_ok: bool = False) -> None:
        """Remove a file or directory.

        Args:
            path: Path inside the sandbox.
            recursive: Remove directories and their contents.
            missing_ok: No error if it does not exist.
        """
        await self._sandbox.client.remove(
            self._sandbox.id, path, recursive=recursive, missing_ok=missing_ok
        )
