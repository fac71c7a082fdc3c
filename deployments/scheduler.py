"""The Scheduler: one Worker per alive node, placement, and the cluster's sandbox registry.

A plain async class; ``_ray.py`` runs it as the detached named actor ``rock-scheduler``. It
sees Workers only through the :class:`WorkerDirectory` / :class:`WorkerRef` seam and time only
through an injected clock, so its logic runs without Ray.

The registry lives in memory and is rebuilt from the Workers (``sync``), which also happens
periodically: Workers reap expired sandboxes on their own, and a sync drops what they removed.
Sandboxes of a Worker whose node left the cluster are reported ``failed`` with reason ``lost``.
The sync also reaps sandboxes whose owning Ray job (``ray_job_id``) has died.

State: with ``state.redis_url`` set, the registry and idempotency tokens are also written to
Redis (``_store.py``), and a restarted Scheduler loads them before it asks the Workers, so
clients keep their ``client_token`` answers across restarts. Writes are best effort: while Redis
is down the Scheduler keeps working from memory (creates never fail for it), logs it, and the
next sync writes the whole registry again.

Admission control: at most ``max_creates_in_flight`` creates run at once in the cluster and
``max_creates_in_flight_per_node`` per Worker; further creates wait in a FIFO queue (at most
``max_queued_creates`` of them, each for at most ``create_queue_timeout_seconds``). A full
queue, a queue wait that times out, a full cluster or a namespace over its quota all answer
``rate_limited`` (HTTP 429) with ``retry_after`` and the queue position in the details.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import rock_serve
from rock_serve.config import ServerArgs
from rock_serve.deployments._fork import ForkScheduler
from rock_serve.deployments._node import effective_resources
from rock_serve.deployments._registry import Registry
from rock_serve.deployments._snapshot import SnapshotScheduler
from rock_serve.deployments._store import StateStore, open_store
from rock_serve.deployments._trace import SPANS, TracedActor, untraced_task
from rock_serve.errors import (
    RateLimited,
    RockError,
    RuntimeUnavailable,
    SandboxNotFound,
)
from rock_serve.lifetime import Lifetime
from rock_serve.protocol import (
    CreateSandboxRequest,
    FailureReason,
    Health,
    Resources,
    SandboxList,
    SandboxRecord,
    SandboxState,
    WorkerStatus,
    parse_image_ref,
)
from rock_serve.protocol.fork import ForkRequest

__all__ = ["Scheduler", "WorkerDirectory", "WorkerRef"]

log = logging.getLogger(__name__)

#: Seconds a deleted id stays ignored by sync (a list taken before the delete may still show it).
_TOMBSTONE_SECONDS = 60.0
#: Seconds one call to a Worker may take during sync/health before it counts as unresponsive.
_PROBE_TIMEOUT = 10.0


def _image_key(image: str | None) -> str:
    """One key per image however it is spelled (``python`` = ``docker.io/library/python``)."""
    if image is None:
        return ""
    try:
        return str(parse_image_ref(image))
    except ValueError:
        return image


class WorkerRef(Protocol):
    """What the Scheduler needs of one Worker."""

    name: str
    node_id: str

    async def create(
        self, sandbox_id: str, req: CreateSandboxRequest, ttl: float, namespace: str
    ) -> SandboxRecord:
        """Create and start a sandbox with this id."""
        ...

    async def reap_ids(self, ids: list[str], reason: str) -> list[str]:
        """Remove these sandboxes (e.g. their Ray job died)."""
        ...

    async def reconfigure(self, args: ServerArgs) -> None:
        """Take a redeploy's args."""
        ...

    async def remove(self, sandbox_id: str) -> None:
        """Remove a sandbox (SandboxNotFound if unknown)."""
        ...

    async def list(self) -> list[SandboxRecord]:
        """Every sandbox the Worker owns."""
        ...

    async def status(self) -> WorkerStatus:
        """The Worker's load and capacity."""
        ...

    async def fork(
        self,
        parent_id: str,
        child_ids: builtins.list[str],
        req: ForkRequest,
        ttl: float,
        namespace: str,
    ) -> builtins.list[SandboxRecord]:
        """Fork a sandbox of this Worker into ``child_ids`` (issue 16)."""
        ...

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        """Pause a sandbox (issue 16)."""
        ...

    async def resume(self, sandbox_id: str) -> SandboxRecord:
        """Resume a paused sandbox (issue 16)."""
        ...


