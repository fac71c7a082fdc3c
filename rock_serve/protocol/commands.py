"""Commands: one-shot exec and persistent bash sessions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from rock_serve.protocol._base import Encoding, WireModel, decode_text

DEFAULT_TIMEOUT = 300.0
MAX_TIMEOUT = 86_400.0
DEFAULT_MAX_OUTPUT = 1 << 20
MAX_OUTPUT = 256 << 20
SESSION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class ExecRequest(WireModel):
    """Run one command to completion in a fresh process."""

    command: Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)] = (
        Field(description="A shell string (run with bash -c) or an argv list (run directly).")
    )
    shell: bool | None = Field(
        default=None,
        description="Force shell interpretation; default: True for a string, False for a list.",
    )
    env: dict[str, str] | None = Field(default=None, description="Extra environment variables.")
    cwd: str | None = Field(default=None, max_length=4096, description="Working directory.")
    stdin: str | None = Field(default=None, description="Data written to the command's stdin.")
    timeout: float | None = Field(
        default=DEFAULT_TIMEOUT, gt=0, le=MAX_TIMEOUT, description="Seconds before it is killed."
    )
    max_output_bytes: int = Field(
        default=DEFAULT_MAX_OUTPUT, ge=0, le=MAX_OUTPUT, description="Cap per stream."
    )


class ExecResult(WireModel):
    """The outcome of an :class:`ExecRequest`."""

    exit_code: int = Field(description="Exit status; 128+N when killed by signal N.")
    stdout: str = Field(description="Standard output (see encoding).")
    stderr: str = Field(description="Standard error (see encoding).")
    encoding: Encoding = Field(
        default="utf-8", description="'base64' when the output was not valid UTF-8."
    )
    duration: float = Field(description="Wall time in seconds.")
    timed_out: bool = Field(default=False, description="Killed because the timeout passed.")
    truncated: bool = Field(default=False, description="Output went over max_output_bytes.")

    def stdout_bytes(self) -> bytes:
        """Raw stdout bytes."""
        return decode_text(self.stdout, self.encoding)

    def stderr_bytes(self) -> bytes:
        """Raw stderr bytes."""
        return decode_text(self.stderr, self.encoding)


class SessionCreateRequest(WireModel):
    """Start a persistent bash session."""

    session: str = Field(default="default", pattern=SESSION_NAME, description="Session name.")
    env: dict[str, str] | None = Field(default=None, description="Extra environment variables.")
    cwd: str | None = Field(default=None, max_length=4096, description="Initial directory.")
    startup_commands: list[str] = Field(
        default_factory=list, description="Commands run once in the new session (e.g. source)."
    )


class SessionCreateResponse(WireModel):
    """A session was created."""

    session: str = Field(description="Session name.")
    output: str = Field(default="", description="Output of the startup commands.")


class SessionRunRequest(WireModel):
    """Run a command in an existing session (cwd, env and functions persist)."""

    session: str = Field(default="default", pattern=SESSION_NAME, description="Session name.")
    command: str = Field(description="Bash source; may span lines.")
    timeout: float | None = Field(
        default=DEFAULT_TIMEOUT,
        gt=0,
        le=MAX_TIMEOUT,
        description="Seconds before the command is interrupted (SIGINT, then SIGKILL).",
    )
    max_output_bytes: int = Field(
        default=DEFAULT_MAX_OUTPUT, ge=0, le=MAX_OUTPUT, description="Output cap."
    )


class SessionRunResult(WireModel):
    """The outcome of a :class:`SessionRunRequest`; stdout and stderr are merged."""

    session: str = Field(description="Session name.")
    output: str = Field(description="Merged stdout and stderr (see encoding).")
    encoding: Encoding = Field(default="utf-8", description="'base64' when not valid UTF-8.")
    exit_code: int = Field(description="Exit status of the command ($?).")
    duration: float = Field(description="Wall time in seconds.")
    timed_out: bool = Field(default=False, description="Interrupted because of the timeout.")
    truncated: bool = Field(default=False, description="Output went over max_output_bytes.")
    session_restarted: bool = Field(
        default=False,
        description="The shell ignored the interrupt and was restarted; its state is lost.",
    )
    session_ended: bool = Field(
        default=False, description="The command ended the shell (e.g. ``exit``)."
    )

    def output_bytes(self) -> bytes:
        """Raw output bytes."""
        return decode_text(self.output, self.encoding)


class SessionStdinRequest(WireModel):
    """Write to the stdin of the command running in a session."""

    session: str = Field(default="default", pattern=SESSION_NAME, description="Session name.")
    data: str = Field(description="Text to write (add a newline to end a line).")
    eof: bool = Field(default=False, description="Close stdin after writing.")


class SessionInterruptRequest(WireModel):
    """Interrupt the command running in a session (like Ctrl-C)."""

    session: str = Field(default="default", pattern=SESSION_NAME, description="Session name.")


class SessionCloseRequest(WireModel):
    """Close a session and kill its processes."""

    session: str = Field(default="default", pattern=SESSION_NAME, description="Session name.")


class OutputChunk(WireModel):
    """One piece of streamed output."""

    type: Literal["output"] = Field(default="output", description="Tag of the stream item.")
    stream: Literal["stdout", "stderr", "output"] = Field(description="Which stream.")
    data: str = Field(description="The bytes (see encoding).")
    encoding: Encoding = Field(default="utf-8", description="'base64' when not valid UTF-8.")
