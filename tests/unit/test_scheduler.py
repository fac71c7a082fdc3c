"""Scheduler logic through its seams (a WorkerDirectory of real Workers on the fake runtime,
and an injected clock): no Ray needed."""

from __future__ import annotations

import asyncio

import pytest

from rock_serve.config import ServerArgs
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.deployments.worker import Worker
from rock_serve.errors import InvalidRequest, RateLimited, RuntimeUnavailable, SandboxNotFound
from rock_serve.protocol import CreateSandboxRequest
from rock_serve.protocol.ops import StatsOp
from rock_serve.runtime.fake import FakeRuntime


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeDirectory:
    """The seam: nodes are a list, each node's Worker is a real Worker on the fake runtime."""

    def __init__(self, clock: Clock, nodes: list[str], args: ServerArgs) -> None:
        self.clock, self.nodes, self.args = clock, nodes, args
        self.workers: dict[str, Worker] = {}
        self.runtimes: dict[str, GatedRuntime] = {}
        self.dead: set[str] = set()

    async def alive_nodes(self):
        return list(self.nodes)

    async def ensure(self, node_id):
        worker = self.workers.get(node_id)
        if worker is None:
            runtime = self.runtimes[node_id] = GatedRuntime()
            worker = Worker(self.args, node_id[:12], node_id, self.clock, runtime=runtime)
            await worker.ready()
            self.workers[node_id] = worker
        return worker

    async def dead_jobs(self, job_ids):
        return job_ids & self.dead


class GatedRuntime(FakeRuntime):
    """The fake runtime, whose creates can be held at a gate (to keep them in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.waiting = 0

    async def create(self, sandbox_id, spec):
        if self.gate is not None:
            self.waiting += 1
            await self.gate.wait()
        return await super().create(sandbox_id, spec)


_MADE: list[Scheduler] = []


@pytest.fixture(autouse=True)
async def _close_schedulers():
    yield
    while _MADE:
        scheduler = _MADE.pop()
        await scheduler.close()
        directory = scheduler._directory
        assert isinstance(directory, FakeDirectory)
        for worker in directory.workers.values():
            await worker.shutdown()


def _scheduler(nodes: list[str], **args) -> tuple[Scheduler, FakeDirectory, Clock]:
    clock = Clock()
    server_args = ServerArgs.model_validate(
        {"runtime": {"type": "fake"}, "max_sandboxes_per_node": 2, **args}
    )
    directory = FakeDirectory(clock, nodes, server_args)
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
    assert await directory.workers[A].reap() == [record.id]
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
    stale = await worker.list()  # the Worker's answer, taken before the create
    gate = asyncio.Event()

    async def slow_list():
        await gate.wait()
        return stale

    create = worker.create

    async def create_started_earlier(sandbox_id, req, ttl, namespace):
        # The runtime stamps created_at when it began making the sandbox: before the listing.
        record = await create(sandbox_id, req, ttl, namespace)
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


async def _until(predicate, what: str) -> None:
    """Let the event loop run until ``predicate()`` holds (bounded)."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def test_creates_over_the_in_flight_cap_queue_in_order_and_then_go():
    scheduler, directory, _ = _scheduler([A], max_creates_in_flight=1, max_sandboxes_per_node=8)
    await scheduler.ready()
    runtime = directory.runtimes[A]
    runtime.gate = asyncio.Event()
    creates = [
        asyncio.ensure_future(scheduler.create(CreateSandboxRequest(labels={"n": str(i)})))
        for i in range(3)
    ]
    await _until(lambda: runtime.waiting == 1 and len(scheduler._queue) == 2, "one in flight")
    runtime.gate.set()
    records = await asyncio.gather(*creates)
    assert [r.labels["n"] for r in sorted(records, key=lambda r: r.created_at)] == ["0", "1", "2"]
    assert scheduler._inflight_total == 0 and scheduler._queue == []


async def test_a_full_queue_and_a_queue_timeout_answer_429_with_the_position():
    scheduler, directory, _ = _scheduler(
        [A],
        max_creates_in_flight=1,
        max_queued_creates=2,
        create_queue_timeout_seconds=0.05,
        max_sandboxes_per_node=8,
    )
    await scheduler.ready()
    runtime = directory.runtimes[A]
    runtime.gate = asyncio.Event()
    first = asyncio.ensure_future(scheduler.create(CreateSandboxRequest()))
    await _until(lambda: runtime.waiting == 1, "first create in flight")
    queued = [asyncio.ensure_future(scheduler.create(CreateSandboxRequest())) for _ in range(2)]
    await _until(lambda: len(scheduler._queue) == 2, "two queued")
    with pytest.raises(RateLimited) as full:
        await scheduler.create(CreateSandboxRequest())
    assert full.value.details["queue_length"] == 2 and full.value.retry_after == 1.0
    timed_out = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(e, RateLimited) for e in timed_out)
    positions = sorted(e.details["queue_position"] for e in timed_out)  # type: ignore[union-attr]
    assert positions[0] == 1
    runtime.gate.set()
    await first
    assert len((await scheduler.list()).items) == 1  # nothing stuck, nothing extra