class WorkerDirectory(Protocol):
    """Where Workers come from: the cluster's nodes and one Worker per node."""

    async def alive_nodes(self) -> list[str]:
        """Ids of the alive nodes."""
        ...

    async def ensure(self, node_id: str) -> WorkerRef:
        """Get or create the Worker pinned to ``node_id``."""
        ...

    async def dead_jobs(self, job_ids: set[str]) -> set[str]:
        """Which of these Ray job ids belong to jobs whose driver has died."""
        ...


class Scheduler(SnapshotScheduler, ForkScheduler, TracedActor):  # SnapshotScheduler.resume first
    """Places sandboxes on Workers and keeps the registry."""

    def __init__(
        self,
        args: ServerArgs,
        directory: WorkerDirectory | None = None,
        clock: Callable[[], float] = time.time,
        store: StateStore | None = None,
    ) -> None:
        if directory is None:
            from rock_serve.deployments._ray import RayWorkerDirectory

            directory = RayWorkerDirectory(args)
        self.args = args
        self._directory = directory
        self._clock = clock
        if args.tracing.otlp_endpoint:  # spans of its calls, children of the Admin's
            SPANS.configure(args.tracing.otlp_endpoint, args.tracing.service_name)
        self._workers: dict[str, WorkerRef] = {}  # node id -> Worker
        self._lost_nodes: set[str] = set()
        #: The registry, with the live counts admission reads (no scan per create).
        self._records = Registry(self._weigh)
        self._inflight: dict[str, int] = {}  # worker name -> creates in flight
        self._inflight_ids: set[str] = set()
        #: Image -> Workers whose store holds it (learned from creates and prepulls): placement
        #: prefers them, so a cold pull happens only where no holder has room.
        self._holders: dict[str, set[str]] = {}
        #: When this Scheduler registered each sandbox: a Worker listing taken before that
        #: moment must not drop it (the listing may predate the sandbox).
        self._registered: dict[str, float] = {}
        self._tombstones: dict[str, float] = {}
        self._tokens: dict[str, asyncio.Future[SandboxRecord]] = {}
        self._sync_lock = asyncio.Lock()
        self._store = store if store is not None else open_store(args.state)
        self._persist = self._store.name != "memory"
        self._store_ok = True
        self._dropped: list[str] = []
        self._queue: list[object] = []  # FIFO of waiting creates (tickets)
        self._queue_changed = asyncio.Event()
        self._inflight_total = 0
        self._inflight_ns: dict[str, int] = {}
        #: Effective resources of each namespace's creates in flight (quotas count them).
        self._inflight_res: dict[str, list[Resources]] = {}
        self._startup: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ life cycle

    async def ready(self) -> None:
        """Finish start-up (idempotent): one Worker per node, registry rebuilt, sync loop on."""
        if self._startup is None:
            self._startup = untraced_task(self._start())
        try:
            await asyncio.shield(self._startup)
        except BaseException:
            self._startup = None  # let the next call try again
            raise

    async def _start(self) -> None:
        if self._persist:
            try:
                loaded = await self._store.load()
            except RockError as exc:
                log.error("scheduler: cannot load the registry from %s: %s", self._store.name, exc)
            else:
                now = self._clock()
                for record in loaded:
                    self._records.setdefault(record.id, record)
                    self._registered.setdefault(record.id, now)
                log.info("scheduler: loaded %d records from %s", len(loaded), self._store.name)
        await self.sync()
        if self._loop_task is None:
            self._loop_task = untraced_task(self._sync_loop())

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.reap_interval_seconds)
            try:
                await self.sync()
            except Exception:  # pragma: no cover - keep syncing whatever happens
                log.exception("scheduler: sync failed")

    async def close(self) -> None:
        """Stop the sync loop and close the store (the Workers and sandboxes are untouched)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None
        await self._store.close()

    async def configure(self, args: ServerArgs) -> None:
        """Take a redeploy's args and hand them to every Worker.

        Limits apply at once; a changed runtime is used for new sandboxes (existing ones keep
        theirs). Workers that do not answer get the args when they are next ensured.
        """
        changed = args != self.args
        reweigh = args.runtime != self.args.runtime
        self.args = args
        if reweigh:
            self._records.reweigh(self._weigh)
        if hasattr(self._directory, "args"):
            self._directory.args = args
        if changed:
            results = await asyncio.gather(
                *(
                    asyncio.wait_for(w.reconfigure(args), _PROBE_TIMEOUT)
                    for w in self._workers.values()
                ),
                return_exceptions=True,
            )
            for worker, result in zip(list(self._workers.values()), results, strict=True):
                if isinstance(result, BaseException):
                    log.error("scheduler: reconfiguring %s failed: %r", worker.name, result)
        self._wake()

    async def sync(self) -> None:
        """Match Workers to alive nodes and the registry to what the Workers own."""
        async with self._sync_lock:
            alive = set(await self._directory.alive_nodes())
            for node_id in alive - set(self._workers):
                try:
                    self._workers[node_id] = await self._directory.ensure(node_id)
                    self._lost_nodes.discard(node_id)
                except RockError as exc:
                    log.error("scheduler: no Worker on node %s: %s", node_id, exc)
            for node_id in set(self._workers) - alive:
                worker = self._workers.pop(node_id)
                self._lost_nodes.add(node_id)
                self._mark_lost(worker.name)
            now = self._clock()
            self._tombstones = {k: t for k, t in self._tombstones.items() if t > now}
            results = await asyncio.gather(
                *(self._list_worker(w) for w in self._workers.values()), return_exceptions=True
            )
            for worker, result in zip(list(self._workers.values()), results, strict=True):
                if isinstance(result, BaseException):
                    continue
                self._reconcile(worker.name, result, now)
            await self._collect_archived()  # issue 16: lease-expired sandboxes kept as snapshots
        self._wake()  # reaped sandboxes freed capacity
        self._prune_tokens()
        dropped, self._dropped = tuple(self._dropped), []
        await self._save(*self._records.values(), gone=dropped)
        await self._reap_dead_jobs()

    async def _reap_dead_jobs(self) -> None:
        """Remove the sandboxes of Ray jobs whose driver has died."""
        jobs = {r.ray_job_id for r in self._records.values() if r.ray_job_id}
        if not jobs:
            return
        try:
            dead = await self._directory.dead_jobs(jobs)
        except Exception as exc:  # pragma: no cover - best effort, retried next sync
            log.warning("scheduler: cannot read Ray jobs: %r", exc)
            return
        if not dead:
            return
        by_worker: dict[str, list[str]] = {}
        for sid, record in self._records.items():
            if record.ray_job_id in dead:
                by_worker.setdefault(record.worker, []).append(sid)
        for worker in list(self._workers.values()):
            ids = by_worker.get(worker.name)
            if not ids:
                continue
            log.warning(
                "scheduler: reaping %d sandboxes of dead Ray jobs on %s", len(ids), worker.name
            )
            with contextlib.suppress(RockError):
                for sid in await worker.reap_ids(ids, "job_dead"):
                    self._forget(sid)
                    self._dropped.append(sid)

    async def _list_worker(self, worker: WorkerRef) -> list[SandboxRecord]:
        return await asyncio.wait_for(worker.list(), _PROBE_TIMEOUT)

    def _reconcile(self, worker: str, owned: list[SandboxRecord], listed_at: float) -> None:
        ids = {r.id for r in owned}
        for sid, record in list(self._records.items()):
            if (
                record.worker == worker
                and sid not in ids
                and sid not in self._inflight_ids
                and self._registered.get(sid, record.created_at) < listed_at
            ):
                del self._records[sid]
                self._registered.pop(sid, None)
                self._dropped.append(sid)
        for record in owned:
            if record.id not in self._tombstones:
                self._records[record.id] = record  # the Worker is the source of truth

    def _prune_tokens(self) -> None:
        """Forget the client tokens of finished creates whose sandbox is gone (every SDK
        create carries a token, so this map would otherwise only grow).
        """
        for token, future in list(self._tokens.items()):
            if future.done() and (
                future.cancelled()
                or future.exception() is not None
                or future.result().id not in self._records
            ):
                del self._tokens[token]

    async def _save(self, *records: SandboxRecord, gone: tuple[str, ...] = ()) -> None:
        """Write registry changes to the store (best effort: see the module docstring)."""
        if not self._persist:
            return
        try:
            if records:
                await self._store.put_many(list(records))
            for sid in gone:
                await self._store.delete(sid)
        except RockError as exc:
            if self._store_ok:
                log.error("scheduler: state store unavailable, running from memory: %s", exc)
            self._store_ok = False
        else:
            if not self._store_ok:
                log.warning("scheduler: state store is back")
            self._store_ok = True

    def _mark_lost(self, worker: str) -> None:
        for sid, record in self._records.items():
            if record.worker == worker and record.state != SandboxState.FAILED:
                self._records[sid] = record.model_copy(
                    update={"state": SandboxState.FAILED, "reason": FailureReason.LOST}
                )

    # ------------------------------------------------------------------ placement

    def _live(self, record: SandboxRecord, now: float) -> bool:
        return Lifetime.live(record, now)

    def _weigh(self, resources: Resources) -> Resources:
        """A sandbox's effective resources (what quotas count)."""
        return effective_resources(resources, self.args.runtime)

    def _load(self, worker: str, now: float) -> int:
        return self._records.load(worker, now) + self._inflight.get(worker, 0)

    def _place(self, image: str | None = None) -> WorkerRef | None:
        """The least loaded Worker with room (preferring those that hold ``image``), or None
        while in-flight caps hold every one back.

        Raises:
            RuntimeUnavailable: no Worker at all.
            RateLimited: every Worker is at capacity.
        """
        if not self._workers:
            raise RuntimeUnavailable("no Worker is available", retry_after=1.0)
        now = self._clock()
        loads = sorted(
            ((self._load(w.name, now), w) for w in self._workers.values()),
            key=lambda pair: pair[0],
        )
        if loads[0][0] >= self.args.max_sandboxes_per_node:
            raise RateLimited(
                f"all {len(self._workers)} Workers are full "
                f"({self.args.max_sandboxes_per_node} sandboxes each)",
                retry_after=self.args.create_retry_after_seconds,
            )
        if self._inflight_total >= self.args.max_creates_in_flight:
            return None
        if image is not None:  # (every node has the default image: spread those by load)
            holders = self._holders.get(_image_key(image), set())
            loads.sort(key=lambda pair: (pair[1].name not in holders, pair[0]))
        for load, worker in loads:
            if (
                load < self.args.max_sandboxes_per_node
                and self._inflight.get(worker.name, 0) < self.args.max_creates_in_flight_per_node
            ):
                return worker
        return None

    def _wake(self) -> None:
        self._queue_changed.set()
        self._queue_changed = asyncio.Event()

    def _check_quota(self, namespace: str, req: CreateSandboxRequest) -> None:
        """Refuse a create that would take its namespace over its quota.

        Sandboxes count with their effective limits (the runtime's defaults fill what a
        request leaves unset), so leaving ``memory_mb`` unset is no way around a memory quota.
        """
        quota = self.args.quotas.get(namespace, self.args.default_quota)
        if quota is None:
            return
        mine = self._records.usage(namespace, self._clock())
        count = mine.sandboxes + self._inflight_ns.get(namespace, 0)
        retry = self.args.create_retry_after_seconds
        if quota.max_sandboxes is not None and count + 1 > quota.max_sandboxes:
            raise RateLimited(
                f"namespace {namespace!r} is at its quota of {quota.max_sandboxes} sandboxes",
                retry_after=retry,
                quota="sandboxes",
            )
        held = self._inflight_res.get(namespace, [])
        new = self._weigh(req.resources)
        for field, limit, unit in (
            ("cpus", quota.max_cpus, "cpus"),
            ("memory_mb", quota.max_memory_mb, "MiB of memory"),
            ("disk_mb", quota.max_disk_mb, "MiB of disk"),
        ):
            if limit is None:
                continue
            total = mine.total(field) + sum(getattr(r, field) or 0 for r in [*held, new])
            if total > limit:
                raise RateLimited(
                    f"namespace {namespace!r} would use {total:g} {unit}, over its quota of "
                    f"{limit:g}",
                    retry_after=retry,
                    quota=field,
                )

    async def _admit(
        self, namespace: str, req: CreateSandboxRequest
    ) -> tuple[WorkerRef, Resources]:
        """Wait (FIFO, bounded) for a Worker with room and a free create slot; reserve it
        (and the create's effective resources, for quotas, until :meth:`_release`).
        """
        self._check_quota(namespace, req)
        retry = self.args.create_retry_after_seconds
        if len(self._queue) >= self.args.max_queued_creates:
            raise RateLimited(
                f"{len(self._queue)} creates are queued already; retry later",
                retry_after=retry,
                queue_length=len(self._queue),
            )
        if self._workers:
            # Queued creates will need room too: refuse at once what cannot fit, rather than
            # after a wait in the queue.
            now = self._clock()
            room = len(self._workers) * self.args.max_sandboxes_per_node
            used = sum(self._load(w.name, now) for w in self._workers.values())
            if used + len(self._queue) >= room:
                raise RateLimited(
                    f"the cluster is full ({used} sandboxes and {len(self._queue)} queued "
                    f"creates for {room} places)",
                    retry_after=retry,
                    queue_length=len(self._queue),
                )
        ticket = object()
        self._queue.append(ticket)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.args.create_queue_timeout_seconds
        try:
            while True:
                worker = self._place(req.image) if self._queue[0] is ticket else None
                if worker is not None:
                    self._check_quota(namespace, req)
                    self._inflight[worker.name] = self._inflight.get(worker.name, 0) + 1
                    self._inflight_total += 1
                    self._inflight_ns[namespace] = self._inflight_ns.get(namespace, 0) + 1
                    held = effective_resources(req.resources, self.args.runtime)
                    self._inflight_res.setdefault(namespace, []).append(held)
                    return worker, held
                remaining = deadline - loop.time()
                if remaining <= 0:
                    position = self._queue.index(ticket) + 1
                    raise RateLimited(
                        f"no create slot within {self.args.create_queue_timeout_seconds:g} s "
                        f"(queue position {position} of {len(self._queue)})",
                        retry_after=retry,
                        queue_position=position,
                        queue_length=len(self._queue),
                    )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._queue_changed.wait(), remaining)
        finally:
            self._queue.remove(ticket)
            self._wake()

    def _release(self, worker: str, namespace: str, held: Resources) -> None:
        self._inflight[worker] -= 1
        self._inflight_total -= 1
        self._inflight_ns[namespace] -= 1
        reserved = self._inflight_res[namespace]
        del reserved[next(i for i, r in enumerate(reserved) if r is held)]
        self._wake()

    async def create(self, req: CreateSandboxRequest, namespace: str = "default") -> SandboxRecord:
        """Admit, place, create and start a sandbox; the same ``client_token`` gives the same one.

        Raises:
            InvalidRequest: ``ttl_seconds`` or ``lease_seconds`` is over its limit.
            RateLimited: the cluster is full, the create queue is full or timed out, or the
                namespace is over its quota (with ``retry_after``).
            RuntimeUnavailable: no Worker is available.
        """
        await self.ready()
        ttl = Lifetime.of(self.args).admit(req.ttl_seconds, req.lease_seconds)
        req, snap = await self._snapshot_for_create(req, namespace)
        token = req.client_token
        if token is None:
            return await self._create(req, ttl, namespace, snap)
        token = f"{namespace}/{token}"
        known = self._tokens.get(token)
        if known is not None:
            record = await asyncio.shield(known)
            current = self._records.get(record.id)
            if current is not None:
                return current
        elif self._persist:  # made before this Scheduler (re)started?
            with contextlib.suppress(RockError):
                bound = await self._store.token_of(token)
                if bound is not None and bound in self._records:
                    return self._records[bound]
        future: asyncio.Future[SandboxRecord] = asyncio.get_running_loop().create_future()
        self._tokens[token] = future
        try:
            record = await self._create(req, ttl, namespace, snap)
        except BaseException as exc:
            self._tokens.pop(token, None)
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning
            raise
        future.set_result(record)
        if self._persist:
            with contextlib.suppress(RockError):
                await self._store.claim_token(token, record.id, self.args.state.token_ttl_seconds)
        return record

    async def _create(
        self, req: CreateSandboxRequest, ttl: float, namespace: str, snap: Any = None
    ) -> SandboxRecord:
        worker, held = await self._admit(namespace, req)
        sandbox_id = f"sb-{worker.name}-{secrets.token_hex(8)}"
        self._inflight_ids.add(sandbox_id)
        try:
            if snap is None:
                record = await worker.create(sandbox_id, req, ttl, namespace)
            else:  # any node: its Worker fetches the archive from S3 when absent
                record = await worker.create(sandbox_id, req, ttl, namespace, snap)  # type: ignore[call-arg]
        finally:
            self._release(worker.name, namespace, held)
            self._inflight_ids.discard(sandbox_id)
        sandbox_id = record.id  # a Worker may serve the create from its warm pool
        if req.image is not None:
            self._holders.setdefault(_image_key(req.image), set()).add(worker.name)
        self._records[sandbox_id] = record
        self._registered[sandbox_id] = self._clock()
        await self._save(record)
        log.info(
            "scheduler: created %s on %s",
            sandbox_id,
            worker.name,
            extra={"sandbox_id": sandbox_id, "owner": req.owner, "namespace": namespace},
        )
        return record

    async def note_image(self, worker: str, image: str, held: bool = True) -> None:
        """A Worker's store now holds (or no longer holds) ``image`` (from the image routes)."""
        holders = self._holders.setdefault(_image_key(image), set())
        if held:
            holders.add(worker)
        else:
            holders.discard(worker)

    # ------------------------------------------------------------------ registry

    async def get(self, sandbox_id: str) -> SandboxRecord:
        """One sandbox.

        Raises:
            SandboxNotFound: unknown, deleted or expired.
        """
        record = self._records.get(sandbox_id)
        if record is None or not self._live(record, self._clock()):
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return record

    async def list(
        self,
        owner: str | None = None,
        state: SandboxState | None = None,
        labels: dict[str, str] | None = None,
        namespace: str | None = None,
    ) -> SandboxList:
        """Sandboxes matching every given filter, newest first."""
        await self.ready()
        now = self._clock()
        items = [
            r
            for r in self._records.values()
            if self._live(r, now)
            and (owner is None or r.owner == owner)
            and (namespace is None or r.namespace == namespace)
            and (state is None or r.state == state)
            and all(r.labels.get(k) == v for k, v in (labels or {}).items())
        ]
        items.sort(key=lambda r: r.created_at, reverse=True)
        return SandboxList(items=items)

    async def delete(self, sandbox_id: str) -> None:
        """Remove a sandbox.

        Raises:
            SandboxNotFound: no such sandbox.
        """
        record = self._records.get(sandbox_id)
        if record is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        worker = next((w for w in self._workers.values() if w.name == record.worker), None)
        self._tombstones[sandbox_id] = self._clock() + _TOMBSTONE_SECONDS
        try:
            if worker is not None:
                with contextlib.suppress(SandboxNotFound):  # reaped meanwhile: same outcome
                    await worker.remove(sandbox_id)
        finally:
            self._forget(sandbox_id)
        await self._save(gone=(sandbox_id,))

    async def delete_by_token(self, client_token: str, namespace: str = "default") -> str:
        """Remove the sandbox a create with this ``client_token`` made, waiting for the create
        if it is still in flight (so a delete racing a create leaves nothing behind).

        Raises:
            SandboxNotFound: no create with this token is known.
        """
        future = self._tokens.get(f"{namespace}/{client_token}")
        if future is None:
            raise SandboxNotFound(f"no sandbox was created with client_token {client_token!r}")
        try:
            record = await asyncio.shield(future)
        except RockError:
            raise SandboxNotFound(
                f"the create with client_token {client_token!r} failed; nothing to delete"
            ) from None
        self._tokens.pop(f"{namespace}/{client_token}", None)
        with contextlib.suppress(SandboxNotFound):
            await self.delete(record.id)
        return record.id

    def _forget(self, sandbox_id: str) -> None:
        self._records.pop(sandbox_id, None)
        self._registered.pop(sandbox_id, None)
        self._wake()  # capacity freed: a queued create may go

    async def admission(self) -> dict[str, int]:
        """The admission queue now: creates waiting and creates running (for the console)."""
        return {"queued": len(self._queue), "in_flight": self._inflight_total}

    async def health(self) -> Health:
        """Every Worker's status; ``ok`` when at least one answers."""
        await self.ready()
        workers = list(self._workers.values())
        results = await asyncio.gather(
            *(asyncio.wait_for(w.status(), _PROBE_TIMEOUT) for w in workers),
            return_exceptions=True,
        )
        statuses: list[WorkerStatus] = []
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, WorkerStatus):
                statuses.append(result)
            else:
                statuses.append(
                    WorkerStatus(
                        name=worker.name,
                        node_id=worker.node_id,
                        alive=False,
                        sandboxes=self._load(worker.name, self._clock()),
                        capacity=self.args.max_sandboxes_per_node,
                        runtime=self.args.runtime.type,
                    )
                )
        if self._persist:
            self._store_ok = await self._store.ping()
        alive = any(s.alive for s in statuses)
        status = "ok" if alive and self._store_ok else "degraded"
        return Health(
            status=status,
            version=rock_serve.__version__,
            namespace=self.args.namespace,
            state_store=self._store.name,
            state_store_ok=self._store_ok,
            workers=statuses,
        )

    async def ray_call(self, token: str | None, method: str, *args: object) -> object:
        """A control-plane call of ``AsyncClient.from_ray``: the caller's platform token is
        checked (namespace scoping as over HTTP) and the call audited (see ``_raygate``).
        """
        from rock_serve.deployments._raygate import RayGate

        gate: RayGate | None = getattr(self, "_ray_gate", None)
        if gate is None:
            gate = self._ray_gate = RayGate(self.args)
        return await gate.use(self.args).control(self, token, method, args)

    async def dataplane_secret(self) -> bytes:
        """The cluster secret of data-plane tokens when ``dataplane.secret_env`` is unset: made
        once per Scheduler start (a restart makes a new one; the nodes fetch it again).
        """
        secret: bytes | None = getattr(self, "_dataplane_secret", None)
        if secret is None:
            secret = self._dataplane_secret = secrets.token_bytes(32)
        return secret
