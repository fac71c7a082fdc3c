"""SandboxFusion's ``/run_code`` contract, served by running the code in one of our sandboxes.

The request and response models are SandboxFusion's (``sandbox/server/sandbox_api.py`` and
``sandbox/runners/types.py`` of bytedance/SandboxFusion), field for field, so verl's code-reward
path (``reward.sandbox_fusion.url``) and its SandboxFusion tool work against the platform with
only the URL changed. Unknown request fields are ignored, as SandboxFusion does.

:func:`run_code` creates a fresh short-lived sandbox per request, writes ``files`` and the code,
runs it with ``stdin`` under ``run_timeout``, reads back ``fetch_files``, and always deletes the
sandbox (also when the caller is cancelled; its TTL is the backstop). Languages: ``python`` and
``bash``; any other gives SandboxFusion's ``SandboxError`` status without creating a sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import posixpath
import uuid
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from rock_serve.errors import RockError, SandboxNotFound
from rock_serve.protocol import CreateSandboxRequest, ExecResult, Resources
from rock_serve.sdk import AsyncClient

__all__ = [
    "SUPPORTED_LANGUAGES",
    "CommandRunResult",
    "CommandRunStatus",
    "RunCodeRequest",
    "RunCodeResponse",
    "RunStatus",
    "run_code",
]

log = logging.getLogger("rock_serve.envs.integrations")

#: Languages :func:`run_code` runs, with the interpreter argv and the code file's suffix.
_RUNNERS: dict[str, tuple[tuple[str, ...], str]] = {
    "python": (("python3",), ".py"),
    "bash": (("bash",), ".sh"),
}
SUPPORTED_LANGUAGES: tuple[str, ...] = tuple(_RUNNERS)
#: Output kept per stream (SandboxFusion keeps 1 MiB).
MAX_OUTPUT_BYTES = 1 << 20
#: Seconds added to the timeouts for the sandbox's TTL (the backstop if a delete is lost).
TTL_MARGIN = 60.0


class RunCodeRequest(BaseModel):
    """Body of ``POST /run_code`` (SandboxFusion's ``RunCodeRequest``)."""

    model_config = ConfigDict(extra="ignore")

    compile_timeout: float = Field(10, description="Compile timeout for compiled languages.")
    run_timeout: float = Field(10, gt=0, le=3600, description="Code run timeout in seconds.")
    memory_limit_MB: int = Field(-1, description="Maximum memory in MiB (-1: no limit).")
    code: str = Field(description="The code to run.")
    stdin: str | None = Field(None, description="Optional string passed to stdin.")
    language: str = Field(description="Language or execution mode (python, bash).")
    files: dict[str, str | None] = Field(
        default_factory=dict, description="File path -> base64 content, written before the run."
    )
    fetch_files: list[str] = Field(
        default_factory=list, description="File paths read back (base64) after the run."
    )
    args: list[str] = Field(
        default_factory=list, description="Extra command-line arguments (pytest mode only)."
    )


class CommandRunStatus(str, Enum):
    """How one command ended."""

    Finished = "Finished"
    Error = "Error"
    TimeLimitExceeded = "TimeLimitExceeded"


class CommandRunResult(BaseModel):
    """One command's outcome (compile or run)."""

    status: CommandRunStatus = Field(description="Finished, Error or TimeLimitExceeded.")
    execution_time: float | None = Field(None, description="Wall time in seconds.")
    return_code: int | None = Field(None, description="Exit status (None after a timeout).")
    stdout: str | None = Field(None, description="Standard output.")
    stderr: str | None = Field(None, description="Standard error.")


class RunStatus(str, Enum):
    """Overall status of a run."""

    Success = "Success"
    Failed = "Failed"
    SandboxError = "SandboxError"


class RunCodeResponse(BaseModel):
    """Reply of ``POST /run_code`` (SandboxFusion's ``RunCodeResponse``)."""

    status: RunStatus = Field(
        description="Success, Failed (non-zero exit or timeout), SandboxError."
    )
    message: str = Field(description="What went wrong on the sandbox side, if anything.")
    compile_result: CommandRunResult | None = Field(None, description="Compile step, if any.")
    run_result: CommandRunResult | None = Field(None, description="Run step, if it ran.")
    executor_pod_name: str | None = Field(None, description="The sandbox that ran the code.")
    files: dict[str, str] = Field(
        default_factory=dict, description="Fetched files: path -> base64 content."
    )


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _command_result(result: ExecResult) -> CommandRunResult:
    stdout, stderr = _text(result.stdout_bytes()), _text(result.stderr_bytes())
    if result.timed_out:
        return CommandRunResult(
            status=CommandRunStatus.TimeLimitExceeded,
            execution_time=result.duration,
            stdout=stdout,
            stderr=stderr,
        )
    return CommandRunResult(
        status=CommandRunStatus.Finished,
        execution_time=result.duration,
        return_code=result.exit_code,
        stdout=stdout,
        stderr=stderr,
    )


def _relative(path: str) -> str:
    """A request path made relative to the run's directory (as SandboxFusion joins them)."""
    cleaned = posixpath.normpath(path).lstrip("/")
    if cleaned in ("", ".") or cleaned.startswith(".."):
        raise ValueError(f"file path {path!r} leaves the working directory")
    return cleaned


async def _delete(client: AsyncClient, sandbox_id: str | None, client_token: str) -> None:
    """Delete the run's sandbox; by its create token when the create's answer never came."""
    try:
        if sandbox_id is not None:
            await client.delete_sandbox(sandbox_id)
        else:
            await client.delete_by_token(client_token)
    except SandboxNotFound:
        pass
    except Exception:
        what = sandbox_id or f"with client_token {client_token}"
        log.warning("run_code could not delete sandbox %s (its TTL will)", what, exc_info=True)


async def run_code(
    client: AsyncClient,
    request: RunCodeRequest,
    *,
    image: str | None = None,
    owner: str = "run_code",
) -> RunCodeResponse:
    """Run one :class:`RunCodeRequest` in a fresh sandbox and delete the sandbox.

    Args:
        client: Any SDK client (HTTP, or the Ray transport inside the cluster).
        request: SandboxFusion's request.
        image: Image of the sandbox (None: the runtime's default).
        owner: Owner recorded on the sandbox.

    Returns:
        SandboxFusion's response. Platform errors (no capacity after the SDK's retries, a
        sandbox that died) are ``SandboxError`` replies, not exceptions.
    """
    runner = _RUNNERS.get(request.language)
    if runner is None:
        return RunCodeResponse(
            status=RunStatus.SandboxError,
            message=f"language {request.language!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_LANGUAGES)})",
        )
    argv, suffix = runner
    try:
        files = {
            _relative(path): base64.b64decode(content, validate=True)
            for path, content in request.files.items()
            if isinstance(content, str)
        }
        fetch = [_relative(path) for path in request.fetch_files]
    except (ValueError, binascii.Error) as exc:
        return RunCodeResponse(status=RunStatus.SandboxError, message=f"bad files: {exc}")

    memory = request.memory_limit_MB
    token = uuid.uuid4().hex
    create = CreateSandboxRequest(
        client_token=token,
        image=image,
        owner=owner,
        labels={"rock-serve/purpose": "run_code"},
        ttl_seconds=max(0.0, request.compile_timeout) + request.run_timeout + TTL_MARGIN,
        resources=Resources(memory_mb=min(max(16, memory), 4 << 20)) if memory > 0 else Resources(),
    )
    sandbox_id: str | None = None
    try:
        sandbox_id = (await client.create_sandbox(create)).id
        for path, data in files.items():
            await client.write_file(sandbox_id, path, data)
        script = f"tmp{uuid.uuid4().hex[:12]}{suffix}"
        await client.write_file(sandbox_id, script, request.code.encode("utf-8"))
        result = await client.exec(
            sandbox_id,
            [*argv, script],
            stdin=request.stdin,
            timeout=request.run_timeout,
            max_output_bytes=MAX_OUTPUT_BYTES,
        )
        fetched: dict[str, str] = {}
        for path in fetch:
            try:
                data = await client.read_file(sandbox_id, path)
            except (FileNotFoundError, IsADirectoryError):
                continue  # SandboxFusion skips what is not a file
            fetched[path] = base64.b64encode(data).decode("ascii")
        run = _command_result(result)
        ok = run.status == CommandRunStatus.Finished and run.return_code == 0
        return RunCodeResponse(
            status=RunStatus.Success if ok else RunStatus.Failed,
            message="",
            run_result=run,
            executor_pod_name=sandbox_id,
            files=fetched,
        )
    except RockError as exc:
        return RunCodeResponse(
            status=RunStatus.SandboxError,
            message=f"{exc.code.value}: {exc.message}",
            executor_pod_name=sandbox_id,
        )
    finally:
        # Shielded: a caller that goes away (cancellation) must not leave the sandbox, even
        # one whose create was still in flight.
        await asyncio.shield(_delete(client, sandbox_id, token))
