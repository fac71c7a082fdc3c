"""The Worker's one entry point for sandbox operations, and typed calls to it over Ray.

``Worker.op(sandbox_id, operation)`` runs any :data:`~rock_serve.protocol.ops.Operation`;
``Worker.op_stream`` runs the ones that stream (:class:`~rock_serve.protocol.ops.Streams`).
Both dispatch through a table keyed by the operation's model type; each row is registered with
:func:`_row`, which makes a type checker match the handler's parameter to the model. The Admin's
data-plane routes (through :func:`worker_op` / :func:`worker_op_stream`), the direct data plane
and the Ray gate (``ray_op`` / ``ray_op_stream``) all come in here, so no caller names a Worker
method by a string for these operations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from rock_serve.deployments._ray import ActorHandle, call, stream_ahead
from rock_serve.errors import InvalidRequest
from rock_serve.protocol import (
    ExecRequest,
    ExecResult,
    FileInfo,
    FileWritten,
    ListDirResult,
    MkdirRequest,
    OutputChunk,
    RemoveRequest,
    SandboxStats,
    SessionCreateRequest,
    SessionCreateResponse,
    SessionRunRequest,
    SessionRunResult,
)
from rock_serve.protocol.ops import (
    ExecOp,
    FileListOp,
    FileReadOp,
    FileStatOp,
    FileWriteOp,
    MkdirOp,
    Op,
    RemoveOp,
    SessionCloseOp,
    SessionCreateOp,
    SessionInterruptOp,
    SessionRunOp,
    SessionStdinOp,
    StatsOp,
    Streams,
    TarDownloadOp,
    TarUploadOp,
)

if TYPE_CHECKING:
    from rock_serve.deployments.worker import Worker

__all__ = ["HANDLERS", "STREAM_HANDLERS", "OpsWorker", "worker_op", "worker_op_stream"]

OpT = TypeVar("OpT", bound=Op[Any])
StreamT = TypeVar("StreamT", bound=Streams[Any])
R = TypeVar("R")
ItemT = TypeVar("ItemT")

Handler = Callable[["Worker", str, Any], Awaitable[Any]]
StreamHandler = Callable[["Worker", str, Any], AsyncIterator[Any]]


def _row(
    kind: type[OpT], handler: Callable[[Worker, str, OpT], Awaitable[Any]]
) -> tuple[type, Handler]:
    return kind, cast(Handler, handler)


def _stream_row(
    kind: type[StreamT], handler: Callable[[Worker, str, StreamT], AsyncIterator[Any]]
) -> tuple[type, StreamHandler]:
    return kind, cast(StreamHandler, handler)


# ---------------------------------------------------------------------------- handlers


async def _exec(w: Worker, sid: str, o: ExecOp) -> ExecResult:
    return await w.exec(sid, o.request(ExecRequest), o.idempotency_key)


async def _session_create(w: Worker, sid: str, o: SessionCreateOp) -> SessionCreateResponse:
    return await w.create_session(sid, o.request(SessionCreateRequest))


async def _session_run(w: Worker, sid: str, o: SessionRunOp) -> SessionRunResult:
    return await w.run_in_session(sid, o.request(SessionRunRequest), o.idempotency_key)


async def _session_stdin(w: Worker, sid: str, o: SessionStdinOp) -> None:
    await w.session_stdin(sid, o.session, o.data.encode(), eof=o.eof)


async def _session_interrupt(w: Worker, sid: str, o: SessionInterruptOp) -> None:
    await w.interrupt_session(sid, o.session)


async def _session_close(w: Worker, sid: str, o: SessionCloseOp) -> None:
    await w.close_session(sid, o.session)


async def _file_read(w: Worker, sid: str, o: FileReadOp) -> bytes:
    return await w.read_file(sid, o.path)


async def _file_write(w: Worker, sid: str, o: FileWriteOp) -> FileWritten:
    size = await w.write_file(sid, o.path, o.data, o.mode)
    return FileWritten(path=o.path, size=size)


async def _file_stat(w: Worker, sid: str, o: FileStatOp) -> FileInfo:
    return await w.stat(sid, o.path)


async def _file_list(w: Worker, sid: str, o: FileListOp) -> ListDirResult:
    return await w.list_dir(sid, o.path)


async def _mkdir(w: Worker, sid: str, o: MkdirOp) -> None:
    await w.mkdir(sid, o.request(MkdirRequest))


async def _remove(w: Worker, sid: str, o: RemoveOp) -> None:
    await w.remove_path(sid, o.request(RemoveRequest))


async def _tar_download(w: Worker, sid: str, o: TarDownloadOp) -> bytes:
    return await w.download_archive(sid, o.path)


async def _tar_upload(w: Worker, sid: str, o: TarUploadOp) -> None:
    await w.upload_archive(sid, o.path, o.data)


async def _stats(w: Worker, sid: str, o: StatsOp) -> SandboxStats:
    return await w.stats(sid)


HANDLERS: dict[type, Handler] = dict(
    [
        _row(ExecOp, _exec),
        _row(SessionCreateOp, _session_create),
        _row(SessionRunOp, _session_run),
        _row(SessionStdinOp, _session_stdin),
        _row(SessionInterruptOp, _session_interrupt),
        _row(SessionCloseOp, _session_close),
        _row(FileReadOp, _file_read),
        _row(FileWriteOp, _file_write),
        _row(FileStatOp, _file_stat),
        _row(FileListOp, _file_list),
        _row(MkdirOp, _mkdir),
        _row(RemoveOp, _remove),
        _row(TarDownloadOp, _tar_download),
        _row(TarUploadOp, _tar_upload),
        _row(StatsOp, _stats),
    ]
)
"""Operation model -> the Worker's handler."""


