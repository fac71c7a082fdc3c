"""Standalone HTTP mode of the rocklet: a Starlette app in front of one :class:`RockletHandle`.

Two route families share one app:

- The **SWE-ReX remote-runtime protocol**, exactly as ``swerex.server`` serves it (``GET /``,
  ``GET /is_alive``, ``POST /create_session``, ``/run_in_session``, ``/close_session``,
  ``/execute``, ``/read_file``, ``/write_file``, ``/upload``, ``/close``), so that
  ``swerex.runtime.remote.RemoteRuntime`` and SWE-agent work unmodified. Errors use SWE-ReX's
  shape: HTTP 511 ``{"swerexception": {"message", "class_path", "traceback", "extra_info"}}``,
  where ``class_path`` only ever names a class from a fixed allow-list and ``traceback`` is
  always empty; invalid bodies give FastAPI's 422 ``{"detail": [...]}``. These routes live in
  :mod:`rock_serve.rocklet._swerex`, their bodies in :mod:`rock_serve.protocol.swerex`.
- **``/rock/v1/...``** for what that protocol lacks: streamed runs (NDJSON of
  :class:`~rock_serve.protocol.OutputChunk` lines, then the result), raw binary file and tar
  transfer streamed both ways, stdin, interrupt, stats and our own exec. Errors use the one
  error body ``{"error": {"code", "message"}}`` with the status from :mod:`rock_serve.errors`.

Authentication: when a token is set, every request needs the header ``X-API-Key: <token>``
(compared in constant time); otherwise 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rock_serve.errors import (
    InternalError,
    InvalidRequest,
    RockError,
    RockletUnavailable,
    SessionNotFound,
    Unauthorized,
    to_body,
)
from rock_serve.protocol import (
    ExecRequest,
    MkdirRequest,
    ReadFileRequest,
    RemoveRequest,
    SessionCloseRequest,
    SessionCreateRequest,
    SessionInterruptRequest,
    SessionRunRequest,
    SessionStdinRequest,
)
from rock_serve.rocklet._swerex import SwerexRoutes
from rock_serve.rocklet.handle import RockletHandle

__all__ = ["HandleFactory", "create_app"]

log = logging.getLogger(__name__)

#: An async callable that starts a rocklet and returns a handle to it.
HandleFactory = Callable[[], Awaitable[RockletHandle]]

#: Prefix of the routes that are ours rather than SWE-ReX's.
ROCK_PREFIX = "/rock/v1"

#: How long a streamed route waits for its first item before it sends the headers.
FIRST_ITEM_WAIT = 0.2

M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------------------- helpers


def _model_response(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _rock_error_response(exc: BaseException) -> Response:
    if not isinstance(exc, RockError):
        log.exception("rocklet http: unexpected error", exc_info=exc)
        exc = InternalError("internal error")
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(to_body(exc), status_code=exc.status, headers=headers)


def _parse(model: type[M], raw: bytes | Mapping[str, Any]) -> M:
    """Validate a body or query against ``model``; problems raise :class:`InvalidRequest`."""
    try:
        if isinstance(raw, bytes | bytearray):
            return model.model_validate_json(raw or b"{}")
        return model.model_validate(dict(raw))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        raise InvalidRequest(f"invalid {model.__name__}: {problems}") from None


def _query_path(request: Request) -> str:
    path = request.query_params.get("path", "")
    if not path or len(path) > 4096 or "\0" in path:
        raise InvalidRequest("query parameter 'path' must be a path of 1 to 4096 characters")
    return path


# ---------------------------------------------------------------------------- middleware


class _AuthMiddleware:
    """Checks ``X-API-Key`` in constant time; 401 in the shape of the route family."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given: bytes | None = None
        for name, value in scope.get("headers", ()):
            if name == b"x-api-key":
                given = value
                break
        if given is not None and hmac.compare_digest(given, self.token):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        response: Response
        if path.startswith(ROCK_PREFIX + "/") or path == ROCK_PREFIX:
            response = _rock_error_response(Unauthorized("missing or wrong X-API-Key header"))
        elif given is None:
            response = JSONResponse(
                {"detail": "Not authenticated"},
                status_code=401,
                headers={"WWW-Authenticate": "APIKey"},
            )
        else:
            response = JSONResponse({"detail": "Invalid API Key"}, status_code=401)
        await response(scope, receive, send)


# ---------------------------------------------------------------------------- the app


