"""Background processes (``/v1/sandboxes/{id}/processes``, issue 15.1): Admin routes and
their Worker side.

- ``POST /v1/sandboxes/{id}/processes`` (:class:`ProcessStartRequest`): 201
  :class:`ProcessInfo`; the process runs in its own process group in the sandbox and outlives
  the request and any client (the sandbox's end ends it).
- ``GET .../processes``: :class:`ProcessList`; ``GET .../processes/{pid}``: its status.
- ``GET .../processes/{pid}/output?stream=&offset=&follow=``: NDJSON lines
  (:class:`ProcessTruncated` when bytes before ``offset`` left the buffer,
  :class:`ProcessOutputChunk` with absolute offsets, last :class:`ProcessOutputEnd` with
  ``next``, the offset to resume from after a reconnect). ``follow`` streams until it ends.
- ``POST .../{pid}/input`` (:class:`ProcessInputBody`), ``POST .../{pid}/signal``
  (:class:`ProcessSignalBody`), ``DELETE .../{pid}`` (SIGKILL its group), ``POST
  .../{pid}/wait?timeout=`` (504 ``timeout`` while it still runs): each answers its status.

Auth, namespaces and audit as every sandbox route: the routes go through the Admin's own
``_worker`` (namespace check) and ``_audited``. Wiring: ``admin.py`` includes :data:`router`
(one line); the Worker class inherits :class:`ProcessesWorker`.
"""

# No "from __future__ import annotations": FastAPI reads these annotations at include time.

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse

from rock_serve.config import ServerArgs
from rock_serve.deployments._auth import Auth
from rock_serve.deployments._ray import stream
from rock_serve.deployments._relays import ndjson
from rock_serve.deployments._trace import logged_stream
from rock_serve.protocol.processes import (
    ProcessInfo,
    ProcessInputBody,
    ProcessList,
    ProcessOutputChunk,
    ProcessOutputEnd,
    ProcessSignalBody,
    ProcessStartRequest,
    ProcessStream,
    ProcessTruncated,
)

__all__ = ["MAX_WAIT", "REFRESH_TIMEOUT", "ProcessesWorker", "router"]

router = APIRouter(tags=["processes"])
_NDJSON = "application/x-ndjson"
_BASE = "/v1/sandboxes/{sandbox_id}/processes"
#: Longest wait one request may ask for (seconds); the SDK waits longer in several requests.
MAX_WAIT = 3600.0

Pid = Annotated[int, Path(ge=1, le=(1 << 31) - 1, description="The process's pid.")]
ProcessItem = ProcessOutputChunk | ProcessTruncated | ProcessOutputEnd
#: Seconds one sandbox's process list may take while the process table is refreshed.
REFRESH_TIMEOUT = 5.0


# ----------------------------------------------------------------------------- Worker side


