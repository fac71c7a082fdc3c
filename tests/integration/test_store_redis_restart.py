"""The Redis store while its redis-server dies, hangs and comes back (a real server each time).

Every test owns a persistent server (append-only file, fsync always) in its tmp dir; it is
killed, stopped, paused (SIGSTOP) and started again on the same port. The same store object
is used throughout: it must fail fast and typed while Redis is away, and work again after.
"""

from __future__ import annotations

import time

import pytest

from rock_serve.config import StateConfig
from rock_serve.deployments._store import RedisStore, open_store
from rock_serve.errors import RuntimeUnavailable
from rock_serve.protocol import SandboxRecord
from tests._redis import RedisServer, have_redis_server

pytest.importorskip("redis")

pytestmark = [
    pytest.mark.redis,
    pytest.mark.chaos,
    pytest.mark.skipif(not have_redis_server(), reason="needs redis-server"),
]

#: Most seconds a call may take to report an unreachable or hung Redis.
FAIL_FAST = 3.0


def record(i: int) -> SandboxRecord:
    return SandboxRecord(
        id=f"sb-w0-{i:016x}",
        state="running",
        worker="w0",
        node_id="n0",
        created_at=1000.0 + i,
        lease_seconds=30.0,
        lease_expires_at=1030.0 + i,
    )


@pytest.fixture
def server(tmp_path):
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    yield server
    server.stop()


@pytest.fixture
async def store(server):
    s = open_store(StateConfig(redis_url=server.url, key_prefix="chaos"))
    assert isinstance(s, RedisStore)
    yield s
    await s.close()


async def timed_failure(call) -> float:
    """Seconds until ``call`` (a coroutine) raised RuntimeUnavailable."""
    t0 = time.monotonic()
    with pytest.raises(RuntimeUnavailable) as info:
        await call
    elapsed = time.monotonic() - t0
    assert info.value.status == 503 and info.value.retry_after is not None
    return elapsed


async def seed(store: RedisStore) -> list[SandboxRecord]:
    records = [record(i) for i in range(100)]
    await store.put_many(records)
    assert await store.claim_token("tok-old", records[0].id, 600) is None
    await store.tombstone("sb-w0-deleted", 600)
    return records


async def check_recovered(store: RedisStore, records: list[SandboxRecord]) -> None:
    assert sorted(await store.load(), key=lambda r: r.id) == records
    assert await store.token_of("tok-old") == records[0].id
    assert await store.claim_token("tok-old", "sb-w0-other", 600) == records[0].id
    assert await store.claim_token("tok-new", records[1].id, 600) is None  # script re-sent
    await store.release_token("tok-new", records[1].id)
    assert await store.token_of("tok-new") is None
    assert await store.is_tombstoned("sb-w0-deleted")
    await store.put(record(100))
    assert await store.get(record(100).id) == record(100)


@pytest.mark.parametrize("how", ["killed", "stopped"])
async def test_restart_same_store_recovers(server, store, how):
    records = await seed(store)
    if how == "killed":
        server.kill()
    else:
        server.stop()

    times = {
        "get": await timed_failure(store.get(records[0].id)),
        "put": await timed_failure(store.put(record(200))),
        "put_many": await timed_failure(store.put_many(records[:10])),
        "claim_token": await timed_failure(store.claim_token("tok-x", "sb-x", 60)),
        "load": await timed_failure(store.load()),
    }
    t0 = time.monotonic()
    assert not await store.ping()
    times["ping"] = time.monotonic() - t0
    print(
        f"\nRedis {how}: failure reported in "
        + ", ".join(f"{op} {t * 1000:.1f} ms" for op, t in times.items())
    )
    assert max(times.values()) < FAIL_FAST

    server.start()  # same port, same append-only file
    assert await store.ping()
    await check_recovered(store, records)


@pytest.mark.slow
async def test_a_hung_redis_fails_within_the_deadline(server, store):
    records = await seed(store)
    with server.paused():  # accepts connections, answers nothing
        times = {
            "get": await timed_failure(store.get(records[0].id)),
            "claim_token": await timed_failure(store.claim_token("tok-x", "sb-x", 60)),
            "put_many": await timed_failure(store.put_many(records[:10])),
            "load": await timed_failure(store.load()),
        }
        t0 = time.monotonic()
        assert not await store.ping()
        times["ping"] = time.monotonic() - t0
    print("\nRedis paused: " + ", ".join(f"{op} {t:.2f} s" for op, t in times.items()))
    assert max(times.values()) < FAIL_FAST
    await check_recovered(store, records)


async def test_redis_down_when_the_store_opens(tmp_path):
    """A Scheduler that starts before its Redis: typed failures, then it just works."""
    server = RedisServer(tmp_path / "late", persistent=True)  # not started yet
    s = open_store(StateConfig(redis_url=server.url))
    try:
        assert not await s.ping()
        assert await timed_failure(s.load()) < FAIL_FAST
        server.start()
        assert await s.ping()
        assert await s.load() == []
        await s.put(record(1))
        assert await s.load() == [record(1)]
    finally:
        await s.close()
        server.stop()


async def test_repeated_restarts_under_the_same_store(server, store):
    records = await seed(store)
    for i in range(3):
        server.restart(kill=i % 2 == 0)
        assert len(await store.load()) == 100 + i
        await store.put(record(100 + i))
    assert await store.token_of("tok-old") == records[0].id
