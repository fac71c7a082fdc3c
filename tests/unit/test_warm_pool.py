"""The warm pool on the fake runtime: targets, take, and a shutdown that leaves nothing behind."""

from __future__ import annotations

import asyncio
import time

from rock_serve.config import ServerArgs
from rock_serve.deployments._warm_pool import WarmPool, pool_targets
from rock_serve.deployments.worker import Worker
from rock_serve.protocol import SandboxSpec
from rock_serve.rocklet.handle import RockletHandle
from rock_serve.runtime.fake import FakeRuntime


class HeldRuntime(FakeRuntime):
    """A fake whose ``start`` waits until released, and whose ``remove`` takes a few turns of the
    event loop (as a real runtime's I/O does)."""

    def __init__(self) -> None:
        super().__init__()
        self.starting = asyncio.Event()
        self.release = asyncio.Event()

    async def start(self, sandbox_id: str) -> RockletHandle:
        self.starting.set()
        await self.release.wait()
        return await super().start(sandbox_id)

    async def remove(self, sandbox_id: str) -> None:
        for _ in range(20):
            await asyncio.sleep(0)
        await super().remove(sandbox_id)


async def test_shutdown_waits_for_a_refill_in_flight_and_removes_what_it_made():
    runtime = HeldRuntime()
    args = ServerArgs.model_validate({"runtime": {"type": "fake"}, "warm_pool_size": 1})
    worker = Worker(args, "w1", "node-1", runtime=runtime)
    await worker.ready()
    await runtime.starting.wait()  # a refill is in flight: created, not yet started
    assert len(await runtime.list()) == 1
    assert await worker.shutdown() == 0
    assert await runtime.list() == []  # the refill was cancelled, awaited and cleaned up


class StubbornRuntime(FakeRuntime):
    """A fake whose ``start`` finishes even when its caller is cancelled (as a start running in
    a thread does)."""

    def __init__(self) -> None:
        super().__init__()
        self.starting = asyncio.Event()
        self.release = asyncio.Event()

    async def start(self, sandbox_id: str) -> RockletHandle:
        self.starting.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            await self.release.wait()
        return await super().start(sandbox_id)


def _pool(runtime: FakeRuntime, args: ServerArgs, room: int = 8) -> WarmPool:
    return WarmPool(
        "w1", "node-1", time.time, lambda: runtime, lambda: pool_targets(args, runtime, room)
    )


async def test_a_refill_that_ignores_the_cancel_is_awaited_and_removed():
    runtime = StubbornRuntime()
    args = ServerArgs.model_validate({"runtime": {"type": "fake"}, "warm_pool_size": 1})
    pool = _pool(runtime, args)
    pool.start()
    await runtime.starting.wait()
    closing = asyncio.ensure_future(pool.shutdown())
    await asyncio.sleep(0)
    assert not closing.done()  # it waits for the refill
    runtime.release.set()
    await closing
    assert await runtime.list() == [] and len(pool) == 0


async def test_take_serves_the_matching_pool_and_discards_what_cannot_serve():
    runtime = FakeRuntime()
    args = ServerArgs.model_validate(
        {
            "runtime": {"type": "fake"},
            "warm_pool_size": 1,
            "warm_pools": [{"image": "a", "size": 2}],
        }
    )
    pool = _pool(runtime, args, room=2)
    assert [t for _, _, t in pool_targets(args, runtime, 2)] == [1, 1]  # held to the room
    pool.start()
    while len(pool) < 2:
        await asyncio.sleep(0)
    assert pool.take(SandboxSpec(image="b")) is None
    dead = next(b for b in pool.boxes if b.record.image == "a")
    await dead.handle.close()  # its rocklet died while it waited
    assert pool.take(SandboxSpec(image="a")) is None
    box = pool.take(SandboxSpec())
    assert box is not None and box.pool == "" and box.record.image is None
    assert len(pool) == 0
    await pool.shutdown()
    assert {i.id for i in await runtime.list()} == {box.record.id}  # taken: no longer the pool's
    await WarmPool.discard(box)
    assert await runtime.list() == []


def test_runtimes_that_reattach_keep_no_pool():
    args = ServerArgs.model_validate({"runtime": {"type": "fake"}, "warm_pool_size": 3})

    class Docker(FakeRuntime):
        name = "docker"

    assert pool_targets(args, Docker(), 8) == []
    assert pool_targets(args, None, 8) == []
    assert pool_targets(args, FakeRuntime(), 8)[0][2] == 3
