"""The one module that calls ``ray.*``: actors by name, placement, and error unwrapping.

Everything else in ``deployments/`` talks to Ray through this seam, so the Scheduler and the
Worker are plain classes that run (and can be tested) without Ray.

Errors: an actor method that raises a :class:`~rock_serve.errors.RockError` reaches the caller
as ``RayTaskError``; :func:`call` and :func:`stream` re-raise the original typed error (its
message, ``retry_after`` and details survive pickling). Any other failure becomes a typed error
too: a dead or unreachable actor is :class:`RuntimeUnavailable`, a Worker whose node is gone
:class:`SandboxFailed` (``reason="lost"``), anything else
:class:`InternalError` (its text is logged, never sent).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, overload

import ray
from ray.exceptions import ActorUnschedulableError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rock_serve.config import ServerArgs
from rock_serve.deployments._trace import TRACED_METHOD, TRACED_STREAM, parent
from rock_serve.errors import (
    InternalError,
    RockError,
    RuntimeUnavailable,
    SandboxFailed,
    SandboxNotFound,
)
from rock_serve.protocol import CreateSandboxRequest, SandboxRecord, WorkerStatus
from rock_serve.protocol.fork import ForkRequest
from rock_serve.runtime._sync import run_sync

if TYPE_CHECKING:
    from rock_serve.deployments.worker import Worker

__all__ = [
    "SCHEDULER_NAME",
    "WORKER_PREFIX",
    "RayWorker",
    "RayWorkerDirectory",
    "WorkerHandles",
    "call",
    "current_job_id",
    "get_or_create_scheduler",
    "get_scheduler",
    "pin_replica_grpc",
    "put",
    "short_name",
    "stream",
    "stream_ahead",
    "worker_class",
    "worker_actor_name",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

#: Actor name of the Scheduler (in ``ServerArgs.namespace``).
SCHEDULER_NAME = "rock-scheduler"
#: A resource every Ray head node has (and no other node).
_HEAD_RESOURCE = "node:__internal_head__"
#: Actor names of Workers are this prefix plus the short node name.
WORKER_PREFIX = "rock-worker-"

ActorHandle = Any


def short_name(node_id: str) -> str:
    """The short, id-safe name of a node's Worker (``[a-z0-9]{12}``)."""
    return node_id[:12].lower()


def worker_actor_name(short: str) -> str:
    """Actor name of the Worker whose short name is ``short``."""
    return WORKER_PREFIX + short


_RAY_ERRORS = (RayTaskError, RayActorError, ActorUnschedulableError)


def _translate(exc: BaseException, what: str) -> RockError:
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, RockError):
            return cause
        if isinstance(cause, RayActorError):
            return RuntimeUnavailable(f"{what}: a Ray actor is unavailable")
        log.error("%s failed: %r", what, cause)
        return InternalError(f"{what} failed")
    if isinstance(exc, RayActorError):
        return RuntimeUnavailable(f"{what}: the actor is unavailable, retry shortly", retry_after=1)
    if isinstance(exc, ActorUnschedulableError):
        # A node-pinned Worker whose node is gone: its sandboxes are lost for good.
        return SandboxFailed(f"{what}: the sandbox's node is gone", reason="lost")
    log.error("%s failed: %r", what, exc)
    return InternalError(f"{what} failed")


