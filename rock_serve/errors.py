"""The one table: ErrorCode <-> exception class <-> HTTP status.

Servers render :class:`rock_serve.protocol.ErrorBody` from an exception with :func:`to_body`;
clients re-raise with :func:`from_body`. Each exception also inherits the builtin it means,
so ``except LookupError`` catches :class:`SandboxNotFound`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any, ClassVar

__all__ = [
    "ArtifactCorrupt",
    "AgentFailed",
    "BadFrame",
    "Conflict",
    "ErrorCode",
    "FileNotFound",
    "ImageNotFound",
    "ImageStoreFull",
    "InternalError",
    "InvalidConfig",
    "InvalidImageReference",
    "InvalidRequest",
    "IsADirectory",
    "LLMTimeout",
    "NotADirectory",
    "NotFound",
    "NotSupported",
    "OverCapacity",
    "PathOutsideSandbox",
    "PermissionDenied",
    "PortClosed",
    "ProcessNotFound",
    "RateLimited",
    "RegistryUnauthorized",
    "RegistryUnavailable",
    "ReplayDiverged",
    "ResourceExhausted",
    "RockError",
    "RockletUnavailable",
    "RuntimeUnavailable",
    "SandboxFailed",
    "SandboxNotFound",
    "SandboxNotRunning",
    "SessionBusy",
    "SessionExists",
    "SessionNotFound",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "UnknownOperation",
    "error_class",
    "from_body",
    "from_validation",
    "http_status",
    "to_body",
]


class ErrorCode(str, Enum):
    """Every error code that crosses a process boundary."""

    INVALID_REQUEST = "invalid_request"
    INVALID_CONFIG = "invalid_config"
    INVALID_IMAGE_REFERENCE = "invalid_image_reference"
    BAD_FRAME = "bad_frame"
    UNKNOWN_OPERATION = "unknown_operation"
    PATH_OUTSIDE_SANDBOX = "path_outside_sandbox"
    IS_A_DIRECTORY = "is_a_directory"
    NOT_A_DIRECTORY = "not_a_directory"
    UNAUTHORIZED = "unauthorized"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    SANDBOX_NOT_FOUND = "sandbox_not_found"
    SESSION_NOT_FOUND = "session_not_found"
    PROCESS_NOT_FOUND = "process_not_found"
    FILE_NOT_FOUND = "file_not_found"
    IMAGE_NOT_FOUND = "image_not_found"
    REGISTRY_UNAUTHORIZED = "registry_unauthorized"
    REGISTRY_UNAVAILABLE = "registry_unavailable"
    IMAGE_STORE_FULL = "image_store_full"
    CONFLICT = "conflict"
    SESSION_EXISTS = "session_exists"
    SESSION_BUSY = "session_busy"
    SANDBOX_NOT_RUNNING = "sandbox_not_running"
    SANDBOX_FAILED = "sandbox_failed"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    OVER_CAPACITY = "over_capacity"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"
    ROCKLET_UNAVAILABLE = "rocklet_unavailable"
    RUNTIME_UNAVAILABLE = "runtime_unavailable"
    TIMEOUT = "timeout"
    LLM_TIMEOUT = "llm_timeout"
    REPLAY_DIVERGED = "replay_diverged"
    PORT_CLOSED = "port_closed"
    NOT_SUPPORTED = "not_supported"
    ARTIFACT_CORRUPT = "artifact_corrupt"
    AGENT_FAILED = "agent_failed"


class RockError(Exception):
    """Base of every rock-serve error; carries a code, a message and an optional Retry-After."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    status: ClassVar[int] = 500

    def __init__(
        self, message: str = "", *, retry_after: float | None = None, **details: Any
    ) -> None:
        super().__init__(message or self.code.value)
        self.message = message or self.code.value
        self.retry_after = retry_after
        self.details = details

    def __str__(self) -> str:
        return self.message


class InvalidRequest(RockError, ValueError):
    """The request is malformed or a field is out of range."""

    code = ErrorCode.INVALID_REQUEST
    status = 400


class InvalidImageReference(InvalidRequest):
    """An image reference that is not one (``Bad Ref!``, ``UPPER/case``, a relative ``oci:``
    path): 422, the body is well-formed JSON but names no image. Validators raise it as a
    pydantic error of the same type (``invalid_image_reference``); :func:`from_validation`
    turns that back into this class.
    """

    code = ErrorCode.INVALID_IMAGE_REFERENCE
    status = 422


class InvalidConfig(RockError, ValueError):
    """A configuration (runtime, server) is invalid or names something unusable."""

    code = ErrorCode.INVALID_CONFIG
    status = 400


class BadFrame(RockError, ValueError):
    """A rocklet frame could not be decoded."""

    code = ErrorCode.BAD_FRAME
    status = 400


class UnknownOperation(RockError, ValueError):
    """The rocklet does not know the requested operation."""

    code = ErrorCode.UNKNOWN_OPERATION
    status = 400


