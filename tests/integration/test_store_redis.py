"""The state store on a real redis-server (started by this module on a loopback port).

The behaviour suite runs on both backends (``store`` is parametrized over memory and redis);
the rest is Redis-only: races between two stores and two processes, recovery by a new store,
records that do not parse, TTLs set on keys, bulk timings, a saturated pool, no server at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import subprocess
import sys
import time
import uuid

import pytest

from rock_serve.config import StateConfig
from rock_serve.deployments._store import MemoryStore, RedisStore, StateStore, open_store
from rock_serve.errors import InvalidConfig, InvalidRequest, RuntimeUnavailable
from rock_serve.protocol import SandboxRecord
from rock_serve.protocol.api import StateChange
from tests._redis import RedisServer, free_port, have_redis_server

redis = pytest.importorskip("redis")

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(not have_redis_server(), reason="needs redis-server"),
]


def record(i: int = 0, **update) -> SandboxRecord:
    base = SandboxRecord(
        id=f"sb-w{i % 4}-{i:016x}",
        state="running",
        owner="alice",
        labels={"exp": "a", "seed": str(i)},
        image="python:3.11",
        worker=f"w{i % 4}",
        node_id="f" * 56,
        created_at=1000.0 + i,
        expires_at=4600.0 + i,
        namespace="team-a",
        ray_job_id="0a000000",
        trajectory_id=f"traj-{i}",
        lease_seconds=60.0,
        lease_expires_at=1060.0 + i,
        history=[
            StateChange(state="pending", at=1000.0),
            StateChange(state="starting", at=1000.1),
            StateChange(state="running", at=1000.5),
        ],
    )
    return SandboxRecord.model_validate({**base.model_dump(), **update})


def config(server: RedisServer, prefix: str | None = None, **kw) -> StateConfig:
    return StateConfig(redis_url=server.url, key_prefix=prefix or uuid.uuid4().hex[:12], **kw)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
async def raw(redis_server):
    """A plain redis client, to look at (or spoil) what the store wrote."""
    client = redis.asyncio.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def opened():
    """Open stores with ``opened(config)``; every one is closed at teardown, pass or fail."""
    stores: list[StateStore] = []

    def open_(cfg: StateConfig) -> StateStore:
        stores.append(open_store(cfg))
        return stores[-1]

    yield open_
    for s in stores:
        await s.close()


@pytest.fixture(params=["memory", "redis"])
async def store(request):
    if request.param == "memory":
        s = MemoryStore()
    else:
        s = open_store(config(request.getfixturevalue("redis_server")))
        assert isinstance(s, RedisStore)
    assert s.name == request.param
    yield s
    await s.close()


async def wait_until(check, timeout: float = 5.0) -> float:
    """Poll ``check`` (async) until true; seconds it took. Fails at the deadline."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout, "deadline passed"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


# ---------------------------------------------------------------- both backends


async def test_records_round_trip_every_field(store):
    r = record(1)
    await store.put(r)
    assert await store.get(r.id) == r
    assert await store.load() == [r]
    assert await store.get("sb-w0-missing") is None


async def test_records_do_not_alias(store):
    r = record(1)
    await store.put(r)
    r.labels["exp"] = "changed"
    got = await store.get(r.id)
    assert got is not None and got.labels["exp"] == "a"


async def test_put_upserts_delete_is_idempotent(store):
    await store.put(record(1))
    await store.put(record(1, state="stopping"))
    assert [r.state for r in await store.load()] == ["stopping"]
    await store.delete(record(1).id)
    await store.delete(record(1).id)
    assert await store.load() == [] and await store.get(record(1).id) is None


async def test_put_many_upserts(store):
    await store.put(record(0, state="starting"))
    await store.put_many([record(i) for i in range(1200)])  # more than one HSET chunk
    await store.put_many([])
    loaded = {r.id: r for r in await store.load()}
    assert len(loaded) == 1200 and loaded[record(0).id] == record(0)


