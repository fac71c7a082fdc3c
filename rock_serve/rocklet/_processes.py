"""The host side of the rocklet's ``proc.*`` ops (background processes, issue 15.1).

:class:`ProcessOps` is a mixin of :class:`~rock_serve.rocklet.handle.RockletHandle`: each
method is one rocklet request, its reply parsed into the wire models of
:mod:`rock_serve.protocol.processes`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from rock_serve.protocol import encode_bytes
from rock_serve.protocol.processes import (
    ProcessInfo,
    ProcessList,
    ProcessOutputChunk,
    ProcessOutputEnd,
    ProcessStartRequest,
    ProcessStream,
    ProcessTruncated,
)

__all__ = ["ProcessOps", "info_of"]

_INFO_FIELDS = frozenset(ProcessInfo.model_fields)


def info_of(data: dict[str, Any]) -> ProcessInfo:
    """The :class:`ProcessInfo` in a ``proc.*`` result (which may carry more keys)."""
    return ProcessInfo(**{k: v for k, v in data.items() if k in _INFO_FIELDS})


class ProcessOps:
    """``proc.*`` requests; mixed into ``RockletHandle`` (which provides the two below)."""

    async def request(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        payload: bytes = b"",
        *,
        upload: AsyncIterable[bytes] | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        raise NotImplementedError  # pragma: no cover

    def _stream(
        self,
        op: str,
        args: dict[str, Any],
        payload: bytes = b"",
        *,
        upload: AsyncIterable[bytes] | None = None,
    ) -> AsyncIterator[tuple[dict[str, Any], bytes]]:
        raise NotImplementedError  # pragma: no cover

    async def start_process(
        self, req: ProcessStartRequest, *, max_procs: int | None = None
    ) -> ProcessInfo:
        """Start a background process (refused with ``resource_exhausted`` when the sandbox
        runs ``max_procs`` already; None = the rocklet's default bound).
        """
        args = req.model_dump(exclude_none=True)
        if max_procs is not None:
            args["max_procs"] = max_procs
        data, _ = await self.request("proc.start", args)
        return info_of(data)

    async def process_status(self, pid: int) -> ProcessInfo:
        """A background process's status."""
        data, _ = await self.request("proc.status", {"pid": pid})
        return info_of(data)

    async def list_processes(self) -> ProcessList:
        """Running and recently ended background processes."""
        data, _ = await self.request("proc.list")
        return ProcessList.model_validate(data)

    async def process_output(
        self,
        pid: int,
        *,
        stream: ProcessStream = "stdout",
        offset: int = 0,
        follow: bool = False,
        max_bytes: int | None = None,
    ) -> AsyncIterator[ProcessOutputChunk | ProcessTruncated | ProcessOutputEnd]:
        """A stream's output from ``offset``: what is there now, or with ``follow`` everything
        until the process ends; the last item is a :class:`ProcessOutputEnd`.
        """
        args: dict[str, Any] = {"pid": pid, "stream": stream, "offset": offset, "follow": follow}
        if max_bytes is not None:
            args["max_bytes"] = max_bytes
        async for header, data in self._stream("proc.output", args):
            if header.get("type") == "result":
                result = header.get("data") or {}
                yield ProcessOutputEnd(stream=stream, next=result["next"], process=info_of(result))
                return
            if "truncated_before" in header:
                yield ProcessTruncated(stream=stream, truncated_before=header["truncated_before"])
                continue
            (text,), encoding = encode_bytes(data)
            yield ProcessOutputChunk(
                stream=stream, offset=header["offset"], data=text, encoding=encoding
            )

    async def process_input(self, pid: int, data: bytes, *, eof: bool = False) -> ProcessInfo:
        """Write to a background process's stdin (and close it with ``eof``)."""
        result, _ = await self.request("proc.input", {"pid": pid, "eof": eof}, data)
        return info_of(result)

    async def signal_process(
        self, pid: int, signal: int | str, *, group: bool = True
    ) -> ProcessInfo:
        """Send ``signal`` to a background process (its whole process group by default)."""
        data, _ = await self.request("proc.signal", {"pid": pid, "signal": signal, "group": group})
        return info_of(data)

    async def kill_process(self, pid: int) -> ProcessInfo:
        """SIGKILL a background process's group and descendants; its final status."""
        data, _ = await self.request("proc.kill", {"pid": pid})
        return info_of(data)

    async def wait_process(self, pid: int, timeout: float | None = None) -> ProcessInfo:
        """Wait until a background process ended (``Timeout`` after ``timeout`` seconds)."""
        data, _ = await self.request("proc.wait", {"pid": pid, "timeout": timeout})
        return info_of(data)