class PathOutsideSandbox(RockError, PermissionError):
    """A path resolves outside the sandbox's root."""

    code = ErrorCode.PATH_OUTSIDE_SANDBOX
    status = 400


class IsADirectory(RockError, IsADirectoryError):
    """A file operation named a directory."""

    code = ErrorCode.IS_A_DIRECTORY
    status = 400


class NotADirectory(RockError, NotADirectoryError):
    """A directory operation named something that is not a directory."""

    code = ErrorCode.NOT_A_DIRECTORY
    status = 400


class Unauthorized(RockError, PermissionError):
    """No or a wrong credential."""

    code = ErrorCode.UNAUTHORIZED
    status = 401


class PermissionDenied(RockError, PermissionError):
    """The credential is valid but may not do this."""

    code = ErrorCode.PERMISSION_DENIED
    status = 403


class NotFound(RockError, LookupError):
    """Something that was named does not exist."""

    code = ErrorCode.NOT_FOUND
    status = 404


class SandboxNotFound(NotFound):
    """No sandbox with that id."""

    code = ErrorCode.SANDBOX_NOT_FOUND


class SessionNotFound(NotFound):
    """No session with that name in the sandbox."""

    code = ErrorCode.SESSION_NOT_FOUND


class ProcessNotFound(NotFound):
    """No background process with that pid in the sandbox (or it was forgotten)."""

    code = ErrorCode.PROCESS_NOT_FOUND


class FileNotFound(RockError, FileNotFoundError):
    """No file or directory at that path."""

    code = ErrorCode.FILE_NOT_FOUND
    status = 404


class ImageNotFound(NotFound):
    """The image or rootfs does not exist."""

    code = ErrorCode.IMAGE_NOT_FOUND


class RegistryUnauthorized(RockError, PermissionError):
    """The registry refused the credentials given for an image (or asked for some)."""

    code = ErrorCode.REGISTRY_UNAUTHORIZED
    status = 403


class RegistryUnavailable(RockError, ConnectionError):
    """The image's source (registry, Docker daemon) did not answer, after retries."""

    code = ErrorCode.REGISTRY_UNAVAILABLE
    status = 502


class ImageStoreFull(RockError, OSError):
    """The node's image store cannot fit the image, even after evicting unused images."""

    code = ErrorCode.IMAGE_STORE_FULL
    status = 507


class Conflict(RockError, RuntimeError):
    """The request conflicts with the current state."""

    code = ErrorCode.CONFLICT
    status = 409


class SessionExists(Conflict):
    """A session with that name already exists."""

    code = ErrorCode.SESSION_EXISTS


class SessionBusy(Conflict):
    """A command is already running in that session."""

    code = ErrorCode.SESSION_BUSY


class SandboxNotRunning(Conflict):
    """The sandbox is not running (stopped, removed or not yet started)."""

    code = ErrorCode.SANDBOX_NOT_RUNNING


class SandboxFailed(Conflict):
    """The sandbox failed (for example it was OOM-killed); ``details['reason']`` says why."""

    code = ErrorCode.SANDBOX_FAILED


class OverCapacity(InvalidRequest):
    """Schema-valid limits this node (or this platform's config) cannot give, such as more cpus
    than the node has: ``details['fields']`` names them. Not ``invalid_request``: the same body
    can be right on a bigger node.
    """

    code = ErrorCode.OVER_CAPACITY


class ResourceExhausted(Conflict):
    """The sandbox is at one of its limits (sessions, processes, memory, disk):
    ``details['resource']`` says which. Retrying as is fails the same way: free something first.
    """

    code = ErrorCode.RESOURCE_EXHAUSTED


class TooLarge(RockError, ValueError):
    """A request body, a frame or a reply (file, archive) is over its configured size limit."""

    code = ErrorCode.TOO_LARGE
    status = 413


class RateLimited(RockError, RuntimeError):
    """Too many requests; retry after ``retry_after`` seconds."""

    code = ErrorCode.RATE_LIMITED
    status = 429


class InternalError(RockError, RuntimeError):
    """A bug or an unexpected failure on the server side."""

    code = ErrorCode.INTERNAL
    status = 500


class RockletUnavailable(RockError, ConnectionError):
    """The sandbox's rocklet is gone (its process died or its pipe closed)."""

    code = ErrorCode.ROCKLET_UNAVAILABLE
    status = 503


class RuntimeUnavailable(RockError, ConnectionError):
    """The runtime backend (bwrap binary, Docker daemon) cannot be used right now."""

    code = ErrorCode.RUNTIME_UNAVAILABLE
    status = 503


class Timeout(RockError, TimeoutError):
    """An operation did not finish in time (a command's own timeout is a result, not this)."""

    code = ErrorCode.TIMEOUT
    status = 504


class LLMTimeout(Timeout):
    """The trainer did not answer a model-service call in time (the agent gets a 504)."""

    code = ErrorCode.LLM_TIMEOUT
    status = 504


