"""Background processes (``/v1/sandboxes/{id}/processes``, issue 15.1).

A process started here runs in its own process group in the sandbox, outlives the request
that started it and any client, and keeps the newest ``max_output_bytes`` of its stdout and
stderr each. Output is addressed by absolute byte offsets, so a reader that reconnects resumes
where it stopped; bytes that fell out of the buffer are reported by a
:class:`ProcessTruncated` marker, never skipped silently.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from pydantic import Field, WithJsonSchema

from rock_serve.protocol._base import Encoding, WireModel, decode_text

__all__ = [
    "DEFAULT_PROCESS_BUFFER",
    "MAX_PROCESS_BUFFER",
    "ProcessEvent",
    "ProcessInfo",
    "ProcessInputBody",
    "ProcessList",
    "ProcessOutputChunk",
    "ProcessOutputEnd",
    "ProcessSignalBody",
    "ProcessStartRequest",
    "ProcessStream",
    "ProcessTruncated",
    "SignalName",
]

DEFAULT_PROCESS_BUFFER = 1 << 20
MAX_PROCESS_BUFFER = 64 << 20
ProcessStream = Literal["stdout", "stderr"]
_NO_NUL = r"^[^\x00]*$"
_BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
_ENV_NAME = r"^[^=\x00]+$"
#: Environment variables: names without ``=`` or NUL, values without NUL (a closed schema, so
#: that a name outside the pattern is invalid there too, not only here).
Env = Annotated[
    dict[Annotated[str, Field(pattern=_ENV_NAME)], Annotated[str, Field(pattern=_NO_NUL)]],
    WithJsonSchema(
        {
            "type": "object",
            "patternProperties": {_ENV_NAME: {"type": "string", "pattern": _NO_NUL}},
            "additionalProperties": False,
        }
    ),
]
#: Signal names a process may be sent (with or without the SIG prefix; numbers 1-64 too).
SignalName = Literal[
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGALRM",
    "SIGTERM", "SIGCONT", "SIGSTOP", "SIGTSTP", "SIGWINCH",
    "HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "PIPE", "ALRM",
    "TERM", "CONT", "STOP", "TSTP", "WINCH",
]  # fmt: skip


class ProcessStartRequest(WireModel):
    """Start a command in the background."""

    command: (
        Annotated[str, Field(min_length=1, pattern=_NO_NUL)]
        | Annotated[list[Annotated[str, Field(min_length=1, pattern=_NO_NUL)]], Field(min_length=1)]
    ) = Field(description="A shell string (run with bash -c) or an argv list (run directly).")
    shell: bool | None = Field(
        default=None,
        description="Force shell interpretation; default: True for a string, False for a list.",
    )
    env: Env | None = Field(default=None, description="Extra environment variables.")
    cwd: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        pattern=_NO_NUL,
        description="Working directory.",
    )
    stdin: bool = Field(
        default=False,
        description="Give the process a stdin pipe for later input (else it reads /dev/null).",
    )
    max_output_bytes: int = Field(
        default=DEFAULT_PROCESS_BUFFER,
        ge=1,
        le=MAX_PROCESS_BUFFER,
        description="Newest bytes kept per stream; older ones are dropped (readers see a "
        "truncation marker). The platform may hold this to its own max_output_bytes.",
    )


class ProcessInfo(WireModel):
    """A background process's status."""

    pid: int = Field(description="Its pid inside the sandbox (the id of every process route).")
    command: list[str] = Field(description="The argv it runs.")
    running: bool = Field(description="True until it exits.")
    exit_code: int | None = Field(
        default=None, description="Exit status once ended; 128+N when killed by signal N."
    )
    signal: int | None = Field(default=None, description="The signal that ended it, if any.")
    started_at: float = Field(description="Start time (Unix seconds).")
    ended_at: float | None = Field(default=None, description="Exit time (Unix seconds).")
    stdout_bytes: int = Field(description="Bytes it wrote to stdout so far (the end offset).")
    stderr_bytes: int = Field(description="Bytes it wrote to stderr so far (the end offset).")
    stdin_open: bool = Field(description="Whether input can still be sent to it.")


class ProcessList(WireModel):
    """Reply of ``GET /v1/sandboxes/{id}/processes``: running and recently ended processes."""

    processes: list[ProcessInfo] = Field(description="Oldest first.")


class ProcessOutputChunk(WireModel):
    """Output bytes of one stream, at an absolute offset (one NDJSON line of an output read)."""

    type: Literal["data"] = "data"
    stream: ProcessStream = Field(description="stdout or stderr.")
    offset: int = Field(description="Offset of the first byte of ``data`` in the stream.")
    data: str = Field(description="The bytes (see encoding).")
    encoding: Encoding = Field(default="utf-8", description="'base64' when not valid UTF-8.")

    def data_bytes(self) -> bytes:
        """The raw bytes."""
        return decode_text(self.data, self.encoding)


class ProcessTruncated(WireModel):
    """The bytes before ``truncated_before`` left the process's output buffer unread."""

    type: Literal["truncated"] = "truncated"
    stream: ProcessStream = Field(description="stdout or stderr.")
    truncated_before: int = Field(description="Offset of the oldest byte still kept.")


class ProcessOutputEnd(WireModel):
    """The last line of an output read: where to resume and the process's status."""

    type: Literal["end"] = "end"
    stream: ProcessStream = Field(description="stdout or stderr.")
    next: int = Field(description="Offset to resume reading from.")
    process: ProcessInfo = Field(description="The process's status at the end of the read.")


ProcessEvent = Annotated[
    ProcessOutputChunk | ProcessTruncated | ProcessOutputEnd, Field(discriminator="type")
]


class ProcessInputBody(WireModel):
    """Body of ``POST /v1/sandboxes/{id}/processes/{pid}/input``."""

    data: str = Field(default="", description="Text for the process's stdin (sent as UTF-8).")
    data_base64: str | None = Field(
        default=None,
        pattern=_BASE64,
        description="Binary input, base64-encoded; written after ``data``.",
    )
    eof: bool = Field(default=False, description="Close its stdin after writing.")

    def data_bytes(self) -> bytes:
        """The raw bytes."""
        extra = base64.b64decode(self.data_base64) if self.data_base64 else b""
        return self.data.encode("utf-8", "surrogatepass") + extra


class ProcessSignalBody(WireModel):
    """Body of ``POST /v1/sandboxes/{id}/processes/{pid}/signal``."""

    signal: Annotated[int, Field(ge=1, le=64)] | SignalName = Field(
        default="SIGTERM", description="A signal number (1-64) or name (TERM, SIGINT, ...)."
    )
    group: bool = Field(
        default=True, description="Signal its whole process group (it is the group's leader)."
    )
