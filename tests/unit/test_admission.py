"""Admission bookkeeping is incremental: a create visits no record of the registry, however many
it holds, and the counts it reads match a full scan through adds, removals, syncs and expiry.

The Scheduler runs against fake Workers at its seam (``WorkerRef``: a create returns a record,
``list`` returns what the Worker holds) and an injected clock; costs are counted operations
(records visited, counters updated), never times.
"""

from __future__ import annotations

import builtins
from typing import Any

import pytest

from rock_serve.config import ServerArgs
from rock_serve.deployments._node import effective_resources
from rock_serve.deployments._registry import RESOURCE_FIELDS, Registry
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.errors import RateLimited, SandboxNotFound
from rock_serve.lifetime import Lifetime
from rock_serve.protocol import (
    CreateSandboxRequest,
    Resources,
    SandboxRecord,
    SandboxState,
    WorkerStatus,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeWorker:
    """A Worker at the Scheduler's seam: records only, no sandboxes."""

    def __init__(self, name: str, clock: Clock) -> None:
        self.name, self.node_id, self.clock = name, name * 4, clock
        self.records: dict[str, SandboxRecord] = {}

    def record(
        self, sandbox_id: str, namespace: str, ttl: float, resources: Resources | None = None
    ) -> SandboxRecord:
        now = self.clock()
        return SandboxRecord(
            id=sandbox_id,
            state=SandboxState.RUNNING,
            worker=self.name,
            node_id=self.node_id,
            created_at=now,
            expires_at=now + ttl,
            namespace=namespace,
            resources=resources or Resources(),
        )

    def hold(self, count: int, namespace: str, ttl: float = 3600) -> None:
        for i in range(count):
            sid = f"sb-{self.name}-held{i:06d}"
            self.records[sid] = self.record(sid, namespace, ttl, Resources(cpus=0.5))

    async def create(
        self, sandbox_id: str, req: CreateSandboxRequest, ttl: float, namespace: str
    ) -> SandboxRecord:
        record = self.record(sandbox_id, namespace, ttl, req.resources)
        self.records[sandbox_id] = record
        return record

    async def remove(self, sandbox_id: str) -> None:
        if self.records.pop(sandbox_id, None) is None:
            raise SandboxNotFound(sandbox_id)

    async def list(self) -> builtins.list[SandboxRecord]:
        return builtins.list(self.records.values())

    async def reap_ids(self, ids: builtins.list[str], reason: str) -> builtins.list[str]:
        return [sid for sid in ids if self.records.pop(sid, None) is not None]

    async def reconfigure(self, args: ServerArgs) -> None:
        pass

    async def status(self) -> WorkerStatus:
        return WorkerStatus(
            name=self.name,
            node_id=self.node_id,
            alive=True,
            sandboxes=len(self.records),
            capacity=1,
            runtime="fake",
        )


class FakeDirectory:
    def __init__(self, workers: builtins.list[FakeWorker]) -> None:
        self.workers = {w.node_id: w for w in workers}

    async def alive_nodes(self) -> builtins.list[str]:
        return builtins.list(self.workers)

    async def ensure(self, node_id: str) -> FakeWorker:
        return self.workers[node_id]

    async def dead_jobs(self, job_ids: set[str]) -> set[str]:
        return set()


_ARGS: dict[str, Any] = {
    "runtime": {"type": "fake"},
    "max_sandboxes_per_node": 100_000,
    "quotas": {"team": {"max_sandboxes": 100_000, "max_cpus": 100_000}},
}


async def _scheduler(held: int) -> tuple[Scheduler, Registry, Clock, builtins.list[FakeWorker]]:
    """A Scheduler over two fake Workers that hold ``held`` sandboxes between them."""
    clock = Clock()
    workers = [FakeWorker("aaaaaaaaaaaa", clock), FakeWorker("bbbbbbbbbbbb", clock)]
    workers[0].hold(held // 2, "team")
    workers[1].hold(held - held // 2, "other")
    scheduler = Scheduler(
        ServerArgs.model_validate(_ARGS),
        FakeDirectory(workers),
        clock,  # type: ignore[arg-type]
    )
    await scheduler.ready()  # sync: the registry now holds every record
    registry = scheduler._records
    assert isinstance(registry, Registry) and len(registry) == held
    return scheduler, registry, clock, workers


async def _admission_cost(held: int) -> tuple[int, int]:
    """(records visited, counters updated) by one create in ``team`` with ``held`` records."""
    scheduler, registry, _, _ = await _scheduler(held)
    try:
        await scheduler.create(CreateSandboxRequest(), "team")  # warm: first create's one-offs
        scanned, updates = registry.scanned, registry.updates
        await scheduler.create(CreateSandboxRequest(resources=Resources(cpus=1)), "team")
        return registry.scanned - scanned, registry.updates - updates
    finally:
        await scheduler.close()


async def test_a_create_costs_the_same_with_100_or_10_000_records_held():
    small = await _admission_cost(100)
    large = await _admission_cost(10_000)
    assert small == large == (0, 1)  # no record visited; one counted (the new sandbox)


def _scan(registry: Registry, now: float) -> dict[str, Any]:
    """The counts by brute force, as admission computed them before (one pass per question)."""
    live = [r for r in dict.values(registry) if Lifetime.live(r, now)]
    runtime = ServerArgs.model_validate(_ARGS).runtime
    out: dict[str, Any] = {}
    for record in live:
        out.setdefault(("worker", record.worker), 0)
        out[("worker", record.worker)] += 1
        weights = effective_resources(record.resources, runtime)
        row = out.setdefault(("ns", record.namespace), [0, 0.0, 0.0, 0.0])
        row[0] += 1
        for i, field in enumerate(RESOURCE_FIELDS, 1):
            row[i] += getattr(weights, field) or 0
    return out


def _counted(registry: Registry, now: float, workers: builtins.list[FakeWorker]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for worker in workers:
        if load := registry.load(worker.name, now):
            out[("worker", worker.name)] = load
    for namespace in ("team", "other", "third"):
        usage = registry.usage(namespace, now)
        if usage.sandboxes:
            out[("ns", namespace)] = [usage.sandboxes] + [
                pytest.approx(usage.total(f)) for f in RESOURCE_FIELDS
            ]
    return out


async def test_counts_match_a_full_scan_through_creates_deletes_syncs_and_expiry():
    scheduler, registry, clock, workers = await _scheduler(40)
    try:
        made = [
            await scheduler.create(
                CreateSandboxRequest(ttl_seconds=60 * (i + 1), resources=Resources(cpus=0.1)), ns
            )
            for i, ns in enumerate(["team", "third", "team", "other", "third"])
        ]
        assert _counted(registry, clock(), workers) == _scan(registry, clock())
        await scheduler.delete(made[0].id)
        # A Worker's reaper removed one (a sync drops it) and re-homed another's namespace.
        gone = next(iter(workers[1].records))
        del workers[1].records[gone]
        moved = next(iter(workers[0].records))
        workers[0].records[moved] = (
            workers[0]
            .records[moved]
            .model_copy(
                update={"namespace": "third", "resources": Resources(cpus=2, memory_mb=512)}
            )
        )
        clock.now += 1
        await scheduler.sync()
        assert gone not in registry
        assert _counted(registry, clock(), workers) == _scan(registry, clock())
        for step in (61, 60, 60, 3600):  # TTLs pass one by one, then every held one
            clock.now += step
            assert _counted(registry, clock(), workers) == _scan(registry, clock())
        assert _counted(registry, clock(), workers) == {}
        assert len(registry) > 0  # still listed until the Workers reap them
    finally:
        await scheduler.close()


async def test_quotas_read_the_counts():
    scheduler, _, clock, _ = await _scheduler(0)
    scheduler.args = ServerArgs.model_validate(
        {**_ARGS, "quotas": {"team": {"max_sandboxes": 2, "max_cpus": 1.5}}}
    )
    try:
        first = await scheduler.create(
            CreateSandboxRequest(ttl_seconds=10, resources=Resources(cpus=1)), "team"
        )
        with pytest.raises(RateLimited) as over:
            await scheduler.create(CreateSandboxRequest(resources=Resources(cpus=1)), "team")
        assert over.value.details["quota"] == "cpus"
        await scheduler.create(CreateSandboxRequest(resources=Resources(cpus=0.5)), "team")
        with pytest.raises(RateLimited) as full:
            await scheduler.create(CreateSandboxRequest(), "team")  # (counted before cpus)
        assert full.value.details["quota"] == "sandboxes"
        clock.now += 10  # the first one's TTL passed: it no longer counts
        assert first.expires_at is not None and not Lifetime.live(first, clock())
        await scheduler.create(CreateSandboxRequest(resources=Resources(cpus=1)), "team")
    finally:
        await scheduler.close()


def test_the_deadline_heap_stays_bounded_through_repeated_syncs():
    registry = Registry(lambda r: r)
    worker = FakeWorker("aaaaaaaaaaaa", Clock())
    worker.hold(100, "team")
    for round_ in range(50):  # every sync replaces each record (new objects, new deadlines)
        for sid, record in worker.records.items():
            registry[sid] = record.model_copy(update={"expires_at": 5000.0 + round_})
    assert len(registry._deadlines) <= 2 * len(registry) + 64
    assert registry.load("aaaaaaaaaaaa", 5000.0 + 48) == 100
    assert registry.load("aaaaaaaaaaaa", 5000.0 + 49) == 0


def test_a_sync_copy_keeps_its_counts_and_a_new_runtime_reweighs_them():
    doubled = Resources(cpus=2)
    registry = Registry(lambda r: r if r.cpus else doubled)  # unset cpus: the runtime's 2
    worker = FakeWorker("aaaaaaaaaaaa", Clock())
    record = worker.record("sb-aaaaaaaaaaaa-x", "team", 60)
    registry[record.id] = record
    updates = registry.updates
    registry[record.id] = record.model_copy(update={"state": SandboxState.FAILED})
    assert registry.updates == updates  # same sandbox, same counts: nothing recounted
    assert registry.usage("team", 1000).total("cpus") == 2
    registry.reweigh(lambda r: r if r.cpus else Resources(cpus=0.25))
    assert registry.usage("team", 1000).total("cpus") == 0.25
    assert registry.load("aaaaaaaaaaaa", 1059.9) == 1 and registry.load("aaaaaaaaaaaa", 1060) == 0