async def test_concurrent_claims_have_exactly_one_winner(store):
    results = await asyncio.gather(*(store.claim_token("tok", f"sb-{i}", 60) for i in range(100)))
    winners = [f"sb-{i}" for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert {r for r in results if r is not None} == set(winners)
    assert await store.token_of("tok") == winners[0]
    assert await store.claim_token("tok", winners[0], 60) is None  # the holder again: a retry
    assert await store.claim_token("tok", "sb-late", 60) == winners[0]


async def test_release_is_compare_and_delete(store):
    assert await store.claim_token("tok", "sb-a", 60) is None
    await store.release_token("tok", "sb-b")
    assert await store.token_of("tok") == "sb-a"
    await store.release_token("tok", "sb-a")
    assert await store.token_of("tok") is None
    assert await store.claim_token("tok", "sb-b", 60) is None
    await store.release_token("tok")
    assert await store.token_of("tok") is None
    await store.release_token("never", "sb-a")
    await store.release_token("never")


async def test_tokens_are_independent_and_any_text(store):
    tokens = ["a", "A", "ü-ñ 🙂", "x" * 128, "with:colons:and spaces", "tok\n", "lone \ud800"]
    for i, t in enumerate(tokens):
        assert await store.claim_token(t, f"sb-{i}", 60) is None
    for i, t in enumerate(tokens):
        assert await store.token_of(t) == f"sb-{i}"


async def test_token_and_tombstone_expire(store):
    assert await store.claim_token("tok", "sb-a", 0.2) is None
    await store.tombstone("sb-a", 0.2)
    assert await store.is_tombstoned("sb-a") and not await store.is_tombstoned("sb-b")

    async def token_gone():
        return await store.token_of("tok") is None

    async def tombstone_gone():
        return not await store.is_tombstoned("sb-a")

    assert await wait_until(token_gone) >= 0.1
    await wait_until(tombstone_gone)
    assert await store.claim_token("tok", "sb-b", 60) is None


async def test_claiming_again_keeps_the_first_expiry(store):
    assert await store.claim_token("tok", "sb-a", 0.3) is None
    assert await store.claim_token("tok", "sb-a", 60) is None

    async def gone():
        return await store.token_of("tok") is None

    assert await wait_until(gone) < 3.0


@pytest.mark.parametrize("ttl", [0, -1.0, float("nan")])
async def test_ttl_must_be_positive(store, ttl):
    with pytest.raises(InvalidRequest):
        await store.claim_token("tok", "sb-a", ttl)
    with pytest.raises(InvalidRequest):
        await store.tombstone("sb-a", ttl)


async def test_documents_by_kind(store):  # snapshot records (issue 16)
    assert await store.docs("snapshots") == {}
    await store.doc_put("snapshots", "snap-1", '{"a": 1}')
    await store.doc_put("snapshots", "snap-1", '{"a": 2}')
    await store.doc_put("other", "snap-1", "{}")
    assert await store.docs("snapshots") == {"snap-1": '{"a": 2}'}
    await store.doc_delete("snapshots", "snap-1")
    await store.doc_delete("snapshots", "snap-1")
    assert await store.docs("snapshots") == {} and await store.docs("other") == {"snap-1": "{}"}
    assert await store.load() == []  # documents are not sandbox records


async def test_ping_and_close(store):
    assert await store.ping()
    await store.close()
    await store.close()
    assert not await store.ping()
    with pytest.raises(RuntimeUnavailable):
        await store.get("sb-a")


# ---------------------------------------------------------------- Redis only


async def test_ttls_are_set_on_the_keys(redis_server, raw, opened):
    cfg = config(redis_server)
    s = opened(cfg)
    await s.claim_token("tok", "sb-a", 30)
    await s.tombstone("sb-a", 5)
    await s.put(record(1))
    token_keys = [k async for k in raw.scan_iter(f"{cfg.key_prefix}:token:*")]
    digest = hashlib.sha256(b"tok").hexdigest()  # hashed: the token is never a key name
    assert token_keys == [f"{cfg.key_prefix}:token:{digest}".encode()]
    assert 29_000 < await raw.pttl(token_keys[0]) <= 30_000
    assert 4_000 < await raw.pttl(f"{cfg.key_prefix}:tombstone:sb-a") <= 5_000
    assert await raw.ttl(f"{cfg.key_prefix}:sandboxes") == -1  # records never expire
    assert sorted(await raw.keys(f"{cfg.key_prefix}:*")) == sorted(
        [f"{cfg.key_prefix}:sandboxes".encode(), token_keys[0]]
        + [f"{cfg.key_prefix}:tombstone:sb-a".encode()]
    )


async def test_two_stores_race_for_tokens(redis_server, opened):
    cfg = config(redis_server)
    a, b = opened(cfg), opened(cfg)
    tokens = [f"tok-{i}" for i in range(50)]
    calls = [
        store.claim_token(t, f"sb-{name}-{t}-{k}", 60)
        for t in tokens
        for k in range(3)
        for name, store in (("a", a), ("b", b))
    ]
    results = await asyncio.gather(*calls)
    by_token: dict[str, list[str | None]] = {}
    for i, result in enumerate(results):
        by_token.setdefault(tokens[i // 6], []).append(result)
    for t, outcomes in by_token.items():
        assert outcomes.count(None) == 1, (t, outcomes)
        winner = await a.token_of(t)
        assert winner is not None and await b.token_of(t) == winner
        assert {o for o in outcomes if o is not None} == {winner}


_RACER = """
import asyncio, json, random, sys, time
from rock_serve.config import StateConfig
from rock_serve.deployments._store import open_store

async def main(url, prefix, name, n):
    import redis.asyncio as r
    store = open_store(StateConfig(redis_url=url, key_prefix=prefix))
    raw = r.Redis.from_url(url)
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while not await raw.exists(prefix + ":go"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)
    order = list(range(n))
    random.Random(name).shuffle(order)  # each process contends in its own order
    results = await asyncio.gather(
        *(store.claim_token(f"tok-{i}", f"sb-{name}-{i}", 60) for i in order)
    )
    print(json.dumps(dict(zip(order, results))), flush=True)
    await raw.aclose()
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


async def test_two_processes_race_for_the_same_tokens(redis_server, raw, opened):
    """Two "Schedulers" in two processes claim the same 300 tokens at once."""
    prefix, n = uuid.uuid4().hex[:12], 300
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, redis_server.url, prefix, name, str(n)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert await asyncio.to_thread(p.stdout.readline) == "ready\n"
        await raw.set(f"{prefix}:go", 1)
        outs = [await asyncio.to_thread(p.communicate, timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    a, b = ({int(k): v for k, v in json.loads(out.splitlines()[-1]).items()} for out, _ in outs)
    check = opened(StateConfig(redis_url=redis_server.url, key_prefix=prefix))
    wins = {"a": 0, "b": 0}
    for i in range(n):
        bound = await check.token_of(f"tok-{i}")
        if a[i] is None:  # a won: b saw a's id
            assert b[i] == bound == f"sb-a-{i}"
            wins["a"] += 1
        else:
            assert b[i] is None and a[i] == bound == f"sb-b-{i}"
            wins["b"] += 1
    assert sum(wins.values()) == n
    print(f"\ntwo-process race over {n} tokens: wins {wins}")


async def test_a_new_store_recovers_everything(redis_server, opened):
    cfg = config(redis_server)
    first = opened(cfg)
    records = [record(i) for i in range(20)]
    await first.put_many(records[:10])
    for r in records[10:]:
        await first.put(r)
    await first.delete(records[0].id)
    await first.claim_token("tok", records[1].id, 60)
    await first.tombstone(records[0].id, 60)
    await first.close()

    second = opened(cfg)  # a restarted Scheduler
    loaded = sorted(await second.load(), key=lambda r: r.id)
    assert loaded == sorted(records[1:], key=lambda r: r.id)
    assert await second.token_of("tok") == records[1].id
    assert await second.claim_token("tok", "sb-other", 60) == records[1].id
    assert await second.is_tombstoned(records[0].id)


async def test_key_prefixes_keep_clusters_apart(redis_server, opened):
    a, b = opened(config(redis_server)), opened(config(redis_server))
    await a.put(record(1))
    await a.claim_token("tok", "sb-a", 60)
    await a.tombstone("sb-a", 60)
    assert await b.load() == [] and await b.token_of("tok") is None
    assert not await b.is_tombstoned("sb-a")
    assert await b.claim_token("tok", "sb-b", 60) is None


async def test_records_that_do_not_parse_are_skipped(redis_server, raw, caplog, opened):
    cfg = config(redis_server)
    s = opened(cfg)
    good = [record(i) for i in range(3)]
    await s.put_many(good)
    key = f"{cfg.key_prefix}:sandboxes"
    other = record(9).model_dump(mode="json")
    await raw.hset(
        key,
        mapping={
            "sb-w0-notjson": b"{not json",
            "sb-w0-notutf8": b"\xff\xfe\x00garbage",
            "sb-w0-wrongschema": json.dumps({"id": "sb-w0-wrongschema", "state": "exploded"}),
            "sb-w0-extrafield": json.dumps({**good[0].model_dump(mode="json"), "from": "v9"}),
            "sb-w0-otherid": json.dumps(other),  # stored under the wrong id
            b"\xff-bad-key": b"{}",
        },
    )
    with caplog.at_level(logging.WARNING, logger="rock_serve.deployments._store"):
        loaded = await s.load()
    assert sorted(loaded, key=lambda r: r.id) == good
    skipped = [m for m in caplog.messages if "skipping record" in m]
    assert len(skipped) == 6
    assert all("garbage" not in m for m in caplog.messages)  # values are not logged
    assert await s.get("sb-w0-notjson") is None
    assert await s.get("sb-w0-otherid") is None


async def hscan_calls(raw) -> int:
    return int((await raw.info("commandstats")).get("cmdstat_hscan", {}).get("calls", 0))


async def test_put_many_and_load_of_1000_records_timed(redis_server, raw, opened):
    cfg = config(redis_server)
    s = opened(cfg)
    records = [record(i) for i in range(1000)]
    assert await s.ping()  # connect first: time the calls, not the handshake
    size = sum(len(r.model_dump_json()) for r in records)
    before = (await raw.info("stats"))["total_commands_processed"]
    t0 = time.perf_counter()
    await s.put_many(records)
    t_put = time.perf_counter() - t0
    commands = (await raw.info("stats"))["total_commands_processed"] - before - 1
    scans = await hscan_calls(raw)
    t0 = time.perf_counter()
    loaded = await s.load()
    t_load = time.perf_counter() - t0
    scans = await hscan_calls(raw) - scans
    t0 = time.perf_counter()
    for r in records[:200]:
        await s.put(r)
    t_put1 = (time.perf_counter() - t0) / 200
    t0 = time.perf_counter()
    for r in records[:200]:
        await s.get(r.id)
    t_get1 = (time.perf_counter() - t0) / 200
    assert sorted(loaded, key=lambda r: r.id) == sorted(records, key=lambda r: r.id)
    assert commands == 2  # two HSETs of 500 in one pipeline
    assert scans <= 3  # about 1,000 records per HSCAN round trip
    print(
        f"\n1,000 records ({size / 1000:.0f} B each): put_many {t_put * 1000:.1f} ms, "
        f"load {t_load * 1000:.1f} ms ({scans} HSCANs); "
        f"one put {t_put1 * 1e6:.0f} us, one get {t_get1 * 1e6:.0f} us"
    )
    assert t_put < 2.0 and t_load < 2.0


async def test_a_saturated_pool_queues_instead_of_failing(redis_server, opened):
    s = opened(config(redis_server, max_connections=2))
    await asyncio.gather(*(s.put(record(i)) for i in range(300)))
    results = await asyncio.gather(*(s.claim_token("tok", f"sb-{i}", 60) for i in range(300)))
    assert results.count(None) == 1
    assert len(await s.load()) == 300


async def test_no_server_fails_fast_and_typed(opened):
    s = opened(StateConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    t0 = time.monotonic()
    assert not await s.ping()
    for call in (
        s.load(),
        s.put(record(1)),
        s.get("sb-a"),
        s.delete("sb-a"),
        s.put_many([record(1)]),
        s.claim_token("tok", "sb-a", 60),
        s.release_token("tok", "sb-a"),
        s.release_token("tok"),
        s.token_of("tok"),
        s.tombstone("sb-a", 60),
        s.is_tombstoned("sb-a"),
    ):
        with pytest.raises(RuntimeUnavailable) as info:
            await call
        assert info.value.status == 503 and info.value.retry_after == 1.0
        assert "unavailable" in info.value.message
    assert time.monotonic() - t0 < 3.0


def test_a_bad_url_is_a_config_error():
    with pytest.raises(InvalidConfig):
        RedisStore(StateConfig(redis_url="redis://127.0.0.1:notaport/0"))
    with pytest.raises(InvalidConfig):
        RedisStore(StateConfig())


def test_the_password_stays_out_of_the_store_url():
    s = RedisStore(StateConfig(redis_url="redis://user:hunter2@127.0.0.1:1/0"))
    assert "hunter2" not in s.url and s.url == "redis://user:***@127.0.0.1:1/0"
