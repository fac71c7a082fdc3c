"""SandboxFusion's ``/run_code`` contract, served by running the code in one of our sandboxes.

The request and response models are SandboxFusion's (``sandbox/server/sandbox_api.py`` and
``sandbox/runners/types.py`` of bytedance/SandboxFusion), field for field, so verl's code-reward
path (``reward.sandbox_fusion.url``) and its SandboxFusion tool work against the platform with
only the URL changed. Unknown request fields are ignored, as SandboxFusion does.

:func:`run_code` creates a fresh short-lived sandbox per request, writes ``files`` and the code,
runs it with ``stdin`` under ``run_timeout``, reads back ``fetch_files``, and always deletes the
sandbox (also when the caller is cancelled; its TTL is the backstop).

Languages come from one table (:data:`LANGUAGES`: source file, compile argv, run argv), so a
toolchain image adds a row, not code: python, bash, cpp, c, go, java, nodejs, rust. A compiled
language reports its compile step in ``compile_result``; a failed compile is ``Failed`` with no
``run_result`` (verl's compile-error branch), a compile past ``compile_timeout`` is
``TimeLimitExceeded`` there. A toolchain missing from the sandbox's image (exit 127 from the
compiler or interpreter) is a ``SandboxError`` naming it. ``run_result.cpu_time`` is the CPU time
the sandbox's cgroup charged during the run (None where the runtime has no cgroup). An
unknown language gives ``SandboxError`` without creating a sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import posixpath
import uuid
from dataclasses import dataclass
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from rock_serve.errors import RockError, SandboxNotFound
from rock_serve.protocol import CreateSandboxRequest, ExecResult, Resources
from rock_serve.sdk import AsyncClient

__all__ = [
    "LANGUAGES",
    "SUPPORTED_LANGUAGES",
    "Language",
    "CommandRunResult",
    "CommandRunStatus",
    "RunCodeRequest",
    "RunCodeResponse",
    "RunStatus",
    "run_code",
]

log = logging.getLogger("rock_serve.envs.integrations")


@dataclass(frozen=True)
class Language:
    """How :func:`run_code` runs one language: ``{src}`` in an argv is the source file."""

    source: str
    """File name the code is written to (java needs ``Main.java``)."""
    run: tuple[str, ...]
    """Argv of the run step (stdin is the request's)."""
    compile: tuple[str, ...] | None = None
    """Argv of the compile step, if the language has one."""


#: Languages :func:`run_code` runs (SandboxFusion's names). Compiled programs are ``./main``.
LANGUAGES: dict[str, Language] = {
    "python": Language("main.py", ("python3", "{src}")),
    "bash": Language("main.sh", ("bash", "{src}")),
    "cpp": Language("main.cpp", ("./main",), ("g++", "-O2", "-std=c++17", "-o", "main", "{src}")),
    "c": Language("main.c", ("./main",), ("gcc", "-O2", "-o", "main", "{src}", "-lm")),
    "go": Language("main.go", ("./main",), ("go", "build", "-o", "main", "{src}")),
    "java": Language("Main.java", ("java", "-cp", ".", "Main"), ("javac", "{src}")),
    "nodejs": Language("main.js", ("node", "{src}")),
    "rust": Language("main.rs", ("./main",), ("rustc", "-O", "-o", "main", "{src}")),
}
SUPPORTED_LANGUAGES: tuple[str, ...] = tuple(LANGUAGES)
#: Exit status of a shell or ``env`` that did not find the program: a missing toolchain.
_NOT_FOUND = 127
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
    cpu_time: float | None = Field(
        None, description="CPU seconds the sandbox's cgroup charged during the step, if known."
    )


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


def _command_result(result: ExecResult, cpu_time: float | None = None) -> CommandRunResult:
    stdout, stderr = _text(result.stdout_bytes()), _text(result.stderr_bytes())
    if result.timed_out:
        return CommandRunResult(
            status=CommandRunStatus.TimeLimitExceeded,
            execution_time=result.duration,
            stdout=stdout,
            stderr=stderr,
            cpu_time=cpu_time,
        )
    return CommandRunResult(
        status=CommandRunStatus.Finished,
        execution_time=result.duration,
        return_code=result.exit_code,
        stdout=stdout,
        stderr=stderr,
        cpu_time=cpu_time,
    )


async def _cpu_seconds(client: AsyncClient, sandbox_id: str) -> float | None:
    """CPU time the sandbox's cgroup has charged so far (None without a cgroup)."""
    try:
        return (await client.stats(sandbox_id)).cpu_usage_seconds
    except RockError:
        return None


def _missing_toolchain(result: ExecResult, argv: tuple[str, ...]) -> bool:
    """True when the step's program was not found (exit 127 and it says so)."""
    if result.timed_out or result.exit_code != _NOT_FOUND:
        return False
    stderr = _text(result.stderr_bytes())
    return argv[0] in stderr and ("not found" in stderr or "No such file" in stderr)


def _argv(template: tuple[str, ...], source: str) -> list[str]:
    return [part.replace("{src}", source) for part in template]


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


def _no_toolchain(language: str, program: str, sandbox_id: str) -> RunCodeResponse:
    return RunCodeResponse(
        status=RunStatus.SandboxError,
        message=f"the sandbox's image has no {language} toolchain ({program!r} not found); "
        "use an image that has it (compat.run_code_image)",
        executor_pod_name=sandbox_id,
    )


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
    language = LANGUAGES.get(request.language)
    if language is None:
        return RunCodeResponse(
            status=RunStatus.SandboxError,
            message=f"language {request.language!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_LANGUAGES)})",
        )
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
    compile_timeout = max(1.0, request.compile_timeout) if language.compile else 0.0
    create = CreateSandboxRequest(
        client_token=token,
        image=image,
        owner=owner,
        labels={"rock-serve/purpose": "run_code"},
        ttl_seconds=compile_timeout + request.run_timeout + TTL_MARGIN,
        resources=Resources(memory_mb=min(max(16, memory), 4 << 20)) if memory > 0 else Resources(),
    )
    sandbox_id: str | None = None
    try:
        sandbox_id = (await client.create_sandbox(create)).id
        for path, data in files.items():
            await client.write_file(sandbox_id, path, data)
        # In the sandbox's working directory, beside ``files`` (as SandboxFusion does).
        await client.write_file(sandbox_id, language.source, request.code.encode("utf-8"))
        compiled: CommandRunResult | None = None
        if language.compile is not None:
            result = await client.exec(
                sandbox_id,
                _argv(language.compile, language.source),
                timeout=compile_timeout,
                max_output_bytes=MAX_OUTPUT_BYTES,
            )
            if _missing_toolchain(result, language.compile):
                return _no_toolchain(request.language, language.compile[0], sandbox_id)
            compiled = _command_result(result)
            if compiled.status != CommandRunStatus.Finished or compiled.return_code != 0:
                return RunCodeResponse(
                    status=RunStatus.Failed,
                    message="",
                    compile_result=compiled,
                    executor_pod_name=sandbox_id,
                )
        cpu_before = await _cpu_seconds(client, sandbox_id)
        result = await client.exec(
            sandbox_id,
            _argv(language.run, language.source),
            stdin=request.stdin,
            timeout=request.run_timeout,
            max_output_bytes=MAX_OUTPUT_BYTES,
        )
        if _missing_toolchain(result, language.run):
            return _no_toolchain(request.language, language.run[0], sandbox_id)
        cpu_after = await _cpu_seconds(client, sandbox_id)
        cpu = (
            round(max(0.0, cpu_after - cpu_before), 6)
            if cpu_before is not None and cpu_after is not None
            else None
        )
        fetched: dict[str, str] = {}
        for path in fetch:
            try:
                data = await client.read_file(sandbox_id, path)
            except (FileNotFoundError, IsADirectoryError):
                continue  # SandboxFusion skips what is not a file
            fetched[path] = base64.b64encode(data).decode("ascii")
        run = _command_result(result, cpu)
        ok = run.status == CommandRunStatus.Finished and run.return_code == 0
        return RunCodeResponse(
            status=RunStatus.Success if ok else RunStatus.Failed,
            message="",
            compile_result=compiled,
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
