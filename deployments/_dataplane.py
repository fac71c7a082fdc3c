"""The direct data plane: each node's Worker serves its own sandboxes' operations over HTTP.

Data-plane calls (exec, sessions, files, archives, stats, renew) skip the Serve proxy and the
Admin replica: the SDK asks the Admin once per sandbox for a :class:`DataPlaneGrant` (``POST
/v1/sandboxes/{id}/dataplane``: the node's endpoint and a short-lived token scoped to that
sandbox, signed with the cluster secret) and then sends the REST v1 data-plane routes, same
paths and bodies, to the node. The server runs in the Worker actor's own event loop (uvicorn,
started on first use), so a call is one HTTP hop to the process that holds the sandbox's rocklet
handle: no Ray call at all.

- Auth: ``Authorization: Bearer rdp1...`` checked here without a round trip
  (:mod:`rock_serve.dataplane_token`): none, malformed, forged or expired -> 401
  ``unauthorized``; a token of another sandbox -> 403 ``permission_denied``. Errors use the one
  body ``{"error": {"code", "message"}}``.
- Audit: mutating calls are recorded as the Admin records them (same action names, the token's
  name and namespace, ``detail.transport = "direct"``), into the Worker's audit log.
- Binding: ``dataplane.host``/``port`` (default 127.0.0.1 and a free port). This port is the one
  per-node port to open to trainers; Ray's ports stay on loopback / the private network.
- Tracing: every request gets a trace id (the client's ``traceparent``, else new) that reaches
  the rocklet, echoed in ``X-Trace-ID`` with ``X-Request-ID`` (``_trace.TraceMiddleware``).
- Secret: the ``dataplane.secret_env`` variable (same on every node), else one the Scheduler
  makes per cluster start (fetched once; again when a token names another key id).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rock_serve import dataplane_token
from rock_serve.auth import Principal
from rock_serve.config import DataPlaneConfig, ServerArgs
from rock_serve.deployments import _op_routes
from rock_serve.deployments._audit import AuditEvent
from rock_serve.deployments._ops import batch_outcome
from rock_serve.deployments._trace import TraceMiddleware, untraced_task
from rock_serve.errors import (
    InvalidConfig,
    InvalidRequest,
    NotFound,
    RockError,
    TooLarge,
    to_body,
)
from rock_serve.protocol import SessionRunResult
from rock_serve.protocol.dataplane import (
    BatchRunItem,
    BatchRunReply,
    BatchRunRequest,
)
from rock_serve.protocol.ops import OPS, Op

if TYPE_CHECKING:
    from rock_serve.deployments.worker import Worker

__all__ = ["DataPlaneWorker", "cluster_secret", "make_app"]

log = logging.getLogger(__name__)

_JSON = "application/json"
#: Seconds between two secret refreshes asked for by tokens naming an unknown key id.
_REFETCH_EVERY = 5.0


def cluster_secret_from_env(config: DataPlaneConfig) -> bytes | None:
    """The cluster secret from ``config.secret_env``, if that variable is set."""
    value = os.environ.get(config.secret_env, "")
    return value.encode("utf-8") if value else None


async def cluster_secret(args: ServerArgs) -> bytes:
    """The secret data-plane tokens are signed with (env first, else the Scheduler's).

    Raises:
        RuntimeUnavailable: no Scheduler to ask.
    """
    secret = cluster_secret_from_env(args.dataplane)
    if secret is not None:
        return secret
    from rock_serve.deployments._ray import call, get_scheduler
    from rock_serve.deployments.scheduler import Scheduler
    from rock_serve.runtime._sync import run_sync

    scheduler = await run_sync(get_scheduler, args.namespace)
    value: bytes = await call(scheduler, Scheduler.dataplane_secret)
    return value


def _error(exc: BaseException) -> Response:
    status = exc.status if isinstance(exc, RockError) else 500
    if not isinstance(exc, RockError):
        log.exception("data plane: unexpected error", exc_info=exc)
    return Response(json.dumps(to_body(exc)), status_code=status, media_type=_JSON)


def _model(model: BaseModel | None, status: int = 200) -> Response:
    if model is None:
        return Response(status_code=204)
    return Response(model.model_dump_json(), status_code=status, media_type=_JSON)


def _parse(model: type[Any], body: bytes) -> Any:
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequest(f"invalid {model.__name__}: {problems}") from None


class _Server:
    """The data plane of one Worker: token checks, audit and the routes."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._secret: bytes | None = None
        self._kid = ""
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()
        self._tokens = dataplane_token.VerifiedTokens()  # signature checked once per token

    # ------------------------------------------------------------------ auth and audit

    async def _secret_for(self, kid: str | None) -> bytes:
        secret = self._secret
        if secret is not None and kid == self._kid:
            return secret  # the usual case: no lock, no round trip
        async with self._lock:
            stale = self._secret is not None and kid != dataplane_token.key_id(self._secret)
            due = time.monotonic() - self._fetched_at > _REFETCH_EVERY
            if self._secret is None or (stale and due):
                self._secret = await cluster_secret(self.worker.args)
                self._kid = dataplane_token.key_id(self._secret)
                self._fetched_at = time.monotonic()
            return self._secret

    async def claims(
        self, request: Request, sandbox_id: str, token: str | None = None
    ) -> dataplane_token.TokenClaims:
        if token is None:
            header = request.headers.get("authorization", "")
            token = header[7:].strip() if header[:7].lower() == "bearer " else None
        try:
            secret = await self._secret_for(self._tokens.kid(token) if token else None)
            return self._tokens.verify(secret, token, sandbox_id)
        except RockError as exc:
            self._audit_event(
                action="auth",
                token_name="-",
                namespace="-",
                status=exc.status,
                code=exc.code.value,
                client=request.client.host if request.client else None,
                sandbox_id=sandbox_id,
                detail={"transport": "direct", "method": request.method, "path": request.url.path},
            )
            raise

    def _audit_event(self, **fields: Any) -> None:
        audit = self.worker._ray_gate().audit
        if audit.enabled:
            audit.record(AuditEvent(**fields))

    @contextlib.asynccontextmanager
    async def audited(
        self,
        request: Request,
        claims: dataplane_token.TokenClaims,
        action: str,
        **fields: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """One audit event for the block, as the Admin records it (``transport: direct``)."""
        principal = Principal(
            name=claims.token_name, namespace=claims.namespace, admin=claims.admin
        )
        detail = {**fields.pop("detail", {}), "transport": "direct"}
        async with self.worker._ray_gate().audit.scope(
            principal,
            action,
            claims.sandbox_id,
            client=request.client.host if request.client else None,
            detail=detail,
            **fields,
        ) as event:
            yield event

    # ------------------------------------------------------------------ routes

    def route(
        self,
        handler: Callable[[Request, str, dataplane_token.TokenClaims], Awaitable[Response]],
        *,
        limit: Callable[[ServerArgs], int] = lambda args: args.max_request_bytes,
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler: size limit, token check, errors as the one error body."""

        async def endpoint(request: Request) -> Response:
            sandbox_id = str(request.path_params["sandbox_id"])
            try:
                claims = await self.claims(request, sandbox_id)
                length = request.headers.get("content-length")
                if length is not None and length.isdigit():
                    if int(length) > limit(self.worker.args):
                        raise TooLarge(f"request body over {limit(self.worker.args)} bytes")
                return await handler(request, sandbox_id, claims)
            except Exception as exc:
                return _error(exc)

        return endpoint

    async def serve(
        self,
        route: _op_routes.OpRoute,
        request: Request,
        sid: str,
        operation: Op[Any],
        streamed: bool,
        claims: Any,
    ) -> Response:
        """One operation's route (see ``_op_routes``), audited as the Admin audits it."""
        action = route.spec.audit
        if action is None:
            return await _op_routes.serve_op(route, self.worker, sid, operation, streamed)
        fields = _op_routes.audit_fields(operation, streamed)
        detail = fields.pop("detail", {})
        async with self.audited(request, claims, action, **fields, detail=detail) as event:
            return await _op_routes.serve_op(route, self.worker, sid, operation, streamed, event)

    async def renew(self, request: Request, sid: str, claims: Any) -> Response:
        return _model(await self.worker.renew(sid))


async def _batch(server: _Server, request: Request) -> Response:
    """``POST /v1/dataplane/batch``: each item checked with its own token, all run at once."""
    try:
        if len(await request.body()) > server.worker.args.max_request_bytes:
            raise TooLarge(f"request body over {server.worker.args.max_request_bytes} bytes")
        batch: BatchRunRequest = _parse(BatchRunRequest, await request.body())
    except Exception as exc:
        return _error(exc)

    async def one(item: BatchRunItem) -> SessionRunResult:
        claims = await server.claims(request, item.sandbox_id, item.token)
        operation = item.op()
        fields = _op_routes.audit_fields(operation)
        detail = {**fields.pop("detail", {}), "batch": len(batch.items)}
        action = OPS[operation.op].audit or operation.op
        async with server.audited(request, claims, action, **fields, detail=detail):
            return await server.worker.op(item.sandbox_id, operation)

    outcomes = await asyncio.gather(*(batch_outcome(one(item)) for item in batch.items))
    return _model(BatchRunReply(outcomes=list(outcomes)))


async def _ping(request: Request) -> Response:
    return Response(b'{"ok":true}', media_type=_JSON)


async def _not_found(request: Request, exc: Exception) -> Response:
    # Marked so the SDK sends the call to the Admin instead (a route only the Admin has).
    missing = NotFound(f"no data-plane route {request.method} {request.url.path}")
    missing.details["dataplane"] = "no_route"
    return _error(missing)


def make_app(worker: Worker) -> Starlette:
    """The data-plane ASGI app of ``worker`` (REST v1's data-plane routes)."""
    s = _Server(worker)
    sb = "/v1/sandboxes/{sandbox_id}"
    files = {"limit": lambda args: args.max_file_bytes}
    routes = [
        Route("/v1/dataplane/ping", _ping, methods=["GET"]),
        Route("/v1/dataplane/batch", functools.partial(_batch, s), methods=["POST"]),
        Route(f"{sb}/renew", s.route(s.renew), methods=["POST"]),
        # every sandbox operation, from its one route declaration (as the Admin serves it)
        *_op_routes.starlette_routes(
            s.serve, lambda handler, raw: s.route(handler, **(files if raw else {}))
        ),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={404: _not_found, 405: _not_found},
        middleware=[Middleware(TraceMiddleware)],  # one trace id per request, echoed
    )


def _advertised(config: DataPlaneConfig, port: int) -> str:
    host = config.advertise_host or config.host
    if host in ("0.0.0.0", "::", ""):
        import ray

        host = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


class DataPlaneWorker:
    """The Worker's side: the data-plane server, started on first use in the actor's loop."""

    args: ServerArgs

    def _ray_gate(self) -> Any:  # provided by the Worker
        raise NotImplementedError

    def dataplane_address(self) -> str | None:
        """The data plane's base URL if it runs (what a new sandbox's record carries)."""
        state: dict[str, Any] = self.__dict__.get("_dataplane", {})
        endpoint = state.get("endpoint")
        return None if endpoint is None else str(endpoint)

    async def _start_dataplane_at_start(self) -> None:
        """Start the server with the Worker actor (a Worker outside Ray, as in unit tests,
        starts it on first use); a failure is logged (calls then use the Admin path).
        """
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return
        try:
            await self.dataplane_endpoint()
        except Exception:
            log.exception("worker %s: the data plane did not start", getattr(self, "name", "?"))

    async def dataplane_endpoint(self) -> str | None:
        """The base URL of this node's data-plane server (started now if need be); None when
        ``dataplane.enabled`` is false.

        Raises:
            InvalidConfig: the configured address cannot be bound.
        """
        if not self.args.dataplane.enabled:
            return None
        state: dict[str, Any] = self.__dict__.setdefault("_dataplane", {})
        if "endpoint" in state:
            return str(state["endpoint"])
        lock: asyncio.Lock = state.setdefault("lock", asyncio.Lock())
        async with lock:
            if "endpoint" not in state:  # its server's tasks outlive this (traced) call
                await untraced_task(self._start_dataplane(state))
        return str(state["endpoint"])

    async def _start_dataplane(self, state: dict[str, Any]) -> None:
        import uvicorn

        config = self.args.dataplane
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((config.host, config.port))
        except OSError as exc:
            sock.close()
            raise InvalidConfig(
                f"dataplane: cannot bind {config.host}:{config.port}: {exc.strerror}"
            ) from None
        sock.listen(1024)
        sock.setblocking(False)
        server = uvicorn.Server(
            uvicorn.Config(
                make_app(self),  # type: ignore[arg-type]
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_keep_alive=120,
            )
        )
        server.config.load()
        server.lifespan = server.config.lifespan_class(server.config)
        await server.startup(sockets=[sock])
        port = int(sock.getsockname()[1])
        state["server"], state["socket"] = server, sock
        state["endpoint"] = _advertised(config, port)
        log.info("data plane of %s on %s", getattr(self, "name", "?"), state["endpoint"])

    async def _stop_dataplane(self) -> None:
        state: dict[str, Any] = self.__dict__.get("_dataplane", {})
        server = state.pop("server", None)
        state.pop("endpoint", None)
        if server is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await server.shutdown(sockets=[state.pop("socket")])
