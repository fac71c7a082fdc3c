"""The sans-IO part of background processes (issue 15.1): requests and NDJSON parsing, shared
by the async client, its generated sync twin and the Ray transport.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping

from pydantic import TypeAdapter, ValidationError

from rock_serve.errors import InternalError, from_body
from rock_serve.protocol.processes import (
    DEFAULT_PROCESS_BUFFER,
    ProcessEvent,
    ProcessInputBody,
    ProcessOutputChunk,
    ProcessOutputEnd,
    ProcessSignalBody,
    ProcessStartRequest,
    ProcessStream,
    ProcessTruncated,
)
from rock_serve.sdk import _base

__all__ = [
    "RECONNECTS",
    "WAIT_SLICE",
    "ProcessItem",
    "ended_early",
    "input_body",
    "parse_line",
    "start_request",
]

ProcessItem = ProcessOutputChunk | ProcessTruncated | ProcessOutputEnd
#: Seconds one wait request asks for; longer waits are several requests (each well inside an
#: HTTP read timeout), so a client-side ``timeout=None`` waits as long as it takes.
WAIT_SLICE = 30.0
#: Consecutive failed reconnects of an output reader before it gives up.
RECONNECTS = 5
_EVENT: TypeAdapter[ProcessItem] = TypeAdapter(ProcessEvent)


def _base_path(sandbox_id: str, *rest: str) -> str:
    return _base._sandbox(sandbox_id, "processes", *rest)


def start_request(
    command: str | list[str] | ProcessStartRequest,
    *,
    shell: bool | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: bool = False,
    max_output_bytes: int = DEFAULT_PROCESS_BUFFER,
) -> ProcessStartRequest:
    """The start request for ``command`` (a ready request is passed through)."""
    if isinstance(command, ProcessStartRequest):
        return command
    return ProcessStartRequest(
        command=command,
        shell=shell,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdin=stdin,
        max_output_bytes=max_output_bytes,
    )


def input_body(data: str | bytes, eof: bool) -> ProcessInputBody:
    """The input body for ``data`` (text as is, bytes as base64)."""
    if isinstance(data, str):
        return ProcessInputBody(data=data, eof=eof)
    if not data:
        return ProcessInputBody(eof=eof)
    return ProcessInputBody(data_base64=base64.b64encode(data).decode("ascii"), eof=eof)


def start(sandbox_id: str, request: ProcessStartRequest) -> _base.Call:
    """``POST /v1/sandboxes/{id}/processes``."""
    return _base.Call("POST", _base_path(sandbox_id), json=_base._dump(request))


def list_(sandbox_id: str) -> _base.Call:
    """``GET /v1/sandboxes/{id}/processes``."""
    return _base.Call("GET", _base_path(sandbox_id))


def status(sandbox_id: str, pid: int) -> _base.Call:
    """``GET /v1/sandboxes/{id}/processes/{pid}``."""
    return _base.Call("GET", _base_path(sandbox_id, str(int(pid))))


def output(
    sandbox_id: str, pid: int, stream: ProcessStream, offset: int, follow: bool
) -> _base.Call:
    """``GET /v1/sandboxes/{id}/processes/{pid}/output`` (a follow waits as long as it runs)."""
    params = (("stream", stream), ("offset", str(int(offset))), ("follow", str(follow).lower()))
    return _base.Call(
        "GET",
        _base_path(sandbox_id, str(int(pid)), "output"),
        params=params,
        read_timeout=None if follow else "default",
    )


def send_input(sandbox_id: str, pid: int, body: ProcessInputBody) -> _base.Call:
    """``POST /v1/sandboxes/{id}/processes/{pid}/input``."""
    return _base.Call(
        "POST", _base_path(sandbox_id, str(int(pid)), "input"), json=_base._dump(body)
    )


def signal(sandbox_id: str, pid: int, body: ProcessSignalBody) -> _base.Call:
    """``POST /v1/sandboxes/{id}/processes/{pid}/signal``."""
    return _base.Call(
        "POST", _base_path(sandbox_id, str(int(pid)), "signal"), json=_base._dump(body)
    )


def kill(sandbox_id: str, pid: int) -> _base.Call:
    """``DELETE /v1/sandboxes/{id}/processes/{pid}``."""
    return _base.Call("DELETE", _base_path(sandbox_id, str(int(pid))))


def wait(sandbox_id: str, pid: int, timeout: float) -> _base.Call:
    """``POST /v1/sandboxes/{id}/processes/{pid}/wait?timeout=``."""
    return _base.Call(
        "POST",
        _base_path(sandbox_id, str(int(pid)), "wait"),
        params=(("timeout", repr(float(timeout))),),
        read_timeout=timeout + _base.COMMAND_TIMEOUT_MARGIN,
    )


def parse_line(line: str) -> ProcessItem | None:
    """One NDJSON line of an output read; None if blank.

    Raises:
        RockError: The line is an error body (the read failed mid-stream), or malformed.
    """
    if not line.strip():
        return None
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise InternalError(f"malformed output line: {line[:200]!r}") from exc
    if isinstance(item, dict) and "error" in item:
        raise from_body(item)
    try:
        return _EVENT.validate_python(item)
    except ValidationError as exc:
        raise InternalError(f"malformed output line: {line[:200]!r}") from exc


def ended_early() -> InternalError:
    """The error for an output read that closed before its end line."""
    return InternalError("the output stream ended before its end line")