async def _stream_exec(w: Worker, sid: str, o: ExecOp) -> AsyncIterator[OutputChunk | ExecResult]:
    async for item in w.stream_exec(sid, o.request(ExecRequest)):
        yield item


async def _stream_session_run(
    w: Worker, sid: str, o: SessionRunOp
) -> AsyncIterator[OutputChunk | SessionRunResult]:
    async for item in w.stream_in_session(sid, o.request(SessionRunRequest)):
        yield item


async def _stream_file_read(w: Worker, sid: str, o: FileReadOp) -> AsyncIterator[bytes]:
    async for chunk in w.iter_file(sid, o.path):
        yield chunk


async def _stream_tar_download(w: Worker, sid: str, o: TarDownloadOp) -> AsyncIterator[bytes]:
    async for chunk in w.iter_archive(sid, o.path):
        yield chunk


STREAM_HANDLERS: dict[type, StreamHandler] = dict(
    [
        _stream_row(ExecOp, _stream_exec),
        _stream_row(SessionRunOp, _stream_session_run),
        _stream_row(FileReadOp, _stream_file_read),
        _stream_row(TarDownloadOp, _stream_tar_download),
    ]
)
"""Streaming operation model -> the Worker's streaming handler."""


# ---------------------------------------------------------------------------- the Worker's side


class OpsWorker:
    """The Worker's entry points for operations (the Worker class inherits it)."""

    async def op(self, sandbox_id: str, operation: Op[R]) -> R:
        """Run one operation on sandbox ``sandbox_id``; returns its result.

        Raises:
            InvalidRequest: ``operation`` is not an operation model.
        """
        handler = HANDLERS.get(type(operation))
        if handler is None:
            raise InvalidRequest(f"unknown operation {type(operation).__name__}")
        return cast(R, await handler(cast("Worker", self), sandbox_id, operation))

    async def op_stream(self, sandbox_id: str, operation: Streams[ItemT]) -> AsyncIterator[ItemT]:
        """Run one streaming operation, yielding its items (see :class:`Streams`).

        Raises:
            InvalidRequest: ``operation`` does not stream.
        """
        handler = STREAM_HANDLERS.get(type(operation))
        if handler is None:
            raise InvalidRequest(f"operation {type(operation).__name__} does not stream")
        async for item in handler(cast("Worker", self), sandbox_id, operation):
            yield item

    async def ray_op(self, token: str | None, sandbox_id: str, operation: Op[R]) -> R:
        """:meth:`op` from the Ray transport: the caller's token checked, the call audited."""
        gate = cast("Worker", self)._ray_gate()
        return cast(R, await gate.data_op(self, token, sandbox_id, operation))

    async def ray_op_stream(
        self, token: str | None, sandbox_id: str, operation: Streams[ItemT]
    ) -> AsyncIterator[ItemT]:
        """:meth:`op_stream` from the Ray transport (see :meth:`ray_op`)."""
        gate = cast("Worker", self)._ray_gate()
        async for item in gate.data_op_stream(self, token, sandbox_id, operation):
            yield item


# ---------------------------------------------------------------------------- callers' side


async def worker_op(actor: ActorHandle, sandbox_id: str, operation: Op[R]) -> R:
    """``Worker.op`` on a Worker actor (typed errors re-raised, traced as ``call`` is)."""
    return cast(R, await call(actor, OpsWorker.op, sandbox_id, operation))


def worker_op_stream(
    actor: ActorHandle,
    sandbox_id: str,
    operation: Streams[ItemT],
    *,
    backpressure: int | None = None,
) -> AsyncIterator[ItemT]:
    """``Worker.op_stream`` on a Worker actor, item by item (see ``_ray.stream``)."""
    return cast(
        AsyncIterator[ItemT],
        stream_ahead(backpressure, actor, OpsWorker.op_stream, sandbox_id, operation),
    )
