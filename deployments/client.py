"""The SDK's Ray transport: the plain SDK client, its calls sent to the platform's actors.

Inside a Ray job or actor on the cluster that runs the platform (same Ray version),
``AsyncClient.from_ray(namespace=...)`` / ``Client.from_ray(...)`` return the ordinary SDK
client over :class:`AsyncRayTransport` / :class:`SyncRayTransport` instead of HTTP: every method,
its typed errors and its retry policy are the SDK's own; only how one call travels differs.

- A sandbox operation (its call carries the model, ``Call.op``) goes to the sandbox's Worker as
  the model itself: ``Worker.ray_op`` / ``ray_op_stream`` (no REST encoding, no parsing back).
- Every other call is mapped by its route to one Scheduler or Worker method (:data:`ROUTES`, one
  table): create, get, list, delete, renew, fork, pause/resume, snapshots, health, background
  processes. A call the table does not map needs HTTP (a typed ``invalid_request``).

The reply is the value itself, held in a :class:`~rock_serve.sdk._base.Held` response that the
SDK's parser takes as it is; a streamed one is the Admin's NDJSON; an actor's typed error is
raised as is (the client retries it by its policy).

Auth and audit: the transport carries the caller's platform token (``ROCK_TOKEN``, else the
credentials file, as the HTTP SDK finds it) and calls the actors' Ray-transport entry points
(``Scheduler.ray_call``, ``Worker.ray_op``/``ray_op_stream``, ``Worker.ray_call``/``ray_stream``),
which check it as the Admin does and audit as HTTP is audited (see ``_raygate``). The platform's
own routes (compat, GEM) use ``gate=False``: they authenticated their caller themselves.

Sandboxes created through it are owned by the calling Ray job (``ray_job_id``), so the platform
reaps them when that job's driver dies. The sync transport blocks in ``ray.get`` on the
caller's thread (no event loop, no thread of its own); streams use Ray's streaming generators.

This module lives in ``deployments/`` because only ``deployments/`` imports Ray; the SDK finds
it through the ``rock_serve.sdk.transports`` entry point (``ray``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import unquote

import httpx
import ray
from pydantic import ValidationError

from rock_serve.deployments._ops import OpsWorker
from rock_serve.deployments._ray import (
    _RAY_ERRORS,
    ActorHandle,
    WorkerHandles,
    _translate,
    call,
    current_job_id,
    get_scheduler,
    stream,
    worker_actor_name,
)
from rock_serve.deployments._trace import TRACE_ID, new_trace_id, traced
from rock_serve.errors import (
    InternalError,
    InvalidRequest,
    RockError,
    SandboxNotFound,
    from_body,
    from_validation,
    to_body,
)
from rock_serve.protocol import CreateSandboxRequest, SandboxState, SessionRunResult
from rock_serve.protocol.api import SANDBOX_ID
from rock_serve.protocol.dataplane import BatchRunItem, BatchRunOutcome
from rock_serve.protocol.fork import ForkRequest
from rock_serve.protocol.llm import LLMAnswer, LLMCallList, LLMPollRequest, LLMRelease
from rock_serve.protocol.ops import Op
from rock_serve.protocol.processes import ProcessInputBody, ProcessSignalBody, ProcessStartRequest
from rock_serve.protocol.snapshot import SnapshotList, SnapshotRequest
from rock_serve.sdk import _base
from rock_serve.sdk._async import AsyncClient
from rock_serve.sdk._async_transport import AsyncTransport
from rock_serve.sdk._sync import Client
from rock_serve.sdk._sync_transport import Transport

__all__ = [
    "DEFAULT_NAMESPACE",
    "ROUTES",
    "ActorCall",
    "AsyncRayTransport",
    "SyncRayTransport",
    "actor_call",
    "entry",
    "platform_client",
    "ray_client",
    "route",
]

#: The Ray namespace of the platform's actors when ``ServerArgs.namespace`` is not set.
DEFAULT_NAMESPACE = "rock-serve"

_ID = re.compile(SANDBOX_ID)
C = TypeVar("C")


def _worker_of(sandbox_id: str) -> str:
    if not _ID.match(sandbox_id):
        raise SandboxNotFound(f"no sandbox {sandbox_id!r} (malformed id)")
    return sandbox_id.split("-")[1]


# ---------------------------------------------------------------------------------------------
# One table: a non-operation REST call -> one actor method


@dataclass(frozen=True)
class ActorCall:
    """One actor call a REST call stands for."""

    #: The sandbox whose Worker is called; None: the Scheduler.
    sandbox: str | None
    method: str
    args: tuple[Any, ...]
    #: An async-generator method whose items make an NDJSON reply.
    streams: bool = False
    #: Turns the method's return value into what the SDK parses (e.g. a list into its model).
    wrap: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class _Ctx:
    tenant: str
    job_owned: bool


_Build = Callable[[_Ctx, dict[str, str], _base.Call], ActorCall]


def _params(call: _base.Call) -> dict[str, str]:
    return dict(call.params)


def _create(ctx: _Ctx, seg: dict[str, str], c: _base.Call) -> ActorCall:
    request = CreateSandboxRequest.model_validate(c.json)
    if ctx.job_owned and request.ray_job_id is None:
        request = request.model_copy(update={"ray_job_id": current_job_id()})
    return ActorCall(None, "create", (request, ctx.tenant))


def _list(ctx: _Ctx, seg: dict[str, str], c: _base.Call) -> ActorCall:
    owner, state, labels = None, None, {}
    for key, value in c.params:
        if key == "owner":
            owner = value
        elif key == "state":
            state = SandboxState(value)
        elif key == "label":
            name, _, label = value.partition("=")
            labels[name] = label
    return ActorCall(None, "list", (owner, state, labels))


def _sb(seg: dict[str, str]) -> str:
    sandbox_id = seg["sandbox_id"]
    _worker_of(sandbox_id)
    return sandbox_id


def _proc(method: str, *, body: type[Any] | None = None) -> _Build:
    """A background-process route: ``Worker.<method>(sandbox_id, pid, [body])``."""

    def build(ctx: _Ctx, seg: dict[str, str], c: _base.Call) -> ActorCall:
        args: tuple[Any, ...] = (int(seg["pid"]),)
        if body is not None:
            args += (body.model_validate(c.json),)
        return ActorCall(_sb(seg), method, args)

    return build


def _output(ctx: _Ctx, seg: dict[str, str], c: _base.Call) -> ActorCall:
    p = _params(c)
    args = (int(seg["pid"]), p.get("stream", "stdout"), int(p.get("offset", "0")))
    follow = p.get("follow", "false") == "true"
    return ActorCall(_sb(seg), "stream_process_output", (*args, follow), streams=True)


def _llm_poll(ctx: _Ctx, seg: dict[str, str], c: _base.Call) -> ActorCall:
    """A long poll, bounded as the Admin's (``wait`` and ``max_calls`` of LLMPollRequest)."""
    sandbox_id = _sb(seg)
    bounds = {k: v for k, v in _params(c).items() if k in ("wait", "max_calls")}
    poll = LLMPollRequest.model_validate({"sandbox_ids": [sandbox_id], **bounds})
    args = (poll.wait, poll.max_calls)
    return ActorCall(sandbox_id, "llm_poll", args, wrap=lambda calls: LLMCallList(calls=calls))


