"""The Worker's parts, each on its own against the fake (or local) runtime: the sandbox
table, the idempotency cache, uploads, ptys and adoption. (The warm pool: test_warm_pool.py.)
"""

from __future__ import annotations

import asyncio

import pytest

from rock_serve.config import LocalRuntimeConfig
from rock_serve.deployments import _adoption
from rock_serve.deployments._idempotency import KeyCache
from rock_serve.deployments._ptys import PtyRegistry
from rock_serve.deployments._uploads import QUEUE, Uploads
from rock_serve.deployments._warm_pool import LABEL_WARM
from rock_serve.deployments._worker_table import (
    LABEL_RECORD,
    LABEL_WORKER,
    Box,
    SandboxTable,
    step,
)
from rock_serve.errors import (
    Conflict,
    FileNotFound,
    InvalidRequest,
    NotFound,
    SandboxFailed,
    SandboxNotFound,
    SandboxNotRunning,
    TooLarge,
    UnknownOperation,
)
from rock_serve.protocol import (
    FailureReason,
    SandboxInfo,
    SandboxRecord,
    SandboxSpec,
    SandboxState,
)
from rock_serve.runtime.fake import FakeRuntime


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def sandbox():
    """A started fake sandbox: (runtime, id, handle)."""
    runtime = FakeRuntime()
    await runtime.create("sb-parts", SandboxSpec())
    handle = await runtime.start("sb-parts")
    yield runtime, "sb-parts", handle
    await handle.close()
    await runtime.remove("sb-parts")


def _record(sid: str, **extra) -> SandboxRecord:
    return SandboxRecord(
        id=sid,
        state=SandboxState.RUNNING,
        worker="w1",
        node_id="node-1",
        created_at=1000.0,
        **extra,
    )


# --------------------------------------------------------------------------- table


async def test_the_table_renews_leases_and_remembers_why_sandboxes_went(sandbox):
    runtime, sid, handle = sandbox
    clock = Clock()
    table = SandboxTable(clock, graveyard=2)
    box = Box(_record(sid, lease_seconds=10, expires_at=2000.0), handle, runtime)
    table.add(box, clock.now)
    assert box.record.lease_expires_at == 1010.0 and table.load() == 1
    clock.now += 5
    assert table.live(sid) is box and box.record.lease_expires_at == 1015.0
    table.creating.add("sb-next")
    assert table.load() == 2 and table.taken("sb-next") and not table.taken("sb-other")
    assert table.expired(1016.0) == [(sid, "lease_expired")]
    assert table.counts() == ({"running": 1}, {"default": 1})

    step(box.record, SandboxState.PAUSED, clock.now)
    with pytest.raises(SandboxNotRunning):
        table.live(sid)
    assert table.lookup(sid) is box  # the control plane still sees it
    box.record.reason = FailureReason.AGENT_EXITED
    step(box.record, SandboxState.FAILED, clock.now)
    with pytest.raises(SandboxFailed) as failed:
        table.live(sid)
    assert failed.value.details["reason"] == "agent_exited"
    assert not table.still_running(box)

    assert table.pop(sid, "lease_expired") is box
    with pytest.raises(SandboxNotFound) as gone:
        table.live(sid)
    assert gone.value.details == {"reason": "lease_expired", "removed_at": clock.now}
    with pytest.raises(SandboxNotFound):
        table.pop(sid, "again")
    for other in ("sb-a", "sb-b"):  # the graveyard is bounded: the oldest is forgotten
        table.add(Box(_record(other), handle, runtime), clock.now)
        table.pop(other, "deleted")
    assert list(table.graveyard) == ["sb-a", "sb-b"]
    assert "reason" not in table.not_found(sid).details


# --------------------------------------------------------------------------- idempotency


async def test_the_key_cache_shares_one_run_per_key_within_its_bounds():
    clock, runs = Clock(), []
    cache = KeyCache(clock, size=2, seconds=60)
    held, free = asyncio.Event(), asyncio.Event()
    free.set()

    async def work(tag: str, gate: asyncio.Event) -> str:
        runs.append(tag)
        await gate.wait()
        return tag

    first = asyncio.ensure_future(cache.once("k1", work("first", held)))
    resend = asyncio.ensure_future(cache.once("k1", work("resend", held)))  # closed, never run
    await asyncio.sleep(0)
    for key in ("k2", "k3"):  # over the size, but k1 is still running: it is kept
        assert await cache.once(key, work(key, free)) == key
    assert len(cache) == 3 and "k1" in cache
    held.set()
    assert await first == await resend == "first"
    assert runs == ["first", "k2", "k3"]
    await cache.once("k4", work("k4", free))  # finished ones beyond the size go, oldest first
    assert len(cache) == 2 and "k1" not in cache and "k2" not in cache
    assert await cache.once(None, work("unkeyed", free)) == "unkeyed"  # no key: every time
    clock.now += 61  # past the horizon: finished keys go as new ones arrive
    await cache.once("k5", work("k5", free))
    assert len(cache) == 1 and "k5" in cache


async def test_a_keyed_error_is_shared_and_a_cancelled_caller_does_not_cancel_the_work():
    cache, gate = KeyCache(Clock()), asyncio.Event()

    async def fails() -> None:
        await gate.wait()
        raise Conflict("once")

    waiting = asyncio.ensure_future(cache.once("k", fails()))
    await asyncio.sleep(0)
    waiting.cancel()
    gate.set()
    with pytest.raises(Conflict):
        await cache.once("k", fails())


# --------------------------------------------------------------------------- uploads


