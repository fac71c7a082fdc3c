"""The Scheduler: one Worker per alive node, placement, and the cluster's sandbox registry.

A plain async class; ``_ray.py`` runs it as the detached named actor ``rock-scheduler``. It
sees Workers only through the :class:`WorkerDirectory` / :class:`WorkerRef` seam and time only
through an injected clock, so its logic runs without Ray.

The registry lives in memory and is rebuilt from the Workers (``sync``), which also happens
periodically: Workers reap expired sandboxes on their own, and a sync drops what they removed.
Sandboxes of a Worker whose node left the cluster are reported ``failed`` with reason ``lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Protocol

import rock_serve
from rock_serve.config import ServerArgs
from rock_serve.errors import (
    InvalidRequest,
    RateLimited,
    RockError,
    RuntimeUnavailable,
    SandboxNotFound,
)
from rock_serve.protocol import (
    CreateSandboxRequest,
    FailureReason,
    Health,
    SandboxList,
    SandboxRecord,
    SandboxState,
    WorkerStatus,
)

__all__ = ["Scheduler", "WorkerDirectory", "WorkerRef"]

log = logging.getLogger(__name__)

#: Seconds a deleted id stays ignored by sync (a list taken before the delete may still show it).
_TOMBSTONE_SECONDS = 60.0
#: Seconds one call to a Worker may take during sync/health before it counts as unresponsive.
_PROBE_TIMEOUT = 10.0


class WorkerRef(Protocol):
    """What the Scheduler needs of one Worker."""

    name: str
    node_id: str

    async def create(self, sandbox_id: str, req: CreateSandboxRequest, ttl: float) -> SandboxRecord:
        """Create and start a sandbox with this id."""
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


class WorkerDirectory(Protocol):
    """Where Workers come from: the cluster's nodes and one Worker per node."""

    async def alive_nodes(self) -> list[str]:
        """Ids of the alive nodes."""
        ...

    async def ensure(self, node_id: str) -> WorkerRef:
        """Get or create the Worker pinned to ``node_id``."""
        ...


