"""SWE-ReX remote-runtime wire models, as the rocklet's SWE-ReX routes take and return them.

Mirrors of ``swerex.runtime.abstract`` (v1.4): same fields and defaults. Unlike our own
:class:`~rock_serve.protocol.WireModel`, unknown fields are ignored as in SWE-ReX, so clients
that add fields (ROCK's ``sandbox_id``) keep working.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "SwxBashAction",
    "SwxBashInterruptAction",
    "SwxCloseSessionRequest",
    "SwxCloseSessionResponse",
    "SwxCommand",
    "SwxCommandResponse",
    "SwxCreateSessionRequest",
    "SwxCreateSessionResponse",
    "SwxObservation",
    "SwxReadFileRequest",
    "SwxWriteFileRequest",
]


class _SwxModel(BaseModel):
    """Base of the mirrors: unknown fields are ignored, as in SWE-ReX."""

    model_config = ConfigDict(extra="ignore")


class SwxCreateSessionRequest(_SwxModel):
    """SWE-ReX ``CreateBashSessionRequest``."""

    startup_source: list[str] = Field(default_factory=list, description="Files to source.")
    session: str = Field(default="default", description="Session name.")
    session_type: Literal["bash"] = Field(default="bash", description="Only 'bash'.")
    startup_timeout: float = Field(default=1.0, description="Timeout of the startup commands.")


class SwxCreateSessionResponse(_SwxModel):
    """SWE-ReX ``CreateBashSessionResponse``."""

    output: str = Field(default="", description="Output of the startup commands.")
    session_type: Literal["bash"] = Field(default="bash", description="Tag.")


class SwxBashAction(_SwxModel):
    """SWE-ReX ``BashAction``."""

    command: str = Field(description="The command to run.")
    session: str = Field(default="default", description="Session name.")
    timeout: float | None = Field(default=None, description="Seconds; None means the default.")
    is_interactive_command: bool = Field(default=False, description="Input for a running program.")
    is_interactive_quit: bool = Field(default=False, description="Input that ends that program.")
    check: Literal["silent", "raise", "ignore"] = Field(default="raise", description="Exit code.")
    error_msg: str = Field(default="", description="Prefix of the NonZeroExitCodeError message.")
    expect: list[str] = Field(default_factory=list, description="Extra strings to wait for.")
    action_type: Literal["bash"] = Field(default="bash", description="Tag.")


class SwxBashInterruptAction(_SwxModel):
    """SWE-ReX ``BashInterruptAction``."""

    session: str = Field(default="default", description="Session name.")
    timeout: float = Field(default=0.2, description="Seconds to wait per attempt.")
    n_retry: int = Field(default=3, description="Attempts.")
    expect: list[str] = Field(default_factory=list, description="Extra strings to wait for.")
    action_type: Literal["bash_interrupt"] = Field(default="bash_interrupt", description="Tag.")


class SwxObservation(_SwxModel):
    """SWE-ReX ``BashObservation``."""

    output: str = Field(default="", description="Merged output.")
    exit_code: int | None = Field(default=None, description="Exit code, None when not checked.")
    failure_reason: str = Field(default="", description="Unused.")
    expect_string: str = Field(default="", description="Which expect string ended the wait.")
    session_type: Literal["bash"] = Field(default="bash", description="Tag.")


class SwxCloseSessionRequest(_SwxModel):
    """SWE-ReX ``CloseBashSessionRequest``."""

    session: str = Field(default="default", description="Session name.")
    session_type: Literal["bash"] = Field(default="bash", description="Tag.")


class SwxCloseSessionResponse(_SwxModel):
    """SWE-ReX ``CloseBashSessionResponse``."""

    session_type: Literal["bash"] = Field(default="bash", description="Tag.")


class SwxCommand(_SwxModel):
    """SWE-ReX ``Command`` (``subprocess.run`` semantics)."""

    command: str | list[str] = Field(description="Argv list, or a string with shell=True.")
    timeout: float | None = Field(default=None, description="Seconds; None means the default.")
    shell: bool = Field(default=False, description="Run through /bin/sh -c.")
    check: bool = Field(default=False, description="Raise NonZeroExitCodeError on failure.")
    error_msg: str = Field(default="", description="Prefix of that error's message.")
    env: dict[str, str] | None = Field(default=None, description="The whole environment.")
    cwd: str | None = Field(default=None, description="Working directory.")
    merge_output_streams: bool = Field(default=False, description="stderr into stdout.")


class SwxCommandResponse(_SwxModel):
    """SWE-ReX ``CommandResponse``."""

    stdout: str = Field(default="", description="Standard output.")
    stderr: str = Field(default="", description="Standard error.")
    exit_code: int | None = Field(default=None, description="Exit code of the command.")


class SwxReadFileRequest(_SwxModel):
    """SWE-ReX ``ReadFileRequest`` (``Path.read_text`` semantics)."""

    path: str = Field(description="Path to read.")
    encoding: str | None = Field(default=None, description="Text encoding (default UTF-8).")
    errors: str | None = Field(default=None, description="Decoding error handler.")


class SwxWriteFileRequest(_SwxModel):
    """SWE-ReX ``WriteFileRequest``."""

    content: str = Field(description="Text to write (UTF-8).")
    path: str = Field(description="Path to write; parents are created.")
