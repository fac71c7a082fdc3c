"""One operation model: every sandbox data-plane operation as one typed model.

Each operation is a :class:`Op` whose type parameter is its result type (``Op[ExecResult]``);
operations that can stream their output also derive from :class:`Streams` with the type of one
streamed item. :data:`Operation` is the discriminated union of all of them (tag: ``op``, the
rocklet's own operation name), and :data:`OPS` says, per tag, the model, its result and stream
item types, its audit action, its REST route and the SDK method that sends it.

The Worker takes them at one entry point (``Worker.op`` / ``Worker.op_stream``), sending the
model to the rocklet as one frame with its policies taken from the model's traits (see
:class:`Op`); the Admin and the direct data plane serve each operation's route from its
:data:`OPS` row (``deployments/_op_routes.py``). Adding an operation touches four places (see
``docs/operations.md``): the model here, the agent's handler, its route (the :data:`OPS` row),
and the SDK method; ``tests/unit/test_ops.py`` fails when one is missing or a fifth appears.

Models that extend a request model (``ExecOp`` is an :class:`ExecRequest` with a tag) carry the
same fields and defaults; :meth:`Op.request` gives the plain request back without copying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, Field, TypeAdapter

from rock_serve.protocol._base import WireModel
from rock_serve.protocol.api import FileWritten
from rock_serve.protocol.commands import (
    ExecRequest,
    ExecResult,
    OutputChunk,
    SessionCloseRequest,
    SessionCreateRequest,
    SessionCreateResponse,
    SessionInterruptRequest,
    SessionRunRequest,
    SessionRunResult,
    SessionStdinRequest,
)
from rock_serve.protocol.files import FileInfo, ListDirResult, MkdirRequest, RemoveRequest
from rock_serve.protocol.sandbox import SandboxStats

__all__ = [
    "OPS",
    "ExecOp",
    "FileListOp",
    "FileReadOp",
    "FileStatOp",
    "FileWriteOp",
    "MkdirOp",
    "Op",
    "OpSpec",
    "Operation",
    "RemoveOp",
    "SessionCloseOp",
    "SessionCreateOp",
    "SessionInterruptOp",
    "SessionRunOp",
    "SessionStdinOp",
    "StatsOp",
    "StreamOperation",
    "Streams",
    "TarDownloadOp",
    "TarUploadOp",
    "parse_operation",
]

R_co = TypeVar("R_co", covariant=True)
ItemT_co = TypeVar("ItemT_co", covariant=True)
Q = TypeVar("Q", bound=BaseModel)

_PATH = Field(min_length=1, max_length=4096, description="Path inside the sandbox.")
_KEY = Field(
    default=None,
    max_length=256,
    description="Run once per key: a resend gets the first run's result (HTTP: the "
    "Idempotency-Key header).",
)


class Op(WireModel, Generic[R_co]):
    """An operation on one sandbox whose result is an ``R_co``.

    The Worker sends it to the rocklet as one frame: the model's fields are the frame's
    arguments (the agent's handler of the tag takes exactly those names), except ``op``,
    ``idempotency_key`` and the :attr:`payload` field, which is the frame's payload. The reply
    is read back into the result type by its shape (see ``RockletHandle.op``). What the Worker
    does besides sending it is declared here, as traits, never as per-operation code:
    """

    #: The field sent as the frame's payload (its bytes; a str is UTF-8 encoded), if any.
    payload: ClassVar[str | None] = None
    #: The payload is a file-sized body (REST: the raw request body): held to
    #: ``max_file_bytes`` and sent in chunks when it does not fit one frame (the agent reads it
    #: as a stream). The value names it to the Worker's chunked uploads (``upload_open``).
    upload: ClassVar[str | None] = None
    #: The content type of its bytes when it streams them (REST replies).
    media_type: ClassVar[str] = "application/octet-stream"
    #: Run once per ``idempotency_key`` (a resend gets the first run's result).
    idempotent: ClassVar[bool] = False
    #: ``max_output_bytes`` is held to the server's ``max_output_bytes``.
    output_capped: ClassVar[bool] = False
    #: Frame arguments the Worker adds from its config: ``max_bytes`` (the read limit),
    #: ``max_sessions`` (``max_sessions_per_sandbox``).
    limits: ClassVar[tuple[str, ...]] = ()
    #: The Worker's latency metric of this operation (``rock_op_seconds{op=...}``), if any.
    metric: ClassVar[str | None] = None

    def request(self, model: type[Q]) -> Q:
        """The operation as the plain request model ``model`` (its fields, no tag, no copy)."""
        values = {name: getattr(self, name) for name in model.model_fields}
        fields_set = self.model_fields_set & set(model.model_fields)
        return model.model_construct(fields_set, **values)


class Streams(WireModel, Generic[ItemT_co]):
    """An operation that can also stream its output as ``ItemT_co`` items (``Worker.op_stream``)."""


# ---------------------------------------------------------------------------- commands


class ExecOp(ExecRequest, Op[ExecResult], Streams[OutputChunk | ExecResult]):
    """Run one command to completion; streamed: output chunks, then the result."""

    op: Literal["exec"] = "exec"
    idempotency_key: str | None = _KEY

    payload: ClassVar[str | None] = "stdin"
    idempotent: ClassVar[bool] = True
    output_capped: ClassVar[bool] = True
    metric: ClassVar[str | None] = "exec"

    @classmethod
    def of(cls, req: ExecRequest, idempotency_key: str | None = None) -> ExecOp:
        """The operation of a validated request (no second validation)."""
        values = {name: getattr(req, name) for name in ExecRequest.model_fields}
        return cls.model_construct(
            req.model_fields_set, **values, op="exec", idempotency_key=idempotency_key
        )


class SessionCreateOp(SessionCreateRequest, Op[SessionCreateResponse]):
    """Start a persistent bash session."""

    op: Literal["session.create"] = "session.create"

    limits: ClassVar[tuple[str, ...]] = ("max_sessions",)

    @classmethod
    def of(cls, req: SessionCreateRequest) -> SessionCreateOp:
        """The operation of a validated request (no second validation)."""
        values = {name: getattr(req, name) for name in SessionCreateRequest.model_fields}
        return cls.model_construct(req.model_fields_set, **values, op="session.create")


class SessionRunOp(
    SessionRunRequest, Op[SessionRunResult], Streams[OutputChunk | SessionRunResult]
):
    """Run a command in a session; streamed: output chunks, then the result."""

    op: Literal["session.run"] = "session.run"
    idempotency_key: str | None = _KEY

    idempotent: ClassVar[bool] = True
    output_capped: ClassVar[bool] = True
    metric: ClassVar[str | None] = "session_run"

    @classmethod
    def of(cls, req: SessionRunRequest, idempotency_key: str | None = None) -> SessionRunOp:
        """The operation of a validated request (no second validation)."""
        values = {name: getattr(req, name) for name in SessionRunRequest.model_fields}
        return cls.model_construct(
            req.model_fields_set, **values, op="session.run", idempotency_key=idempotency_key
        )


class SessionStdinOp(SessionStdinRequest, Op[None]):
    """Write to the stdin of the command running in a session."""

    op: Literal["session.stdin"] = "session.stdin"

    payload: ClassVar[str | None] = "data"


class SessionInterruptOp(SessionInterruptRequest, Op[None]):
    """Interrupt (SIGINT) the command running in a session."""

    op: Literal["session.interrupt"] = "session.interrupt"


class SessionCloseOp(SessionCloseRequest, Op[None]):
    """Close a session and kill its processes."""

    op: Literal["session.close"] = "session.close"


# ---------------------------------------------------------------------------- files


class FileReadOp(Op[bytes], Streams[bytes]):
    """A whole file (up to ``max_read_bytes``); streamed: its bytes in chunks."""

    op: Literal["file.read"] = "file.read"
    path: str = _PATH

    limits: ClassVar[tuple[str, ...]] = ("max_bytes",)


class FileWriteOp(Op[FileWritten]):
    """Write a whole file atomically (up to ``max_file_bytes``)."""

    op: Literal["file.write"] = "file.write"
    path: str = _PATH
    data: bytes = Field(description="The file's bytes (REST: the raw request body).")
    mode: int | None = Field(default=None, ge=0, le=0o7777, description="Permission bits.")

    payload: ClassVar[str | None] = "data"
    upload: ClassVar[str | None] = "file"


class FileStatOp(Op[FileInfo]):
    """Stat a path (symlinks are not followed)."""

    op: Literal["file.stat"] = "file.stat"
    path: str = _PATH


class FileListOp(Op[ListDirResult]):
    """List a directory."""

    op: Literal["file.list"] = "file.list"
    path: str = _PATH


class MkdirOp(MkdirRequest, Op[None]):
    """Create a directory."""

    op: Literal["file.mkdir"] = "file.mkdir"


class RemoveOp(RemoveRequest, Op[None]):
    """Remove a file, or a directory with ``recursive``."""

    op: Literal["file.remove"] = "file.remove"


class TarDownloadOp(Op[bytes], Streams[bytes]):
    """An uncompressed tar of a file or directory; streamed: in chunks."""

    op: Literal["tar.download"] = "tar.download"
    path: str = _PATH

    limits: ClassVar[tuple[str, ...]] = ("max_bytes",)
    media_type: ClassVar[str] = "application/x-tar"


class TarUploadOp(Op[None]):
    """Extract a tar (plain or compressed) into directory ``path``."""

    op: Literal["tar.upload"] = "tar.upload"
    path: str = _PATH
    data: bytes = Field(description="The tar's bytes (REST: the raw request body).")

    payload: ClassVar[str | None] = "data"
    upload: ClassVar[str | None] = "archive"


# ---------------------------------------------------------------------------- sandbox


class StatsOp(Op[SandboxStats]):
    """CPU, memory and process usage and limits of the sandbox."""

    op: Literal["stats"] = "stats"


Operation = Annotated[
    ExecOp
    | SessionCreateOp
    | SessionRunOp
    | SessionStdinOp
    | SessionInterruptOp
    | SessionCloseOp
    | FileReadOp
    | FileWriteOp
    | FileStatOp
    | FileListOp
    | MkdirOp
    | RemoveOp
    | TarDownloadOp
    | TarUploadOp
    | StatsOp,
    Field(discriminator="op"),
]
"""Every sandbox data-plane operation (tag ``op``)."""

StreamOperation = ExecOp | SessionRunOp | FileReadOp | TarDownloadOp
"""The operations ``Worker.op_stream`` takes."""

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Operation)


def parse_operation(data: Any) -> Op[Any]:
    """Validate a dict (or JSON bytes/str) into its operation model.

    Raises:
        pydantic.ValidationError: unknown ``op`` or bad fields.
    """
    if isinstance(data, str | bytes):
        parsed: Op[Any] = _ADAPTER.validate_json(data)
    else:
        parsed = _ADAPTER.validate_python(data)
    return parsed


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class OpSpec:
    """What the platform knows of one operation."""

    model: type[Op[Any]]
    #: The result type (``type(None)`` for none).
    result: Any
    #: The type of one streamed item, or None when it does not stream.
    item: Any
    #: The audit action of a mutating operation (None: not audited).
    audit: str | None
    #: Its REST v1 route: (method, path).
    route: tuple[str, str]
    #: The method of ``AsyncClient`` / ``Client`` that sends it.
    sdk: str


_SB = "/v1/sandboxes/{sandbox_id}"
_NONE = type(None)
_SESSION = _SB + "/sessions/{session}"

OPS: dict[str, OpSpec] = {
    "exec": OpSpec(
        ExecOp, ExecResult, OutputChunk | ExecResult, "exec", ("POST", _SB + "/exec"), "exec"
    ),
    "session.create": OpSpec(
        SessionCreateOp,
        SessionCreateResponse,
        None,
        "session.create",
        ("POST", _SB + "/sessions"),
        "create_session",
    ),
    "session.run": OpSpec(
        SessionRunOp,
        SessionRunResult,
        OutputChunk | SessionRunResult,
        "session.run",
        ("POST", _SESSION + "/run"),
        "run",
    ),
    "session.stdin": OpSpec(
        SessionStdinOp,
        _NONE,
        None,
        "session.stdin",
        ("POST", _SESSION + "/stdin"),
        "session_stdin",
    ),
    "session.interrupt": OpSpec(
        SessionInterruptOp,
        _NONE,
        None,
        "session.interrupt",
        ("POST", _SESSION + "/interrupt"),
        "interrupt",
    ),
    "session.close": OpSpec(
        SessionCloseOp, _NONE, None, "session.close", ("DELETE", _SESSION), "close_session"
    ),
    "file.read": OpSpec(FileReadOp, bytes, bytes, None, ("GET", _SB + "/files"), "read_file"),
    "file.write": OpSpec(
        FileWriteOp, FileWritten, None, "file.write", ("PUT", _SB + "/files"), "write_file"
    ),
    "file.stat": OpSpec(FileStatOp, FileInfo, None, None, ("GET", _SB + "/files/stat"), "stat"),
    "file.list": OpSpec(
        FileListOp, ListDirResult, None, None, ("GET", _SB + "/files/list"), "list_dir"
    ),
    "file.mkdir": OpSpec(
        MkdirOp, _NONE, None, "file.mkdir", ("POST", _SB + "/files/mkdir"), "mkdir"
    ),
    "file.remove": OpSpec(
        RemoveOp, _NONE, None, "file.remove", ("POST", _SB + "/files/remove"), "remove"
    ),
    "tar.download": OpSpec(
        TarDownloadOp, bytes, bytes, None, ("GET", _SB + "/archive"), "download_archive"
    ),
    "tar.upload": OpSpec(
        TarUploadOp, _NONE, None, "archive.upload", ("PUT", _SB + "/archive"), "upload_archive"
    ),
    "stats": OpSpec(StatsOp, SandboxStats, None, None, ("GET", _SB + "/stats"), "stats"),
}
"""Every operation by tag: model, result, stream item, audit action, route, SDK method."""