class _Rocklet:
    """The state behind the app: the handle and the SWE-ReX routes with their state."""

    def __init__(self, source: RockletHandle | HandleFactory) -> None:
        if isinstance(source, RockletHandle):
            self._handle: RockletHandle | None = source
            self._factory: HandleFactory | None = None
        else:
            self._handle = None
            self._factory = source
        self._lock = asyncio.Lock()
        self.swx = SwerexRoutes(self.handle)

    async def handle(self) -> RockletHandle:
        """The live handle; with a factory, a dead rocklet is replaced by a new one."""
        h = self._handle
        if h is not None and h.alive:
            return h
        if self._factory is None:
            if h is None:  # pragma: no cover - the constructor sets it
                raise RockletUnavailable("no rocklet")
            return h  # its calls raise RockletUnavailable
        async with self._lock:
            if self._handle is not None and self._handle.alive:
                return self._handle
            if self._handle is not None:
                with contextlib.suppress(Exception):
                    await self._handle.close()
                self._handle = None
            self.swx.background.clear()
            self._handle = await self._factory()
            return self._handle

    async def shutdown(self) -> None:
        await self.swx.cancel_background()
        if self._factory is not None and self._handle is not None:
            await self._handle.close()
            self._handle = None

    # ------------------------------------------------------------------ /rock/v1 routes

    def rock(
        self, fn: Callable[[Request], Awaitable[Response | BaseModel | None]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap one of our endpoints: typed errors become the one error body."""

        async def endpoint(request: Request) -> Response:
            try:
                result = await fn(request)
            except Exception as exc:
                return _rock_error_response(exc)
            if result is None:
                return Response(status_code=204)
            if isinstance(result, BaseModel):
                return _model_response(result)
            return result

        return endpoint

    async def rock_create_session(self, request: Request) -> BaseModel:
        req = _parse(SessionCreateRequest, await request.body())
        return await (await self.handle()).create_session(req)

    async def rock_run(self, request: Request) -> BaseModel:
        req = _parse(SessionRunRequest, await request.body())
        return await (await self.handle()).run_in_session(req)

    async def rock_run_stream(self, request: Request) -> Response:
        req = _parse(SessionRunRequest, await request.body())
        h = await self.handle()
        if req.session not in await h.list_sessions():  # a 404 even if the agent is slow
            raise SessionNotFound(f"no session named {req.session!r}")
        return await _ndjson(h.stream_in_session(req))

    async def rock_stdin(self, request: Request) -> None:
        req = _parse(SessionStdinRequest, await request.body())
        await (await self.handle()).session_stdin(req.session, req.data.encode(), eof=req.eof)

    async def rock_interrupt(self, request: Request) -> None:
        req = _parse(SessionInterruptRequest, await request.body())
        await (await self.handle()).interrupt_session(req.session)

    async def rock_close_session(self, request: Request) -> None:
        req = _parse(SessionCloseRequest, await request.body())
        bg = self.swx.background.pop(req.session, None)
        try:
            await (await self.handle()).close_session(req.session)
        finally:
            if bg is not None:
                await bg.cancel()

    async def rock_exec(self, request: Request) -> BaseModel:
        req = _parse(ExecRequest, await request.body())
        return await (await self.handle()).exec(req)

    async def rock_exec_stream(self, request: Request) -> Response:
        req = _parse(ExecRequest, await request.body())
        h = await self.handle()
        return await _ndjson(h.stream_exec(req))

    async def rock_read(self, request: Request) -> Response:
        req = _parse(ReadFileRequest, request.query_params)
        h = await self.handle()
        if req.offset or req.length is not None:
            data = await h.read_file(req.path, offset=req.offset, length=req.length)
            return Response(data, media_type="application/octet-stream")
        return await _raw_stream(h.iter_file(req.path), "application/octet-stream")

    async def rock_write(self, request: Request) -> BaseModel:
        path = _query_path(request)
        mode_text = request.query_params.get("mode")
        mode: int | None = None
        if mode_text:
            try:
                mode = int(mode_text, 8)
            except ValueError:
                raise InvalidRequest("query parameter 'mode' must be octal, e.g. 644") from None
            if not 0 <= mode <= 0o7777:
                raise InvalidRequest("query parameter 'mode' must be between 0 and 7777")
        parents = request.query_params.get("make_parents", "true").lower() != "false"
        h = await self.handle()
        await h.write_file(path, _iter_body(request), mode=mode, make_parents=parents)
        return await h.stat(path)

    async def rock_stat(self, request: Request) -> BaseModel:
        return await (await self.handle()).stat(_query_path(request))

    async def rock_list(self, request: Request) -> BaseModel:
        return await (await self.handle()).list_dir(_query_path(request))

    async def rock_mkdir(self, request: Request) -> None:
        req = _parse(MkdirRequest, await request.body())
        await (await self.handle()).mkdir(req.path, parents=req.parents, exist_ok=req.exist_ok)

    async def rock_remove(self, request: Request) -> None:
        req = _parse(RemoveRequest, await request.body())
        h = await self.handle()
        await h.remove(req.path, recursive=req.recursive, missing_ok=req.missing_ok)

    async def rock_tar_download(self, request: Request) -> Response:
        h = await self.handle()
        return await _raw_stream(h.download_tar(_query_path(request)), "application/x-tar")

    async def rock_tar_upload(self, request: Request) -> None:
        path = _query_path(request)
        await (await self.handle()).upload_tar(path, _iter_body(request))

    async def rock_stats(self, request: Request) -> BaseModel:
        return await (await self.handle()).stats()


async def _iter_body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


async def _raw_stream(it: AsyncIterator[bytes], media_type: str) -> Response:
    """Stream bytes; an error before the first chunk becomes a normal error response."""
    iterator = aiter(it)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        return Response(b"", media_type=media_type)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in iterator:
                yield chunk
        finally:
            await cast(Any, iterator).aclose()

    return StreamingResponse(body(), media_type=media_type)


async def _ndjson(it: AsyncIterator[BaseModel]) -> Response:
    """Stream models as NDJSON lines; an error mid-stream is sent as an error-body line.

    The headers wait up to :data:`FIRST_ITEM_WAIT` for the first item, so an immediate error
    (no such session) still gets its own status code.
    """
    iterator = aiter(it)
    first: asyncio.Future[BaseModel] = asyncio.ensure_future(anext(iterator))
    await asyncio.wait({first}, timeout=FIRST_ITEM_WAIT)
    if first.done():
        exc = first.exception()
        if isinstance(exc, StopAsyncIteration):
            return Response(b"", media_type="application/x-ndjson")
        if exc is not None:
            return _rock_error_response(exc)

    async def body() -> AsyncIterator[bytes]:
        try:
            try:
                item = await asyncio.shield(first)
                yield item.model_dump_json().encode() + b"\n"
                async for item in iterator:
                    yield item.model_dump_json().encode() + b"\n"
            except StopAsyncIteration:
                return
            except RockError as exc:
                yield json.dumps(to_body(exc)).encode() + b"\n"
        finally:
            if not first.done():
                first.cancel()
                with contextlib.suppress(BaseException):
                    await first
            with contextlib.suppress(RuntimeError):
                await cast(Any, iterator).aclose()

    return StreamingResponse(body(), media_type="application/x-ndjson")


def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith(ROCK_PREFIX):
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        body = {
            "error": {"code": code, "message": f"{exc.detail}: {request.method} {request.url.path}"}
        }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(source: RockletHandle | HandleFactory, *, token: str | None) -> Starlette:
    """Build the HTTP app in front of one rocklet.

    Args:
        source: A connected :class:`RockletHandle` (the caller owns and closes it), or an
            async factory that starts one. With a factory the app owns its rocklet: it starts
            it at startup (or on first use), replaces it if it dies, and closes it at shutdown.
        token: When set, every request must carry ``X-API-Key: <token>``.

    Returns:
        A Starlette app serving the SWE-ReX routes and ``/rock/v1/...``.
    """
    r = _Rocklet(source)
    rock = r.rock
    p = ROCK_PREFIX
    routes = [
        *r.swx.routes(),
        Route(f"{p}/sessions", rock(r.rock_create_session), methods=["POST"]),
        Route(f"{p}/sessions/run", rock(r.rock_run), methods=["POST"]),
        Route(f"{p}/sessions/stream", rock(r.rock_run_stream), methods=["POST"]),
        Route(f"{p}/sessions/stdin", rock(r.rock_stdin), methods=["POST"]),
        Route(f"{p}/sessions/interrupt", rock(r.rock_interrupt), methods=["POST"]),
        Route(f"{p}/sessions/close", rock(r.rock_close_session), methods=["POST"]),
        Route(f"{p}/exec", rock(r.rock_exec), methods=["POST"]),
        Route(f"{p}/exec/stream", rock(r.rock_exec_stream), methods=["POST"]),
        Route(f"{p}/files", rock(r.rock_read), methods=["GET"]),
        Route(f"{p}/files", rock(r.rock_write), methods=["PUT"]),
        Route(f"{p}/files/stat", rock(r.rock_stat), methods=["GET"]),
        Route(f"{p}/files/list", rock(r.rock_list), methods=["GET"]),
        Route(f"{p}/files/mkdir", rock(r.rock_mkdir), methods=["POST"]),
        Route(f"{p}/files/remove", rock(r.rock_remove), methods=["POST"]),
        Route(f"{p}/tar", rock(r.rock_tar_download), methods=["GET"]),
        Route(f"{p}/tar", rock(r.rock_tar_upload), methods=["PUT"]),
        Route(f"{p}/stats", rock(r.rock_stats), methods=["GET"]),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if r._factory is not None:
            await r.handle()
        try:
            yield
        finally:
            await r.shutdown()

    middleware = [Middleware(_AuthMiddleware, token=token)] if token else []
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception},
    )
    app.state.rocklet = r
    return app
