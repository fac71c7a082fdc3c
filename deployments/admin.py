"""The Admin: the stateless REST v1 ingress (see ``rock_serve/protocol/api.py`` for the routes).

Control-plane calls (create, get, list, delete, health) go to the Scheduler actor; data-plane
calls go straight to the Worker named in the sandbox id. Every error, ours or FastAPI's, leaves
as the one body ``{"error": {"code", "message", "retry_after"?}}`` with the table's status and,
on 429/503, a ``Retry-After`` header.

File and archive bodies are streamed both ways: downloads are relayed chunk by chunk from the
rocklet, uploads are sent to the Worker in chunks of ``_relays.UPLOAD_CHUNK`` bytes with
backpressure, so no body is ever held whole in a replica (``max_file_bytes`` caps an upload's
size, not memory).

The module composes: routes here; error rendering in ``_errors.py``; body limits in
``_bodylimit.py``; the stream, upload and pty relays in ``_relays.py``; the other API groups in
their own ``_*_api.py`` routers.
"""

# No "from __future__ import annotations": Serve pickles the FastAPI app to its replicas, and
# FastAPI must see the real types (not strings) there to build the OpenAPI schema.

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Concatenate, ParamSpec, TypeVar

from fastapi import Depends, FastAPI, Query, Request, WebSocket
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import StringConstraints
from ray import serve
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect

import rock_serve
from rock_serve.auth import Authenticator, Principal
from rock_serve.config import NAME_PATTERN, ServerArgs, parse_server_args
from rock_serve.deployments import (
    _compat,
    _console,
    _dataplane_api,
    _errors,
    _fork_api,
    _gem,
    _images,
    _llm_api,
    _notify,
    _op_routes,
    _ports_api,
    _processes,
    _relays,
    _rock_api,
    _snapshot_api,
    _swerex_api,
)
from rock_serve.deployments._audit import AuditEvent, AuditLog
from rock_serve.deployments._auth import (
    Auth,
    NamespaceGuard,
    authenticate_header_or_query,
    caller,
    check_spec_privileges,
    request_token,
    set_caller,
    websocket_token,
)
from rock_serve.deployments._bodylimit import BODY_LIMITS as _BODY_LIMITS
from rock_serve.deployments._bodylimit import BodyLimit
from rock_serve.deployments._errors import admin_metrics as _admin_metrics
from rock_serve.deployments._ops import worker_op, worker_op_stream
from rock_serve.deployments._ray import (
    ActorHandle,
    WorkerHandles,
    call,
    get_or_create_scheduler,
    pin_replica_grpc,
    stream,
    worker_class,
)
from rock_serve.deployments._relays import pty_dimension as _pty_dimension
from rock_serve.deployments._relays import pty_input as _pty_input
from rock_serve.deployments._relays import pty_output as _pty_output
from rock_serve.deployments._relays import ws_error as _ws_error
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.errors import (
    ErrorCode,
    InvalidRequest,
    RockError,
    SandboxNotFound,
    http_status,
)
from rock_serve.protocol import (
    CreateSandboxRequest,
    ErrorBody,
    Health,
    PtyExit,
    SandboxList,
    SandboxRecord,
    SandboxState,
)
from rock_serve.protocol.api import SANDBOX_ID
from rock_serve.protocol.ops import Op, Streams

__all__ = ["Admin", "app"]

log = logging.getLogger(__name__)
R = TypeVar("R")
R_ = TypeVar("R_")
P = ParamSpec("P")

_ID = re.compile(SANDBOX_ID)

app = FastAPI(
    title="rock-serve",
    version=rock_serve.__version__,
    description="Sandbox platform for agentic RL. Errors: "
    '`{"error": {"code", "message", "retry_after"?}}`.',
    docs_url="/docs",
)

# ----------------------------------------------------------------------------- errors

# Every error leaves as the one body (``_errors.py``); bodies over their limit are refused
# before a route reads them (``_bodylimit.py``).
_errors.install(app)
app.add_middleware(BodyLimit)


# ----------------------------------------------------------------------------- helpers

LabelFilter = Annotated[str, StringConstraints(pattern=r"^[^=]+=")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": 'Error body `{"error": {"code", "message"}}`.'}
    # Every status the error table can answer (501 not_supported, 502 port_closed, ...).
    for status in sorted({http_status(code) for code in ErrorCode})
}
#: /v1/health needs no token (a wrong one is still refused).
_HEALTH_ERRORS: dict[int | str, dict[str, Any]] = {
    status: _ERRORS[status] for status in (401, 500, 503, 504)
}


