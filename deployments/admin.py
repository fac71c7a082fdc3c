"""The Admin: the stateless REST v1 ingress (see ``rock_serve/protocol/api.py`` for the routes).

Control-plane calls (create, get, list, delete, health) go to the Scheduler actor; data-plane
calls go straight to the Worker named in the sandbox id. Every error, ours or FastAPI's, leaves
as the one body ``{"error": {"code", "message", "retry_after"?}}`` with the table's status and,
on 429/503, a ``Retry-After`` header.

File and archive bodies are streamed both ways: downloads are relayed chunk by chunk from the
rocklet, uploads are sent to the Worker in chunks of ``_UPLOAD_CHUNK`` bytes with
backpressure, so no body is ever held whole in a replica (``max_file_bytes`` caps an upload's
size, not memory).
"""

# No "from __future__ import annotations": Serve pickles the FastAPI app to its replicas, and
# FastAPI must see the real types (not strings) there to build the OpenAPI schema.

import asyncio
import contextlib
import json
import logging
import math
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, WebSocket
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect, WebSocketState

import rock_serve
from rock_serve.config import ServerArgs, parse_server_args
from rock_serve.deployments._metrics import Metrics, metrics
from rock_serve.deployments._ray import (
    ActorHandle,
    WorkerHandles,
    call,
    get_or_create_scheduler,
    stream,
)
from rock_serve.errors import (
    ErrorCode,
    InvalidRequest,
    NotFound,
    RockError,
    SandboxNotFound,
    http_status,
    to_body,
)
from rock_serve.protocol import (
    CreateSandboxRequest,
    ExecRequest,
    ExecResult,
    FileInfo,
    FileWritten,
    Health,
    ListDirResult,
    MkdirRequest,
    PtyExit,
    PtyResize,
    RemoveRequest,
    SandboxList,
    SandboxRecord,
    SandboxState,
    SandboxStats,
    SessionCreateRequest,
    SessionCreateResponse,
    SessionRunBody,
    SessionRunRequest,
    SessionRunResult,
    SessionStdinBody,
)
from rock_serve.protocol.api import SANDBOX_ID
from rock_serve.protocol.commands import SESSION_NAME

__all__ = ["Admin", "app"]

log = logging.getLogger(__name__)

_ID = re.compile(SANDBOX_ID)
_NDJSON = "application/x-ndjson"
#: Bytes per chunk of an upload sent to a Worker (one actor call each).
_UPLOAD_CHUNK = 1 << 20

app = FastAPI(
    title="rock-serve",
    version=rock_serve.__version__,
    description="Sandbox platform for agentic RL. Errors: "
    '`{"error": {"code", "message", "retry_after"?}}`.',
    docs_url="/docs",
)

# ----------------------------------------------------------------------------- errors


def error_response(exc: BaseException) -> JSONResponse:
    """The one error body, with the table's status and Retry-After on 429/503."""
    body = to_body(exc)
    status = http_status(body["error"]["code"])
    headers: dict[str, str] = {}
    retry_after = body["error"].get("retry_after")
    if retry_after is not None and status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(float(retry_after))))
    return JSONResponse(body, status_code=status, headers=headers)


_METRICS: list[Metrics] = []


def _count_error(request: Request, code: str) -> None:
    """Errors by route and code on the Admin (metrics are made once per replica process)."""
    if not _METRICS:
        _METRICS.append(metrics("admin"))
    route = request.scope.get("route")
    _METRICS[0].error(getattr(route, "path", "unmatched"), code)


@app.exception_handler(RockError)
async def _rock_error(request: Request, exc: RockError) -> JSONResponse:
    _count_error(request, exc.code.value)
    return error_response(exc)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
        for err in exc.errors()
    )
    _count_error(request, ErrorCode.INVALID_REQUEST.value)
    return error_response(InvalidRequest(problems[:2000] or "invalid request"))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.INVALID_REQUEST
    return JSONResponse(
        {"error": {"code": code.value, "message": str(exc.detail)}}, status_code=exc.status_code
    )


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    _count_error(request, ErrorCode.INTERNAL.value)
    return error_response(exc)


# ----------------------------------------------------------------------------- helpers