@overload
async def call(
    actor: ActorHandle,
    method: Callable[Concatenate[Any, P], Awaitable[R]],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> R: ...


@overload
async def call(actor: ActorHandle, method: str, /, *args: Any, **kwargs: Any) -> Any: ...


async def call(actor: ActorHandle, method: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Await ``actor.method.remote(*args, **kwargs)`` and re-raise errors as typed errors.

    ``method`` is the actor class's method (``call(worker, Worker.remove, sid)``: the type
    checker checks the arguments and the result), or its name where the method is chosen at run
    time (a forwarded call: the names are checked in ``tests/unit/test_actor_calls.py``).

    Under a trace id (``_trace.TRACE_ID``) the call to an actor that has ``rock_traced``
    (a ``_trace.TracedActor``: the Scheduler and the Worker) goes through it, which runs
    ``method`` with that trace id set in the actor; other actors are called directly.
    """
    name = _name(method)
    trace_id = parent()
    try:
        if trace_id is not None and hasattr(actor, TRACED_METHOD):
            return await getattr(actor, TRACED_METHOD).remote(trace_id, name, *args, **kwargs)
        return await getattr(actor, name).remote(*args, **kwargs)
    except _RAY_ERRORS as exc:
        raise _translate(exc, name) from None


def _name(method: Callable[..., Any] | str) -> str:
    return method if isinstance(method, str) else method.__name__


@overload
def stream(
    actor: ActorHandle,
    method: Callable[Concatenate[Any, P], AsyncIterator[R]],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> AsyncIterator[R]: ...


@overload
def stream(
    actor: ActorHandle,
    method: str,
    /,
    *args: Any,
    backpressure: int | None = None,
    **kwargs: Any,
) -> AsyncIterator[Any]: ...


# The first overload's **P.kwargs could hold a "backpressure" this signature takes: no actor
# method has a parameter of that name (tests/unit/test_actor_calls.py checks it).
def stream(  # type: ignore[misc]
    actor: ActorHandle, method: Any, /, *args: Any, backpressure: int | None = None, **kwargs: Any
) -> AsyncIterator[Any]:
    """Iterate over an async-generator actor method's items as they come (``method`` as for
    :func:`call`).

    If the consumer stops early (a client went away), the actor task is cancelled. With
    ``backpressure`` (by name: :func:`stream_ahead` for a typed method) the actor's generator
    pauses while that many items are unconsumed. Under a trace id the stream goes through
    ``rock_traced_stream`` (as :func:`call` does).
    """
    return _stream(actor, _name(method), args, kwargs, backpressure)


@overload
def stream_ahead(
    backpressure: int | None,
    actor: ActorHandle,
    method: Callable[Concatenate[Any, P], AsyncIterator[R]],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> AsyncIterator[R]: ...


@overload
def stream_ahead(
    backpressure: int | None, actor: ActorHandle, method: str, /, *args: Any, **kwargs: Any
) -> AsyncIterator[Any]: ...


def stream_ahead(
    backpressure: int | None, actor: ActorHandle, method: Any, /, *args: Any, **kwargs: Any
) -> AsyncIterator[Any]:
    """:func:`stream` whose actor generator pauses while ``backpressure`` items are unconsumed
    (None: no bound).
    """
    return _stream(actor, _name(method), args, kwargs, backpressure)


async def _stream(
    actor: ActorHandle,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    backpressure: int | None,
) -> AsyncIterator[Any]:
    options: dict[str, Any] = {"num_returns": "streaming"}
    if backpressure is not None:
        options["_generator_backpressure_num_objects"] = backpressure
    trace_id = parent()
    try:
        if trace_id is not None and hasattr(actor, TRACED_STREAM):
            gen = (
                getattr(actor, TRACED_STREAM)
                .options(**options)
                .remote(trace_id, method, *args, **kwargs)
            )
        else:
            gen = getattr(actor, method).options(**options).remote(*args, **kwargs)
    except _RAY_ERRORS as exc:
        raise _translate(exc, method) from None
    finished = False
    try:
        async for ref in gen:
            try:
                item = await ref
            except _RAY_ERRORS as exc:
                finished = True
                raise _translate(exc, method) from None
            yield item
        finished = True
    finally:
        if not finished:
            with contextlib.suppress(Exception):
                ray.cancel(gen)


# --------------------------------------------------------------------------- Workers


def worker_class() -> type[Worker]:
    """The Worker class (imported on first use: ``worker`` imports this module)."""
    from rock_serve.deployments.worker import Worker

    return Worker


class RayWorker:
    """The Scheduler's wrapper around one Worker actor (see ``scheduler.WorkerRef``)."""

    def __init__(self, name: str, node_id: str, actor: ActorHandle) -> None:
        self.name = name
        self.node_id = node_id
        self.actor = actor

    async def create(
        self,
        sandbox_id: str,
        req: CreateSandboxRequest,
        ttl: float,
        namespace: str,
        snapshot: Any = None,
    ) -> SandboxRecord:
        """Create and start a sandbox on this Worker (over ``snapshot``'s files when given)."""
        return await call(
            self.actor, worker_class().create, sandbox_id, req, ttl, namespace, snapshot
        )

    async def reap_ids(self, ids: list[str], reason: str) -> list[str]:
        """Remove these sandboxes."""
        removed: list[str] = await call(self.actor, worker_class().reap_ids, ids, reason)
        return removed

    async def reconfigure(self, args: ServerArgs) -> None:
        """Hand the Worker a redeploy's args."""
        await call(self.actor, worker_class().reconfigure, args)

    async def remove(self, sandbox_id: str) -> None:
        """Remove a sandbox."""
        await call(self.actor, worker_class().remove, sandbox_id)

    async def list(self) -> list[SandboxRecord]:
        """Every sandbox the Worker owns."""
        records: builtins.list[SandboxRecord] = await call(self.actor, worker_class().list)
        return records

    async def status(self) -> WorkerStatus:
        """The Worker's load and capacity."""
        status: WorkerStatus = await call(self.actor, worker_class().status)
        return status

    async def fork(
        self,
        parent_id: str,
        child_ids: builtins.list[str],
        req: ForkRequest,
        ttl: float,
        namespace: str,
    ) -> builtins.list[SandboxRecord]:
        """Fork a sandbox of this Worker (issue 16)."""
        records: builtins.list[SandboxRecord] = await call(
            self.actor, worker_class().fork, parent_id, child_ids, req, ttl, namespace
        )
        return records

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        """Pause a sandbox (issue 16)."""
        record: SandboxRecord = await call(self.actor, worker_class().pause, sandbox_id)
        return record

    async def resume(self, sandbox_id: str) -> SandboxRecord:
        """Resume a paused sandbox (issue 16)."""
        record: SandboxRecord = await call(self.actor, worker_class().resume, sandbox_id)
        return record

    async def snapshot(self, sandbox_id: str) -> dict[str, Any]:
        """Snapshot a sandbox of this Worker into its node store and S3 (issue 16)."""
        made: dict[str, Any] = await call(self.actor, worker_class().snapshot, sandbox_id)
        return made

    async def take_archived(self) -> builtins.list[dict[str, Any]]:
        """Sandboxes this Worker archived on lease expiry since the last call."""
        items: builtins.list[dict[str, Any]] = await call(self.actor, worker_class().take_archived)
        return items

    async def drop_snapshot(self, archive: str, digest: str, s3: bool = False) -> None:
        """Delete a snapshot archive from this node (and S3)."""
        await call(self.actor, worker_class().drop_snapshot, archive, digest, s3)