def _openapi() -> dict[str, Any]:
    """FastAPI's schema without its 422 replies: validation errors are our error body (400
    ``invalid_request``; 422 ``invalid_image_reference`` for a malformed image reference).
    """
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            description=app.description,
            routes=app.routes,
            servers=app.servers,
        )
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                # FastAPI's own 422 (HTTPValidationError) only: our 422 is the error body
                responses = operation.get("responses", {}) if isinstance(operation, dict) else {}
                if "HTTPValidationError" in str(responses.get("422", "")):
                    responses.pop("422")
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]
# SandboxFusion's /run_code (issue 7); included before @serve.ingress freezes the app. Its
# clients (verl) cannot set headers: the token may also come as ``?token=``.
app.include_router(
    _compat.router, dependencies=[Depends(authenticate_header_or_query)], responses=_ERRORS
)
# ROCK's GEM env API (issue 7); its routes take the caller (``Auth``) themselves.
app.include_router(_gem.router, responses=_ERRORS)
app.include_router(_images.router, responses=_ERRORS)  # /v1/images (issue 12)
app.include_router(_llm_api.router, responses=_ERRORS)  # model service (issue 15.3)
app.include_router(_dataplane_api.router, responses=_ERRORS)  # direct data plane (issue 13)
app.include_router(_ports_api.router, responses=_ERRORS)  # /v1/sandboxes/{id}/ports (15.2)
app.include_router(_fork_api.router, responses=_ERRORS)  # fork, pause, resume (issue 16)
app.include_router(_snapshot_api.router, responses=_ERRORS)  # snapshots (issue 16)
app.include_router(_processes.router, responses=_ERRORS)  # /processes (issue 15.1)
# ROCK's sandbox API (issue 14): answers in ROCK's envelope, errors included.
app.include_router(_rock_api.router)
# SWE-ReX's remote-runtime routes per sandbox (issue 14), in SWE-ReX's dialect.
app.include_router(_swerex_api.router)
# The web console (issue 17): /ui pages and their JSON/SSE feeds; request ids and samples.
_console.install(app)


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


# ----------------------------------------------------------------------------- operations

# Every sandbox operation's REST route, from its one declaration (``_op_routes``); the
# direct data plane mounts the same ones.
_op_routes.mount_fastapi(app, Auth, _ERRORS)


