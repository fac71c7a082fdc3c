"""ROCK's sandbox API wire models (``/apis/envs/sandbox/v1/*``, rl-rock 1.11.0).

Mirrors of ``rock/admin/proto/request.py``, ``rock/actions/sandbox/*`` and
``rock/actions/response.py``: same field names and defaults, unknown fields ignored (ROCK's
SDK sends more than a route reads). Every reply is the :class:`RockResponse` envelope
``{"status": "Success"|"Failed", "message", "error", "result"}``; a failure's ``result`` is
ROCK's ``SandboxResponse`` ``{"code", "exit_code", "failure_reason"}`` with ROCK's codes
(:class:`RockCode`: 4000 bad request, 5000 server error, 6000 command error).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "RockBashAction",
    "RockCloseSessionRequest",
    "RockCode",
    "RockCommand",
    "RockCreateSessionRequest",
    "RockReadFileRequest",
    "RockResponse",
    "RockSandboxIdBody",
    "RockStartRequest",
    "RockWriteFileRequest",
]


class RockCode(IntEnum):
    """ROCK's status codes (``rock._codes.codes``)."""

    OK = 2000
    BAD_REQUEST = 4000
    INTERNAL_SERVER_ERROR = 5000
    COMMAND_ERROR = 6000


class _RockModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RockResponse(BaseModel):
    """ROCK's ``RockResponse`` envelope."""

    status: Literal["Success", "Failed"] = Field(default="Success", description="Outcome.")
    message: str | None = Field(default=None, description="What failed (ROCK's route message).")
    error: str | None = Field(default=None, description="The error text.")
    result: Any = Field(default=None, description="The route's result, or SandboxResponse.")


class RockStartRequest(_RockModel):
    """ROCK's ``SandboxStartRequest`` (the fields this platform maps)."""

    image: str = Field(default="python:3.11", min_length=1, description="Image name.")
    auto_clear_time_minutes: int | None = Field(
        default=None, ge=1, description="Minutes without calls before the sandbox is removed."
    )
    auto_clear_time: int | None = Field(default=None, ge=1, description="Older name of the above.")
    memory: str = Field(default="8g", description="Memory, e.g. '8g', '512m'.")
    cpus: float = Field(default=2, gt=0, le=1024, description="CPU cores.")
    limit_cpus: float | None = Field(default=None, gt=0, le=1024, description="Hard CPU cap.")
    disk: str | None = Field(default=None, description="Disk quota, e.g. '50G'.")
    sandbox_id: str | None = Field(
        default=None,
        max_length=128,
        description="ROCK lets callers name a sandbox; here it is the create's idempotency key.",
    )
    startup_timeout: float | None = Field(default=None, description="Ignored: starts are fast.")


class RockSandboxIdBody(_RockModel):
    """``{"sandbox_id"}`` bodies (stop, delete)."""

    sandbox_id: str = Field(min_length=1, description="The sandbox.")


class RockCommand(_RockModel):
    """ROCK's ``SandboxCommand`` (one-shot ``execute``)."""

    sandbox_id: str = Field(min_length=1, description="The sandbox.")
    command: str | list[str] = Field(description="A shell string, or an argv list.")
    timeout: float | None = Field(default=1200, gt=0, description="Seconds; None = default.")
    shell: bool = Field(default=False, description="Run a string or list through /bin/sh -c.")
    check: bool = Field(default=False, description="A non-zero exit is a failure.")
    error_msg: str = Field(default="", description="Prefix of the failure text.")
    env: dict[str, str] | None = Field(default=None, description="Replaces the environment.")
    cwd: str | None = Field(default=None, description="Working directory.")


class RockCreateSessionRequest(_RockModel):
    """ROCK's ``SandboxCreateBashSessionRequest``."""

    sandbox_id: str = Field(min_length=1, description="The sandbox.")
    session: str = Field(default="default", description="Session name.")
    session_type: Literal["bash"] = Field(default="bash", description="Only 'bash'.")
    startup_source: list[str] = Field(default_factory=list, description="Files to source.")
    env_enable: bool = Field(default=False, description="Use ``env`` for the session.")
    env: dict[str, str] | None = Field(default=None, description="Session environment.")
    remote_user: str | None = Field(default=None, description="Not supported (must be None).")


class RockBashAction(_RockModel):
    """ROCK's ``SandboxBashAction`` (``run_in_session``)."""

    sandbox_id: str = Field(min_length=1, description="The sandbox.")
    action_type: Literal["bash"] = Field(default="bash", description="Only 'bash'.")
    command: str = Field(description="Command line.")
    session: str = Field(default="default", description="Session name.")
    timeout: float | None = Field(default=None, gt=0, description="Seconds; None = default.")
    check: Literal["silent", "raise", "ignore"] = Field(
        default="raise", description="raise: a non-zero exit is a Failed reply (as in ROCK)."
    )
    error_msg: str = Field(default="", description="Prefix of the failure text.")
    is_interactive_command: bool = Field(default=False, description="Not supported.")
    is_interactive_quit: bool = Field(default=False, description="Not supported.")


class RockCloseSessionRequest(_RockModel):
    """ROCK's ``SandboxCloseBashSessionRequest``."""

    sandbox_id: str = Field(min_length=1, description="The sandbox.")
    session: str = Field(default="default", description="Session name.")
    session_type: Literal["bash"] = Field(default="bash", description="Only 'bash'.")


class RockReadFileRequest(_RockModel):
    """ROCK's ``SandboxReadFileRequest``."""

    sandbox_id: str = Field(min_length=1, description="The sandbox.")
    path: str = Field(min_length=1, max_length=4096, description="File path.")
    encoding: str | None = Field(default=None, description="Text encoding (utf-8).")
    errors: str | None = Field(default=None, description="Decode error handling (strict).")


class RockWriteFileRequest(_RockModel):
    """ROCK's ``SandboxWriteFileRequest``."""

    sandbox_id: str = Field(min_length=1, description="The sandbox.")
    path: str = Field(min_length=1, max_length=4096, description="File path.")
    content: str = Field(description="Text written (UTF-8).")