_S = "/v1/sandboxes/{sandbox_id}"
_P = _S + "/processes/{pid}"

#: (method, path template) -> how that REST call becomes an actor call.
ROUTES: dict[tuple[str, str], _Build] = {
    ("GET", "/v1/health"): lambda ctx, seg, c: ActorCall(None, "health", ()),
    ("POST", "/v1/sandboxes"): _create,
    ("GET", "/v1/sandboxes"): _list,
    ("DELETE", "/v1/sandboxes"): lambda ctx, seg, c: ActorCall(
        None, "delete_by_token", (_params(c)["client_token"], ctx.tenant)
    ),
    ("GET", _S): lambda ctx, seg, c: ActorCall(None, "get", (_sb(seg),)),
    ("DELETE", _S): lambda ctx, seg, c: ActorCall(None, "delete", (_sb(seg),)),
    ("POST", _S + "/renew"): lambda ctx, seg, c: ActorCall(_sb(seg), "renew", ()),
    ("POST", _S + "/fork"): lambda ctx, seg, c: ActorCall(
        None, "fork", (_sb(seg), ForkRequest.model_validate(c.json), ctx.tenant)
    ),
    ("POST", _S + "/pause"): lambda ctx, seg, c: ActorCall(None, "pause", (_sb(seg), ctx.tenant)),
    ("POST", _S + "/resume"): lambda ctx, seg, c: ActorCall(None, "resume", (_sb(seg), ctx.tenant)),
    ("POST", _S + "/snapshot"): lambda ctx, seg, c: ActorCall(
        None, "snapshot", (_sb(seg), SnapshotRequest.model_validate(c.json or {}), ctx.tenant)
    ),
    ("GET", "/v1/snapshots"): lambda ctx, seg, c: ActorCall(
        None, "snapshots", (ctx.tenant,), wrap=lambda items: SnapshotList(items=items)
    ),
    ("GET", "/v1/snapshots/{snapshot_id}"): lambda ctx, seg, c: ActorCall(
        None, "get_snapshot", (seg["snapshot_id"], ctx.tenant)
    ),
    ("DELETE", "/v1/snapshots/{snapshot_id}"): lambda ctx, seg, c: ActorCall(
        None, "delete_snapshot", (seg["snapshot_id"], ctx.tenant)
    ),
    ("POST", _S + "/processes"): lambda ctx, seg, c: ActorCall(
        _sb(seg), "start_process", (ProcessStartRequest.model_validate(c.json),)
    ),
    ("GET", _S + "/processes"): lambda ctx, seg, c: ActorCall(_sb(seg), "list_processes", ()),
    ("GET", _P): _proc("process_status"),
    ("DELETE", _P): _proc("kill_process"),
    ("GET", _P + "/output"): _output,
    ("POST", _P + "/input"): _proc("process_input", body=ProcessInputBody),
    ("POST", _P + "/signal"): _proc("signal_process", body=ProcessSignalBody),
    ("POST", _P + "/wait"): lambda ctx, seg, c: ActorCall(
        _sb(seg), "wait_process", (int(seg["pid"]), float(_params(c)["timeout"]))
    ),
    ("GET", _S + "/llm/calls"): _llm_poll,
    ("POST", _S + "/llm/calls/{call_id}"): lambda ctx, seg, c: ActorCall(
        _sb(seg), "llm_answer", (seg["call_id"], LLMAnswer.model_validate(c.json))
    ),
    ("POST", _S + "/llm/release"): lambda ctx, seg, c: ActorCall(
        _sb(seg), "llm_release", (LLMRelease.model_validate(c.json).call_ids,)
    ),
    ("GET", _S + "/llm/trajectory"): lambda ctx, seg, c: ActorCall(_sb(seg), "llm_trajectory", ()),
}
"""Every non-operation call the Ray transport serves, by its REST route."""


