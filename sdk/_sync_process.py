# Generated from _async_process.py by scripts/unasync.py: edit the async file, then regenerate.
"""Background processes in the synchronous client (the sync module is generated from this one).

:class:`ProcessClient` holds the client's process calls (a base of
:class:`~rock_serve.sdk.Client`); ``sb.process`` (:class:`SandboxProcesses`) gives
:class:`Process` handles::

    p = sb.process.start("python train.py", env={"SEED": "1"})
    for line in p.stdout:  # follows the output; resumes from its offset on reconnect
        print(line)
    info = p.wait()
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import httpx

from rock_serve.errors import RuntimeUnavailable, Timeout
from rock_serve.protocol.processes import (
    DEFAULT_PROCESS_BUFFER,
    ProcessInfo,
    ProcessList,
    ProcessOutputChunk,
    ProcessOutputEnd,
    ProcessSignalBody,
    ProcessStartRequest,
    ProcessStream,
    ProcessTruncated,
)
from rock_serve.sdk import _base, _processes
from rock_serve.sdk._processes import ProcessItem

if TYPE_CHECKING:
    from rock_serve.sdk._sync_sandbox import Sandbox

__all__ = ["Process", "ProcessClient", "ProcessOutput", "SandboxProcesses"]


class ProcessClient:
    """The process calls of the client (a base class; ``_send`` is the client's)."""

    if TYPE_CHECKING:

        def _send(self, call: _base.Call, *, stream: bool = False) -> httpx.Response: ...

    def start_process(
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
        """Start a command in the background (its own process group; it outlives the call).

        Args:
            sandbox_id: The sandbox id.
            command: A shell string (run with ``bash -c``), an argv list, or a whole request.
            shell: Force (or refuse) shell interpretation.
            env: Extra environment variables.
            cwd: Working directory.
            stdin: Keep a stdin pipe open for :meth:`process_input`.
            max_output_bytes: Newest bytes kept per stream.

        Returns:
            Its status (``pid`` names it in the other calls).

        Raises:
            ResourceExhausted: The sandbox runs as many background processes as it may.
        """
        request = _processes.start_request(
            command, shell=shell, env=env, cwd=cwd, stdin=stdin, max_output_bytes=max_output_bytes
        )
        return _base.parse(self._send(_processes.start(sandbox_id, request)), ProcessInfo)

    def list_processes(self, sandbox_id: str) -> ProcessList:
        """Running and recently ended background processes of a sandbox, oldest first."""
        return _base.parse(self._send(_processes.list_(sandbox_id)), ProcessList)

    def process_status(self, sandbox_id: str, pid: int) -> ProcessInfo:
        """A background process's status.

        Raises:
            ProcessNotFound: No such process (or it was forgotten).
        """
        return _base.parse(self._send(_processes.status(sandbox_id, pid)), ProcessInfo)

    def process_output(
        self,
        sandbox_id: str,
        pid: int,
        *,
        stream: ProcessStream = "stdout",
        offset: int = 0,
        follow: bool = False,
    ) -> Iterator[ProcessItem]:
        """One stream's output from ``offset``: what is there, or with ``follow`` all of it
        until the process ends.

        Yields:
            :class:`ProcessTruncated` when bytes before ``offset`` are gone,
            :class:`ProcessOutputChunk` items, and last a :class:`ProcessOutputEnd` whose
            ``next`` is the offset to resume from.
        """
        call = _processes.output(sandbox_id, pid, stream, offset, follow)
        response = self._send(call, stream=True)
        try:
            for line in response.iter_lines():
                item = _processes.parse_line(line)
                if item is None:
                    continue
                yield item
                if isinstance(item, ProcessOutputEnd):
                    return
        finally:
            response.close()
        raise _processes.ended_early()

    def process_input(
        self, sandbox_id: str, pid: int, data: str | bytes, *, eof: bool = False
    ) -> ProcessInfo:
        """Write to a background process's stdin (started with ``stdin=True``).

        Raises:
            Conflict: It has no stdin (any more).
        """
        body = _processes.input_body(data, eof)
        return _base.parse(self._send(_processes.send_input(sandbox_id, pid, body)), ProcessInfo)

    def signal_process(
        self, sandbox_id: str, pid: int, signal: int | str = "SIGTERM", *, group: bool = True
    ) -> ProcessInfo:
        """Send ``signal`` (a number or a name) to a background process's group (or only to
        it with ``group=False``).

        Raises:
            Conflict: It has exited.
        """
        body = ProcessSignalBody(signal=signal, group=group)
        return _base.parse(self._send(_processes.signal(sandbox_id, pid, body)), ProcessInfo)

    def kill_process(self, sandbox_id: str, pid: int) -> ProcessInfo:
        """SIGKILL a background process's group and descendants; its final status."""
        return _base.parse(self._send(_processes.kill(sandbox_id, pid)), ProcessInfo)

    def wait_process(self, sandbox_id: str, pid: int, timeout: float) -> ProcessInfo:
        """One wait request: its final status once it ended.

        Raises:
            Timeout: It still runs after ``timeout`` seconds (at most an hour per request).
        """
        return _base.parse(self._send(_processes.wait(sandbox_id, pid, timeout)), ProcessInfo)


class SandboxProcesses:
    """``sb.process``: background processes of one sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        """Bind to a sandbox (use ``sb.process``)."""
        self.sandbox = sandbox

    def start(
        self,
        command: str | list[str] | ProcessStartRequest,
        *,
        shell: bool | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bool = False,
        max_output_bytes: int = DEFAULT_PROCESS_BUFFER,
    ) -> Process:
        """Start a command in the background (args of ``Client.start_process``).

        Returns:
            A handle: ``wait()``, ``stdout``/``stderr`` (async-iterable lines), ``send_input``,
            ``signal``, ``kill``.
        """
        info = self.sandbox.client.start_process(
            self.sandbox.id,
            command,
            shell=shell,
            env=env,
            cwd=cwd,
            stdin=stdin,
            max_output_bytes=max_output_bytes,
        )
        return Process(self.sandbox, info)

    def list(self) -> builtins.list[Process]:
        """Handles of the running and recently ended background processes, oldest first."""
        listed = self.sandbox.client.list_processes(self.sandbox.id)
        return [Process(self.sandbox, info) for info in listed.processes]

    def get(self, pid: int) -> Process:
        """A handle of the background process ``pid`` (e.g. after a client restart).

        Raises:
            ProcessNotFound: No such process.
        """
        return Process(self.sandbox, self.sandbox.client.process_status(self.sandbox.id, pid))


class Process:
    """One background process; ``info`` is its status as last seen."""

    def __init__(self, sandbox: Sandbox, info: ProcessInfo) -> None:
        """Wrap a process's status (use ``sb.process.start`` / ``list`` / ``get``)."""
        self.sandbox = sandbox
        self.info = info
        self.pid = info.pid
        self.stdout = ProcessOutput(self, "stdout")
        self.stderr = ProcessOutput(self, "stderr")

    def __repr__(self) -> str:
        state = "running" if self.info.running else f"exit_code={self.info.exit_code}"
        return f"<Process {self.pid} {state} {self.info.command!r}>"

    @property
    def exit_code(self) -> int | None:
        """Its exit status once ended (as last seen); 128+N when killed by signal N."""
        return self.info.exit_code

    def status(self) -> ProcessInfo:
        """Fetch its status now."""
        self.info = self.sandbox.client.process_status(self.sandbox.id, self.pid)
        return self.info

    def wait(self, timeout: float | None = None) -> ProcessInfo:
        """Wait until it ended (in requests of at most ``WAIT_SLICE`` seconds each).

        Args:
            timeout: Seconds to wait at most (None: as long as it runs).

        Returns:
            Its final status.

        Raises:
            Timeout: It still runs after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            step = _processes.WAIT_SLICE if left is None else min(left, _processes.WAIT_SLICE)
            try:
                self.info = self.sandbox.client.wait_process(self.sandbox.id, self.pid, step)
                return self.info
            except Timeout:
                if left is not None and left <= step:
                    raise

    def send_input(self, data: str | bytes, *, eof: bool = False) -> ProcessInfo:
        """Write to its stdin (it must have been started with ``stdin=True``)."""
        self.info = self.sandbox.client.process_input(self.sandbox.id, self.pid, data, eof=eof)
        return self.info

    def close_stdin(self) -> ProcessInfo:
        """Close its stdin (EOF for the process)."""
        return self.send_input(b"", eof=True)

    def signal(self, signal: int | str = "SIGTERM", *, group: bool = True) -> ProcessInfo:
        """Send ``signal`` to its process group (or only to it with ``group=False``)."""
        self.info = self.sandbox.client.signal_process(
            self.sandbox.id, self.pid, signal, group=group
        )
        return self.info

    def kill(self) -> ProcessInfo:
        """SIGKILL its process group and descendants; its final status."""
        self.info = self.sandbox.client.kill_process(self.sandbox.id, self.pid)
        return self.info


class ProcessOutput:
    """One output stream of a process: ``for line in p.stdout`` follows it line by line.

    The reader keeps its ``offset``: a dropped connection is resumed from there (up to
    ``RECONNECTS`` failed attempts in a row), and a later iteration goes on where the last one
    stopped. ``truncated_before`` is set when bytes it had not read left the process's buffer.
    """

    def __init__(self, process: Process, stream: ProcessStream) -> None:
        """Bind to a process's stream (use ``p.stdout`` / ``p.stderr``)."""
        self.process = process
        self.stream: ProcessStream = stream
        self.offset = 0
        self.truncated_before: int | None = None

    def __iter__(self) -> Iterator[str]:
        return self.lines()

    def chunks(self, *, follow: bool = True) -> Iterator[bytes]:
        """Its bytes from :attr:`offset` on, as they come (``follow``) or as far as there are."""
        sb = self.process.sandbox
        failures = 0
        while True:
            try:
                for item in sb.client.process_output(
                    sb.id, self.process.pid, stream=self.stream, offset=self.offset, follow=follow
                ):
                    if isinstance(item, ProcessTruncated):
                        self.truncated_before = item.truncated_before
                        self.offset = max(self.offset, item.truncated_before)
                    elif isinstance(item, ProcessOutputChunk):
                        data = item.data_bytes()
                        self.offset = item.offset + len(data)
                        failures = 0
                        yield data
                    else:
                        self.offset = item.next
                        self.process.info = item.process
                        return
            except (httpx.TransportError, RuntimeUnavailable):
                failures += 1
                if failures > _processes.RECONNECTS:
                    raise
                _base.sleep(min(0.1 * 2**failures, 2.0))

    def lines(self, *, follow: bool = True) -> Iterator[str]:
        """Its text line by line (newlines stripped; a partial line cut by truncation is
        dropped), following it until the process ends.
        """
        buf = b""
        seen = self.truncated_before
        for data in self.chunks(follow=follow):
            if self.truncated_before != seen:
                buf, seen = b"", self.truncated_before
            buf += data
            *complete, buf = buf.split(b"\n")
            for line in complete:
                yield line.decode("utf-8", "replace")
        if buf:
            yield buf.decode("utf-8", "replace")

    def read(self) -> bytes:
        """The bytes from :attr:`offset` that are there now (without waiting for more)."""
        return b"".join([data for data in self.chunks(follow=False)])
