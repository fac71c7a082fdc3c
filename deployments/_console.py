"""The web console (issue 17): pages at ``/ui``, their JSON/SSE feeds, request ids, samples.

What lives here:

- ``GET /ui/`` and ``/ui/static/*``: the single-page app shipped in ``rock_serve/ui`` (no CDN;
  xterm.js is vendored). The page itself needs no token; everything it shows does.
- ``POST /ui/api/login``: checks a token and keeps it in an ``HttpOnly``, ``SameSite=Strict``
  cookie, plus a readable CSRF cookie. The same cookie authenticates REST v1 and the pty
  WebSocket (see :func:`~rock_serve.deployments._auth.check_cookie_request`: same origin, and
  state-changing calls must repeat the CSRF cookie in ``X-CSRF-Token``).
- ``GET /ui/api/events``: server-sent events of the sandbox table (a snapshot, then only the
  rows that changed), polled from the Scheduler once per ``events_interval_seconds`` per open
  page, limited to what the caller may see.
- ``GET /ui/api/metrics``: the last hour of in-process samples (sandboxes by state, requests,
  errors by status, 429s, create and data-plane latency), taken by this replica; with several
  Admin replicas each page sees the replica it reached (Prometheus has the sums).
- :class:`RequestContext`: ASGI middleware that gives every request an id (``X-Request-ID``,
  echoed; a valid incoming one is kept) and a W3C trace id (from ``traceparent`` or new),
  writes both in a structured log line for failed calls, feeds the samples, and exports an
  OpenTelemetry span when ``tracing.otlp_endpoint`` is set and the package is installed.
"""

# No "from __future__ import annotations": FastAPI must see the real types of the routes.

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from rock_serve.auth import Principal
from rock_serve.deployments._auth import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    Auth,
    same_origin,
)
from rock_serve.deployments._ray import ActorHandle, call
from rock_serve.deployments._trace import (
    SPAN_ID,
    SPANS,
    TRACE_ID,
    install_logging,
    request_ids,
    untraced_task,
    with_ids,
)
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.errors import NotFound, PermissionDenied, RockError
from rock_serve.protocol import (
    ConsoleEvent,
    ConsoleMetrics,
    ConsoleRow,
    ConsoleUser,
    ConsoleWorkers,
    EnvInstance,
    EnvInstances,
    Health,
    LoginRequest,
    MetricsSample,
    SandboxList,
    WorkerStatus,
)

__all__ = [
    "ReapDeltas",
    "REQUEST_ID",
    "TRACE_ID",
    "RequestContext",
    "Samples",
    "install",
    "router",
]

log = logging.getLogger("rock_serve.requests")

#: The current request's id and trace id (also in every structured log line of the request).
REQUEST_ID: ContextVar[str] = ContextVar("rock_request_id", default="-")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_CREATE = re.compile(r"/v1/sandboxes$")
_OP = re.compile(r"/v1/sandboxes/[^/]+/.+")
_MEDIA = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
#: No inline script, nothing from elsewhere; xterm.js writes inline styles.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: Seconds the session cookie lives (the token itself may be revoked sooner).
_SESSION_SECONDS = 12 * 3600
#: Seconds between SSE keep-alive comments when nothing changes.
_KEEPALIVE_SECONDS = 15.0

router = APIRouter(prefix="/ui", include_in_schema=False)


