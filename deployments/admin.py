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
from fastapi import Path as PathParam
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
from rock_serve.deployments._relays import NDJSON as _NDJSON
from rock_serve.deployments._relays import ndjson as _ndjson
from rock_serve.deployments._relays import pty_dimension as _pty_dimension
from rock_serve.deployments._relays import pty_input as _pty_input
from rock_serve.deployments._relays import pty_output as _pty_output
from rock_serve.deployments._relays import relay as _relay
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
    ExecRequest,
    ExecResult,
    FileInfo,
    FileWritten,
    Health,
    ListDirResult,
    MkdirRequest,
    PtyExit,
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
from rock_serve.protocol.ops import (
    ExecOp,
    FileListOp,
    FileReadOp,
    FileStatOp,
    MkdirOp,
    Op,
    RemoveOp,
    SessionCloseOp,
    SessionCreateOp,
    SessionInterruptOp,
    SessionRunOp,
    SessionStdinOp,
    StatsOp,
    TarDownloadOp,
)

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

SessionName = Annotated[str, PathParam(pattern=SESSION_NAME, description="Session name.")]
LabelFilter = Annotated[str, StringConstraints(pattern=r"^[^=]+=")]
PathQuery = Annotated[str, Query(min_length=1, max_length=4096, description="Path in sandbox.")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": 'Error body `{"error": {"code", "message"}}`.'}
    # Every status the error table can answer (501 not_supported, 502 port_closed, ...).
    for status in sorted({http_status(code) for code in ErrorCode})
}
#: The 200 reply of exec and session run with ``?stream=true``.
_STREAMED: dict[str, Any] = {
    "description": "JSON; with `stream=true` NDJSON: OutputChunk lines, then the result "
    "(or an error body line).",
    "content": {_NDJSON: {"schema": {"type": "string"}}},
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


def _idem(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` (1-128 printable characters), if any."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 128 or not key.isprintable():
        raise InvalidRequest("Idempotency-Key must be 1 to 128 printable characters")
    return key


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

    async def _op(self, sandbox_id: str, operation: Op[R]) -> R:
        """Run one sandbox operation on the Worker that holds the sandbox."""
        return await worker_op(await self._worker(sandbox_id), sandbox_id, operation)

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

    # ---------------------------------------------------------------- commands

    @app.post(
        "/v1/sandboxes/{sandbox_id}/exec",
        response_model=ExecResult,
        responses={200: _STREAMED, **_ERRORS},
    )
    async def exec(
        self,
        sandbox_id: str,
        req: ExecRequest,
        request: Request,
        principal: Auth,
        stream_: bool = Query(
            False, alias="stream", description="Stream NDJSON OutputChunk lines, then the result."
        ),
    ) -> Any:
        """Run one command to completion (optionally streaming its output).

        An ``Idempotency-Key`` header makes a resend safe: the command runs once per key and a
        resend gets the first run's result.
        """
        async with self._audited(
            request,
            principal,
            "exec",
            sandbox_id,
            command=req.command,
            env_keys=sorted(req.env or {}),
            detail={"stream": stream_, "cwd": req.cwd, "stdin_bytes": len(req.stdin or "")},
        ) as event:
            if stream_:
                worker = await self._worker(sandbox_id)
                return await _ndjson(worker_op_stream(worker, sandbox_id, ExecOp.of(req)))
            result = await self._op(sandbox_id, ExecOp.of(req, _idem(request)))
            event["detail"]["exit_code"] = result.exit_code
            return result

    @app.post(
        "/v1/sandboxes/{sandbox_id}/sessions",
        response_model=SessionCreateResponse,
        responses=_ERRORS,
    )
    async def create_session(
        self, sandbox_id: str, req: SessionCreateRequest, request: Request, principal: Auth
    ) -> SessionCreateResponse:
        """Start a persistent bash session."""
        async with self._audited(
            request,
            principal,
            "session.create",
            sandbox_id,
            session=req.session,
            command="\n".join(req.startup_commands) if req.startup_commands else None,
            env_keys=sorted(req.env or {}),
        ):
            result = await self._op(sandbox_id, SessionCreateOp.of(req))
        return result

    @app.post(
        "/v1/sandboxes/{sandbox_id}/sessions/{session}/run",
        response_model=SessionRunResult,
        responses={200: _STREAMED, **_ERRORS},
    )
    async def run_in_session(
        self,
        sandbox_id: str,
        session: SessionName,
        body: SessionRunBody,
        request: Request,
        principal: Auth,
        stream_: bool = Query(False, alias="stream", description="Stream NDJSON output."),
    ) -> Any:
        """Run a command in a session (cwd, env and functions persist).

        An ``Idempotency-Key`` header makes a resend safe (see ``exec``).
        """
        req = SessionRunRequest(session=session, **body.model_dump())
        async with self._audited(
            request,
            principal,
            "session.run",
            sandbox_id,
            session=session,
            command=body.command,
            detail={"stream": stream_},
        ) as event:
            if stream_:
                worker = await self._worker(sandbox_id)
                return await _ndjson(worker_op_stream(worker, sandbox_id, SessionRunOp.of(req)))
            result = await self._op(sandbox_id, SessionRunOp.of(req, _idem(request)))
            event["detail"]["exit_code"] = result.exit_code
            return result

    @app.post(
        "/v1/sandboxes/{sandbox_id}/sessions/{session}/stdin", status_code=204, responses=_ERRORS
    )
    async def session_stdin(
        self,
        sandbox_id: str,
        session: SessionName,
        body: SessionStdinBody,
        request: Request,
        principal: Auth,
    ) -> Response:
        """Write to the stdin of the command running in a session."""
        data = body.data.encode()
        async with self._audited(
            request,
            principal,
            "session.stdin",
            sandbox_id,
            status=204,
            session=session,
            detail={"bytes": len(data), "eof": body.eof},  # never the data: it may be a secret
        ):
            await self._op(
                sandbox_id, SessionStdinOp(session=session, data=body.data, eof=body.eof)
            )
        return Response(status_code=204)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/sessions/{session}/interrupt",
        status_code=204,
        responses=_ERRORS,
    )
    async def interrupt_session(
        self, sandbox_id: str, session: SessionName, request: Request, principal: Auth
    ) -> Response:
        """Interrupt (SIGINT) the command running in a session."""
        async with self._audited(
            request, principal, "session.interrupt", sandbox_id, status=204, session=session
        ):
            await self._op(sandbox_id, SessionInterruptOp(session=session))
        return Response(status_code=204)

    @app.delete("/v1/sandboxes/{sandbox_id}/sessions/{session}", status_code=204, responses=_ERRORS)
    async def close_session(
        self, sandbox_id: str, session: SessionName, request: Request, principal: Auth
    ) -> Response:
        """Close a session and kill its processes."""
        async with self._audited(
            request, principal, "session.close", sandbox_id, status=204, session=session
        ):
            await self._op(sandbox_id, SessionCloseOp(session=session))
        return Response(status_code=204)

    # ---------------------------------------------------------------- files

    @app.get(
        "/v1/sandboxes/{sandbox_id}/files",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, **_ERRORS},
    )
    async def read_file(self, sandbox_id: str, path: PathQuery, principal: Auth) -> Response:
        """A file's raw bytes, streamed (any size)."""
        worker = await self._worker(sandbox_id)
        return await _relay(
            worker_op_stream(worker, sandbox_id, FileReadOp(path=path)), "application/octet-stream"
        )

    @app.put("/v1/sandboxes/{sandbox_id}/files", response_model=FileWritten, responses=_ERRORS)
    async def write_file(
        self,
        sandbox_id: str,
        request: Request,
        path: PathQuery,
        principal: Auth,
        mode: Annotated[
            str | None, Query(pattern=r"^[0-7]{1,4}$", description="Octal bits, e.g. 644.")
        ] = None,
    ) -> FileWritten:
        """Write a file atomically from the raw request body (up to ``max_file_bytes``)."""
        async with self._audited(
            request, principal, "file.write", sandbox_id, path=path, detail={"mode": mode}
        ) as event:
            written = await self._upload(sandbox_id, request, "file", path, _parse_mode(mode))
            event["detail"]["bytes"] = written
        return FileWritten(path=path, size=written)

    async def _upload(
        self, sandbox_id: str, request: Request, kind: str, path: str, mode: int | None = None
    ) -> int:
        """Send the request body to the Worker (see ``_relays.upload``)."""
        limit = self.args.max_file_bytes
        return await _relays.upload(self._worker, limit, sandbox_id, request, kind, path, mode)

    @app.get(
        "/v1/sandboxes/{sandbox_id}/archive",
        response_class=Response,
        responses={200: {"content": {"application/x-tar": {}}}, **_ERRORS},
    )
    async def download_archive(self, sandbox_id: str, path: PathQuery, principal: Auth) -> Response:
        """An uncompressed tar of a file or directory, streamed (any size)."""
        worker = await self._worker(sandbox_id)
        items = worker_op_stream(worker, sandbox_id, TarDownloadOp(path=path))
        return await _relay(items, "application/x-tar")

    @app.put("/v1/sandboxes/{sandbox_id}/archive", status_code=204, responses=_ERRORS)
    async def upload_archive(
        self, sandbox_id: str, request: Request, path: PathQuery, principal: Auth
    ) -> Response:
        """Extract a tar (plain or compressed) from the request body into directory ``path``."""
        async with self._audited(
            request, principal, "archive.upload", sandbox_id, status=204, path=path
        ) as event:
            event["detail"]["bytes"] = await self._upload(sandbox_id, request, "archive", path)
        return Response(status_code=204)

    @app.get("/v1/sandboxes/{sandbox_id}/files/stat", response_model=FileInfo, responses=_ERRORS)
    async def stat(self, sandbox_id: str, path: PathQuery, principal: Auth) -> FileInfo:
        """Stat a path (symlinks are not followed)."""
        return await self._op(sandbox_id, FileStatOp(path=path))

    @app.get(
        "/v1/sandboxes/{sandbox_id}/files/list", response_model=ListDirResult, responses=_ERRORS
    )
    async def list_dir(self, sandbox_id: str, path: PathQuery, principal: Auth) -> ListDirResult:
        """List a directory."""
        return await self._op(sandbox_id, FileListOp(path=path))

    @app.post("/v1/sandboxes/{sandbox_id}/files/mkdir", status_code=204, responses=_ERRORS)
    async def mkdir(
        self, sandbox_id: str, req: MkdirRequest, request: Request, principal: Auth
    ) -> Response:
        """Create a directory."""
        async with self._audited(
            request, principal, "file.mkdir", sandbox_id, status=204, path=req.path
        ):
            await self._op(sandbox_id, MkdirOp.model_validate(req.model_dump()))
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/files/remove", status_code=204, responses=_ERRORS)
    async def remove_path(
        self, sandbox_id: str, req: RemoveRequest, request: Request, principal: Auth
    ) -> Response:
        """Remove a file, or a directory with ``recursive``."""
        async with self._audited(
            request,
            principal,
            "file.remove",
            sandbox_id,
            status=204,
            path=req.path,
            detail={"recursive": req.recursive},
        ):
            await self._op(sandbox_id, RemoveOp.model_validate(req.model_dump()))
        return Response(status_code=204)

    @app.get("/v1/sandboxes/{sandbox_id}/stats", response_model=SandboxStats, responses=_ERRORS)
    async def stats(self, sandbox_id: str, principal: Auth) -> SandboxStats:
        """CPU, memory and process usage and limits of a sandbox."""
        return await self._op(sandbox_id, StatsOp())

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
