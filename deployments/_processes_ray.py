"""Background processes over the SDK's Ray transport (issue 15.1): the process calls of
:class:`~rock_serve.deployments.client.AsyncRayClient`, each one Worker actor call (or stream)
through the same gate (token, namespaces, audit) as its other data-plane calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from rock_serve.deployments._ray import WorkerHandles, stream, worker_class
from rock_serve.protocol.processes import (
    DEFAULT_PROCESS_BUFFER,
    ProcessInfo,
    ProcessList,
    ProcessSignalBody,
    ProcessStartRequest,
    ProcessStream,
)
from rock_serve.sdk import _base, _processes
from rock_serve.sdk._processes import ProcessItem

__all__ = ["RayProcessClient"]


class RayProcessClient:
    """The process calls over Ray (a base of ``AsyncRayClient``, placed before AsyncClient)."""

    if TYPE_CHECKING:
        gate: bool
        settings: _base.ClientSettings
        _workers: WorkerHandles

        async def _data(self, sandbox_id: str, method: str, *args: Any) -> Any: ...

    async def start_process(
        self,
        sandbox_id: str,
        command: str | list[str] | ProcessStartRequest,
        *,
        shell: bool | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bool = False,
        max_output_bytes: int = DEFAULT_PROCESS_BUFFER,
    ) -> ProcessInfo:
        """Start a command in the background (see ``AsyncClient.start_process``)."""
        request = _processes.start_request(
            command, shell=shell, env=env, cwd=cwd, stdin=stdin, max_output_bytes=max_output_bytes
        )
        result: ProcessInfo = await self._data(sandbox_id, "start_process", request)
        return result

    async def list_processes(self, sandbox_id: str) -> ProcessList:
        """Running and recently ended background processes of a sandbox."""
        result: ProcessList = await self._data(sandbox_id, "list_processes")
        return result

    async def process_status(self, sandbox_id: str, pid: int) -> ProcessInfo:
        """A background process's status."""
        result: ProcessInfo = await self._data(sandbox_id, "process_status", pid)
        return result

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
        from rock_serve.deployments.client import _worker_of

        worker = await self._workers.get(_worker_of(sandbox_id))
        method, args = "stream_process_output", (sandbox_id, pid, stream, offset, follow)
        if self.gate:
            items = _stream_gated(worker, self.settings.token, method, args)
        else:
            items = _stream(worker, method, args)
        async for item in items:
            yield item

    async def process_input(
        self, sandbox_id: str, pid: int, data: str | bytes, *, eof: bool = False
    ) -> ProcessInfo:
        """Write to a background process's stdin."""
        body = _processes.input_body(data, eof)
        result: ProcessInfo = await self._data(sandbox_id, "process_input", pid, body)
        return result

    async def signal_process(
        self, sandbox_id: str, pid: int, signal: int | str = "SIGTERM", *, group: bool = True
    ) -> ProcessInfo:
        """Signal a background process (its group by default)."""
        body = ProcessSignalBody(signal=signal, group=group)
        result: ProcessInfo = await self._data(sandbox_id, "signal_process", pid, body)
        return result

    async def kill_process(self, sandbox_id: str, pid: int) -> ProcessInfo:
        """SIGKILL a background process's group and descendants."""
        result: ProcessInfo = await self._data(sandbox_id, "kill_process", pid)
        return result

    async def wait_process(self, sandbox_id: str, pid: int, timeout: float) -> ProcessInfo:
        """One wait: its final status (``Timeout`` while it still runs after ``timeout``)."""
        result: ProcessInfo = await self._data(sandbox_id, "wait_process", pid, timeout)
        return result


def _stream(worker: Any, method: str, args: tuple[Any, ...]) -> AsyncIterator[Any]:
    return stream(worker, method, *args)


def _stream_gated(
    worker: Any, token: str | None, method: str, args: tuple[Any, ...]
) -> AsyncIterator[Any]:
    sandbox_id, rest = args[0], args[1:]
    return stream(worker, worker_class().ray_stream, token, method, sandbox_id, *rest)