async def test_namespace_quotas_refuse_with_429():
    scheduler, _, _ = _scheduler(
        [A],
        max_sandboxes_per_node=8,
        quotas={"small": {"max_sandboxes": 1, "max_memory_mb": 512}},
        default_quota={"max_cpus": 2},
    )
    await scheduler.create(CreateSandboxRequest(), namespace="small")
    with pytest.raises(RateLimited) as info:
        await scheduler.create(CreateSandboxRequest(), namespace="small")
    assert info.value.details["quota"] == "sandboxes"
    await scheduler.create(CreateSandboxRequest(resources={"cpus": 2}), namespace="other")
    with pytest.raises(RateLimited) as cpus:
        await scheduler.create(CreateSandboxRequest(resources={"cpus": 0.5}), namespace="other")
    assert cpus.value.details["quota"] == "cpus"


async def test_client_tokens_are_per_namespace_and_a_delete_racing_a_create_leaves_nothing():
    scheduler, directory, _ = _scheduler([A], max_sandboxes_per_node=8)
    await scheduler.ready()
    one = await scheduler.create(CreateSandboxRequest(client_token="t"), namespace="x")
    other = await scheduler.create(CreateSandboxRequest(client_token="t"), namespace="y")
    assert one.id != other.id
    runtime = directory.runtimes[A]
    runtime.gate = asyncio.Event()
    create = asyncio.ensure_future(
        scheduler.create(CreateSandboxRequest(client_token="race"), namespace="x")
    )
    await _until(lambda: runtime.waiting == 1, "create in flight")
    delete = asyncio.ensure_future(scheduler.delete_by_token("race", namespace="x"))
    runtime.gate.set()
    made = await create
    assert await delete == made.id
    assert made.id not in {info.id for info in await runtime.list()}
    with pytest.raises(SandboxNotFound):
        await scheduler.delete_by_token("never", namespace="x")


async def test_sandboxes_of_a_dead_ray_job_are_reaped_on_sync():
    scheduler, directory, _ = _scheduler([A], max_sandboxes_per_node=8)
    mine = await scheduler.create(CreateSandboxRequest(ray_job_id="0a000000"))
    theirs = await scheduler.create(CreateSandboxRequest(ray_job_id="0b000000"))
    directory.dead.add("0a000000")
    await scheduler.sync()
    assert [r.id for r in (await scheduler.list()).items] == [theirs.id]
    assert mine.id not in {info.id for info in await directory.runtimes[A].list()}
    with pytest.raises(SandboxNotFound, match="job_dead"):
        await directory.workers[A].op(mine.id, StatsOp())


async def test_configure_reaches_the_workers_and_changes_limits():
    scheduler, directory, _ = _scheduler([A])
    await scheduler.ready()
    await scheduler.configure(scheduler.args.model_copy(update={"max_sandboxes_per_node": 1}))
    assert directory.workers[A].args.max_sandboxes_per_node == 1
    await scheduler.create(CreateSandboxRequest())
    with pytest.raises(RateLimited):
        await scheduler.create(CreateSandboxRequest())


async def test_placement_prefers_workers_that_hold_the_image():
    scheduler, _, _ = _scheduler([A, B], max_sandboxes_per_node=3)
    # b holds the image (a prepull told the Scheduler); a is emptier but would have to pull
    await scheduler.note_image("bbbbbbbbbbbb", "python:3.11")
    first = await scheduler.create(CreateSandboxRequest(image="docker.io/library/python:3.11"))
    assert first.worker == "bbbbbbbbbbbb"
    # a create of another image still goes to the least loaded Worker, which then holds it
    other = await scheduler.create(CreateSandboxRequest(image="busybox"))
    assert other.worker == "aaaaaaaaaaaa"
    again = await scheduler.create(CreateSandboxRequest(image="busybox:latest"))
    assert again.worker == "aaaaaaaaaaaa"  # a holds busybox now, although b is as loaded
    # holders full: a cold pull on the Worker with room
    await scheduler.create(CreateSandboxRequest(image="python:3.11"))
    await scheduler.create(CreateSandboxRequest(image="python:3.11"))
    spill = await scheduler.create(CreateSandboxRequest(image="python:3.11"))
    assert spill.worker == "aaaaaaaaaaaa"
    await scheduler.note_image("bbbbbbbbbbbb", "python:3.11", held=False)
    assert "bbbbbbbbbbbb" not in scheduler._holders["docker.io/library/python:3.11"]