async def test_uploads_write_files_and_archives_in_chunks(sandbox):
    _runtime, sid, handle = sandbox
    renewed: list[str] = []
    uploads = Uploads(Clock(), lambda: 1 << 20, lambda: 60.0)
    uid = uploads.open(sid, handle, "file", "/tmp/up", None)
    for piece in (b"hello ", b"world"):
        await uploads.chunk(uid, piece, renew=renewed.append)
    assert await uploads.close(uid) == 11 and renewed == [sid, sid]
    assert await handle.read_file("/tmp/up") == b"hello world"
    assert len(uploads) == 0

    # The fake rocklet has no tar extraction: the rocklet's error reaches the sender, and the
    # upload is gone.
    uid = uploads.open(sid, handle, "archive", "/tmp/dir", None)
    with pytest.raises(UnknownOperation):
        for _ in range(QUEUE + 2):
            await uploads.chunk(uid, b"x" * 10)
        await uploads.close(uid)
    assert uid not in uploads

    with pytest.raises(InvalidRequest):
        uploads.open(sid, handle, "zip", "/tmp/x", None)
    with pytest.raises(NotFound):
        await uploads.chunk(uid, b"late")


async def test_uploads_are_capped_and_idle_ones_reaped(sandbox):
    _runtime, sid, handle = sandbox
    clock = Clock()
    uploads = Uploads(clock, lambda: 8, lambda: 30.0)
    big = uploads.open(sid, handle, "file", "/tmp/big", None)
    await uploads.chunk(big, b"12345")
    with pytest.raises(TooLarge):
        await uploads.chunk(big, b"6789")
    assert big not in uploads
    idle = uploads.open(sid, handle, "file", "/tmp/idle", None)
    busy = uploads.open(sid, handle, "file", "/tmp/busy", None)
    clock.now += 20
    await uploads.chunk(busy, b"x")
    clock.now += 20
    assert await uploads.reap(clock.now) == [idle]
    assert idle not in uploads and busy in uploads
    await uploads.close_all()
    assert len(uploads) == 0
    with pytest.raises(FileNotFound):
        await handle.read_file("/tmp/big")  # nothing partial is kept


# --------------------------------------------------------------------------- ptys


async def test_the_pty_registry_holds_a_pty_while_it_runs(tmp_path):
    runtime = LocalRuntimeConfig(state_dir=str(tmp_path / "local")).build()
    await runtime.create("sb-pty", SandboxSpec())
    handle = await runtime.start("sb-pty")
    ptys = PtyRegistry()
    try:
        async with ptys.open("p1", handle, 80, 24) as p:
            assert ptys.get("p1") is p and len(ptys) == 1
            with pytest.raises(Conflict):
                async with ptys.open("p1", handle, 80, 24):
                    pass
            await ptys.get("p1").send(b"exit 3\n")
            assert await p.wait() == 3
        with pytest.raises(NotFound):
            ptys.get("p1")
        await ptys.kill("p1")  # ended: a no-op
        assert len(ptys) == 0
    finally:
        await handle.close()
        await runtime.remove("sb-pty")
        await runtime.close()


# --------------------------------------------------------------------------- adoption


def _info(sid: str, state: SandboxState, labels: dict[str, str], **extra) -> SandboxInfo:
    return SandboxInfo(
        id=sid, state=state, runtime="fake", labels=labels, created_at=1000.0, **extra
    )


def test_adoptable_takes_only_live_labelled_sandboxes_within_their_ttl():
    raw = _record("sb-x", expires_at=5000.0).model_dump_json()
    ok = {LABEL_WORKER: "w1", LABEL_RECORD: raw}
    assert _adoption.adoptable(_info("sb-x", SandboxState.RUNNING, ok), 1000.0) is not None
    exited = _info("sb-x", SandboxState.FAILED, ok, reason=FailureReason.AGENT_EXITED)
    assert _adoption.adoptable(exited, 1000.0) is not None  # a container whose agent died
    assert _adoption.adoptable(_info("sb-x", SandboxState.RUNNING, ok), 6000.0) is None
    assert _adoption.adoptable(_info("sb-x", SandboxState.STOPPED, ok), 1000.0) is None
    warm = {**ok, LABEL_WARM: "1"}
    assert _adoption.adoptable(_info("sb-x", SandboxState.RUNNING, warm), 1000.0) is None
    bad = {LABEL_WORKER: "w1", LABEL_RECORD: "{not json"}
    assert _adoption.adoptable(_info("sb-x", SandboxState.RUNNING, bad), 1000.0) is None
    assert _adoption.adoptable(_info("sb-x", SandboxState.RUNNING, {}), 1000.0) is None


async def test_sweep_adopts_what_it_can_and_removes_the_rest():
    runtime = FakeRuntime()
    record = _record("sb-keep", expires_at=5000.0)
    labels = {LABEL_WORKER: "w1", LABEL_RECORD: record.model_dump_json()}
    for sid, extra in (("sb-keep", {}), ("sb-warm", {LABEL_WARM: "1"}), ("sb-known", {})):
        await runtime.create(sid, SandboxSpec(labels={**labels, **extra}))
        await runtime.start(sid)
    await runtime.create("sb-theirs", SandboxSpec(labels={LABEL_WORKER: "w2"}))
    taken: list[SandboxRecord] = []

    async def take(rt, info) -> bool:
        adopted = await _adoption.adopt(rt, info, "w1", "node-2", 1000.0)
        if adopted is not None:
            taken.append(adopted[0])
            await adopted[1].close()
        return adopted is not None

    removed = await _adoption.sweep(runtime, "w1", {"sb-known"}, take)
    assert removed == ["sb-warm"]
    [adopted] = taken
    assert adopted.id == "sb-keep" and adopted.node_id == "node-2"
    assert adopted.history[-1].reason == "adopted"
    assert {i.id for i in await runtime.list()} == {"sb-keep", "sb-known", "sb-theirs"}
    await runtime.close()