class ProcessesWorker:
    """The Worker's process methods (mixed into ``Worker``: ``_box``, ``_boxes`` and ``args``
    are its).

    It also keeps the Worker's process table (the console's "processes running" chart and the
    ``rock_processes_running`` gauge): the pids seen running, per sandbox, from the replies of
    these methods. :meth:`processes_running` answers from the table at once and refreshes it in
    the background from the rocklets of the sandboxes that had processes running (processes
    end on their own), so a status probe never waits on a rocklet and idle sandboxes cost
    nothing. The refresh reads ``_boxes`` directly: it must not renew leases.
    """

    args: ServerArgs
    _boxes: dict[str, Any]

    def _box(self, sandbox_id: str) -> Any:
        raise NotImplementedError  # pragma: no cover

    def _proc_table(self) -> dict[str, set[int]]:
        table: dict[str, set[int]] | None = self.__dict__.get("_running_pids")
        if table is None:
            table = self.__dict__["_running_pids"] = {}
        return table

    def _proc_seen(self, sandbox_id: str, info: ProcessInfo) -> ProcessInfo:
        """Note a reply's process in the table; returns ``info``."""
        table = self._proc_table()
        pids = table.setdefault(sandbox_id, set())
        if info.running:
            pids.add(info.pid)
        else:
            pids.discard(info.pid)
        if not pids:
            del table[sandbox_id]
        return info

    async def _proc_refresh(self) -> None:
        table = self._proc_table()

        async def one(sandbox_id: str) -> None:
            box = self._boxes.get(sandbox_id)
            if box is None:  # removed: its processes ended with it
                table.pop(sandbox_id, None)
                return
            try:
                listed: ProcessList = await asyncio.wait_for(
                    box.handle.list_processes(), REFRESH_TIMEOUT
                )
            except Exception:  # gone, paused, busy or broken: never the status's problem
                if sandbox_id not in self._boxes:
                    table.pop(sandbox_id, None)
                return  # keep what we knew
            running = {p.pid for p in listed.processes if p.running}
            if running:
                table[sandbox_id] = running
            else:
                table.pop(sandbox_id, None)

        await asyncio.gather(*(one(sandbox_id) for sandbox_id in list(table)))

    async def processes_running(self) -> int:
        """Background processes running in this Worker's sandboxes, from the process table
        (as of the last refresh; this call starts the next one without waiting for it).
        """
        task: asyncio.Task[None] | None = self.__dict__.get("_proc_refresher")
        if (task is None or task.done()) and self._proc_table():
            self.__dict__["_proc_refresher"] = asyncio.ensure_future(self._proc_refresh())
        return sum(len(pids) for pids in self._proc_table().values())

    async def start_process(self, sandbox_id: str, req: ProcessStartRequest) -> ProcessInfo:
        """Start a background process (at most ``max_processes_per_sandbox`` running at once;
        its output buffers held to ``max_output_bytes`` per stream).

        Raises:
            ResourceExhausted: the sandbox runs as many as it may.
        """
        if req.max_output_bytes > self.args.max_output_bytes:
            req = req.model_copy(update={"max_output_bytes": self.args.max_output_bytes})
        handle = self._box(sandbox_id).handle
        info: ProcessInfo = await handle.start_process(
            req, max_procs=self.args.max_processes_per_sandbox
        )
        return self._proc_seen(sandbox_id, info)

    async def list_processes(self, sandbox_id: str) -> ProcessList:
        """Running and recently ended background processes."""
        result: ProcessList = await self._box(sandbox_id).handle.list_processes()
        for info in result.processes:
            self._proc_seen(sandbox_id, info)
        return result

    async def process_status(self, sandbox_id: str, pid: int) -> ProcessInfo:
        """One background process's status."""
        info: ProcessInfo = await self._box(sandbox_id).handle.process_status(pid)
        return self._proc_seen(sandbox_id, info)

    async def stream_process_output(
        self,
        sandbox_id: str,
        pid: int,
        stream: ProcessStream = "stdout",
        offset: int = 0,
        follow: bool = False,
    ) -> AsyncIterator[ProcessItem]:
        """A stream's output from ``offset`` (see the module doc); last a ProcessOutputEnd."""
        handle = self._box(sandbox_id).handle
        items = handle.process_output(pid, stream=stream, offset=offset, follow=follow)
        async for item in logged_stream(f"process.output {pid}", sandbox_id, items):
            yield item

    async def process_input(self, sandbox_id: str, pid: int, body: ProcessInputBody) -> ProcessInfo:
        """Write to a background process's stdin."""
        handle = self._box(sandbox_id).handle
        info: ProcessInfo = await handle.process_input(pid, body.data_bytes(), eof=body.eof)
        return info

    async def signal_process(
        self, sandbox_id: str, pid: int, body: ProcessSignalBody
    ) -> ProcessInfo:
        """Signal a background process (its group by default)."""
        handle = self._box(sandbox_id).handle
        info: ProcessInfo = await handle.signal_process(pid, body.signal, group=body.group)
        return info

    async def kill_process(self, sandbox_id: str, pid: int) -> ProcessInfo:
        """SIGKILL a background process's group and descendants."""
        info: ProcessInfo = await self._box(sandbox_id).handle.kill_process(pid)
        return self._proc_seen(sandbox_id, info)

    async def wait_process(
        self, sandbox_id: str, pid: int, timeout: float | None = None
    ) -> ProcessInfo:
        """Wait until it ended.

        Raises:
            Timeout: it still runs after ``timeout`` seconds.
        """
        info: ProcessInfo = await self._box(sandbox_id).handle.wait_process(pid, timeout)
        return self._proc_seen(sandbox_id, info)


# ----------------------------------------------------------------------------- Admin routes


def _admin() -> Any:
    from ray import serve

    return serve.get_replica_context().servable_object