class RayWorkerDirectory:
    """Finds alive nodes and gets or creates one Worker actor pinned to each."""

    def __init__(self, args: ServerArgs) -> None:
        self.args = args

    async def alive_nodes(self) -> list[str]:
        """Ids of the cluster's alive nodes."""
        nodes = await run_sync(ray.nodes)
        return [str(n["NodeID"]) for n in nodes if n.get("Alive")]

    async def ensure(self, node_id: str) -> RayWorker:
        """Get or create the detached Worker pinned to ``node_id``."""
        from rock_serve.deployments.worker import Worker

        short = short_name(node_id)
        name = worker_actor_name(short)
        cls = ray.remote(Worker)
        actor = cls.options(
            name=name,
            namespace=self.args.namespace,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_concurrency=self.args.worker_max_concurrency,
            max_restarts=-1,
            max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        ).remote(self.args, short, node_id)
        await call(actor, Worker.reconfigure, self.args)  # an existing actor may have older args
        await call(actor, Worker.ready)
        return RayWorker(short, node_id, actor)

    async def dead_jobs(self, job_ids: set[str]) -> set[str]:
        """Which of ``job_ids`` are Ray jobs whose driver has died (from the GCS job table)."""
        from ray._private import state

        jobs = await run_sync(state.jobs)
        return {str(j["JobID"]) for j in jobs if j.get("IsDead") and str(j["JobID"]) in job_ids}


