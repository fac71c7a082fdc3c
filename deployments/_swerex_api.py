"""SWE-ReX's remote-runtime routes per platform sandbox: ``/v1/sandboxes/{id}/swerex/*``.

SWE-ReX's ``RemoteRuntime`` (and SWE-agent's ``deployment.type: remote``) reaches a sandbox of
the platform with::

    RemoteRuntimeConfig(host=f"{platform}/v1/sandboxes/{sandbox_id}/swerex", port=None,
                        auth_token=TOKEN)

(with ``port=None`` the client uses ``host`` verbatim as its base URL; it sends the token as
``X-API-Key``, one of the carriers the Admin reads). The routes are the rocklet's own SWE-ReX
mapping (:class:`~rock_serve.rocklet._swerex.SwerexRoutes`: same bodies, the same 511
``swerexception`` errors naming only allow-listed classes, the same ``X-Request-ID`` retry
cache), driven through :class:`_SandboxHandle`, which turns each rocklet call into the
platform's own operation on the sandbox's Worker (the SDK's Ray transport, as the other
compatibility routes). The rocklet mapping keeps per-sandbox state (background interactive
commands, the retry cache) in the replica that serves the call; one replica per sandbox's
agent is what SWE-agent does (a single client).

Refused credentials are SWE-ReX's 401 ``{"detail"}``; an unknown sandbox (or another
namespace's) and other platform errors are 511 ``swerexception`` bodies.

Wiring (``admin.py``): ``app.include_router(_swerex_api.router)`` before ``@serve.ingress``.
"""

# No "from __future__ import annotations": FastAPI reads these annotations at include time.

import json
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from rock_serve.deployments._auth import Auth
from rock_serve.deployments._compat import platform_client
from rock_serve.deployments._rock_api import check_sandbox
from rock_serve.errors import RockError, RuntimeUnavailable, Unauthorized
from rock_serve.protocol import (
    ExecRequest,
    ExecResult,
    OutputChunk,
    SandboxState,
    SessionCreateRequest,
    SessionCreateResponse,
    SessionRunRequest,
    SessionRunResult,
)
from rock_serve.rocklet._swerex import SwerexRoutes, _swx_body, _swx_error_for
from rock_serve.rocklet.handle import RockletHandle
from rock_serve.sdk import AsyncClient

__all__ = ["SWEREX_PATH", "router"]

SWEREX_PATH = "/v1/sandboxes/{sandbox_id}/swerex"
#: Sandboxes whose SWE-ReX state one replica keeps (least recently used forgotten first).
_MAX_SANDBOXES = 4096


async def _collect(data: bytes | AsyncIterable[bytes]) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    return b"".join([chunk async for chunk in data])


class _SandboxHandle:
    """The part of :class:`RockletHandle` that SwerexRoutes uses, over the platform's
    operations on one sandbox (so the same Worker calls as REST v1 and the SDK).
    """

    def __init__(self, client: AsyncClient, sandbox_id: str) -> None:
        self.client = client
        self.sandbox_id = sandbox_id
        self.sessions: set[str] = set()

    async def ping(self) -> dict[str, Any]:
        record = await self.client.get_sandbox(self.sandbox_id)
        if record.state != SandboxState.RUNNING:
            raise RuntimeUnavailable(f"sandbox {self.sandbox_id} is {record.state.value}")
        return {"ok": True}

    async def create_session(self, req: SessionCreateRequest) -> SessionCreateResponse:
        resp = await self.client.create_session(
            self.sandbox_id,
            req.session,
            env=req.env,
            cwd=req.cwd,
            startup_commands=list(req.startup_commands),
        )
        self.sessions.add(req.session)
        return resp

    async def run_in_session(self, req: SessionRunRequest) -> SessionRunResult:
        return await self.client.run(
            self.sandbox_id,
            req.command,
            session=req.session,
            timeout=req.timeout,
            max_output_bytes=req.max_output_bytes,
        )

    def stream_in_session(
        self, req: SessionRunRequest
    ) -> AsyncIterator[OutputChunk | SessionRunResult]:
        return self.client.stream_run(
            self.sandbox_id,
            req.command,
            session=req.session,
            timeout=req.timeout,
            max_output_bytes=req.max_output_bytes,
        )

    async def session_stdin(self, session: str, data: bytes, *, eof: bool = False) -> None:
        text = data.decode("utf-8", "replace")
        await self.client.session_stdin(self.sandbox_id, text, session=session, eof=eof)

    async def interrupt_session(self, session: str = "default") -> None:
        await self.client.interrupt(self.sandbox_id, session=session)

    async def close_session(self, session: str = "default") -> None:
        await self.client.close_session(self.sandbox_id, session=session)
        self.sessions.discard(session)

    async def list_sessions(self) -> list[str]:
        return sorted(self.sessions)

    async def exec(self, req: ExecRequest) -> ExecResult:
        return await self.client.exec(self.sandbox_id, req)

    async def read_file(self, path: str) -> bytes:
        return await self.client.read_file(self.sandbox_id, path)

    async def write_file(
        self, path: str, data: bytes | AsyncIterable[bytes], *, make_parents: bool = True
    ) -> int:
        written = await self.client.write_file(self.sandbox_id, path, await _collect(data))
        return written.size

    async def upload_tar(self, path: str, data: bytes | AsyncIterable[bytes]) -> None:
        await self.client.upload_archive(self.sandbox_id, path, await _collect(data))