# ----------------------------------------------------------------------------- samples


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Samples:
    """The last hour of this replica's platform metrics, one sample per interval.

    The middleware calls :meth:`request` for each finished request; a background task calls
    :meth:`take` each interval with the sandboxes counted by state.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.time) -> None:
        self.interval = interval
        self._clock = clock
        self._points: deque[MetricsSample] = deque(maxlen=max(1, int(3600 / interval)))
        self._reset()
        self._since = clock()

    def _reset(self) -> None:
        self._requests = 0
        self._errors: dict[str, int] = {}
        self._create: list[float] = []
        self._op: list[float] = []

    def request(self, path: str, method: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        self._requests += 1
        if status >= 400:
            self._errors[str(status)] = self._errors.get(str(status), 0) + 1
        if method == "POST" and _CREATE.search(path) and status < 400:
            self._create.append(seconds)
        elif _OP.search(path) and status < 400:
            self._op.append(seconds)

    def take(
        self,
        sandboxes: dict[str, int],
        reaped: dict[str, int] | None = None,
        processes: int | None = None,
    ) -> MetricsSample:
        """Close the interval: one sample of what happened since the last (``reaped``: the
        interval's reaps by reason, see :class:`ReapDeltas`; ``processes``: background
        processes running, summed over the Workers).
        """
        now = self._clock()
        sample = MetricsSample(
            t=now,
            interval=round(now - self._since, 3),
            sandboxes=dict(sandboxes),
            requests=self._requests,
            errors=dict(self._errors),
            rate_limited=self._errors.get("429", 0),
            create_p50=_quantile(self._create, 0.5),
            create_p99=_quantile(self._create, 0.99),
            op_p50=_quantile(self._op, 0.5),
            op_p99=_quantile(self._op, 0.99),
            reaped=dict(reaped or {}),
            processes_running=processes,
        )
        self._points.append(sample)
        self._since = now
        self._reset()
        return sample

    def series(self) -> ConsoleMetrics:
        """Every kept sample, oldest first."""
        return ConsoleMetrics(interval_seconds=self.interval, samples=list(self._points))


class ReapDeltas:
    """Turns each Worker's reap counts since it started into the reaps of one interval.

    A Worker seen for the first time counts from zero; one whose counts went down (its actor
    restarted) counts from its new totals.
    """

    def __init__(self) -> None:
        self._last: dict[str, dict[str, int]] = {}

    def step(self, workers: list[WorkerStatus]) -> dict[str, int]:
        """Reaps by reason since the previous step, summed over ``workers``."""
        delta: dict[str, int] = {}
        for worker in workers:
            before = self._last.get(worker.name, {})
            restarted = any(worker.reaped.get(r, 0) < n for r, n in before.items())
            for reason, n in worker.reaped.items():
                d = n if restarted else n - before.get(reason, 0)
                if d > 0:
                    delta[reason] = delta.get(reason, 0) + d
            self._last[worker.name] = dict(worker.reaped)
        return delta


# ----------------------------------------------------------------------------- request ids


def _new_trace(headers: dict[str, str]) -> tuple[str, str]:
    """(request id, trace id) of a request: kept from its headers when valid, else new.

    Behind the Serve proxy the request always has an ``x-request-id`` (the client's, or one
    the proxy made), which the proxy also echoes; Serve's own logs carry it too.
    """
    request_id, trace_id, _ = request_ids(headers)
    return request_id, trace_id


class _Tracer:
    """The Admin's spans: this process's :data:`~rock_serve._tracing.SPANS` (one home), whose
    request spans are the parents of the Scheduler's, the Worker's and the rocklet calls'.
    """

    def configure(self, endpoint: str | None, service: str) -> None:
        SPANS.configure(endpoint, service)

    def flush(self) -> None:
        """Export the spans still buffered (blocks; tests and shutdown)."""
        SPANS.flush()

    @contextlib.contextmanager
    def span(self, name: str, trace_id: str, attributes: dict[str, Any]) -> Any:
        """A span of the request (the trace id is already :data:`TRACE_ID`); it is the current
        span (:data:`SPAN_ID`) for the request's calls.
        """
        with SPANS.span(name, attributes) as span:
            yield span


_TRACER = _Tracer()
#: This process's samples (one per Admin replica process), made on first use.
_STATE: dict[str, Any] = {}


def _samples(interval: float = 10.0) -> Samples:
    samples: Samples | None = _STATE.get("samples")
    if samples is None or samples.interval != interval:
        samples = _STATE["samples"] = Samples(interval)
    return samples


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class RequestContext:
    """ASGI middleware: request and trace ids (echoed and logged), samples, optional spans."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        install_logging()  # this process's rock_serve log lines carry trace=<id>

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        request_id, trace_id, parent_span = request_ids(headers)
        REQUEST_ID.set(request_id)
        TRACE_ID.set(trace_id)
        SPAN_ID.set(parent_span or "-")  # the client's span: parent of the request's
        scope.setdefault("state", {})["request_id"] = request_id
        scope["state"]["trace_id"] = trace_id
        if scope["type"] == "websocket":  # the accept carries the ids (the pty WebSocket)
            echo = None if headers.get("x-request-id") == request_id else request_id

            async def accept_with_ids(message: MutableMapping[str, Any]) -> None:
                await send(with_ids(message, trace_id, echo))

            await self.app(scope, receive, accept_with_ids)
            return
        started = time.perf_counter()
        status = 500
        extra = [(b"x-trace-id", trace_id.encode())]
        if headers.get("x-request-id") != request_id:  # no proxy echoes it: we do
            extra.append((b"x-request-id", request_id.encode()))

        async def send_with_ids(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        method, path = scope.get("method", "GET"), scope.get("path", "")
        with _TRACER.span(f"{method} {path}", trace_id, {"http.method": method}) as span:
            try:
                await self.app(scope, receive, send_with_ids)
            finally:
                seconds = time.perf_counter() - started
                _samples(_STATE.get("interval", 10.0)).request(path, method, status, seconds)
                if span is not None:
                    span.set_attribute("http.status_code", status)
                    span.set_attribute("rock.request_id", request_id)
                if status >= 400 or (method == "POST" and _CREATE.search(path)):
                    log.info(
                        json.dumps(
                            {
                                "event": "request",
                                "request_id": request_id,
                                "trace_id": trace_id,
                                "method": method,
                                "path": path,
                                "status": status,
                                "ms": round(seconds * 1000, 3),
                            }
                        )
                    )


# ----------------------------------------------------------------------------- helpers


def _admin() -> Any:
    """The Admin of this replica (its authenticator, Scheduler handle and args)."""
    from ray import serve

    return serve.get_replica_context().servable_object


def _enabled() -> None:
    """Refuse console routes when ``console.enabled`` is false.

    Raises:
        NotFound: the console is switched off.
    """
    if not _admin().args.console.enabled:
        raise NotFound("the web console is disabled (console.enabled: false)")


def _scheduler() -> ActorHandle:
    return _admin()._scheduler


def _user(principal: Principal, required: bool) -> ConsoleUser:
    return ConsoleUser(
        name=principal.name,
        namespace=principal.namespace,
        role=principal.role,
        may_act=principal.may_act,
        all_namespaces=principal.all_namespaces,
        auth_required=required,
    )


def _cookie_path(request: Request) -> str:
    return (request.scope.get("root_path") or "") + "/"


def _start_sampler() -> None:
    """Start this replica's sampler (once), counting every namespace's sandboxes by state."""
    task: asyncio.Task[None] | None = _STATE.get("sampler")
    if task is not None and not task.done():
        return
    admin = _admin()
    interval = float(admin.args.console.sample_interval_seconds)
    _STATE["interval"] = interval
    _TRACER.configure(admin.args.tracing.otlp_endpoint, admin.args.tracing.service_name)
    samples = _samples(interval)
    scheduler = admin._scheduler

    reaps = ReapDeltas()

    async def loop() -> None:
        while True:
            reaped: dict[str, int] = {}
            processes: int | None = None
            with contextlib.suppress(RockError):
                health: Health = await call(scheduler, Scheduler.health)
                reaped = reaps.step(health.workers)
                processes = sum(w.processes_running for w in health.workers if w.alive)
            by_ns: dict[str, dict[str, int]] = {}
            with contextlib.suppress(RockError):
                result: SandboxList = await call(scheduler, Scheduler.list, None, None, {}, None)
                for record in result.items:
                    states = by_ns.setdefault(record.namespace, {})
                    states[record.state.value] = states.get(record.state.value, 0) + 1
            _STATE["by_namespace"] = by_ns
            totals: dict[str, int] = {}
            for states in by_ns.values():
                for state, n in states.items():
                    totals[state] = totals.get(state, 0) + n
            samples.take(totals, reaped, processes)
            await asyncio.sleep(interval)

    _STATE["sampler"] = untraced_task(loop())  # started by a request: not under its trace


def _static(name: str) -> Response:
    suffix = name[name.rfind(".") :] if "." in name else ""
    folder = resources.files("rock_serve.ui")
    parts = name.split("/")
    if suffix not in _MEDIA and not name.startswith("vendor/LICENSE"):
        raise NotFound(f"no console file {name!r}")
    if any(not p or p.startswith(".") for p in parts) or len(parts) > 2:
        raise NotFound(f"no console file {name!r}")
    file = folder.joinpath(*parts)
    if not file.is_file():
        raise NotFound(f"no console file {name!r}")
    return Response(
        file.read_bytes(),
        media_type=_MEDIA.get(suffix, "text/plain; charset=utf-8"),
        headers={
            "Content-Security-Policy": _CSP,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )


# ----------------------------------------------------------------------------- pages


@router.get("")
async def ui_root(request: Request) -> RedirectResponse:
    """``/ui`` -> ``/ui/`` (the page's relative links need the slash)."""
    return RedirectResponse((request.scope.get("root_path") or "") + "/ui/", status_code=307)


@router.get("/")
async def ui_index() -> Response:
    """The console's single page."""
    _enabled()
    _start_sampler()
    return _static("index.html")


@router.get("/static/{name:path}")
async def ui_static(name: str) -> Response:
    """A bundled asset (the app, its styles, vendored xterm.js and its licence)."""
    _enabled()
    return _static(name)


# ----------------------------------------------------------------------------- session


@router.post("/api/login", response_model=ConsoleUser)
async def ui_login(body: LoginRequest, request: Request) -> JSONResponse:
    """Check a token and keep it in the session cookie (``HttpOnly``, ``SameSite=Strict``).

    Raises:
        Unauthorized: the token is not valid (401).
        PermissionDenied: a cross-origin login (403).
    """
    _enabled()
    if not same_origin(request):
        raise PermissionDenied("cross-origin login")
    admin = _admin()
    try:
        principal: Principal = admin.authenticator.authenticate(body.token)
    except RockError as exc:
        admin.auth_failed(request, exc)
        raise
    response = JSONResponse(_user(principal, admin.authenticator.required).model_dump())
    secure = request.url.scheme == "https"
    path = _cookie_path(request)
    response.set_cookie(
        SESSION_COOKIE,
        body.token,
        max_age=_SESSION_SECONDS,
        path=path,
        httponly=True,
        samesite="strict",
        secure=secure,
    )
    response.set_cookie(
        CSRF_COOKIE,
        secrets.token_urlsafe(24),
        max_age=_SESSION_SECONDS,
        path=path,
        httponly=False,
        samesite="strict",
        secure=secure,
    )
    return response


@router.post("/api/logout", status_code=204)
async def ui_logout(request: Request) -> Response:
    """Forget the session cookies."""
    response = Response(status_code=204)
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        response.delete_cookie(name, path=_cookie_path(request))
    return response


@router.get("/api/me", response_model=ConsoleUser)
async def ui_me(principal: Auth) -> ConsoleUser:
    """Who is logged in (401 when nobody is: the page then shows its login form)."""
    _start_sampler()
    return _user(principal, _admin().authenticator.required)


# ----------------------------------------------------------------------------- feeds


def _visible(principal: Principal) -> str | None:
    return None if principal.all_namespaces else principal.namespace


def _sse(event: ConsoleEvent) -> bytes:
    return f"id: {event.seq}\nevent: table\ndata: {event.model_dump_json()}\n\n".encode()


@router.get("/api/events")
async def ui_events(request: Request, principal: Auth) -> StreamingResponse:
    """Server-sent events of the sandbox table the caller may see (see :class:`ConsoleEvent`)."""
    scheduler = _scheduler()
    interval = float(_admin().args.console.events_interval_seconds)
    only = _visible(principal)

    async def body() -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        known: dict[str, ConsoleRow] = {}
        seq = 0
        quiet_since = time.monotonic()
        while not await request.is_disconnected():
            try:
                result: SandboxList = await call(scheduler, Scheduler.list, None, None, {}, only)
            except RockError as exc:
                yield f"event: problem\ndata: {json.dumps(str(exc))}\n\n".encode()
                await asyncio.sleep(interval)
                continue
            rows = {r.id: ConsoleRow.of(r) for r in result.items}
            upsert = [row for rid, row in rows.items() if known.get(rid) != row]
            remove = [rid for rid in known if rid not in rows]
            known = rows
            if seq == 0 or upsert or remove:
                seq += 1
                event = ConsoleEvent(
                    seq=seq, snapshot=seq == 1, at=time.time(), upsert=upsert, remove=remove
                )
                yield _sse(event)
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > _KEEPALIVE_SECONDS:
                yield b": keep-alive\n\n"
                quiet_since = time.monotonic()
            await asyncio.sleep(interval)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/api/metrics", response_model=ConsoleMetrics)
async def ui_metrics(principal: Auth) -> ConsoleMetrics:
    """The last hour of samples; a tenant's ``sandboxes`` counts only its namespace."""
    _start_sampler()
    series = _samples(_STATE.get("interval", 10.0)).series()
    if principal.all_namespaces:
        return series
    # A tenant sees the platform's rates, and only its own namespace's sandbox counts (now).
    mine = _STATE.get("by_namespace", {}).get(principal.namespace, {})
    samples = [
        s.model_copy(update={"sandboxes": {}, "reaped": {}, "processes_running": None})
        for s in series.samples
    ]
    if samples:
        samples[-1] = samples[-1].model_copy(update={"sandboxes": dict(mine)})
    return ConsoleMetrics(interval_seconds=series.interval_seconds, samples=samples)


@router.get("/api/workers", response_model=ConsoleWorkers)
async def ui_workers(principal: Auth) -> ConsoleWorkers:
    """Workers (capacity, warm pools), the admission queue and the 429 rate."""
    scheduler = _scheduler()
    health: Health = await call(scheduler, Scheduler.health)
    admission: dict[str, int] = await call(scheduler, Scheduler.admission)
    series = _samples(_STATE.get("interval", 10.0)).series().samples
    rate = series[-1].rate_limited / max(series[-1].interval, 1e-9) if series else 0.0
    return ConsoleWorkers(
        status=health.status,
        workers=health.workers if principal.all_namespaces else [],
        queued=admission["queued"],
        in_flight=admission["in_flight"],
        rate_limited_per_second=round(rate, 3),
    )


@router.get("/api/envs", response_model=EnvInstances)
async def ui_envs(principal: Auth) -> EnvInstances:
    """Open GEM env instances the caller may see."""
    from rock_serve.deployments import _gem

    table = await _gem.env_table()
    rows: list[dict[str, Any]] = await call(table, _gem.EnvTable.describe, principal)
    return EnvInstances(items=[EnvInstance(**row) for row in rows])


def install(app: FastAPI) -> None:
    """Add the console's routes and the request-id middleware to the Admin's app."""
    from rock_serve.deployments import _console_envs

    app.include_router(router)
    app.include_router(_console_envs.router)
    app.add_middleware(RequestContext)