class Scheduler:
    """Places sandboxes on Workers and keeps the registry."""

    def __init__(
        self,
        args: ServerArgs,
        directory: WorkerDirectory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if directory is None:
            from rock_serve.deployments._ray import RayWorkerDirectory

            directory = RayWorkerDirectory(args)
        self.args = args
        self._directory = directory
        self._clock = clock
        self._workers: dict[str, WorkerRef] = {}  # node id -> Worker
        self._lost_nodes: set[str] = set()
        self._records: dict[str, SandboxRecord] = {}
        self._inflight: dict[str, int] = {}  # worker name -> creates in flight
        self._inflight_ids: set[str] = set()
        #: When this Scheduler registered each sandbox: a Worker listing taken before that
        #: moment must not drop it (the listing may predate the sandbox).
        self._registered: dict[str, float] = {}
        self._tombstones: dict[str, float] = {}
        self._tokens: dict[str, asyncio.Future[SandboxRecord]] = {}
        self._sync_lock = asyncio.Lock()
        self._startup: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ life cycle

    async def ready(self) -> None:
        """Finish start-up (idempotent): one Worker per node, registry rebuilt, sync loop on."""
        if self._startup is None:
            self._startup = asyncio.ensure_future(self._start())
        try:
            await asyncio.shield(self._startup)
        except BaseException:
            self._startup = None  # let the next call try again
            raise

    async def _start(self) -> None:
        await self.sync()
        if self._loop_task is None:
            self._loop_task = asyncio.ensure_future(self._sync_loop())

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.reap_interval_seconds)
            try:
                await self.sync()
            except Exception:  # pragma: no cover - keep syncing whatever happens
                log.exception("scheduler: sync failed")

    async def close(self) -> None:
        """Stop the sync loop (the Workers and their sandboxes are not touched)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None

    async def configure(self, args: ServerArgs) -> None:
        """Take new limits (capacity, TTLs, intervals) from a redeploy.

        The runtime of existing Workers does not change; that needs restarting them.
        """
        self.args = args

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
        for record in owned:
            if record.id not in self._records and record.id not in self._tombstones:
                self._records[record.id] = record

    def _mark_lost(self, worker: str) -> None:
        for sid, record in self._records.items():
            if record.worker == worker and record.state != SandboxState.FAILED:
                self._records[sid] = record.model_copy(
                    update={"state": SandboxState.FAILED, "reason": FailureReason.LOST}
                )

    # ------------------------------------------------------------------ placement

    def _live(self, record: SandboxRecord, now: float) -> bool:
        return record.expires_at is None or record.expires_at > now

    def _load(self, worker: str, now: float) -> int:
        owned = sum(1 for r in self._records.values() if r.worker == worker and self._live(r, now))
        return owned + self._inflight.get(worker, 0)

    def _place(self) -> WorkerRef:
        if not self._workers:
            raise RuntimeUnavailable("no Worker is available", retry_after=1.0)
        now = self._clock()
        load, worker = min(
            ((self._load(w.name, now), w) for w in self._workers.values()),
            key=lambda pair: pair[0],
        )
        if load >= self.args.max_sandboxes_per_node:
            raise RateLimited(
                f"all {len(self._workers)} Workers are full "
                f"({self.args.max_sandboxes_per_node} sandboxes each)",
                retry_after=self.args.create_retry_after_seconds,
            )
        return worker

    async def create(self, req: CreateSandboxRequest) -> SandboxRecord:
        """Place, create and start a sandbox; the same ``client_token`` gives the same one.

        Raises:
            InvalidRequest: ``ttl_seconds`` is over ``max_ttl_seconds``.
            RateLimited: every Worker is at capacity (with ``retry_after``).
            RuntimeUnavailable: no Worker is available.
        """
        await self.ready()
        ttl = req.ttl_seconds if req.ttl_seconds is not None else self.args.default_ttl_seconds
        if ttl > self.args.max_ttl_seconds:
            raise InvalidRequest(
                f"ttl_seconds {ttl} is over the limit of {self.args.max_ttl_seconds}"
            )
        token = req.client_token
        if token is None:
            return await self._create(req, ttl)
        known = self._tokens.get(token)
        if known is not None:
            record = await asyncio.shield(known)
            current = self._records.get(record.id)
            if current is not None:
                return current
        future: asyncio.Future[SandboxRecord] = asyncio.get_running_loop().create_future()
        self._tokens[token] = future
        try:
            record = await self._create(req, ttl)
        except BaseException as exc:
            self._tokens.pop(token, None)
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning
            raise
        future.set_result(record)
        return record

    async def _create(self, req: CreateSandboxRequest, ttl: float) -> SandboxRecord:
        worker = self._place()
        sandbox_id = f"sb-{worker.name}-{secrets.token_hex(8)}"
        self._inflight[worker.name] = self._inflight.get(worker.name, 0) + 1
        self._inflight_ids.add(sandbox_id)
        try:
            record = await worker.create(sandbox_id, req, ttl)
        finally:
            self._inflight[worker.name] -= 1
            self._inflight_ids.discard(sandbox_id)
        self._records[sandbox_id] = record
        self._registered[sandbox_id] = self._clock()
        log.info("scheduler: created %s on %s", sandbox_id, worker.name)
        return record

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
    ) -> SandboxList:
        """Sandboxes matching every given filter, newest first."""
        await self.ready()
        now = self._clock()
        items = [
            r
            for r in self._records.values()
            if self._live(r, now)
            and (owner is None or r.owner == owner)
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
            self._records.pop(sandbox_id, None)
            self._registered.pop(sandbox_id, None)

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
        status = "ok" if any(s.alive for s in statuses) else "degraded"
        return Health(status=status, version=rock_serve.__version__, workers=statuses)