# ----------------------------------------------------------------------------- deployment


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class Admin:
    """REST v1: validation, error mapping and routing; no state of its own."""

    def __init__(self, args: dict[str, Any] | ServerArgs, gem: Any = None) -> None:
        """Serve the platform of ``args``; ``gem`` is the GemApi deployment's handle (from
        ``build_app``; None: the GEM routes call the env table themselves).
        """
        self.args = args if isinstance(args, ServerArgs) else parse_server_args(args)
        pin_replica_grpc()  # Serve's replica gRPC server: the node's IP, not every address
        _BODY_LIMITS.update(request=self.args.max_request_bytes, file=self.args.max_file_bytes)
        self._scheduler: ActorHandle = get_or_create_scheduler(self.args)
        self._workers = WorkerHandles(self.args.namespace)
        _compat.bind(self.args.namespace)  # the compat routes' platform client needs it
        _gem.bind(self.args.namespace, self.args.gem, gem)  # GEM routes -> the GemApi deployment
        _images.bind(self.args.namespace)
        _dataplane_api.bind(self.args)
        _notify.start_watcher(self.args)  # alert gauges and the webhook (one per platform)
        # A redeploy's new limits reach the long-lived Scheduler; start it up early.
        self._scheduler.configure.remote(self.args)
        self._scheduler.ready.remote()
        self.authenticator = Authenticator(self.args.auth)
        self._sender: _op_routes.Sender = self
        _op_routes.bind_admin(self._serve_op)  # the operations' routes serve through it
        self._guard = NamespaceGuard(self._lookup)
        self._audit = AuditLog(self.args.audit, on_error=_admin_metrics().audit_error)
        if not self.authenticator.required:
            log.warning(
                "AUTH IS DISABLED: every caller acts as an admin of namespace 'default'. Keep "
                "the API on loopback, or set auth.tokens / auth.token_file (see `rock token`)."
            )

    async def __del__(self) -> None:
        await self._audit.aclose()

    async def _lookup(self, sandbox_id: str) -> SandboxRecord:
        record: SandboxRecord = await call(self._scheduler, Scheduler.get, sandbox_id)
        return record

    async def _worker(self, sandbox_id: str) -> ActorHandle:
        short = _worker_of(sandbox_id)
        await self._guard.check(caller(), sandbox_id)  # every data-plane call passes here
        return await self._workers.get(short)

    def auth_failed(self, conn: HTTPConnection, exc: RockError) -> None:
        """Audit a refused credential (called by the ``Auth`` dependency and the pty)."""
        self._audit.record(
            AuditEvent(
                action="auth",
                token_name="-",
                namespace="-",
                status=exc.status,
                code=exc.code.value,
                client=conn.client.host if conn.client else None,
                detail={"method": conn.scope.get("method", "WEBSOCKET"), "path": conn.url.path},
            )
        )

    @contextlib.asynccontextmanager
    async def _audited(
        self,
        conn: HTTPConnection,
        principal: Principal,
        action: str,
        sandbox_id: str | None = None,
        *,
        status: int = 200,
        **fields: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Record one audit event for the block (see :meth:`AuditLog.scope`)."""
        client = conn.client.host if conn.client else None
        async with self._audit.scope(
            principal, action, sandbox_id, client=client, status=status, **fields
        ) as event:
            yield event

    async def _data(
        self,
        sandbox_id: str,
        method: Callable[Concatenate[Any, str, P], Awaitable[R_]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R_:
        """Call a Worker method of the sandbox (``method(self, sandbox_id, *args)``) on the
        Worker that holds it.
        """
        return await call(await self._worker(sandbox_id), method, sandbox_id, *args, **kwargs)

    async def op(self, sandbox_id: str, operation: Op[R]) -> R:
        """Run one sandbox operation on the Worker that holds the sandbox."""
        return await worker_op(await self._worker(sandbox_id), sandbox_id, operation)

    async def op_stream(self, sandbox_id: str, operation: Streams[Any]) -> AsyncIterator[Any]:
        """Run one streaming operation on the Worker that holds the sandbox, item by item."""
        worker = await self._worker(sandbox_id)
        items = worker_op_stream(worker, sandbox_id, operation)
        try:
            async for item in items:
                yield item
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()

    # ---------------------------------------------------------------- control plane

    @app.get("/v1/health", response_model=Health, responses=_HEALTH_ERRORS)
    async def health(self, request: Request) -> Health:
        """The platform's status; the Workers' details only for an admin token.

        Needs no token (for probes). With auth disabled every caller counts as an admin.
        """
        token = request_token(request)
        principal = (
            self.authenticator.authenticate(token)
            if token or not self.authenticator.required
            else None
        )
        result: Health = await call(self._scheduler, Scheduler.health)
        if principal is None or not principal.all_namespaces:
            return result.model_copy(update={"workers": []})
        return result

    @app.post("/v1/sandboxes", status_code=201, response_model=SandboxRecord, responses=_ERRORS)
    async def create_sandbox(
        self, req: CreateSandboxRequest, request: Request, principal: Auth
    ) -> SandboxRecord:
        """Create and start a sandbox in the caller's namespace."""
        detail = {"owner": req.owner, "image": req.image, "network": req.network}
        async with self._audited(
            request, principal, "create", status=201, env_keys=sorted(req.env), detail=detail
        ) as event:
            check_spec_privileges(principal, req)
            record: SandboxRecord = await call(
                self._scheduler, Scheduler.create, req, principal.namespace
            )
            event["sandbox_id"] = record.id
        self._guard.remember(record.id, record.namespace)
        return record

    @app.get("/v1/sandboxes", response_model=SandboxList, responses=_ERRORS)
    async def list_sandboxes(
        self,
        principal: Auth,
        owner: str | None = None,
        state: SandboxState | None = None,
        label: Annotated[list[LabelFilter] | None, Query(description="k=v; repeatable.")] = None,
        namespace: Annotated[
            str | None,
            Query(
                pattern=NAME_PATTERN,
                description="Only this namespace (admins; others see only their own).",
            ),
        ] = None,
    ) -> SandboxList:
        """Sandboxes matching every filter, newest first (admins: every namespace's)."""
        only = NamespaceGuard.check_namespace_filter(principal, namespace)
        labels = _parse_labels(label or [])
        result: SandboxList = await call(
            self._scheduler, Scheduler.list, owner, state, labels, only
        )
        for record in result.items:
            self._guard.remember(record.id, record.namespace)
        return result

    @app.get("/v1/sandboxes/{sandbox_id}", response_model=SandboxRecord, responses=_ERRORS)
    async def get_sandbox(self, sandbox_id: str, principal: Auth) -> SandboxRecord:
        """One sandbox."""
        _worker_of(sandbox_id)
        record: SandboxRecord = await call(self._scheduler, Scheduler.get, sandbox_id)
        self._guard.remember(record.id, record.namespace)
        if not principal.may_see(record.namespace):
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return record

    @app.delete("/v1/sandboxes/{sandbox_id}", status_code=204, responses=_ERRORS)
    async def delete_sandbox(self, sandbox_id: str, request: Request, principal: Auth) -> Response:
        """Remove a sandbox and everything in it."""
        async with self._audited(request, principal, "delete", sandbox_id, status=204):
            _worker_of(sandbox_id)
            await self._guard.check(principal, sandbox_id)
            await call(self._scheduler, Scheduler.delete, sandbox_id)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/renew", response_model=SandboxRecord, responses=_ERRORS)
    async def renew(self, sandbox_id: str, principal: Auth) -> SandboxRecord:
        """Renew the sandbox's lease (a heartbeat; any call naming the sandbox also renews)."""
        record: SandboxRecord = await self._data(sandbox_id, worker_class().renew)
        return record

    @app.delete("/v1/sandboxes", status_code=204, responses=_ERRORS)
    async def delete_by_token(
        self,
        request: Request,
        principal: Auth,
        client_token: Annotated[
            str, Query(min_length=1, max_length=128, description="The create's client_token.")
        ],
    ) -> Response:
        """Remove the sandbox created with ``client_token``, waiting for that create if it is
        still running (so a delete that races a create leaves nothing behind).
        """
        async with self._audited(
            request, principal, "delete", status=204, detail={"by": "client_token"}
        ) as event:
            event["sandbox_id"] = await call(
                self._scheduler, Scheduler.delete_by_token, client_token, principal.namespace
            )
        return Response(status_code=204)

    # ---------------------------------------------------------------- operations

    async def _serve_op(
        self,
        route: _op_routes.OpRoute,
        request: Request,
        principal: Principal,
        sandbox_id: str,
        operation: Op[Any],
        streamed: bool,
    ) -> Response:
        """One operation's route (see ``_op_routes``): checked by ``_worker``, audited with
        the action of its ``OPS`` row, sent to the Worker actor (an upload chunk by chunk).
        """
        action = route.spec.audit
        if action is None:
            return await _op_routes.serve_op(route, self._sender, sandbox_id, operation, streamed)
        fields = _op_routes.audit_fields(operation, streamed)
        async with self._audited(
            request, principal, action, sandbox_id, status=route.status, **fields
        ) as event:
            if route.spec.model.upload is not None:
                limit = self.args.max_file_bytes
                result, size = await _relays.upload(
                    self._worker, limit, sandbox_id, request, operation
                )
                event["detail"]["bytes"] = size
                return _op_routes.reply(route, result)
            return await _op_routes.serve_op(
                route, self._sender, sandbox_id, operation, streamed, event
            )

    # ---------------------------------------------------------------- pty

    @app.websocket("/v1/sandboxes/{sandbox_id}/pty")
    async def pty(self, ws: WebSocket, sandbox_id: str) -> None:
        """An interactive bash on a pty (query ``cols``, ``rows``; see :class:`PtyResize`).

        Client -> server: binary frames are keystrokes, text frames JSON control messages.
        Server -> client: binary frames are output; at exit a text frame
        ``{"type": "exit", "exit_code": N}``, then a normal close. An error is a text frame
        with the one error body, then close code 1008 (bad request) or 1011 (failure).

        The token comes from ``Authorization: Bearer`` or, for browsers (which cannot set
        headers on a WebSocket), the ``token`` query parameter or the console's session cookie
        (same origin only); it is never logged. A read-only ``viewer`` gets 403.
        """
        await ws.accept()
        try:
            principal = self.authenticator.authenticate(websocket_token(ws))
            principal.require_act("open a terminal")
        except RockError as exc:
            self.auth_failed(ws, exc)
            await _ws_error(ws, exc, 1008)
            return
        set_caller(principal)
        pty_id = uuid.uuid4().hex
        worker: ActorHandle = None
        items: AsyncIterator[Any] | None = None
        try:
            async with self._audited(ws, principal, "pty.open", sandbox_id, status=101):
                cols = _pty_dimension(ws.query_params.get("cols", "80"), "cols")
                rows = _pty_dimension(ws.query_params.get("rows", "24"), "rows")
                worker = await self._worker(sandbox_id)
                items = stream(worker, worker_class().stream_pty, sandbox_id, pty_id, cols, rows)
                await items.__anext__()  # registered: input may flow
        except (RockError, StopAsyncIteration) as exc:
            await _ws_error(ws, exc, 1008)
            if items is not None:
                await items.aclose()  # type: ignore[attr-defined]
            return
        opened = time.perf_counter()
        exit_code: int | None = None
        output = asyncio.ensure_future(_pty_output(ws, items))
        inputs = asyncio.ensure_future(_pty_input(ws, worker, pty_id))
        try:
            done, _ = await asyncio.wait({output, inputs}, return_when=asyncio.FIRST_COMPLETED)
            if output in done:
                code = exit_code = output.result()
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
                await call(worker, worker_class().pty_close, pty_id)
            if self._audit.enabled:
                self._audit.record(
                    AuditEvent(
                        action="pty.close",
                        token_name=principal.name,
                        namespace=principal.namespace,
                        admin=principal.admin,
                        sandbox_id=sandbox_id,
                        status=200,
                        code="ok",
                        duration_ms=round((time.perf_counter() - opened) * 1000, 3),
                        client=ws.client.host if ws.client else None,
                        detail={"exit_code": exit_code},
                    )
                )
