"""Scheduler logic through its seam (a fake WorkerDirectory and clock): no Ray needed.

These belong in tests/unit; they live here until that folder is free to edit.
"""

from __future__ import annotations

import asyncio

import pytest

from rock_serve.config import ServerArgs
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.errors import InvalidRequest, RateLimited, RuntimeUnavailable, SandboxNotFound
from rock_serve.protocol import CreateSandboxRequest, SandboxRecord, WorkerStatus


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeWorker:
    def __init__(self, name: str, node_id: str, clock: Clock) -> None:
        self.name, self.node_id, self.clock = name, node_id, clock
        self.records: dict[str, SandboxRecord] = {}

    async def create(self, sandbox_id, req, ttl):
        record = SandboxRecord(
            id=sandbox_id,
            state="running",
            owner=req.owner,
            labels=req.labels,
            worker=self.name,
            node_id=self.node_id,
            created_at=self.clock(),
            expires_at=self.clock() + ttl,
        )
        self.records[sandbox_id] = record
        return record

    async def remove(self, sandbox_id):
        if self.records.pop(sandbox_id, None) is None:
            raise SandboxNotFound(sandbox_id)

    async def list(self):
        return list(self.records.values())

    async def status(self):
        return WorkerStatus(
            name=self.name,
            node_id=self.node_id,
            alive=True,
            sandboxes=len(self.records),
            capacity=2,
            runtime="fake",
        )


class FakeDirectory:
    def __init__(self, clock: Clock, nodes: list[str]) -> None:
        self.clock, self.nodes = clock, nodes
        self.workers: dict[str, FakeWorker] = {}

    async def alive_nodes(self):
        return list(self.nodes)

    async def ensure(self, node_id):
        worker = self.workers.get(node_id)
        if worker is None:
            worker = self.workers[node_id] = FakeWorker(node_id[:12], node_id, self.clock)
        return worker


_MADE: list[Scheduler] = []


@pytest.fixture(autouse=True)
async def _close_schedulers():
    yield
    while _MADE:
        await _MADE.pop().close()


def _scheduler(nodes: list[str], **args) -> tuple[Scheduler, FakeDirectory, Clock]:
    clock = Clock()
    directory = FakeDirectory(clock, nodes)
    server_args = ServerArgs.model_validate(
        {"runtime": {"type": "fake"}, "max_sandboxes_per_node": 2, **args}
    )
    scheduler = Scheduler(server_args, directory, clock)
    _MADE.append(scheduler)
    return scheduler, directory, clock


A, B = "a" * 56, "b" * 56


async def test_places_on_the_least_loaded_worker_until_full():
    scheduler, directory, _ = _scheduler([A, B])
    records = [await scheduler.create(CreateSandboxRequest()) for _ in range(4)]
    assert sorted(r.worker for r in records) == ["aaaaaaaaaaaa"] * 2 + ["bbbbbbbbbbbb"] * 2
    assert all(r.id.startswith(f"sb-{r.worker}-") for r in records)
    with pytest.raises(RateLimited) as info:
        await scheduler.create(CreateSandboxRequest())
    assert info.value.retry_after == 1.0
    await scheduler.delete(records[0].id)
    assert (await scheduler.create(CreateSandboxRequest())).worker == records[0].worker


async def test_no_workers_and_bad_ttl_are_typed_errors():
    scheduler, _, _ = _scheduler([])
    with pytest.raises(RuntimeUnavailable):
        await scheduler.create(CreateSandboxRequest())
    scheduler, _, _ = _scheduler([A], max_ttl_seconds=60, default_ttl_seconds=30)
    with pytest.raises(InvalidRequest):
        await scheduler.create(CreateSandboxRequest(ttl_seconds=61))


async def test_client_token_is_idempotent():
    scheduler, _, _ = _scheduler([A])
    first = await scheduler.create(CreateSandboxRequest(client_token="t"))
    again = await scheduler.create(CreateSandboxRequest(client_token="t"))
    assert again.id == first.id
    assert len((await scheduler.list()).items) == 1


async def test_expired_records_are_hidden_and_dropped_after_the_worker_reaps():
    scheduler, directory, clock = _scheduler([A])
    record = await scheduler.create(CreateSandboxRequest(ttl_seconds=10, owner="o"))
    assert [r.id for r in (await scheduler.list(owner="o")).items] == [record.id]
    clock.now += 11
    with pytest.raises(SandboxNotFound):
        await scheduler.get(record.id)
    assert (await scheduler.list()).items == []
    directory.workers[A].records.clear()  # the Worker reaped it
    await scheduler.sync()
    assert record.id not in scheduler._records


async def test_registry_is_rebuilt_from_workers_and_lost_nodes_are_reported():
    scheduler, directory, _ = _scheduler([A, B])
    made = [await scheduler.create(CreateSandboxRequest()) for _ in range(2)]
    fresh = Scheduler(scheduler.args, directory, scheduler._clock)  # a restarted Scheduler
    _MADE.append(fresh)
    assert {r.id for r in (await fresh.list()).items} == {r.id for r in made}
    directory.nodes.remove(B)
    await fresh.sync()
    states = {r.worker: (r.state.value, r.reason) for r in (await fresh.list()).items}
    assert states["bbbbbbbbbbbb"] == ("failed", "lost")
    assert states["aaaaaaaaaaaa"] == ("running", None)
    health = await fresh.health()
    assert [w.name for w in health.workers] == ["aaaaaaaaaaaa"] and health.status == "ok"


async def test_a_listing_older_than_a_create_does_not_drop_it():
    scheduler, directory, clock = _scheduler([A])
    await scheduler.ready()
    worker = directory.workers[A]
    stale = list(worker.records.values())  # the Worker's answer, taken before the create
    gate = asyncio.Event()

    async def slow_list():
        await gate.wait()
        return stale

    create = worker.create

    async def create_started_earlier(sandbox_id, req, ttl):
        # The runtime stamps created_at when it began making the sandbox: before the listing.
        record = await create(sandbox_id, req, ttl)
        return record.model_copy(update={"created_at": clock() - 2})

    worker.list = slow_list
    worker.create = create_started_earlier
    clock.now += 1
    syncing = asyncio.ensure_future(scheduler.sync())  # lists now; the answer comes late
    await asyncio.sleep(0)
    clock.now += 1
    record = await scheduler.create(CreateSandboxRequest())
    gate.set()
    await syncing
    assert (await scheduler.get(record.id)).id == record.id