class ReplayDiverged(Conflict):
    """A replayed episode asked the model something other than the recorded request
    (``details.step``: the index of the step that differs).
    """

    code = ErrorCode.REPLAY_DIVERGED
    status = 409


class PortClosed(RockError, ConnectionRefusedError):
    """Nothing listens on the port inside the sandbox (the connect was refused there).

    502 Bad Gateway: the platform is the gateway and the upstream (the sandbox's server) is
    not there, as a reverse proxy reports a refused upstream. Not 404 (the sandbox exists and
    the route is right) and not 503 (the platform itself is fine; retrying helps only once the
    sandbox's program listens). ``details['port']`` names the port.
    """

    code = ErrorCode.PORT_CLOSED
    status = 502


class NotSupported(RockError, NotImplementedError):
    """The runtime (or the platform's config) cannot do that operation at all (fork on a
    runtime without copy-on-write layers, say); retrying never helps.
    """

    code = ErrorCode.NOT_SUPPORTED
    status = 501


class ArtifactCorrupt(RockError, ValueError):
    """A stored artifact (a snapshot archive) does not hash to its name or does not unpack:
    the store holds bad bytes. Nothing was made from it.
    """

    code = ErrorCode.ARTIFACT_CORRUPT
    status = 502


class AgentFailed(RockError, RuntimeError):
    """An agent run inside a sandbox could not start or ended without its outcome (see
    :mod:`rock_serve.agents`); the message carries the tail of the agent's log.
    """

    code = ErrorCode.AGENT_FAILED
    status = 502


_TABLE: dict[ErrorCode, type[RockError]] = {}
for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, RockError) and _cls is not RockError:
        _TABLE.setdefault(_cls.code, _cls)
_TABLE[ErrorCode.INTERNAL] = InternalError
_TABLE[ErrorCode.NOT_FOUND] = NotFound
_TABLE[ErrorCode.CONFLICT] = Conflict
assert set(_TABLE) == set(ErrorCode), set(ErrorCode) - set(_TABLE)


#: The class for a bare status (a proxy's HTML page, say): the generic one, never a specific
#: one such as rocklet_unavailable that would claim more than is known.
_BY_STATUS: dict[int, type[RockError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: InvalidRequest,
    429: RateLimited,
    503: RuntimeUnavailable,
    504: Timeout,
}


def error_class(code: ErrorCode | str) -> type[RockError]:
    """The exception class for a code; unknown codes map to :class:`InternalError`."""
    try:
        return _TABLE[ErrorCode(code)]
    except ValueError:
        return InternalError


def http_status(code: ErrorCode | str) -> int:
    """The HTTP status for a code."""
    return error_class(code).status


def to_body(exc: BaseException) -> dict[str, Any]:
    """Render an exception as the one error body ``{"error": {"code", "message", ...}}``.

    Exceptions that are not :class:`RockError` become ``internal`` with a generic message, so
    no class path or traceback ever leaves the process.
    """
    if isinstance(exc, RockError):
        err: dict[str, Any] = {"code": exc.code.value, "message": exc.message}
        if exc.retry_after is not None:
            err["retry_after"] = exc.retry_after
        if exc.details:
            err["details"] = exc.details
        return {"error": err}
    return {"error": {"code": ErrorCode.INTERNAL.value, "message": "internal error"}}


def from_body(body: Any, *, status: int | None = None) -> RockError:
    """Rebuild the typed exception from an error body (the inverse of :func:`to_body`)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        cls = _BY_STATUS.get(status or 0, InternalError)
        return cls(f"unexpected error response (HTTP {status}): {str(body)[:200]}")
    cls = error_class(str(err.get("code", "")))
    details = err.get("details") if isinstance(err.get("details"), dict) else {}
    return cls(
        str(err.get("message", "")),
        retry_after=err.get("retry_after"),
        **(details or {}),
    )


def from_validation(problems: Iterable[Mapping[str, Any]]) -> InvalidRequest:
    """One typed error for a failed validation (pydantic's ``errors()`` list).

    A problem whose ``type`` is the code of an :class:`InvalidRequest` subclass (a validator
    raised ``PydanticCustomError(code, ...)``, as the image-reference check does) picks that
    class; anything else is :class:`InvalidRequest`. The message names every problem
    (``loc: msg; ...``), so this table stays the one place a code gets its status.
    """
    problems = list(problems)
    cls: type[InvalidRequest] = InvalidRequest
    for problem in problems:
        found = _TABLE.get(_CODES.get(str(problem.get("type")), ErrorCode.INTERNAL))
        if found is not None and issubclass(found, InvalidRequest):
            cls = found
            break
    message = "; ".join(
        f"{'.'.join(str(p) for p in problem.get('loc', ()))}: {problem.get('msg', '')}"
        for problem in problems
    )
    return cls(message[:2000] or "invalid request")


_CODES = {code.value: code for code in ErrorCode}