#: Per-replica SWE-ReX state, by sandbox id.
_STATE: "OrderedDict[str, SwerexRoutes]" = OrderedDict()


def _routes(client: AsyncClient, sandbox_id: str) -> SwerexRoutes:
    routes = _STATE.get(sandbox_id)
    if routes is None:
        handle = cast(RockletHandle, _SandboxHandle(client, sandbox_id))

        async def get_handle() -> RockletHandle:
            return handle

        routes = _STATE[sandbox_id] = SwerexRoutes(get_handle)
        if len(_STATE) > _MAX_SANDBOXES:
            _STATE.popitem(last=False)
    else:
        _STATE.move_to_end(sandbox_id)
    return routes


def _swx_response(exc: BaseException) -> Response:
    return Response(_swx_body(_swx_error_for(exc)), 511, media_type="application/json")


class SwerexRoute(APIRoute):
    """A route whose failures are SWE-ReX's (401 ``{"detail"}``, 422, 511), never ours."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Unauthorized as exc:
                return JSONResponse({"detail": exc.message}, status_code=401)
            except RequestValidationError as exc:
                return JSONResponse(
                    {"detail": json.loads(json.dumps(exc.errors(), default=str))}, 422
                )
            except RockError as exc:
                return _swx_response(exc)

        return route


router = APIRouter(tags=["swerex"], route_class=SwerexRoute)

Client = Annotated[AsyncClient, Depends(platform_client)]


@router.api_route(SWEREX_PATH, methods=["GET"], name="swerex_root", include_in_schema=False)
async def swerex_root(sandbox_id: str, principal: Auth, client: Client) -> Response:
    """SWE-ReX's ``GET /``."""
    await check_sandbox(client, principal, sandbox_id)
    return JSONResponse({"message": "hello world"})


@router.api_route(
    SWEREX_PATH + "/{operation}",
    methods=["GET", "POST"],
    name="swerex",
    responses={511: {"description": 'SWE-ReX error: `{"swerexception": {...}}`.'}},
)
async def swerex(
    sandbox_id: str, operation: str, request: Request, principal: Auth, client: Client
) -> Response:
    """SWE-ReX's routes (``is_alive``, ``create_session``, ``run_in_session``,
    ``close_session``, ``execute``, ``read_file``, ``write_file``, ``upload``, ``close``) on
    one sandbox; bodies and replies are SWE-ReX's.
    """
    await check_sandbox(client, principal, sandbox_id)
    routes = _routes(client, sandbox_id)
    for route in routes.routes():
        if route.path == f"/{operation}" and request.method in (route.methods or ()):
            endpoint = cast(Callable[[Request], Coroutine[Any, Any, Response]], route.endpoint)
            return await endpoint(request)
    return JSONResponse({"detail": "Not Found"}, status_code=404)