def _pattern(path: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path)))


_COMPILED = [(m, _pattern(p), build) for (m, p), build in ROUTES.items()]


def actor_call(c: _base.Call, *, tenant: str = "default", job_owned: bool = True) -> ActorCall:
    """The actor call that REST call ``c`` stands for (see :data:`ROUTES`).

    Raises:
        InvalidRequest: a call the Ray transport does not map (it needs HTTP).
    """
    for method, pattern, build in _COMPILED:
        if method == c.method and (match := pattern.fullmatch(c.path)) is not None:
            segments = {k: unquote(v) for k, v in match.groupdict().items()}
            try:
                return build(_Ctx(tenant, job_owned), segments, c)
            except ValidationError as exc:  # the typed error the Admin would answer
                raise from_validation(exc.errors()) from None
    raise InvalidRequest(f"{c.method} {c.path} needs HTTP: use the client with a base_url")


def _unkeyed(op: Op[Any]) -> Op[Any]:
    """The operation without its idempotency key: Ray retries only admission refusals (before
    anything ran), and a key costs the Worker a task per command (measured).
    """
    if getattr(op, "idempotency_key", None) is None:
        return op
    return op.model_copy(update={"idempotency_key": None})


def _line(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    return cast(bytes, item.model_dump_json().encode()) + b"\n"


def _error_line(exc: RockError) -> bytes:
    return json.dumps(to_body(exc)).encode() + b"\n"


def _ndjson(c: _base.Call, stream: httpx.SyncByteStream | httpx.AsyncByteStream) -> httpx.Response:
    return httpx.Response(
        200,
        stream=stream,
        headers={"content-type": "application/x-ndjson"},
        request=httpx.Request(c.method, f"ray://rock{c.path}", params=c.params),
    )


def _by_worker(items: list[BatchRunItem]) -> tuple[dict[str, list[int]], dict[int, RockError]]:
    """The indexes of ``items`` by the Worker that holds each one's sandbox, and the errors of
    the items whose sandbox id names no Worker (malformed).
    """
    groups: dict[str, list[int]] = {}
    bad: dict[int, RockError] = {}
    for index, item in enumerate(items):
        try:
            groups.setdefault(_worker_of(item.sandbox_id), []).append(index)
        except RockError as exc:
            bad[index] = exc
    return groups, bad


def _outcomes(
    n: int, groups: dict[str, list[int]], replies: list[Any], bad: dict[int, RockError]
) -> list[SessionRunResult | RockError]:
    """Per item, in order: its result or its typed error (a Worker's whole group shares the
    error that call met).
    """
    out: list[SessionRunResult | RockError] = [InternalError("no outcome")] * n
    for index, error in bad.items():
        out[index] = error
    for indexes, reply in zip(groups.values(), replies, strict=True):
        if isinstance(reply, BaseException):
            if not isinstance(reply, RockError):
                raise reply
            for index in indexes:
                out[index] = reply
            continue
        for index, outcome in zip(indexes, reply, strict=True):
            out[index] = (
                outcome.result
                if outcome.result is not None
                else from_body({"error": outcome.error or {}})
            )
    return out


class _Gate:
    """What both transports share: where a call goes, and the gated entry points."""

    def __init__(
        self, namespace: str, token: str | None, tenant: str, gate: bool, job_owned: bool
    ) -> None:
        self.namespace = namespace
        self.tenant = tenant
        self.gate = gate
        self.job_owned = job_owned
        self.settings = (
            _base.ClientSettings.from_env(token=token) if gate else _base.ClientSettings()
        )
        self.scheduler: ActorHandle = get_scheduler(namespace)

    def route(self, c: _base.Call, stream: bool) -> ActorCall:
        """The actor call of ``c`` (see :func:`route`)."""
        return route(c, stream=stream, tenant=self.tenant, job_owned=self.job_owned)

    def entry(self, target: ActorCall) -> tuple[str, tuple[Any, ...]]:
        """The actor method and arguments of ``target`` (see :func:`entry`)."""
        return entry(target, gate=self.gate, token=self.settings.token)


def route(
    c: _base.Call, *, stream: bool = False, tenant: str = "default", job_owned: bool = True
) -> ActorCall:
    """The actor call of ``c``: its operation model to the sandbox's Worker (``op`` /
    ``op_stream``), or its :data:`ROUTES` row.
    """
    if c.op is not None and c.sandbox is not None:
        if stream:
            return ActorCall(c.sandbox, "op_stream", (_unkeyed(c.op),), streams=True)
        return ActorCall(c.sandbox, "op", (_unkeyed(c.op),))
    return actor_call(c, tenant=tenant, job_owned=job_owned)


def entry(target: ActorCall, *, gate: bool, token: str | None) -> tuple[str, tuple[Any, ...]]:
    """The actor method and arguments of ``target``; with ``gate`` its Ray-transport entry
    point, which checks ``token`` and audits the call.
    """
    args = target.args if target.sandbox is None else (target.sandbox, *target.args)
    if not gate:
        return target.method, args
    if target.method == "op":
        return "ray_op", (token, *args)
    if target.method == "op_stream":
        return "ray_op_stream", (token, *args)
    if target.streams:
        return "ray_stream", (token, target.method, *args)
    return "ray_call", (token, target.method, *args)


class AsyncRayTransport(_Gate, AsyncTransport):
    """The async client's calls as awaited actor calls (see the module)."""

    #: Marks the Ray transport (the model relay polls per sandbox over it).
    ray = True

    def __init__(
        self,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        token: str | None = None,
        tenant: str = "default",
        gate: bool = True,
        job_owned: bool = True,
    ) -> None:
        """Find the platform whose actors live in Ray namespace ``namespace``.

        Args:
            namespace: The platform's Ray namespace.
            token: The platform token (default: ``ROCK_TOKEN`` or the credentials file);
                used with ``gate``.
            tenant: The platform namespace of control-plane calls when auth is off (with auth
                on, the token's namespace).
            gate: Go through the actors' Ray-transport entry points, which check ``token`` and
                audit. False only for the platform's own code (which checked its caller).
            job_owned: Sandboxes created are owned by the calling Ray job.

        Raises:
            RuntimeUnavailable: Ray is not initialized or no platform runs in ``namespace``.
        """
        super().__init__(namespace, token, tenant, gate, job_owned)
        self.workers = WorkerHandles(namespace)

    async def _actor(self, target: ActorCall) -> ActorHandle:
        if target.sandbox is None:
            return self.scheduler
        return await self.workers.get(_worker_of(target.sandbox))

    async def send(self, c: _base.Call, *, stream: bool = False) -> httpx.Response:
        """Send ``c`` as its actor call; the reply holds the value (or streams NDJSON)."""
        target = self.route(c, stream)
        actor = await self._actor(target)
        method, args = self.entry(target)
        if target.streams:
            return _ndjson(c, _AsyncLines(stream_items(actor, method, args)))
        # One trace id for the call (a caller's own trace is kept).
        token = TRACE_ID.set(new_trace_id()) if traced() is None else None
        try:
            value = await call(actor, method, *args)
        finally:
            if token is not None:
                TRACE_ID.reset(token)
        return _base.Held(target.wrap(value) if target.wrap is not None else value)

    async def run_many(
        self, items: list[BatchRunItem], timeout: float | None
    ) -> list[SessionRunResult | RockError]:
        """Run ``items`` with one actor call per Worker (``Worker.run_many``), all at once."""

        async def group(short: str, batch: list[BatchRunItem]) -> list[BatchRunOutcome]:
            actor = await self.workers.get(short)
            if self.gate:
                return await call(actor, OpsWorker.ray_run_many, self.settings.token, batch)
            return await call(actor, OpsWorker.run_many, batch)

        groups, bad = _by_worker(items)
        replies = await asyncio.gather(
            *(group(short, [items[i] for i in ix]) for short, ix in groups.items()),
            return_exceptions=True,
        )
        return _outcomes(len(items), groups, replies, bad)

    async def aclose(self) -> None:
        """Nothing to close: actor handles need no connections of their own."""


def stream_items(actor: ActorHandle, method: str, args: tuple[Any, ...]) -> AsyncIterator[Any]:
    """The items of a streaming actor method (cancelled if left early)."""
    return stream(actor, method, *args)


class _AsyncLines(httpx.AsyncByteStream):
    """Items as NDJSON lines; a typed error mid-stream becomes an error line (as the Admin's)."""

    def __init__(self, items: AsyncIterator[Any]) -> None:
        self._items = items

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for item in self._items:
                yield _line(item)
        except RockError as exc:
            yield _error_line(exc)

    async def aclose(self) -> None:
        aclose = getattr(self._items, "aclose", None)
        if aclose is not None:
            await aclose()


# ---------------------------------------------------------------------------------------------
# The sync transport: ``ray.get`` on the caller's thread


def _get(ref: Any, method: str) -> Any:
    try:
        return ray.get(ref)
    except _RAY_ERRORS as exc:
        raise _translate(exc, method) from None


class SyncRayTransport(_Gate, Transport):
    """The sync client's calls as actor calls that block in ``ray.get`` on the calling thread
    (no event loop, no thread of its own), as a Ray task or rollout worker calls actors.
    Thread-safe.
    """

    ray = True

    def __init__(
        self,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        token: str | None = None,
        tenant: str = "default",
        gate: bool = True,
        job_owned: bool = True,
    ) -> None:
        """As :class:`AsyncRayTransport`."""
        super().__init__(namespace, token, tenant, gate, job_owned)
        self._actors: dict[str, ActorHandle] = {}

    def _actor(self, target: ActorCall) -> ActorHandle:
        if target.sandbox is None:
            return self.scheduler
        short = _worker_of(target.sandbox)
        actor = self._actors.get(short)
        if actor is None:
            try:
                actor = ray.get_actor(worker_actor_name(short), namespace=self.namespace)
            except ValueError:
                raise SandboxNotFound(f"no Worker {short!r} (so no such sandbox)") from None
            self._actors[short] = actor
        return actor

    def send(self, c: _base.Call, *, stream: bool = False) -> httpx.Response:
        """Send ``c`` as its actor call, blocking; the reply holds the value (or streams)."""
        target = self.route(c, stream)
        actor = self._actor(target)
        method, args = self.entry(target)
        if target.streams:
            gen = getattr(actor, method).options(num_returns="streaming").remote(*args)
            return _ndjson(c, _SyncLines(gen, target.method))
        value = _get(getattr(actor, method).remote(*args), target.method)
        return _base.Held(target.wrap(value) if target.wrap is not None else value)

    def run_many(
        self, items: list[BatchRunItem], timeout: float | None
    ) -> list[SessionRunResult | RockError]:
        """Run ``items`` with one actor call per Worker (``Worker.run_many``), all at once."""
        groups, bad = _by_worker(items)
        refs: dict[str, Any] = {}
        replies: list[Any] = []
        for short, ix in groups.items():
            batch = [items[i] for i in ix]
            try:
                actor = self._actor(ActorCall(items[ix[0]].sandbox_id, "run_many", ()))
            except RockError as exc:
                refs[short] = exc
                continue
            if self.gate:
                refs[short] = actor.ray_run_many.remote(self.settings.token, batch)
            else:
                refs[short] = actor.run_many.remote(batch)
        for short in groups:
            ref = refs[short]
            try:
                replies.append(ref if isinstance(ref, RockError) else _get(ref, "run_many"))
            except RockError as exc:
                replies.append(exc)
        return _outcomes(len(items), groups, replies, bad)

    def close(self) -> None:
        """Nothing to close: actor handles need no connections of their own."""


class _SyncLines(httpx.SyncByteStream):
    """A Ray streaming generator's items as NDJSON lines (the task is cancelled if left early)."""

    def __init__(self, gen: Any, method: str) -> None:
        self._gen = gen
        self._method = method
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            for ref in self._gen:
                yield _line(_get(ref, self._method))
        except RockError as exc:
            yield _error_line(exc)
        self._done = True

    def close(self) -> None:
        if not self._done:
            self._done = True
            with contextlib.suppress(Exception):
                ray.cancel(self._gen)


# ---------------------------------------------------------------------------------------------
# Clients


def ray_client(
    cls: type[C],
    namespace: str = DEFAULT_NAMESPACE,
    *,
    retry: _base.RetryPolicy | None = None,
    token: str | None = None,
) -> C:
    """The plain ``cls`` (``AsyncClient`` or ``Client``) over the Ray transport, carrying
    ``token`` (default: ``ROCK_TOKEN`` or the credentials file): what ``from_ray`` returns.

    Raises:
        InvalidRequest: ``cls`` is neither SDK client.
    """
    if issubclass(cls, AsyncClient):
        return cast(C, cls(transport=AsyncRayTransport(namespace, token=token), retry=retry))
    if issubclass(cls, Client):
        return cast(C, cls(transport=SyncRayTransport(namespace, token=token), retry=retry))
    raise InvalidRequest(f"no Ray transport for {cls.__name__}")


def platform_client(
    namespace: str = DEFAULT_NAMESPACE,
    *,
    tenant: str = "default",
    job_owned: bool = True,
    retry: _base.RetryPolicy | None = None,
) -> AsyncClient:
    """The platform's own Ray-transport client (compat routes, GEM API, benches' floor): no
    gate (its caller was authenticated and is audited by the code using it), control-plane
    calls in platform namespace ``tenant``.
    """
    transport = AsyncRayTransport(namespace, tenant=tenant, gate=False, job_owned=job_owned)
    return AsyncClient(transport=transport, retry=retry)