SessionName = Annotated[str, PathParam(pattern=SESSION_NAME, description="Session name.")]
PathQuery = Annotated[str, Query(min_length=1, max_length=4096, description="Path in sandbox.")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": 'Error body `{"error": {"code", "message"}}`.'}
    for status in (400, 404, 409, 429, 500, 503)
}


def _worker_of(sandbox_id: str) -> str:
    if not _ID.match(sandbox_id):
        raise SandboxNotFound(f"no sandbox {sandbox_id!r} (malformed id)")
    return sandbox_id.split("-")[1]


def _parse_labels(labels: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"label filter {item!r} is not key=value")
        out[key] = value
    return out


def _parse_mode(mode: str | None) -> int | None:
    if mode is None:
        return None
    try:
        value = int(mode, 8)
    except ValueError:
        raise InvalidRequest(f"mode {mode!r} is not octal permission bits") from None
    if not 0 <= value <= 0o7777:
        raise InvalidRequest(f"mode {mode!r} is out of range")
    return value


async def _ndjson(items: AsyncIterator[BaseModel]) -> StreamingResponse:
    """Stream models as NDJSON; an error before the first item is a normal error response."""
    first = await items.__anext__()

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first.model_dump_json().encode() + b"\n"
            async for item in items:
                yield item.model_dump_json().encode() + b"\n"
        except RockError as exc:
            yield json.dumps(to_body(exc)).encode() + b"\n"
        finally:
            await items.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(body(), media_type=_NDJSON)


async def _relay(chunks: AsyncIterator[bytes], media_type: str) -> Response:
    """Relay a byte stream; an error before the first chunk is a normal error response."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        return Response(content=b"", media_type=media_type)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(body(), media_type=media_type)


def _pty_dimension(value: str, name: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise InvalidRequest(f"query {name}={value!r} must be an integer in 1..65535")
    return int(value)


async def _ws_error(ws: WebSocket, exc: BaseException, code: int) -> None:
    """Send the one error body as a text frame, then close with ``code``."""
    if isinstance(exc, StopAsyncIteration):
        exc = InvalidRequest("the pty ended before it started")
    if ws.application_state == WebSocketState.CONNECTED:
        await ws.send_text(json.dumps(to_body(exc)))
        await ws.close(code=code)


async def _pty_output(ws: WebSocket, items: AsyncIterator[Any]) -> int:
    """Forward output to the client; returns the exit code."""
    async for item in items:
        if isinstance(item, bytes):
            if item:
                await ws.send_bytes(item)
        else:
            return int(item)
    raise InvalidRequest("the pty ended without an exit code")


async def _pty_input(ws: WebSocket, worker: ActorHandle, pty_id: str) -> None:
    """Forward keystrokes and control messages until the client goes away."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            if message.get("bytes") is not None:
                await call(worker, "pty_input", pty_id, message["bytes"])
            elif message.get("text") is not None:
                try:
                    resize = PtyResize.model_validate_json(message["text"])
                except ValidationError as exc:
                    problem = InvalidRequest(f"bad control message: {exc.errors()[0]['msg']}")
                    await ws.send_text(json.dumps(to_body(problem)))
                    continue
                await call(worker, "pty_resize", pty_id, resize.cols, resize.rows)
        except NotFound:
            pass  # the pty just ended: the output side sends the exit code


