"""The in-memory state store, with an injected clock: no Redis, no Ray, no sleeping.

The behaviour shared with the Redis store is also run on both backends in
tests/integration/test_store_redis.py; this file covers what needs the clock.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys

import pytest
from pydantic import ValidationError

from rock_serve.config import ServerArgs, StateConfig, parse_server_args
from rock_serve.deployments._store import MemoryStore, StateStore, open_store
from rock_serve.errors import InvalidConfig, InvalidRequest, RuntimeUnavailable
from rock_serve.protocol import SandboxRecord
from rock_serve.protocol.api import StateChange


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(i: int = 0, **update) -> SandboxRecord:
    base = SandboxRecord(
        id=f"sb-w0-{i:016x}",
        state="running",
        owner="alice",
        labels={"exp": "a"},
        worker="w0",
        node_id="n0",
        created_at=1000.0 + i,
        expires_at=4600.0 + i,
        namespace="team-a",
        ray_job_id="0a",
        trajectory_id=f"traj-{i}",
        lease_seconds=60.0,
        lease_expires_at=1060.0 + i,
        history=[StateChange(state="pending", at=1000.0), StateChange(state="running", at=1001.0)],
    )
    return SandboxRecord.model_validate({**base.model_dump(), **update})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(clock):
    s = MemoryStore(clock=clock)
    yield s
    await s.close()


async def test_records_round_trip_every_field(store):
    r = record(1)
    await store.put(r)
    assert await store.get(r.id) == r
    assert await store.load() == [r]
    assert await store.get("sb-w0-missing") is None


async def test_returned_records_do_not_alias_the_stored_ones(store):
    r = record(1)
    await store.put(r)
    r.labels["exp"] = "changed-after-put"
    got = await store.get(r.id)
    assert got is not None and got.labels == {"exp": "a"}
    got.history.append(StateChange(state="stopping", at=2000.0))
    again = await store.get(r.id)
    assert again is not None and len(again.history) == 2


async def test_put_upserts_and_delete_is_idempotent(store):
    await store.put(record(1))
    await store.put(record(1, state="stopping"))
    assert [r.state for r in await store.load()] == ["stopping"]
    await store.delete(record(1).id)
    await store.delete(record(1).id)
    await store.delete("sb-w0-neverexisted")
    assert await store.load() == []


async def test_put_many_upserts_all(store):
    await store.put(record(0, state="starting"))
    await store.put_many([record(i) for i in range(50)])
    await store.put_many([])
    loaded = {r.id: r for r in await store.load()}
    assert len(loaded) == 50
    assert loaded[record(0).id].state == "running"


async def test_claim_binds_once(store):
    assert await store.claim_token("tok", "sb-a", 60) is None
    assert await store.claim_token("tok", "sb-b", 60) == "sb-a"
    assert await store.claim_token("tok", "sb-a", 60) is None  # the holder again (a retry)
    assert await store.token_of("tok") == "sb-a"
    assert await store.claim_token("other", "sb-b", 60) is None
    assert await store.token_of("unknown") is None


async def test_concurrent_claims_have_exactly_one_winner(store):
    results = await asyncio.gather(*(store.claim_token("tok", f"sb-{i}", 60) for i in range(200)))
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    winner = f"sb-{winners[0]}"
    assert {r for r in results if r is not None} == {winner}
    assert await store.token_of("tok") == winner


async def test_claiming_again_keeps_the_first_expiry(store, clock):
    await store.claim_token("tok", "sb-a", 10)
    clock.now += 5
    assert await store.claim_token("tok", "sb-a", 10) is None
    clock.now += 5
    assert await store.token_of("tok") is None


async def test_token_expires_on_the_clock(store, clock):
    assert await store.claim_token("tok", "sb-a", 10) is None
    clock.now += 9.999
    assert await store.token_of("tok") == "sb-a"
    assert await store.claim_token("tok", "sb-b", 10) == "sb-a"
    clock.now += 0.001
    assert await store.token_of("tok") is None
    assert await store.claim_token("tok", "sb-b", 10) is None
    assert await store.token_of("tok") == "sb-b"


async def test_release_is_compare_and_delete(store):
    await store.claim_token("tok", "sb-a", 60)
    await store.release_token("tok", "sb-other")  # bound to someone else: kept
    assert await store.token_of("tok") == "sb-a"
    await store.release_token("tok", "sb-a")
    assert await store.token_of("tok") is None
    await store.claim_token("tok", "sb-b", 60)
    await store.release_token("tok")  # unconditional
    assert await store.token_of("tok") is None
    await store.release_token("never-bound")
    await store.release_token("never-bound", "sb-a")


async def test_released_token_can_be_claimed_again(store):
    await store.claim_token("tok", "sb-a", 60)
    await store.release_token("tok", "sb-a")
    assert await store.claim_token("tok", "sb-b", 60) is None


async def test_tombstone_expires_on_the_clock(store, clock):
    assert not await store.is_tombstoned("sb-a")
    await store.tombstone("sb-a", 60)
    assert await store.is_tombstoned("sb-a")
    clock.now += 59.9
    assert await store.is_tombstoned("sb-a")
    clock.now += 0.1
    assert not await store.is_tombstoned("sb-a")


async def test_a_later_tombstone_replaces_the_expiry(store, clock):
    await store.tombstone("sb-a", 60)
    clock.now += 30
    await store.tombstone("sb-a", 60)  # now lasts until +90
    clock.now += 31  # the first expiry (+60) passed
    assert await store.is_tombstoned("sb-a")
    clock.now += 29
    assert not await store.is_tombstoned("sb-a")


async def test_expired_entries_are_dropped_not_kept_forever(store, clock):
    for i in range(1000):
        await store.claim_token(f"tok-{i}", f"sb-{i}", 1)
        await store.tombstone(f"sb-{i}", 1)
    clock.now += 1
    assert await store.token_of("tok-0") is None
    assert store._tokens == {} and store._tombstones == {} and store._expiry == []


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf])
async def test_ttl_must_be_positive(store, ttl):
    with pytest.raises(InvalidRequest):
        await store.claim_token("tok", "sb-a", ttl)
    with pytest.raises(InvalidRequest):
        await store.tombstone("sb-a", ttl)
    assert await store.token_of("tok") is None


async def test_closed_store_refuses_calls_and_pings_false(clock):
    s = MemoryStore(clock=clock)
    await s.put(record(1))
    assert await s.ping()
    await s.close()
    await s.close()
    assert not await s.ping()
    with pytest.raises(RuntimeUnavailable) as info:
        await s.load()
    assert info.value.retry_after is not None
    with pytest.raises(RuntimeUnavailable):
        await s.claim_token("tok", "sb-a", 60)


async def test_open_store_is_memory_without_redis_url():
    s: StateStore = open_store(StateConfig())
    assert isinstance(s, MemoryStore) and s.name == "memory"
    assert await s.ping()
    await s.close()


def test_state_config_lives_on_server_args():
    assert ServerArgs().state == StateConfig()
    assert StateConfig().redis_url is None and StateConfig().key_prefix == "rock"
    args = parse_server_args(
        {"state": {"redis_url": "redis://127.0.0.1:6379/0", "key_prefix": "c1"}}
    )
    assert args.state.redis_url == "redis://127.0.0.1:6379/0" and args.state.key_prefix == "c1"
    with pytest.raises(InvalidConfig):
        parse_server_args({"state": {"redis_url": "http://x"}})
    with pytest.raises(InvalidConfig):
        parse_server_args({"state": {"unknown": 1}})


@pytest.mark.parametrize(
    "bad",
    [
        {"key_prefix": ""},
        {"key_prefix": "a:b"},
        {"key_prefix": "a b"},
        {"token_ttl_seconds": 0},
        {"call_timeout_seconds": 0},
        {"max_connections": 0},
    ],
)
def test_state_config_refuses_bad_values(bad):
    with pytest.raises(ValidationError):
        StateConfig(**bad)


def test_the_redis_password_stays_out_of_repr():
    config = StateConfig(redis_url="redis://:hunter2@redis.internal:6379/0")
    assert "hunter2" not in repr(config) and "hunter2" not in repr(ServerArgs(state=config))


def test_the_store_module_imports_neither_ray_nor_redis():
    code = (
        "import sys, rock_serve.deployments._store as s, rock_serve.config as c;"
        "s.open_store(c.StateConfig());"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'redis'));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