def get_or_create_scheduler(args: ServerArgs) -> ActorHandle:
    """The cluster's detached Scheduler actor (created on first use)."""
    from rock_serve.deployments.scheduler import Scheduler

    cls = ray.remote(Scheduler)
    return cls.options(
        name=SCHEDULER_NAME,
        namespace=args.namespace,
        get_if_exists=True,
        lifetime="detached",
        num_cpus=0,
        max_concurrency=1000,
        max_restarts=-1,
        max_task_retries=0,
        # On the head node: the registry (which sandboxes were lost with their node) lives in
        # its memory, and the head outlives every other node. A resource, not the head's node
        # id, so a restarted head (GCS fault tolerance) takes the Scheduler back.
        resources={_HEAD_RESOURCE: 0.001},
    ).remote(args)


def get_scheduler(namespace: str) -> ActorHandle:
    """The running Scheduler actor of the platform deployed in ``namespace``.

    Raises:
        RuntimeUnavailable: Ray is not initialized, or no platform runs in ``namespace``.
    """
    if not ray.is_initialized():
        raise RuntimeUnavailable("Ray is not initialized: call ray.init(address=...) first")
    try:
        return ray.get_actor(SCHEDULER_NAME, namespace=namespace)
    except ValueError:
        raise RuntimeUnavailable(
            f"no rock-serve Scheduler in namespace {namespace!r} (is the platform deployed?)",
            retry_after=1,
        ) from None


def current_job_id() -> str | None:
    """The Ray job id of the calling driver, actor or task (hex), or None outside Ray."""
    if not ray.is_initialized():
        return None
    job = ray.get_runtime_context().get_job_id()
    return str(job) if job else None


def pin_replica_grpc() -> None:
    """Make this Serve replica's inter-deployment gRPC server listen on the node's IP.

    Ray Serve 2.60 binds it to ``[::]:0`` (every address of the host; with Ray's token auth
    on it asks for the token, but it is still a port beyond loopback on a loopback-only head).
    Called in the replica's constructor, which runs before Serve starts that server; binds to
    the node's IP instead, which is where other nodes reach it (what upstream Ray does from
    ray-project/ray#59852 on). A Ray without that seam is left as it is (and logged).
    """
    try:
        from ray.serve._private import replica
    except ImportError:  # pragma: no cover - another Ray
        log.warning("Serve replica gRPC: no seam in this Ray; left on its default address")
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_rock_pinned", False):
        return
    node_ip = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def pinned(server: Any, address: str) -> Any:
        if address in ("[::]:0", "0.0.0.0:0"):
            address = f"{host}:0"
        return original(server, address)

    pinned._rock_pinned = True  # type: ignore[attr-defined]
    setattr(replica, "add_port_to_grpc_server", pinned)  # noqa: B010 (not an export)


def put(value: Any) -> Any:
    """Put ``value`` in the object store; an actor call given the ref receives the value."""
    return ray.put(value)


class WorkerHandles:
    """The Admin's cache of Worker actor handles, looked up by the short name in an id."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._cache: dict[str, ActorHandle] = {}

    async def get(self, short: str) -> ActorHandle:
        """The Worker actor named by ``short``.

        Raises:
            SandboxNotFound: no such Worker (so no such sandbox).
        """
        actor = self._cache.get(short)
        if actor is not None:
            return actor
        try:
            actor = await run_sync(ray.get_actor, worker_actor_name(short), self.namespace)
        except ValueError:
            raise SandboxNotFound(f"no Worker {short!r} (so no such sandbox)") from None
        self._cache[short] = actor
        return actor