# ----------------------------------------------------------------------------- deployment


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Admin:
    """REST v1: validation, error mapping and routing; no state of its own."""

    def __init__(self, args: dict[str, Any] | ServerArgs) -> None:
        self.args = args if isinstance(args, ServerArgs) else parse_server_args(args)
        self._scheduler: ActorHandle = get_or_create_scheduler(self.args)
        self._workers = WorkerHandles(self.args.namespace)
        # A redeploy's new limits reach the long-lived Scheduler; start it up early.
        self._scheduler.configure.remote(self.args)
        self._scheduler.ready.remote()

    async def _worker(self, sandbox_id: str) -> ActorHandle:
        return await self._workers.get(_worker_of(sandbox_id))

    async def _data(self, sandbox_id: str, method: str, *args: Any) -> Any:
        return await call(await self._worker(sandbox_id), method, sandbox_id, *args)

    # ---------------------------------------------------------------- control plane

    @app.get("/v1/health", response_model=Health, responses=_ERRORS)
    async def health(self) -> Health:
        """The Scheduler's and every Worker's status."""
        result: Health = await call(self._scheduler, "health")
        return result

    @app.post("/v1/sandboxes", status_code=201, response_model=SandboxRecord, responses=_ERRORS)
    async def create_sandbox(self, req: CreateSandboxRequest) -> SandboxRecord:
        """Create and start a sandbox."""
        record: SandboxRecord = await call(self._scheduler, "create", req)
        return record

    @app.get("/v1/sandboxes", response_model=SandboxList, responses=_ERRORS)
    async def list_sandboxes(
        self,
        owner: str | None = None,
        state: SandboxState | None = None,
        label: Annotated[list[str] | None, Query(description="k=v; repeatable.")] = None,
    ) -> SandboxList:
        """Sandboxes matching every filter, newest first."""
        labels = _parse_labels(label or [])
        result: SandboxList = await call(self._scheduler, "list", owner, state, labels)
        return result

    @app.get("/v1/sandboxes/{sandbox_id}", response_model=SandboxRecord, responses=_ERRORS)
    async def get_sandbox(self, sandbox_id: str) -> SandboxRecord:
        """One sandbox."""
        _worker_of(sandbox_id)
        record: SandboxRecord = await call(self._scheduler, "get", sandbox_id)
        return record

    @app.delete("/v1/sandboxes/{sandbox_id}", status_code=204, responses=_ERRORS)
    async def delete_sandbox(self, sandbox_id: str) -> Response:
        """Remove a sandbox and everything in it."""
        _worker_of(sandbox_id)
        await call(self._scheduler, "delete", sandbox_id)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/renew", response_model=SandboxRecord, responses=_ERRORS)
    async def renew(self, sandbox_id: str) -> SandboxRecord:
        """Renew the sandbox's lease (a heartbeat; any call naming the sandbox also renews)."""
        record: SandboxRecord = await self._data(sandbox_id, "renew")
        return record

    @app.delete("/v1/sandboxes", status_code=204, responses=_ERRORS)
    async def delete_by_token(
        self,
        client_token: Annotated[
            str, Query(min_length=1, max_length=128, description="The create's client_token.")
        ],
    ) -> Response:
        """Remove the sandbox created with ``client_token``, waiting for that create if it is
        still running (so a delete that races a create leaves nothing behind).
        """
        await call(self._scheduler, "delete_by_token", client_token)
        return Response(status_code=204)

    # ---------------------------------------------------------------- commands

    @app.post("/v1/sandboxes/{sandbox_id}/exec", response_model=ExecResult, responses=_ERRORS)
    async def exec(
        self,
        sandbox_id: str,
        req: ExecRequest,
        stream_: bool = Query(
            False, alias="stream", description="Stream NDJSON OutputChunk lines, then the result."
        ),
    ) -> Any:
        """Run one command to completion (optionally streaming its output)."""
        if stream_:
            worker = await self._worker(sandbox_id)
            return await _ndjson(stream(worker, "stream_exec", sandbox_id, req))
        return await self._data(sandbox_id, "exec", req)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/sessions",
        response_model=SessionCreateResponse,
        responses=_ERRORS,
    )
    async def create_session(
        self, sandbox_id: str, req: SessionCreateRequest
    ) -> SessionCreateResponse:
        """Start a persistent bash session."""
        result: SessionCreateResponse = await self._data(sandbox_id, "create_session", req)
        return result

    @app.post(
        "/v1/sandboxes/{sandbox_id}/sessions/{session}/run",
        response_model=SessionRunResult,
        responses=_ERRORS,
    )
    async def run_in_session(
        self,
        sandbox_id: str,
        session: SessionName,
        body: SessionRunBody,
        stream_: bool = Query(False, alias="stream", description="Stream NDJSON output."),
    ) -> Any:
        """Run a command in a session (cwd, env and functions persist)."""
        req = SessionRunRequest(session=session, **body.model_dump())
        if stream_:
            worker = await self._worker(sandbox_id)
            return await _ndjson(stream(worker, "stream_in_session", sandbox_id, req))
        return await self._data(sandbox_id, "run_in_session", req)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/sessions/{session}/stdin", status_code=204, responses=_ERRORS
    )
    async def session_stdin(
        self, sandbox_id: str, session: SessionName, body: SessionStdinBody
    ) -> Response:
        """Write to the stdin of the command running in a session."""
        await self._data(sandbox_id, "session_stdin", session, body.data.encode(), body.eof)
        return Response(status_code=204)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/sessions/{session}/interrupt",
        status_code=204,
        responses=_ERRORS,
    )
    async def interrupt_session(self, sandbox_id: str, session: SessionName) -> Response:
        """Interrupt (SIGINT) the command running in a session."""
        await self._data(sandbox_id, "interrupt_session", session)
        return Response(status_code=204)

    @app.delete("/v1/sandboxes/{sandbox_id}/sessions/{session}", status_code=204, responses=_ERRORS)
    async def close_session(self, sandbox_id: str, session: SessionName) -> Response:
        """Close a session and kill its processes."""
        await self._data(sandbox_id, "close_session", session)
        return Response(status_code=204)

    # ---------------------------------------------------------------- files

    @app.get(
        "/v1/sandboxes/{sandbox_id}/files",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, **_ERRORS},
    )
    async def read_file(self, sandbox_id: str, path: PathQuery) -> Response:
        """A file's raw bytes, streamed (any size)."""
        worker = await self._worker(sandbox_id)
        return await _relay(
            stream(worker, "iter_file", sandbox_id, path), "application/octet-stream"
        )

    @app.put("/v1/sandboxes/{sandbox_id}/files", response_model=FileWritten, responses=_ERRORS)
    async def write_file(
        self,
        sandbox_id: str,
        request: Request,
        path: PathQuery,
        mode: Annotated[
            str | None, Query(pattern=r"^[0-7]{1,4}$", description="Octal bits, e.g. 644.")
        ] = None,
    ) -> FileWritten:
        """Write a file atomically from the raw request body (up to ``max_file_bytes``)."""
        written = await self._upload(sandbox_id, request, "file", path, _parse_mode(mode))
        return FileWritten(path=path, size=written)

    async def _upload(
        self, sandbox_id: str, request: Request, kind: str, path: str, mode: int | None = None
    ) -> int:
        """Send the request body to the Worker: one call when small, else chunk by chunk."""
        limit = self.args.max_file_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise InvalidRequest(f"body of {declared} bytes is over the {limit}-byte limit")
        worker = await self._worker(sandbox_id)
        body = request.stream()
        buffer = bytearray()
        async for chunk in body:
            buffer += chunk
            if len(buffer) > _UPLOAD_CHUNK:
                break
        else:  # the whole body fits one chunk: one call
            data = bytes(buffer)
            if kind == "file":
                size: int = await call(worker, "write_file", sandbox_id, path, data, mode)
                return size
            await call(worker, "upload_archive", sandbox_id, path, data)
            return len(data)
        upload_id: str = await call(worker, "upload_open", sandbox_id, kind, path, mode)
        try:
            async for chunk in body:
                buffer += chunk
                while len(buffer) >= _UPLOAD_CHUNK:
                    await call(worker, "upload_chunk", upload_id, bytes(buffer[:_UPLOAD_CHUNK]))
                    del buffer[:_UPLOAD_CHUNK]
            if buffer:
                await call(worker, "upload_chunk", upload_id, bytes(buffer))
            written: int = await call(worker, "upload_close", upload_id)
            return written
        except BaseException:
            with contextlib.suppress(Exception):
                await call(worker, "upload_abort", upload_id)
            raise

    @app.get(
        "/v1/sandboxes/{sandbox_id}/archive",
        response_class=Response,
        responses={200: {"content": {"application/x-tar": {}}}, **_ERRORS},
    )
    async def download_archive(self, sandbox_id: str, path: PathQuery) -> Response:
        """An uncompressed tar of a file or directory, streamed (any size)."""
        worker = await self._worker(sandbox_id)
        return await _relay(stream(worker, "iter_archive", sandbox_id, path), "application/x-tar")

    @app.put("/v1/sandboxes/{sandbox_id}/archive", status_code=204, responses=_ERRORS)
    async def upload_archive(self, sandbox_id: str, request: Request, path: PathQuery) -> Response:
        """Extract a tar (plain or compressed) from the request body into directory ``path``."""
        await self._upload(sandbox_id, request, "archive", path)
        return Response(status_code=204)

    @app.get("/v1/sandboxes/{sandbox_id}/files/stat", response_model=FileInfo, responses=_ERRORS)
    async def stat(self, sandbox_id: str, path: PathQuery) -> FileInfo:
        """Stat a path (symlinks are not followed)."""
        result: FileInfo = await self._data(sandbox_id, "stat", path)
        return result

    @app.get(
        "/v1/sandboxes/{sandbox_id}/files/list", response_model=ListDirResult, responses=_ERRORS
    )
    async def list_dir(self, sandbox_id: str, path: PathQuery) -> ListDirResult:
        """List a directory."""
        result: ListDirResult = await self._data(sandbox_id, "list_dir", path)
        return result

    @app.post("/v1/sandboxes/{sandbox_id}/files/mkdir", status_code=204, responses=_ERRORS)
    async def mkdir(self, sandbox_id: str, req: MkdirRequest) -> Response:
        """Create a directory."""
        await self._data(sandbox_id, "mkdir", req)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/files/remove", status_code=204, responses=_ERRORS)
    async def remove_path(self, sandbox_id: str, req: RemoveRequest) -> Response:
        """Remove a file, or a directory with ``recursive``."""
        await self._data(sandbox_id, "remove_path", req)
        return Response(status_code=204)

    @app.get("/v1/sandboxes/{sandbox_id}/stats", response_model=SandboxStats, responses=_ERRORS)
    async def stats(self, sandbox_id: str) -> SandboxStats:
        """CPU, memory and process usage and limits of a sandbox."""
        result: SandboxStats = await self._data(sandbox_id, "stats")
        return result

    # ---------------------------------------------------------------- pty

    @app.websocket("/v1/sandboxes/{sandbox_id}/pty")
    async def pty(self, ws: WebSocket, sandbox_id: str) -> None:
        """An interactive bash on a pty (query ``cols``, ``rows``; see :class:`PtyResize`).

        Client -> server: binary frames are keystrokes, text frames JSON control messages.
        Server -> client: binary frames are output; at exit a text frame
        ``{"type": "exit", "exit_code": N}``, then a normal close. An error is a text frame
        with the one error body, then close code 1008 (bad request) or 1011 (failure).
        """
        await ws.accept()
        pty_id = uuid.uuid4().hex
        worker: ActorHandle = None
        items: AsyncIterator[Any] | None = None
        try:
            cols = _pty_dimension(ws.query_params.get("cols", "80"), "cols")
            rows = _pty_dimension(ws.query_params.get("rows", "24"), "rows")
            worker = await self._worker(sandbox_id)
            items = stream(worker, "stream_pty", sandbox_id, pty_id, cols, rows)
            await items.__anext__()  # registered: input may flow
        except (RockError, StopAsyncIteration) as exc:
            await _ws_error(ws, exc, 1008)
            if items is not None:
                await items.aclose()  # type: ignore[attr-defined]
            return
        output = asyncio.ensure_future(_pty_output(ws, items))
        inputs = asyncio.ensure_future(_pty_input(ws, worker, pty_id))
        try:
            done, _ = await asyncio.wait({output, inputs}, return_when=asyncio.FIRST_COMPLETED)
            if output in done:
                code = output.result()
                await ws.send_text(PtyExit(exit_code=code).model_dump_json())
                await ws.close()
            else:
                inputs.result()  # the client went away (or sent what we cannot handle)
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away while we were sending
        except Exception as exc:
            with contextlib.suppress(Exception):
                await _ws_error(ws, exc, 1011)
        finally:
            for task in (output, inputs):
                task.cancel()
            await asyncio.gather(output, inputs, return_exceptions=True)
            await items.aclose()  # type: ignore[attr-defined]
            with contextlib.suppress(Exception):
                await call(worker, "pty_close", pty_id)