@router.post(_BASE, status_code=201, response_model=ProcessInfo)
async def start_process(
    sandbox_id: str, req: ProcessStartRequest, request: Request, principal: Auth
) -> ProcessInfo:
    """Start a command in the background; it outlives this request and any client."""
    admin = _admin()
    async with admin._audited(
        request,
        principal,
        "process.start",
        sandbox_id,
        status=201,
        command=req.command,
        env_keys=sorted(req.env or {}),
        detail={"cwd": req.cwd, "stdin": req.stdin},
    ) as event:
        info: ProcessInfo = await admin._data(sandbox_id, ProcessesWorker.start_process, req)
        event["detail"]["pid"] = info.pid
    return info


@router.get(_BASE, response_model=ProcessList)
async def list_processes(sandbox_id: str, principal: Auth) -> ProcessList:
    """Running and recently ended background processes, oldest first."""
    result: ProcessList = await _admin()._data(sandbox_id, ProcessesWorker.list_processes)
    return result


@router.get(_BASE + "/{pid}", response_model=ProcessInfo)
async def process_status(sandbox_id: str, pid: Pid, principal: Auth) -> ProcessInfo:
    """A background process's status (running, exit code, signal, output sizes)."""
    info: ProcessInfo = await _admin()._data(sandbox_id, ProcessesWorker.process_status, pid)
    return info


@router.get(
    _BASE + "/{pid}/output",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "NDJSON: ProcessTruncated / ProcessOutputChunk lines, then one "
            "ProcessOutputEnd (or an error body line).",
            "content": {_NDJSON: {"schema": {"type": "string"}}},
        }
    },
)
async def process_output(
    sandbox_id: str,
    pid: Pid,
    principal: Auth,
    stream_: Annotated[
        ProcessStream, Query(alias="stream", description="stdout or stderr.")
    ] = "stdout",
    offset: Annotated[int, Query(ge=0, description="Absolute offset to start at.")] = 0,
    follow: Annotated[bool, Query(description="Stream until the process ends.")] = False,
) -> Any:
    """A stream's output as NDJSON: a ``truncated`` marker when bytes before ``offset`` are
    gone, ``data`` lines with their offsets, last ``end`` with ``next`` (resume from there).
    """
    worker = await _admin()._worker(sandbox_id)
    items = stream(
        worker, ProcessesWorker.stream_process_output, sandbox_id, pid, stream_, offset, follow
    )
    return await ndjson(items)


@router.post(_BASE + "/{pid}/input", response_model=ProcessInfo)
async def process_input(
    sandbox_id: str, pid: Pid, body: ProcessInputBody, request: Request, principal: Auth
) -> ProcessInfo:
    """Write to the process's stdin (it must have been started with ``stdin: true``)."""
    admin = _admin()
    size = len(body.data_bytes())
    async with admin._audited(
        request,
        principal,
        "process.input",
        sandbox_id,
        detail={"pid": pid, "bytes": size, "eof": body.eof},  # never the data: may be secret
    ):
        info: ProcessInfo = await admin._data(sandbox_id, ProcessesWorker.process_input, pid, body)
    return info


@router.post(_BASE + "/{pid}/signal", response_model=ProcessInfo)
async def signal_process(
    sandbox_id: str, pid: Pid, body: ProcessSignalBody, request: Request, principal: Auth
) -> ProcessInfo:
    """Send a signal to the process (its whole process group by default)."""
    admin = _admin()
    async with admin._audited(
        request,
        principal,
        "process.signal",
        sandbox_id,
        detail={"pid": pid, "signal": body.signal, "group": body.group},
    ):
        info: ProcessInfo = await admin._data(sandbox_id, ProcessesWorker.signal_process, pid, body)
    return info


@router.delete(_BASE + "/{pid}", response_model=ProcessInfo)
async def kill_process(sandbox_id: str, pid: Pid, request: Request, principal: Auth) -> ProcessInfo:
    """SIGKILL the process's group and descendants; its final status (a no-op once ended)."""
    admin = _admin()
    async with admin._audited(request, principal, "process.kill", sandbox_id, detail={"pid": pid}):
        info: ProcessInfo = await admin._data(sandbox_id, ProcessesWorker.kill_process, pid)
    return info


@router.post(_BASE + "/{pid}/wait", response_model=ProcessInfo)
async def wait_process(
    sandbox_id: str,
    pid: Pid,
    principal: Auth,
    timeout: Annotated[
        float | None,
        Query(ge=0, le=MAX_WAIT, description="Seconds to wait (504 timeout while it runs)."),
    ] = None,
) -> ProcessInfo:
    """Wait until the process ended; its final status."""
    wait = MAX_WAIT if timeout is None else timeout
    info: ProcessInfo = await _admin()._data(sandbox_id, ProcessesWorker.wait_process, pid, wait)
    return info
