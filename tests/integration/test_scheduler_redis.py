"""The Scheduler on a real redis-server: its registry and client tokens outlive a restart, and
a Redis outage degrades it to memory without failing creates."""

from __future__ import annotations

import pytest

from rock_serve.config import ServerArgs
from rock_serve.deployments._store import open_store
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.protocol import CreateSandboxRequest
from tests._redis import RedisServer, have_redis_server
from tests.unit.test_scheduler import A, Clock, FakeDirectory

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(not have_redis_server(), reason="redis-server is not installed"),
]


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    yield server
    server.stop()


@pytest.fixture
async def stack(redis_server):
    made: list[Scheduler] = []
    clock = Clock()
    args = ServerArgs.model_validate(
        {"runtime": {"type": "fake"}, "state": {"redis_url": redis_server.url}}
    )
    directory = FakeDirectory(clock, [A], args)

    def scheduler() -> Scheduler:
        made.append(Scheduler(args, directory, clock, store=open_store(args.state)))
        return made[-1]

    yield scheduler, directory
    for s in made:
        await s.close()
    for worker in directory.workers.values():
        await worker.shutdown()


async def test_registry_and_tokens_survive_a_scheduler_restart(stack):
    make, directory = stack
    first = make()
    record = await first.create(CreateSandboxRequest(client_token="once", owner="o"))
    assert (await first.health()).state_store == "redis"
    await first.close()

    second = make()  # a restarted Scheduler: a new process, the same Redis
    await second.ready()
    assert (await second.get(record.id)).owner == "o"
    again = await second.create(CreateSandboxRequest(client_token="once"))
    assert again.id == record.id
    assert len(await directory.workers[A].list()) == 1


async def test_a_redis_outage_degrades_to_memory_and_recovers(stack, redis_server):
    make, _ = stack
    scheduler = make()
    await scheduler.ready()
    redis_server.stop()
    during = await scheduler.create(CreateSandboxRequest())  # creates never fail for Redis
    health = await scheduler.health()
    assert health.status == "degraded" and not health.state_store_ok
    redis_server.start()
    await scheduler.sync()  # writes the whole registry again
    assert (await scheduler.health()).state_store_ok
    reloaded = open_store(scheduler.args.state)
    try:
        assert during.id in {r.id for r in await reloaded.load()}
    finally:
        await reloaded.close()
